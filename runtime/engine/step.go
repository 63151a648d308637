package engine

import (
	"time"

	"context"
	"fmt"
	"math"
	"sort"

	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/sample"
)

// Input is one sequence's part of a step.
type Input struct {
	Seq       *Sequence
	Tokens    []int32 // tokens to append (a prefill chunk, or one decode token)
	Slot      int     // adapter slot, or -1 for the base model
	AllLogits bool    // logits for every token, not only the last
}

// Step runs one forward pass over every input and returns, per input in
// order, the logits rows (one row, or len(Tokens) rows with AllLogits).
// On error no sequence's length changes (pages reserved for it stay, as
// Reserve's do).
func (e *Engine) Step(ctx context.Context, in []Input) ([][]float32, error) {
	meta, outRow, err := e.prepare(ctx, in)
	if err != nil {
		return nil, err
	}
	var logits []float32
	err = e.run(in, meta, func() error {
		logits = make([]float32, len(meta.LogitRows)*e.cfg.VocabSize)
		return e.b.Read(e.logits, len(meta.LogitRows), logits)
	})
	if err != nil {
		return nil, err
	}
	out := make([][]float32, len(in))
	V := e.cfg.VocabSize
	for i, x := range in {
		n := 1
		if x.AllLogits {
			n = len(x.Tokens)
		}
		out[i] = logits[outRow[i]*V : (outRow[i]+n)*V : (outRow[i]+n)*V]
	}
	return out, nil
}

// Sampling says how StepSample draws the next token of one input.
type Sampling struct {
	Skip   bool          // no token wanted (a prefill chunk that does not end the prompt)
	Params sample.Params // valid sampling parameters (Params.Seed is not used: Seed is)
	// Seed and Index key the draw on a DeviceSampler: the same (Seed, Index,
	// logits) give the same token. Index is the new token's position in its
	// sequence.
	Seed, Index uint64
	// CPU, when set, draws on the host path (a backend without DeviceSampler)
	// from this sampler's own stream; nil: a sampler seeded from (Seed, Index).
	CPU *sample.Sampler
	// Adjust changes the logits before the draw: the sequence's penalties
	// and logit bias (sample.Tracker), each token at most once.
	Adjust []sample.Adjust
	// Targets scores the input's rows (prompt logprobs, echo): one per
	// input token (the input needs AllLogits), and for each Targets[j] >=
	// 0, Scores[j] gets sample.Score of it under row j's raw logits (no
	// Adjust) with Params.Logprobs alternatives. The caller provides
	// Scores, as long as Targets. Skip does not skip scoring.
	Targets []int32
	Scores  []sample.Choice
}

// scoredRows is one past the last logits row some Sampling scores (0: none).
func scoredRows(sp []Sampling, outRow []int) int {
	n := 0
	for i, s := range sp {
		for j, t := range s.Targets {
			if t >= 0 {
				n = max(n, outRow[i]+j+1)
			}
		}
	}
	return n
}

// score fills each Sampling's Scores from the logits rows rows(i, j) of
// row j of input i.
func score(sp []Sampling, rows func(i, j int) []float32) {
	for i, s := range sp {
		for j, t := range s.Targets {
			if t >= 0 {
				s.Scores[j] = sample.Score(rows(i, j), t, s.Params.Logprobs)
			}
		}
	}
}

// StepTimes is where the host time of a step went, in order: Prepare
// validates the inputs and builds the step's metadata (page tables,
// segments); Issue is the backend's Execute (the ops enqueued, or computed
// on a host backend); Wait is what follows until the results are back
// (sampling or reading the logits, and the backend's End).
type StepTimes struct {
	Prepare, Issue, Wait time.Duration
}

// LastStepTimes is where the host time of the last step went.
func (e *Engine) LastStepTimes() StepTimes { return e.times }

// DeviceTime is the device time of the last step, when the backend
// measures it (StepTimer).
func (e *Engine) DeviceTime() (time.Duration, bool) {
	if t, ok := e.b.(StepTimer); ok {
		return t.StepDeviceTime()
	}
	return 0, false
}

// DeviceSampling reports whether StepSample samples on the backend.
func (e *Engine) DeviceSampling() bool {
	_, ok := e.b.(DeviceSampler)
	return ok
}

// StepSample runs one forward pass like Step and draws one token per input
// from its last logits row, on the device when the backend is a
// DeviceSampler (only token ids and log-probabilities come back), else on
// the host with package sample. Skipped inputs get a zero Choice.
func (e *Engine) StepSample(ctx context.Context, in []Input, sp []Sampling) ([]sample.Choice, error) {
	if len(sp) != len(in) {
		return nil, fmt.Errorf("%w: %d inputs, %d samplings", ErrBadInput, len(in), len(sp))
	}
	V := e.cfg.VocabSize
	for i := range sp {
		if t := sp[i].Targets; len(t) > 0 {
			if len(t) != len(in[i].Tokens) || len(sp[i].Scores) != len(t) || !in[i].AllLogits {
				return nil, fmt.Errorf("%w: input %d scores %d rows into %d of %d tokens (AllLogits %v)", ErrBadInput, i, len(t), len(sp[i].Scores), len(in[i].Tokens), in[i].AllLogits)
			}
			for _, id := range t {
				if id < -1 || int(id) >= V {
					return nil, fmt.Errorf("%w: input %d scores token %d of a %d-token vocabulary", ErrBadInput, i, id, V)
				}
			}
			if n := sp[i].Params.Logprobs; n < 0 || n > sample.MaxLogprobs {
				return nil, fmt.Errorf("%w: input %d: logprobs %d outside [0, %d]", ErrBadInput, i, n, sample.MaxLogprobs)
			}
		}
		if sp[i].Skip {
			continue
		}
		if err := sp[i].Params.Validate(); err != nil {
			return nil, err
		}
		for _, a := range sp[i].Adjust {
			if a.Token < 0 || int(a.Token) >= V {
				return nil, fmt.Errorf("%w: input %d adjusts token %d of a %d-token vocabulary", ErrBadInput, i, a.Token, V)
			}
		}
	}
	ds, ok := e.b.(DeviceSampler)
	out := make([]sample.Choice, len(in))
	if !ok {
		logits, err := e.Step(ctx, in)
		if err != nil {
			return nil, err
		}
		t0 := time.Now()
		defer func() { e.times.Wait += time.Since(t0) }()                       // host sampling
		score(sp, func(i, j int) []float32 { return logits[i][j*V : (j+1)*V] }) // before Adjust changes a last row
		for i, s := range sp {
			if s.Skip {
				continue
			}
			smp := s.CPU
			if smp == nil {
				p := s.Params
				seed := s.Seed ^ (s.Index+1)*0x9e3779b97f4a7c15
				p.Seed = &seed
				var err error
				if smp, err = sample.New(p); err != nil {
					return nil, err
				}
			}
			l := logits[i]
			row := l[len(l)-V:]
			sample.Apply(row, s.Adjust) // the step's own logits buffer
			out[i] = smp.Sample(row)
		}
		return out, nil
	}
	meta, outRow, err := e.prepare(ctx, in)
	if err != nil {
		return nil, err
	}
	var rows []RowSample
	var who []int
	for i, s := range sp {
		if s.Skip {
			continue
		}
		n := 1
		if in[i].AllLogits {
			n = len(in[i].Tokens)
		}
		rows = append(rows, RowSample{Row: outRow[i] + n - 1, Params: s.Params, Seed: s.Seed, Counter: s.Index, Adjust: s.Adjust})
		who = append(who, i)
	}
	got := make([]sample.Choice, len(rows))
	err = e.run(in, meta, func() error {
		if n := scoredRows(sp, outRow); n > 0 {
			// the logits rows up to the last scored one come to the host
			// (before SampleRows adjusts a last row on the device), into
			// a buffer kept for the next scoring step
			if cap(e.scoreBuf) < n*V {
				e.scoreBuf = make([]float32, n*V)
			}
			host := e.scoreBuf[:n*V]
			if err := e.b.Read(e.logits, n, host); err != nil {
				return err
			}
			score(sp, func(i, j int) []float32 { return host[(outRow[i]+j)*V : (outRow[i]+j+1)*V] })
		}
		if len(rows) == 0 {
			return nil
		}
		return ds.SampleRows(e.logits, rows, got)
	})
	if err != nil {
		return nil, err
	}
	for k, i := range who {
		out[i] = got[k]
	}
	return out, nil
}

// prepare validates a step, grows the sequences' page tables and builds the
// step's metadata; outRow[i] is the first logits row of input i. It starts
// the step's StepTimes with its own.
func (e *Engine) prepare(ctx context.Context, in []Input) (*StepMeta, []int, error) {
	t0 := time.Now()
	if err := ctx.Err(); err != nil {
		return nil, nil, err
	}
	c := e.cfg
	total, rows, need := 0, 0, 0
	seen := map[*Sequence]bool{}
	for i, x := range in {
		if x.Seq == nil || len(x.Tokens) == 0 {
			return nil, nil, fmt.Errorf("%w: input %d has no sequence or no tokens", ErrBadInput, i)
		}
		if seen[x.Seq] {
			return nil, nil, fmt.Errorf("%w: sequence appears twice in one step", ErrBadInput)
		}
		seen[x.Seq] = true
		if x.Slot >= len(e.slots) || x.Slot < -1 || (x.Slot >= 0 && e.slots[x.Slot] == nil) {
			return nil, nil, fmt.Errorf("%w: input %d uses empty or missing slot %d", ErrNoSlot, i, x.Slot)
		}
		for _, t := range x.Tokens {
			if t < 0 || int(t) >= c.VocabSize {
				return nil, nil, fmt.Errorf("%w: token id %d outside the vocabulary [0, %d)", ErrBadInput, t, c.VocabSize)
			}
		}
		n := x.Seq.n + len(x.Tokens)
		if n > e.opts.MaxContext {
			return nil, nil, fmt.Errorf("%w: %d tokens > %d", ErrContextLen, n, e.opts.MaxContext)
		}
		total += len(x.Tokens)
		if x.AllLogits {
			rows += len(x.Tokens)
		} else {
			rows++
		}
		need += max(0, e.BlocksFor(n)-len(x.Seq.blocks))
	}
	if total > e.opts.MaxTokens {
		return nil, nil, fmt.Errorf("%w: %d tokens > %d", ErrTooMany, total, e.opts.MaxTokens)
	}
	if need > len(e.freeBlocks) {
		// Only a caller that did not Reserve gets here (the scheduler does).
		return nil, nil, fmt.Errorf("%w: need %d pages, %d free", ErrKVFull, need, len(e.freeBlocks))
	}
	// Group rows by adapter slot so each adapter's tokens are one segment.
	order := make([]int, len(in))
	for i := range order {
		order[i] = i
	}
	sort.SliceStable(order, func(a, b int) bool { return in[order[a]].Slot < in[order[b]].Slot })

	meta := &StepMeta{
		Tokens: make([]int32, 0, total), Positions: make([]int32, 0, total), KVSlots: make([]int32, 0, total),
		Seqs: make([]SeqMeta, 0, len(in)), LogitRows: make([]int32, 0, rows),
	}
	outRow := make([]int, len(in)) // first logits row of each input
	for _, i := range order {
		x := in[i]
		s := x.Seq
		e.Reserve(s, s.n+len(x.Tokens)) // cannot fail: checked above
		start := len(meta.Tokens)
		for j, t := range x.Tokens {
			pos := s.n + j
			meta.Tokens = append(meta.Tokens, t)
			meta.Positions = append(meta.Positions, int32(pos))
			meta.KVSlots = append(meta.KVSlots, s.blocks[pos/e.opts.BlockSize]*int32(e.opts.BlockSize)+int32(pos%e.opts.BlockSize))
		}
		meta.Seqs = append(meta.Seqs, SeqMeta{Start: start, Len: len(x.Tokens), Context: s.n + len(x.Tokens), Blocks: s.blocks})
		if x.Slot >= 0 {
			if k := len(meta.LoRA) - 1; k >= 0 && meta.LoRA[k].Slot == x.Slot && meta.LoRA[k].End == start {
				meta.LoRA[k].End = len(meta.Tokens)
			} else {
				meta.LoRA = append(meta.LoRA, Segment{Start: start, End: len(meta.Tokens), Slot: x.Slot})
			}
		}
		outRow[i] = len(meta.LogitRows)
		if x.AllLogits {
			for r := start; r < len(meta.Tokens); r++ {
				meta.LogitRows = append(meta.LogitRows, int32(r))
			}
		} else {
			meta.LogitRows = append(meta.LogitRows, int32(len(meta.Tokens)-1))
		}
	}
	e.times = StepTimes{Prepare: time.Since(t0)} // a new step's times begin
	return meta, outRow, nil
}

// program is the forward pass for steps of shape s.
func (e *Engine) program(s Shape) Program {
	return Program{Shape: s, Run: func(b Ops) { e.forward(b, s) }}
}

// Warmup lets a backend that records programs (CUDA graphs) record all of
// the engine's programs for steps without adapters and with adapters on
// every projection. Other backends do nothing.
func (e *Engine) Warmup() error {
	_, _, err := e.WarmSome(0)
	return err
}

// WarmSome records up to n of the programs Warmup records, and those of
// steps with the adapters loaded now, that are still missing (n <= 0: all),
// and reports how many it recorded and how many are
// still missing: none for a backend that records nothing. Between steps, on
// the engine goroutine.
func (e *Engine) WarmSome(n int) (recorded, left int, err error) {
	w, ok := e.b.(Warmer)
	if !ok {
		return 0, 0, nil
	}
	all := uint8(1<<llama.NumModules - 1)
	progs := []Program{e.program(Shape{}), e.program(Shape{LoRA: all})}
	if m := e.loraMask(); m != 0 && m != all { // what steps with the loaded adapters run
		progs = append(progs, e.program(Shape{LoRA: m}))
	}
	f := func() error {
		recorded, left, err = w.Warmup(progs, n)
		return err
	}
	if r, ok := e.b.(Runner); ok {
		err = r.Run(f)
	} else {
		err = f()
	}
	return recorded, left, err
}

// MissedRecording reports whether a step ran without its recorded program
// since the last call, on a backend that leaves recording to WarmSome
// (engine.RecordMisser): a WarmSome round would record it. Between steps,
// on the engine goroutine.
func (e *Engine) MissedRecording() bool {
	m, ok := e.b.(RecordMisser)
	return ok && m.MissedRecording()
}

// run executes a prepared step and tail (which reads its result), inside
// the backend's Runner when it has one; on success the sequences advance;
// on error they stay as they were (with their pages).
func (e *Engine) run(in []Input, meta *StepMeta, tail func() error) error {
	var s Shape
	if len(meta.LoRA) > 0 {
		s.LoRA = e.loraMask()
	}
	prog := e.program(s)
	f := func() error {
		t0 := time.Now()
		err := e.b.Execute(meta, prog)
		t1 := time.Now()
		e.times.Issue = t1.Sub(t0)
		defer func() { e.times.Wait = time.Since(t1) }()
		if err != nil {
			e.b.End()
			return err
		}
		if err := tail(); err != nil {
			e.b.End()
			return err
		}
		return e.b.End()
	}
	var err error
	if r, ok := e.b.(Runner); ok {
		err = r.Run(f)
	} else {
		err = f()
	}
	if err != nil {
		return err // the sequences keep their pages and their length
	}
	for _, x := range in {
		x.Seq.n += len(x.Tokens)
	}
	return nil
}

// forward issues the ops of one step of shape s: the model, written once
// for every backend.
func (e *Engine) forward(b Ops, s Shape) {
	c := e.cfg
	eps := float32(c.RMSNormEps)
	fo, _ := b.(FamilyOps) // New checked it is there when the model needs it
	// lora issues one LoRA op for a fused group when the step's adapters
	// change any projection of it (slots without one have rank 0 there).
	lora := func(out, in Buffer, l int, g int) {
		for _, m := range llama.FusedGroups[g] {
			if s.LoRA&(1<<m) != 0 {
				b.LoRA(out, in, l, llama.FusedGroups[g])
				return
			}
		}
	}
	b.Embed(e.x, e.embed)
	scale := float32(1 / math.Sqrt(float64(c.HeadDim)))
	for l := range e.layers {
		lw := &e.layers[l]
		if l == 0 {
			b.AddRMSNorm(e.x, nil, e.h, lw.inNorm, eps)
		} else {
			b.AddRMSNorm(e.x, e.tmp, e.h, lw.inNorm, eps) // adds the previous layer's MLP output
		}
		b.Linear(e.qkv, e.h, lw.qkv)
		if lw.qkvBias != nil {
			fo.AddBias(e.qkv, lw.qkvBias)
		}
		lora(e.qkv, e.h, l, 0)
		if lw.qNorm != nil {
			fo.HeadRMSNorm(e.q, c.Heads, c.HeadDim, lw.qNorm, eps)
			fo.HeadRMSNorm(e.k, c.KVHeads, c.HeadDim, lw.kNorm, eps)
		}
		b.Attention(e.attn, e.q, e.k, e.v, l, scale, e.invFreq)
		b.Linear(e.tmp, e.attn, lw.o)
		lora(e.tmp, e.attn, l, 1)
		b.AddRMSNorm(e.x, e.tmp, e.h, lw.postNorm, eps)
		b.Linear(e.gateUp, e.h, lw.gateUp)
		lora(e.gateUp, e.h, l, 2)
		b.SiLUMul(e.act, e.gate, e.up)
		b.Linear(e.tmp, e.act, lw.down)
		lora(e.tmp, e.act, l, 3)
	}
	b.AddRMSNorm(e.x, e.tmp, nil, nil, eps) // x += the last MLP output
	b.Logits(e.logits, e.x, e.norm, e.head, eps)
}
