package engine

import (
	"context"
	"fmt"
	"slices"
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
	// from[i] >= 0: input i takes the token its sample row from[i] of
	// the step in flight fromFl draws (SetTokenFrom), on the device
	from   []int
	fromFl *Flight
	prep   time.Duration
	used   bool
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
	if p.from != nil {
		p.from[i] = -1
	}
	return nil
}

// SetTokenFrom gives input i (marked Later) the token that f, the step in
// flight, draws for its input j, read on the device: the step can then be
// launched before f's tokens are back (Launch, on a Chainer backend). A
// later SetToken takes its place.
func (p *Planned) SetTokenFrom(i int, f *Flight, j int) error {
	if i < 0 || i >= len(p.in) || !p.in[i].Later {
		return fmt.Errorf("%w: input %d does not take its token later", ErrBadInput, i)
	}
	if f == nil || f.waited || p.fromFl != nil && p.fromFl != f {
		return fmt.Errorf("%w: tokens from a step not in flight, or from two", ErrBadInput)
	}
	k := slices.Index(f.who, j)
	if k < 0 {
		return fmt.Errorf("%w: input %d of the step in flight draws no token", ErrBadInput, j)
	}
	if p.from == nil {
		p.from = make([]int, len(p.in))
		for x := range p.from {
			p.from[x] = -1
		}
	}
	p.from[i], p.fromFl, p.set[i] = k, f, true
	return nil
}

// inFlight counts the launched step's tokens in its sequences' Next
// lengths (discarded inputs' sequences do not advance).
func (p *Planned) inFlight() {
	for i, x := range p.in {
		if !p.discard[i] {
			x.Seq.ahead += len(x.Tokens)
		}
	}
}

// lastRow is input i's last logits row: the one its token is drawn from.
func (p *Planned) lastRow(i int) int {
	n := 1
	if p.in[i].AllLogits {
		n = len(p.in[i].Tokens)
	}
	return p.outRow[i] + n - 1
}

// chained reports whether some input takes its token on the device.
func (p *Planned) chained() bool {
	for _, k := range p.from {
		if k >= 0 {
			return true
		}
	}
	return false
}

// Discard keeps input i's rows in the step without a result: its sequence
// ended while the step was prepared (a stop token drawn by the step before;
// the caller may have released its pages: the rows write into them before
// any later step can, and nothing reads them). Its sequence does not
// advance and it draws no token.
func (p *Planned) Discard(i int) {
	if i >= 0 && i < len(p.in) {
		p.discard[i] = true
		if p.from != nil {
			p.from[i] = -1
		}
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
	issued bool // its draw was started (Chainer.IssueSample) for a step launched after it
	rows   []RowSample
	who    []int
	sp     []Sampling
	out    []sample.Choice
	err    error // the host path's result, or the launch's
	done   bool  // the host path ran the whole step in Launch
	waited bool
	times  StepTimes
}

// Launch issues a prepared step with one Sampling per input (those of
// discarded inputs are not used). One step is in flight at a time: the
// last one launched must have been waited for. On error nothing is in
// flight and no sequence advanced.
func (e *Engine) Launch(p *Planned, sp []Sampling) (*Flight, error) {
	if p == nil || p.e != e {
		return nil, fmt.Errorf("%w: a step prepared by another engine", ErrBadInput)
	}
	if e.fly != nil || p.chained() {
		return e.launchChained(p, sp)
	}
	sp, err := e.samplings(p, sp)
	if err != nil {
		return nil, err
	}
	if err := p.ready(); err != nil {
		return nil, err
	}
	p.meta.TokenFrom = nil               // every token is on the host
	e.times = StepTimes{Prepare: p.prep} // a new step's times begin
	f := &Flight{e: e, p: p, sp: sp, out: make([]sample.Choice, len(p.in))}
	if _, ok := e.b.(DeviceSampler); !ok {
		// The host path runs the whole step now (the CPU backend computes
		// in Execute anyway); Wait hands out its result.
		f.err = e.hostStep(f)
		f.done = true
	} else {
		f.sampleRows()
		if err := e.issue(p.meta); err != nil {
			return nil, err
		}
		if err := e.issueDraw(f); err != nil {
			e.inRunner(e.b.End) // nothing in flight: the step ends here
			return nil, err
		}
	}
	f.times = e.times
	p.inFlight()
	e.fly = f
	return f, nil
}

// issueDraw starts f's draw right behind its forward on a backend that
// chains steps, unless its rows are scored (their logits come to the host
// first): the device then runs forward and draw back to back, and a step
// chained behind f need only be enqueued before the draw ends, not before
// the forward does (a host that wakes late would leave the device idle).
func (e *Engine) issueDraw(f *Flight) error {
	ch, ok := e.b.(Chainer)
	if !ok || !ch.Chains() || f.issued || scoredRows(f.sp, f.p.outRow) > 0 {
		return nil
	}
	if err := e.inRunner(func() error { return ch.IssueSample(e.logits, f.rows) }); err != nil {
		return err
	}
	f.issued = true
	return nil
}

// CanChain reports whether a step may be launched behind the one in
// flight (a Chainer backend, one step in flight, its draw not scored).
func (e *Engine) CanChain() bool {
	ch, ok := e.b.(Chainer)
	return ok && ch.Chains() && e.fly != nil && e.next == nil && !e.fly.done && scoredRows(e.fly.sp, e.fly.p.outRow) == 0
}

// launchChained launches p while e.fly is in flight, on a Chainer: the
// flight's draw is started first (its tokens stay on the device for p's
// rows that take them), then p executes behind it. ErrInFlight when that
// cannot be: no Chainer, two steps in flight already, tokens from another
// step, a step the backend cannot chain, or nothing in flight for p's
// device tokens.
func (e *Engine) launchChained(p *Planned, sp []Sampling) (*Flight, error) {
	f0 := e.fly
	if !e.CanChain() || (p.fromFl != nil && p.fromFl != f0) {
		return nil, ErrInFlight
	}
	ch := e.b.(Chainer)
	sp, err := e.samplings(p, sp)
	if err != nil {
		return nil, err
	}
	for i := range sp {
		if len(sp[i].Targets) > 0 {
			return nil, fmt.Errorf("%w: a chained step scores no rows", ErrBadInput)
		}
	}
	p.meta.TokenFrom = nil
	if p.chained() {
		p.meta.TokenFrom = make([]int32, len(p.meta.Tokens))
		for r := range p.meta.TokenFrom {
			p.meta.TokenFrom[r] = -1
		}
		for i, k := range p.from {
			if k >= 0 {
				p.meta.TokenFrom[p.first[i]] = int32(k)
			}
		}
	}
	prog := e.program(e.shapeOf(p.meta))
	if !ch.Chainable(p.meta, prog) {
		p.meta.TokenFrom = nil
		return nil, ErrInFlight
	}
	if err := p.ready(); err != nil {
		return nil, err
	}
	if err := e.issueDraw(f0); err != nil { // issued at its launch already, unless CanChain's backend did not chain then
		return nil, err
	}
	f := &Flight{e: e, p: p, sp: sp, out: make([]sample.Choice, len(p.in))}
	f.sampleRows()
	if err := e.issue(p.meta); err != nil {
		return nil, err
	}
	if err := e.issueDraw(f); err != nil {
		return nil, err
	}
	f.times = StepTimes{Prepare: p.prep, Issue: e.times.Issue}
	p.inFlight()
	e.next = f
	return f, nil
}

// collectIssued waits for a draw started by IssueSample; when no step is
// in flight behind it, the backend's step ends too (End).
func (e *Engine) collectIssued(f *Flight) error {
	ch := e.b.(Chainer)
	got := make([]sample.Choice, len(f.rows))
	err := e.inRunner(func() error { return ch.WaitSample(got) })
	if e.fly == nil { // Wait took f off: nothing executed after it
		if endErr := e.inRunner(e.b.End); err == nil {
			err = endErr
		}
	}
	if err != nil {
		return err
	}
	for k, i := range f.who {
		f.out[i] = got[k]
	}
	return nil
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
	if e.fly != f {
		return nil, fmt.Errorf("%w: flights are waited for in the order they were launched", ErrBadInput)
	}
	f.waited = true
	e.fly, e.next = e.next, nil
	err := f.err
	t := f.times
	switch {
	case f.issued:
		t0 := time.Now()
		err = e.collectIssued(f)
		t.Wait = time.Since(t0)
	case !f.done:
		err = e.collect(f)
		t.Wait = e.times.Wait
	}
	e.times = t
	for i, x := range f.p.in {
		if f.p.discard[i] {
			continue
		}
		if err == nil {
			x.Seq.n += len(x.Tokens)
		}
		x.Seq.ahead -= len(x.Tokens)
	}
	if err != nil {
		return nil, err
	}
	return f.out, nil
}

// sampleRows lists the draws of the flight's inputs that are not skipped:
// each from its last logits row (rows), for input who[k].
func (f *Flight) sampleRows() {
	for i, s := range f.sp {
		if s.Skip {
			continue
		}
		f.rows = append(f.rows, RowSample{Row: f.p.lastRow(i), Params: s.Params, Seed: s.Seed, Counter: s.Index, Adjust: s.Adjust})
		f.who = append(f.who, i)
	}
}

// samplings is sp checked for p, copied, with discarded inputs skipped.
func (e *Engine) samplings(p *Planned, sp []Sampling) ([]Sampling, error) {
	if len(sp) != len(p.in) {
		return nil, fmt.Errorf("%w: %d inputs, %d samplings", ErrBadInput, len(p.in), len(sp))
	}
	sp = append([]Sampling(nil), sp...)
	for i := range sp {
		if p.discard[i] {
			sp[i] = Sampling{Skip: true}
		}
	}
	return sp, e.checkSampling(p.in, sp)
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
