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
	// Later: Tokens holds one placeholder; its token is set with
	// Planned.SetToken before Launch (the token the step in flight draws
	// for the sequence: Prepare may run while it does).
	Later bool
}

// Step runs one forward pass over every input and returns, per input in
// order, the logits rows (one row, or len(Tokens) rows with AllLogits).
// On error no sequence's length changes (pages reserved for it stay, as
// Reserve's do).
func (e *Engine) Step(ctx context.Context, in []Input) ([][]float32, error) {
	if e.fly != nil {
		return nil, ErrInFlight
	}
	p, err := e.prepare(ctx, in)
	if err != nil {
		return nil, err
	}
	if err := p.ready(); err != nil {
		return nil, err
	}
	meta, outRow := p.meta, p.outRow
	e.times = StepTimes{Prepare: p.prep} // a new step's times begin
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
// the host with package sample. Skipped inputs get a zero Choice. It is
// Prepare, Launch and Wait in one call.
func (e *Engine) StepSample(ctx context.Context, in []Input, sp []Sampling) ([]sample.Choice, error) {
	p, err := e.Prepare(ctx, in)
	if err != nil {
		return nil, err
	}
	f, err := e.Launch(p, sp)
	if err != nil {
		return nil, err
	}
	return f.Wait()
}

// prepare validates a step, grows the sequences' page tables and builds the
// step's metadata (Prepare). A sequence with a step in flight is placed
// after that step's tokens.
func (e *Engine) prepare(ctx context.Context, in []Input) (*Planned, error) {
	t0 := time.Now()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	c := e.cfg
	total, rows, need := 0, 0, 0
	seen := map[*Sequence]bool{}
	for i, x := range in {
		if x.Seq == nil || len(x.Tokens) == 0 {
			return nil, fmt.Errorf("%w: input %d has no sequence or no tokens", ErrBadInput, i)
		}
		if seen[x.Seq] {
			return nil, fmt.Errorf("%w: sequence appears twice in one step", ErrBadInput)
		}
		seen[x.Seq] = true
		if x.Slot >= len(e.slots) || x.Slot < -1 || (x.Slot >= 0 && e.slots[x.Slot] == nil) {
			return nil, fmt.Errorf("%w: input %d uses empty or missing slot %d", ErrNoSlot, i, x.Slot)
		}
		if x.Later && len(x.Tokens) != 1 {
			return nil, fmt.Errorf("%w: input %d takes its token later but has %d", ErrBadInput, i, len(x.Tokens))
		}
		if !x.Later {
			for _, t := range x.Tokens {
				if t < 0 || int(t) >= c.VocabSize {
					return nil, fmt.Errorf("%w: token id %d outside the vocabulary [0, %d)", ErrBadInput, t, c.VocabSize)
				}
			}
		}
		n := x.Seq.Next() + len(x.Tokens)
		if n > e.opts.MaxContext {
			return nil, fmt.Errorf("%w: %d tokens > %d", ErrContextLen, n, e.opts.MaxContext)
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
		return nil, fmt.Errorf("%w: %d tokens > %d", ErrTooMany, total, e.opts.MaxTokens)
	}
	if need > len(e.freeBlocks) {
		// Only a caller that did not Reserve gets here (the scheduler does).
		return nil, fmt.Errorf("%w: need %d pages, %d free", ErrKVFull, need, len(e.freeBlocks))
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
	p := &Planned{e: e, in: in, meta: meta, outRow: make([]int, len(in)), first: make([]int, len(in)),
		set: make([]bool, len(in)), discard: make([]bool, len(in))}
	for _, i := range order {
		x := in[i]
		s := x.Seq
		at := s.Next()
		e.Reserve(s, at+len(x.Tokens)) // cannot fail: checked above
		start := len(meta.Tokens)
		p.first[i] = start
		for j, t := range x.Tokens {
			pos := at + j
			if x.Later {
				t = 0 // SetToken gives it
			}
			meta.Tokens = append(meta.Tokens, t)
			meta.Positions = append(meta.Positions, int32(pos))
			meta.KVSlots = append(meta.KVSlots, s.blocks[pos/e.opts.BlockSize]*int32(e.opts.BlockSize)+int32(pos%e.opts.BlockSize))
		}
		meta.Seqs = append(meta.Seqs, SeqMeta{Start: start, Len: len(x.Tokens), Context: at + len(x.Tokens), Blocks: s.blocks})
		if x.Slot >= 0 {
			if k := len(meta.LoRA) - 1; k >= 0 && meta.LoRA[k].Slot == x.Slot && meta.LoRA[k].End == start {
				meta.LoRA[k].End = len(meta.Tokens)
			} else {
				meta.LoRA = append(meta.LoRA, Segment{Start: start, End: len(meta.Tokens), Slot: x.Slot})
			}
		}
		p.outRow[i] = len(meta.LogitRows)
		if x.AllLogits {
			for r := start; r < len(meta.Tokens); r++ {
				meta.LogitRows = append(meta.LogitRows, int32(r))
			}
		} else {
			meta.LogitRows = append(meta.LogitRows, int32(len(meta.Tokens)-1))
		}
	}
	p.prep = time.Since(t0)
	return p, nil
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

// run executes a prepared step and tail (which reads its result); on
// success the sequences advance; on error they stay as they were (with
// their pages).
func (e *Engine) run(in []Input, meta *StepMeta, tail func() error) error {
	if err := e.issue(meta); err != nil {
		return err
	}
	if err := e.finish(tail); err != nil {
		return err
	}
	for _, x := range in {
		x.Seq.n += len(x.Tokens)
	}
	return nil
}

// issue has the backend execute meta's step (inside its Runner when it has
// one); on error the step is ended.
func (e *Engine) issue(meta *StepMeta) error {
	prog := e.program(e.shapeOf(meta))
	return e.inRunner(func() error {
		t0 := time.Now()
		err := e.b.Execute(meta, prog)
		e.times.Issue = time.Since(t0)
		if err != nil {
			e.b.End()
		}
		return err
	})
}

// shapeOf is the program shape of the step meta describes.
func (e *Engine) shapeOf(meta *StepMeta) Shape {
	var s Shape
	if len(meta.LoRA) > 0 {
		s.LoRA = e.loraMask()
	}
	return s
}

// finish runs tail, which reads the issued step's result, and ends the
// step (inside the backend's Runner when it has one).
func (e *Engine) finish(tail func() error) error {
	return e.inRunner(func() error {
		t0 := time.Now()
		defer func() { e.times.Wait = time.Since(t0) }()
		if err := tail(); err != nil {
			e.b.End()
			return err
		}
		return e.b.End()
	})
}

// inRunner calls fn in the backend's Runner, or directly.
func (e *Engine) inRunner(fn func() error) error {
	if r, ok := e.b.(Runner); ok {
		return r.Run(fn)
	}
	return fn()
}

// hostStep runs a whole step on a backend without DeviceSampler: the
// logits come to the host and package sample draws the tokens.
func (e *Engine) hostStep(f *Flight) error {
	p := f.p
	V := e.cfg.VocabSize
	var logits []float32
	if err := e.issue(p.meta); err != nil {
		return err
	}
	err := e.finish(func() error {
		logits = make([]float32, len(p.meta.LogitRows)*V)
		return e.b.Read(e.logits, len(p.meta.LogitRows), logits)
	})
	if err != nil {
		return err
	}
	t0 := time.Now()
	defer func() { e.times.Wait += time.Since(t0) }() // host sampling
	row := func(i, j int) []float32 { r := p.outRow[i] + j; return logits[r*V : (r+1)*V] }
	score(f.sp, row) // before Adjust changes a last row
	for i, s := range f.sp {
		if s.Skip {
			continue
		}
		smp := s.CPU
		if smp == nil {
			prm := s.Params
			seed := s.Seed ^ (s.Index+1)*0x9e3779b97f4a7c15
			prm.Seed = &seed
			var err error
			if smp, err = sample.New(prm); err != nil {
				return err
			}
		}
		r := p.lastRow(i)
		last := logits[r*V : (r+1)*V]
		sample.Apply(last, s.Adjust) // the step's own logits buffer
		f.out[i] = smp.Sample(last)
	}
	return nil
}

// collect draws a launched step's tokens on the device (DeviceSampler),
// scoring the rows Targets asks for first, and ends the step.
func (e *Engine) collect(f *Flight) error {
	ds := e.b.(DeviceSampler)
	p := f.p
	V := e.cfg.VocabSize
	got := make([]sample.Choice, len(f.rows))
	err := e.finish(func() error {
		if n := scoredRows(f.sp, p.outRow); n > 0 {
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
			score(f.sp, func(i, j int) []float32 { return host[(p.outRow[i]+j)*V : (p.outRow[i]+j+1)*V] })
		}
		if len(f.rows) == 0 {
			return nil
		}
		return ds.SampleRows(e.logits, f.rows, got)
	})
	if err != nil {
		return err
	}
	for k, i := range f.who {
		f.out[i] = got[k]
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
	hasLoRA := func(g int) bool {
		for _, m := range llama.FusedGroups[g] {
			if s.LoRA&(1<<m) != 0 {
				return true
			}
		}
		return false
	}
	lora := func(out, in Buffer, l int, g int) {
		if hasLoRA(g) {
			b.LoRA(out, in, l, llama.FusedGroups[g])
		}
	}
	// linear is group g's product and then its LoRA update, as one op
	// where the backend has it (LinearLoRAOps)
	fl, fused := b.(LinearLoRAOps)
	fs, fusedSiLU := b.(LinearSiLUOps) // the gate/up product and silu_mul as one op where the backend takes it
	linear := func(out, in Buffer, w Weight, l int, g int) {
		if fused && hasLoRA(g) {
			fl.LinearLoRA(out, in, w, l, llama.FusedGroups[g])
			return
		}
		b.Linear(out, in, w)
		lora(out, in, l, g)
	}
	// linearNorm is group g's product into e.tmp, then the residual add
	// and the norm after it (norm nil: the add alone), as one op where
	// the backend takes it (LinearAddRMSNormOps)
	fn, fusedNorm := b.(LinearAddRMSNormOps)
	linearNorm := func(in Buffer, w Weight, l int, g int, norm Weight) {
		out := e.h
		if norm == nil {
			out = nil
		}
		if !hasLoRA(g) && fusedNorm && fn.LinearAddRMSNorm(e.tmp, in, w, e.x, out, norm, eps) {
			return
		}
		linear(e.tmp, in, w, l, g)
		b.AddRMSNorm(e.x, e.tmp, out, norm, eps)
	}
	b.Embed(e.x, e.embed)
	scale := float32(1 / math.Sqrt(float64(c.HeadDim)))
	for l := range e.layers {
		lw := &e.layers[l]
		if l == 0 {
			b.AddRMSNorm(e.x, nil, e.h, lw.inNorm, eps)
		}
		if lw.qkvBias != nil {
			b.Linear(e.qkv, e.h, lw.qkv)
			fo.AddBias(e.qkv, lw.qkvBias)
			lora(e.qkv, e.h, l, 0)
		} else {
			linear(e.qkv, e.h, lw.qkv, l, 0)
		}
		if lw.qNorm != nil {
			fo.HeadRMSNorm(e.q, c.Heads, c.HeadDim, lw.qNorm, eps)
			fo.HeadRMSNorm(e.k, c.KVHeads, c.HeadDim, lw.kNorm, eps)
		}
		b.Attention(e.attn, e.q, e.k, e.v, l, scale, e.invFreq)
		linearNorm(e.attn, lw.o, l, 1, lw.postNorm)
		if hasLoRA(2) || !fusedSiLU || !fs.LinearSiLU(e.act, e.h, lw.gateUp) {
			linear(e.gateUp, e.h, lw.gateUp, l, 2)
			b.SiLUMul(e.act, e.gate, e.up)
		}
		// x += the MLP output, then the next layer's input norm (after the
		// last layer the add alone: Logits normalizes)
		var next Weight
		if l+1 < len(e.layers) {
			next = e.layers[l+1].inNorm
		}
		linearNorm(e.act, lw.down, l, 3, next)
	}
	b.Logits(e.logits, e.x, e.norm, e.head, eps)
}
