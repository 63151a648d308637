package engine

import (
	"context"
	"fmt"
	"time"

	"github.com/peftd/peftd/runtime/sample"
)

// A step in three parts, so that a caller can plan the next step while the
// device runs this one: Prepare (validate, reserve pages, build the
// metadata: host work only, allowed while a step is in flight), Launch
// (issue it; one step in flight at a time) and Flight.Wait (its tokens).
// The scheduler prepares step N+1 during step N and launches it as soon as
// N's tokens are back. StepSample is the three in one call.

// Planned is a step planned by Prepare and not yet launched.
type Planned struct {
	e       *Engine
	in      []Input
	meta    *StepMeta
	outRow  []int // first logits row of each input
	first   []int // first row of meta.Tokens of each input
	set     []bool
	discard []bool
	prep    time.Duration
	used    bool
}

// Prepare validates a step, gives its sequences the pages it needs and
// builds its metadata. A sequence with tokens in the step in flight is
// placed after them (its Next length). Inputs marked Later get their token
// from SetToken before Launch.
func (e *Engine) Prepare(ctx context.Context, in []Input) (*Planned, error) {
	return e.prepare(ctx, in)
}

// SetToken gives input i (marked Later) its token.
func (p *Planned) SetToken(i int, t int32) error {
	if i < 0 || i >= len(p.in) || !p.in[i].Later {
		return fmt.Errorf("%w: input %d does not take its token later", ErrBadInput, i)
	}
	if t < 0 || int(t) >= p.e.cfg.VocabSize {
		return fmt.Errorf("%w: token id %d outside the vocabulary [0, %d)", ErrBadInput, t, p.e.cfg.VocabSize)
	}
	p.meta.Tokens[p.first[i]] = t
	p.set[i] = true
	return nil
}

// Discard keeps input i's rows in the step without a result: its sequence
// ended while the step was prepared (a stop token drawn by the step before;
// the caller may have released its pages: the rows write into them before
// any later step can, and nothing reads them). Its sequence does not
// advance and it draws no token.
func (p *Planned) Discard(i int) {
	if i >= 0 && i < len(p.in) {
		p.discard[i] = true
	}
}

// ready checks that every Later input has its token (or is discarded).
func (p *Planned) ready() error {
	if p.used {
		return fmt.Errorf("%w: a prepared step is launched once", ErrBadInput)
	}
	for i, x := range p.in {
		if x.Later && !p.set[i] && !p.discard[i] {
			return fmt.Errorf("%w: input %d has no token yet (SetToken)", ErrBadInput, i)
		}
	}
	p.used = true
	return nil
}

// Flight is a launched step.
type Flight struct {
	e      *Engine
	p      *Planned
	rows   []RowSample
	who    []int
	sp     []Sampling
	out    []sample.Choice
	err    error // the host path's result, or the launch's
	done   bool  // the host path ran the whole step in Launch
	waited bool
}

// Launch issues a prepared step with one Sampling per input (those of
// discarded inputs are not used). One step is in flight at a time: the
// last one launched must have been waited for. On error nothing is in
// flight and no sequence advanced.
func (e *Engine) Launch(p *Planned, sp []Sampling) (*Flight, error) {
	if e.fly != nil {
		return nil, ErrInFlight
	}
	if p == nil || p.e != e {
		return nil, fmt.Errorf("%w: a step prepared by another engine", ErrBadInput)
	}
	if len(sp) != len(p.in) {
		return nil, fmt.Errorf("%w: %d inputs, %d samplings", ErrBadInput, len(p.in), len(sp))
	}
	sp = append([]Sampling(nil), sp...)
	for i := range sp {
		if p.discard[i] {
			sp[i] = Sampling{Skip: true}
		}
	}
	if err := e.checkSampling(p.in, sp); err != nil {
		return nil, err
	}
	if err := p.ready(); err != nil {
		return nil, err
	}
	e.times = StepTimes{Prepare: p.prep} // a new step's times begin
	f := &Flight{e: e, p: p, sp: sp, out: make([]sample.Choice, len(p.in))}
	if _, ok := e.b.(DeviceSampler); !ok {
		// The host path runs the whole step now (the CPU backend computes
		// in Execute anyway); Wait hands out its result.
		f.err = e.hostStep(f)
		f.done = true
	} else {
		for i, s := range sp {
			if s.Skip {
				continue
			}
			n := 1
			if p.in[i].AllLogits {
				n = len(p.in[i].Tokens)
			}
			f.rows = append(f.rows, RowSample{Row: p.outRow[i] + n - 1, Params: s.Params, Seed: s.Seed, Counter: s.Index, Adjust: s.Adjust})
			f.who = append(f.who, i)
		}
		if err := e.issue(p.meta); err != nil {
			return nil, err
		}
	}
	for i, x := range p.in {
		if !p.discard[i] {
			x.Seq.ahead = len(x.Tokens)
		}
	}
	e.fly = f
	return f, nil
}

// Done reports whether the step's result is in already: on a backend
// without DeviceSampler, Launch runs the whole step.
func (f *Flight) Done() bool { return f.done }

// Wait returns the launched step's tokens: per input, the Choice drawn from
// its last logits row (zero for skipped and discarded inputs). On success
// the sequences advance by their tokens; on error they stay as they were
// (with their pages).
func (f *Flight) Wait() ([]sample.Choice, error) {
	e := f.e
	if f.waited {
		return nil, fmt.Errorf("%w: a flight is waited for once", ErrBadInput)
	}
	f.waited = true
	if e.fly == f {
		e.fly = nil
	}
	err := f.err
	if !f.done {
		err = e.collect(f)
	}
	for i, x := range f.p.in {
		if f.p.discard[i] {
			continue
		}
		if err == nil {
			x.Seq.n += x.Seq.ahead
		}
		x.Seq.ahead = 0
	}
	if err != nil {
		return nil, err
	}
	return f.out, nil
}

// checkSampling validates one Sampling per input.
func (e *Engine) checkSampling(in []Input, sp []Sampling) error {
	V := e.cfg.VocabSize
	for i := range sp {
		if t := sp[i].Targets; len(t) > 0 {
			if len(t) != len(in[i].Tokens) || len(sp[i].Scores) != len(t) || !in[i].AllLogits {
				return fmt.Errorf("%w: input %d scores %d rows into %d of %d tokens (AllLogits %v)", ErrBadInput, i, len(t), len(sp[i].Scores), len(in[i].Tokens), in[i].AllLogits)
			}
			for _, id := range t {
				if id < -1 || int(id) >= V {
					return fmt.Errorf("%w: input %d scores token %d of a %d-token vocabulary", ErrBadInput, i, id, V)
				}
			}
			if n := sp[i].Params.Logprobs; n < 0 || n > sample.MaxLogprobs {
				return fmt.Errorf("%w: input %d: logprobs %d outside [0, %d]", ErrBadInput, i, n, sample.MaxLogprobs)
			}
		}
		if sp[i].Skip {
			continue
		}
		if err := sp[i].Params.Validate(); err != nil {
			return err
		}
		for _, a := range sp[i].Adjust {
			if a.Token < 0 || int(a.Token) >= V {
				return fmt.Errorf("%w: input %d adjusts token %d of a %d-token vocabulary", ErrBadInput, i, a.Token, V)
			}
		}
	}
	return nil
}
