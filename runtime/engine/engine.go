package engine

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"sort"

	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/lora"
	"github.com/peftd/peftd/runtime/safetensors"
	"github.com/peftd/peftd/runtime/sample"
)

// Errors returned (wrapped) by the engine.
var (
	ErrKVFull     = errors.New("engine: KV cache full")
	ErrTooMany    = errors.New("engine: step exceeds the token budget")
	ErrBadInput   = errors.New("engine: bad step input")
	ErrNoSlot     = errors.New("engine: no such adapter slot")
	ErrContextLen = errors.New("engine: sequence exceeds the model's context length")
)

// Options size the engine.
type Options struct {
	MaxTokens    int // rows per step (prefill chunk budget + decodes)
	KVBlocks     int // KV cache pages
	BlockSize    int // tokens per page
	AdapterSlots int // adapters resident at once
	MaxContext   int // per-sequence token limit; 0 means max_position_embeddings
}

// DefaultOptions suit the small CPU models.
func DefaultOptions() Options {
	return Options{MaxTokens: 512, KVBlocks: 1024, BlockSize: 16, AdapterSlots: 8}
}

// layerWeights are one decoder layer's weights; the q, k and v projections
// are one weight (their rows stacked: one GEMM writes q|k|v side by side),
// and so are gate and up.
type layerWeights struct {
	inNorm, postNorm Weight
	qkv, o           Weight
	gateUp, down     Weight
	qkvBias          Weight // Qwen2: the q|k|v biases; nil elsewhere
	qNorm, kNorm     Weight // Qwen3: per-head norms; nil elsewhere
}

// Engine owns a model on a backend, the KV page allocator and adapter slots.
// It is not safe for concurrent use: one scheduler goroutine drives it.
type Engine struct {
	cfg     *llama.Config
	b       Backend
	opts    Options
	invFreq []float32

	embed, norm, head Weight
	layers            []layerWeights

	// activations: qkv and gateUp are the fused projections' outputs, q, k,
	// v and gate, up views of their columns; act is silu(gate) * up
	x, h, qkv, q, k, v, attn, tmp, gateUp, gate, up, act, logits Buffer

	freeBlocks []int32
	// refs counts the holders of each page: the sequences whose page table
	// lists it and, for a page kept for prefix reuse, its keeper (Retain).
	// A page returns to freeBlocks when its count reaches 0.
	refs  []int32
	slots []*lora.Adapter
	// loraUse[l][m] counts the loaded adapters that change projection m of layer l.
	loraUse [][llama.NumModules]int
}

// New uploads the model's weights to the backend.
func New(m *llama.Model, b Backend, opts Options) (*Engine, error) {
	c := m.Config
	if opts.BlockSize <= 0 || opts.KVBlocks <= 0 || opts.MaxTokens <= 0 || opts.AdapterSlots < 0 {
		return nil, fmt.Errorf("%w: options %+v", ErrBadInput, opts)
	}
	if limit := c.MaxContext(); opts.MaxContext <= 0 || (limit > 0 && opts.MaxContext > limit) {
		opts.MaxContext = limit
		if opts.MaxContext <= 0 {
			opts.MaxContext = 4096
		}
	}
	if c.QKVBias() || c.QKNorm() {
		if _, ok := b.(FamilyOps); !ok {
			return nil, fmt.Errorf("%w: the %s backend cannot run %s models yet (they need q/k/v biases or per-head q/k norms); use --device cpu",
				ErrBadInput, b.Name(), c.Family())
		}
	}
	e := &Engine{cfg: c, b: b, opts: opts, invFreq: c.InvFreq(),
		slots: make([]*lora.Adapter, opts.AdapterSlots), loraUse: make([][llama.NumModules]int, c.Layers)}
	kv := KVSpec{Layers: c.Layers, Blocks: opts.KVBlocks, BlockSize: opts.BlockSize, KVHeads: c.KVHeads, HeadDim: c.HeadDim}
	if err := b.Init(c, Spec{MaxTokens: opts.MaxTokens, KV: kv, AdapterSlots: opts.AdapterSlots, MaxContext: opts.MaxContext}); err != nil {
		return nil, fmt.Errorf("engine: %s backend: %w", b.Name(), err)
	}
	up := func(name string) (Weight, error) {
		raw, info, err := m.Tensors.Bytes(name)
		if err != nil {
			return nil, err
		}
		w, err := b.Upload(name, info.DType, info.Shape, raw)
		if err != nil {
			return nil, fmt.Errorf("engine: upload %s: %w", name, err)
		}
		return w, nil
	}
	var err error
	if e.embed, err = up(llama.EmbedName); err != nil {
		return nil, err
	}
	if e.norm, err = up(llama.NormName); err != nil {
		return nil, err
	}
	if e.head, err = up(c.HeadTensor()); err != nil {
		return nil, err
	}
	e.layers = make([]layerWeights, c.Layers)
	for l := range e.layers {
		lw := &e.layers[l]
		in, post := llama.LayerNormNames(l)
		if lw.inNorm, err = up(in); err != nil {
			return nil, err
		}
		if lw.postNorm, err = up(post); err != nil {
			return nil, err
		}
		weights := func(ms ...llama.Module) []string {
			var n []string
			for _, m := range ms {
				n = append(n, m.Path(l)+".weight")
			}
			return n
		}
		if lw.qkv, err = upStacked(m, b, fmt.Sprintf("model.layers.%d.self_attn.qkv_proj.weight", l), weights(llama.Q, llama.K, llama.V)); err != nil {
			return nil, err
		}
		if lw.o, err = up(llama.O.Path(l) + ".weight"); err != nil {
			return nil, err
		}
		if lw.gateUp, err = upStacked(m, b, fmt.Sprintf("model.layers.%d.mlp.gate_up_proj.weight", l), weights(llama.Gate, llama.Up)); err != nil {
			return nil, err
		}
		if lw.down, err = up(llama.Down.Path(l) + ".weight"); err != nil {
			return nil, err
		}
		if c.QKVBias() {
			names := []string{llama.Q.Path(l) + ".bias", llama.K.Path(l) + ".bias", llama.V.Path(l) + ".bias"}
			if lw.qkvBias, err = upStacked(m, b, fmt.Sprintf("model.layers.%d.self_attn.qkv_proj.bias", l), names); err != nil {
				return nil, err
			}
		}
		if c.QKNorm() {
			qn, kn := llama.QKNormNames(l)
			if lw.qNorm, err = up(qn); err != nil {
				return nil, err
			}
			if lw.kNorm, err = up(kn); err != nil {
				return nil, err
			}
		}
	}
	T := opts.MaxTokens
	qd, kvd := c.Heads*c.HeadDim, c.KVHeads*c.HeadDim
	for _, s := range []struct {
		p    *Buffer
		cols int
	}{{&e.x, c.Hidden}, {&e.h, c.Hidden}, {&e.qkv, qd + 2*kvd}, {&e.attn, qd},
		{&e.tmp, c.Hidden}, {&e.gateUp, 2 * c.Intermediate}, {&e.act, c.Intermediate}, {&e.logits, c.VocabSize}} {
		if *s.p, err = b.NewBuffer(T, s.cols); err != nil {
			return nil, fmt.Errorf("engine: activations: %w", err)
		}
	}
	for _, v := range []struct {
		p         *Buffer
		of        Buffer
		col, cols int
	}{{&e.q, e.qkv, 0, qd}, {&e.k, e.qkv, qd, kvd}, {&e.v, e.qkv, qd + kvd, kvd},
		{&e.gate, e.gateUp, 0, c.Intermediate}, {&e.up, e.gateUp, c.Intermediate, c.Intermediate}} {
		if *v.p, err = b.NewView(v.of, v.col, v.cols); err != nil {
			return nil, fmt.Errorf("engine: activations: %w", err)
		}
	}
	e.refs = make([]int32, opts.KVBlocks)
	e.freeBlocks = make([]int32, opts.KVBlocks)
	for i := range e.freeBlocks {
		e.freeBlocks[i] = int32(opts.KVBlocks - 1 - i) // pop from the end: block 0 first
	}
	return e, nil
}

// upStacked uploads the tensors names as one weight named name: their rows
// stacked in order (1-D tensors: concatenated), in their common dtype, or
// in float32 when they differ.
func upStacked(m *llama.Model, b Backend, name string, names []string) (Weight, error) {
	raws := make([][]byte, len(names))
	infos := make([]safetensors.Info, len(names))
	for i, n := range names {
		var err error
		if raws[i], infos[i], err = m.Tensors.Bytes(n); err != nil {
			return nil, err
		}
		a, z := infos[0].Shape, infos[i].Shape
		if len(z) < 1 || len(z) > 2 || len(z) != len(a) || (len(z) == 2 && z[1] != a[1]) {
			return nil, fmt.Errorf("%w: %s has shape %v, %s has %v: they cannot be stacked", ErrBadInput, n, z, names[0], a)
		}
	}
	dtype := infos[0].DType
	for _, in := range infos {
		if in.DType != dtype {
			dtype = safetensors.F32
		}
	}
	var all []byte
	rows := 0
	for i, raw := range raws {
		if infos[i].DType != dtype { // mixed dtypes: everything in float32
			f := make([]float32, len(raw)/infos[i].DType.Size())
			if err := safetensors.DecodeFloat32(f, raw, infos[i].DType); err != nil {
				return nil, fmt.Errorf("engine: %s: %w", names[i], err)
			}
			raw = make([]byte, 4*len(f))
			for j, v := range f {
				binary.LittleEndian.PutUint32(raw[4*j:], math.Float32bits(v))
			}
		}
		all = append(all, raw...)
		rows += infos[i].Shape[0]
	}
	shape := []int{rows}
	if len(infos[0].Shape) == 2 {
		shape = []int{rows, infos[0].Shape[1]}
	}
	w, err := b.Upload(name, dtype, shape, all)
	if err != nil {
		return nil, fmt.Errorf("engine: upload %s: %w", name, err)
	}
	return w, nil
}

// Config is the model's configuration.
func (e *Engine) Config() *llama.Config { return e.cfg }

// Options are the engine's sizes.
func (e *Engine) Options() Options { return e.opts }

// Backend is the backend the engine runs on.
func (e *Engine) Backend() Backend { return e.b }

// FreeBlocks is the number of unused KV pages.
func (e *Engine) FreeBlocks() int { return len(e.freeBlocks) }

// BlocksFor is the number of KV pages a sequence of n tokens holds.
func (e *Engine) BlocksFor(n int) int { return (n + e.opts.BlockSize - 1) / e.opts.BlockSize }

// Close releases the backend.
func (e *Engine) Close() error { return e.b.Close() }

// LoadAdapter places a in slot, replacing any adapter there.
func (e *Engine) LoadAdapter(slot int, a *lora.Adapter) error {
	if slot < 0 || slot >= len(e.slots) {
		return fmt.Errorf("%w: %d (have %d)", ErrNoSlot, slot, len(e.slots))
	}
	if len(a.Layers) != e.cfg.Layers {
		return fmt.Errorf("%w: adapter %s has %d layers, model has %d", lora.ErrMismatch, a.Name, len(a.Layers), e.cfg.Layers)
	}
	if err := e.b.LoadAdapter(slot, a); err != nil {
		return fmt.Errorf("engine: load adapter %s into slot %d: %w", a.Name, slot, err)
	}
	e.setSlot(slot, a)
	return nil
}

// Prepared is an adapter made ready for Engine.LoadPrepared by
// Engine.PrepareAdapter.
type Prepared struct {
	a  *lora.Adapter
	bp PreparedAdapter // nil when the backend has no AdapterPreparer
}

// Release frees what PrepareAdapter staged if LoadPrepared never took it.
// Safe to call more than once.
func (p *Prepared) Release() {
	if p != nil && p.bp != nil {
		p.bp.Release()
	}
}

// PrepareAdapter does the host-side part of loading a (conversion and
// staging on backends that are AdapterPreparers; nothing on others). Unlike
// the other methods it may be called from any goroutine, also while another
// runs steps.
func (e *Engine) PrepareAdapter(a *lora.Adapter) (*Prepared, error) {
	if a == nil {
		return nil, fmt.Errorf("%w: nil adapter", ErrBadInput)
	}
	if len(a.Layers) != e.cfg.Layers {
		return nil, fmt.Errorf("%w: adapter %s has %d layers, model has %d", lora.ErrMismatch, a.Name, len(a.Layers), e.cfg.Layers)
	}
	p := &Prepared{a: a}
	if ap, ok := e.b.(AdapterPreparer); ok {
		bp, err := ap.PrepareAdapter(a)
		if err != nil {
			return nil, fmt.Errorf("engine: prepare adapter %s: %w", a.Name, err)
		}
		p.bp = bp
	}
	return p, nil
}

// LoadPrepared places a prepared adapter in slot, replacing any adapter
// there, like LoadAdapter; on an AdapterPreparer backend it does not wait
// for the upload (the first step that uses the slot does). It consumes p.
func (e *Engine) LoadPrepared(slot int, p *Prepared) error {
	if p == nil || p.a == nil {
		return fmt.Errorf("%w: nil prepared adapter", ErrBadInput)
	}
	if slot < 0 || slot >= len(e.slots) {
		p.Release()
		return fmt.Errorf("%w: %d (have %d)", ErrNoSlot, slot, len(e.slots))
	}
	if p.bp == nil {
		return e.LoadAdapter(slot, p.a)
	}
	if err := e.b.(AdapterPreparer).LoadPrepared(slot, p.bp); err != nil {
		return fmt.Errorf("engine: load adapter %s into slot %d: %w", p.a.Name, slot, err)
	}
	e.setSlot(slot, p.a)
	return nil
}

// UnloadAdapter empties slot.
func (e *Engine) UnloadAdapter(slot int) error {
	if slot < 0 || slot >= len(e.slots) {
		return fmt.Errorf("%w: %d (have %d)", ErrNoSlot, slot, len(e.slots))
	}
	if err := e.b.UnloadAdapter(slot); err != nil {
		return err
	}
	e.setSlot(slot, nil)
	return nil
}

func (e *Engine) setSlot(slot int, a *lora.Adapter) {
	for _, ad := range []*lora.Adapter{e.slots[slot], a} {
		if ad == nil {
			continue
		}
		d := 1
		if ad == e.slots[slot] {
			d = -1
		}
		for l := range ad.Layers {
			for m, p := range ad.Layers[l] {
				if p != nil {
					e.loraUse[l][m] += d
				}
			}
		}
	}
	e.slots[slot] = a
}

// Sequence is one sequence's KV cache state.
type Sequence struct {
	blocks []int32
	n      int
}

// Len is the number of tokens in the sequence's cache.
func (s *Sequence) Len() int { return s.n }

// Release returns a sequence's KV pages to the pool; the sequence is empty after.
func (e *Engine) Release(s *Sequence) {
	for _, b := range s.blocks {
		e.Unref(b)
	}
	s.blocks, s.n = nil, 0
}

// Reserve gives s pages for n tokens in all (those in its cache and those
// the coming steps append); pages it holds stay. With too few free pages
// it fails with ErrKVFull and allocates nothing. The scheduler reserves
// every input's pages before it issues a step, so a step it issues never
// fails for want of pages.
func (e *Engine) Reserve(s *Sequence, n int) error {
	need := e.BlocksFor(n) - len(s.blocks)
	if need <= 0 {
		return nil
	}
	if need > len(e.freeBlocks) {
		return fmt.Errorf("%w: need %d pages, %d free", ErrKVFull, need, len(e.freeBlocks))
	}
	for range need {
		b := e.freeBlocks[len(e.freeBlocks)-1]
		e.freeBlocks = e.freeBlocks[:len(e.freeBlocks)-1]
		e.refs[b] = 1
		s.blocks = append(s.blocks, b)
	}
	return nil
}

// Attach starts an empty sequence on pages that already hold the KV of its
// first n tokens (a cached prefix: full pages, so the sequence's own tokens
// go to pages of its own); each page gains a holder.
func (e *Engine) Attach(s *Sequence, blocks []int32, n int) error {
	if s.n != 0 || len(s.blocks) != 0 {
		return fmt.Errorf("%w: attach to a sequence that holds tokens", ErrBadInput)
	}
	if n != len(blocks)*e.opts.BlockSize {
		return fmt.Errorf("%w: attach %d tokens to %d pages of %d", ErrBadInput, n, len(blocks), e.opts.BlockSize)
	}
	for _, b := range blocks {
		if b < 0 || int(b) >= len(e.refs) || e.refs[b] <= 0 {
			return fmt.Errorf("%w: attach page %d that nobody holds", ErrBadInput, b)
		}
	}
	for _, b := range blocks {
		e.refs[b]++
	}
	s.blocks, s.n = append([]int32(nil), blocks...), n
	return nil
}

// Blocks is the sequence's page table (not to be modified).
func (s *Sequence) Blocks() []int32 { return s.blocks }

// Retain adds a holder to a page a sequence holds (the prefix cache keeps
// it past the sequence); Unref drops one.
func (e *Engine) Retain(b int32) { e.refs[b]++ }

// Unref drops a holder of page b; the page is free when none is left.
func (e *Engine) Unref(b int32) {
	e.refs[b]--
	if e.refs[b] == 0 {
		e.freeBlocks = append(e.freeBlocks, b)
	}
}

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
	for i := range sp {
		if !sp[i].Skip {
			if err := sp[i].Params.Validate(); err != nil {
				return nil, err
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
		V := e.cfg.VocabSize
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
			out[i] = smp.Sample(l[len(l)-V:])
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
		rows = append(rows, RowSample{Row: outRow[i] + n - 1, Params: s.Params, Seed: s.Seed, Counter: s.Index})
		who = append(who, i)
	}
	got := make([]sample.Choice, len(rows))
	err = e.run(in, meta, func() error {
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
// step's metadata; outRow[i] is the first logits row of input i.
func (e *Engine) prepare(ctx context.Context, in []Input) (*StepMeta, []int, error) {
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
	return meta, outRow, nil
}

// loraMask is the Shape.LoRA of a step with adapters: every projection that
// some loaded adapter changes in some layer.
func (e *Engine) loraMask() uint8 {
	var m uint8
	for l := range e.loraUse {
		for p, n := range e.loraUse[l] {
			if n > 0 {
				m |= 1 << p
			}
		}
	}
	return m
}

// program is the forward pass for steps of shape s.
func (e *Engine) program(s Shape) Program {
	return Program{Shape: s, Run: func(b Ops) { e.forward(b, s) }}
}

// Warmup lets a backend that records programs (CUDA graphs) record the
// engine's programs for steps without adapters and with adapters on every
// projection before the first request. Other backends do nothing.
func (e *Engine) Warmup() error {
	w, ok := e.b.(Warmer)
	if !ok {
		return nil
	}
	progs := []Program{e.program(Shape{}), e.program(Shape{LoRA: 1<<llama.NumModules - 1})}
	f := func() error { return w.Warmup(progs) }
	if r, ok := e.b.(Runner); ok {
		return r.Run(f)
	}
	return f()
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
		if err := e.b.Execute(meta, prog); err != nil {
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
	lora := func(out, in Buffer, l int, m llama.Module) {
		if s.LoRA&(1<<m) != 0 {
			b.LoRA(out, in, l, m)
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
		lora(e.q, e.h, l, llama.Q)
		lora(e.k, e.h, l, llama.K)
		lora(e.v, e.h, l, llama.V)
		if lw.qNorm != nil {
			fo.HeadRMSNorm(e.q, c.Heads, c.HeadDim, lw.qNorm, eps)
			fo.HeadRMSNorm(e.k, c.KVHeads, c.HeadDim, lw.kNorm, eps)
		}
		b.Attention(e.attn, e.q, e.k, e.v, l, scale, e.invFreq)
		b.Linear(e.tmp, e.attn, lw.o)
		lora(e.tmp, e.attn, l, llama.O)
		b.AddRMSNorm(e.x, e.tmp, e.h, lw.postNorm, eps)
		b.Linear(e.gateUp, e.h, lw.gateUp)
		lora(e.gate, e.h, l, llama.Gate)
		lora(e.up, e.h, l, llama.Up)
		b.SiLUMul(e.act, e.gate, e.up)
		b.Linear(e.tmp, e.act, lw.down)
		lora(e.tmp, e.act, l, llama.Down)
	}
	b.AddRMSNorm(e.x, e.tmp, nil, nil, eps) // x += the last MLP output
	b.Logits(e.logits, e.x, e.norm, e.head, eps)
}
