package engine

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"

	"github.com/peftd/peftd/internal/parallel"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/lora"
	"github.com/peftd/peftd/runtime/safetensors"
)

// Errors returned (wrapped) by the engine.
var (
	ErrKVFull     = errors.New("engine: KV cache full")
	ErrTooMany    = errors.New("engine: step exceeds the token budget")
	ErrBadInput   = errors.New("engine: bad step input")
	ErrNoSlot     = errors.New("engine: no such adapter slot")
	ErrContextLen = errors.New("engine: sequence exceeds the model's context length")
	// ErrInFlight: a step was launched and not yet waited for
	// (Flight.Wait); the engine runs one step at a time.
	ErrInFlight = errors.New("engine: a launched step has not been waited for")
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
	scoreBuf                                                     []float32 // host copy of scored logits rows (StepSample with Targets)

	freeBlocks []int32
	// refs counts the holders of each page: the sequences whose page table
	// lists it and, for a page kept for prefix reuse, its keeper (Retain).
	// A page returns to freeBlocks when its count reaches 0.
	refs  []int32
	slots []*lora.Adapter
	// loraUse[l][m] counts the loaded adapters that change projection m of layer l.
	loraUse [][llama.NumModules]int
	// times is where the host time of the last step went (LastStepTimes).
	times StepTimes
	// fly is the launched step not yet waited for (Launch, Flight.Wait);
	// next, one launched behind it on a Chainer (launchChained)
	fly, next *Flight
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
		if w, ok, err := upFP8(m, b, name, []string{name}); ok || err != nil {
			return w, err
		}
		raw, info, err := m.Weight(name)
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
	if w, ok, err := upFP8(m, b, name, names); ok || err != nil {
		return w, err
	}
	raws := make([][]byte, len(names))
	infos := make([]safetensors.Info, len(names))
	for i, n := range names {
		var err error
		if raws[i], infos[i], err = m.Weight(n); err != nil {
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
		raws[i] = raw
		rows += infos[i].Shape[0]
	}
	shape := []int{rows}
	if len(infos[0].Shape) == 2 {
		shape = []int{rows, infos[0].Shape[1]}
	}
	var w Weight
	var err error
	if pu, ok := b.(PartsUploader); ok && len(raws) > 1 {
		w, err = pu.UploadParts(name, dtype, shape, raws) // no joined copy on the host
	} else {
		w, err = b.Upload(name, dtype, shape, concat(raws))
	}
	if err != nil {
		return nil, fmt.Errorf("engine: upload %s: %w", name, err)
	}
	return w, nil
}

// upFP8 hands the FP8 weights names, their rows stacked in order, to an
// FP8Uploader backend as weight name. ok is false (nothing uploaded) when
// b is not one, a part is not F8_E4M3, the widths differ, or b does not
// keep the stacked weight in FP8.
func upFP8(m *llama.Model, b Backend, name string, names []string) (w Weight, ok bool, err error) {
	fb, is := b.(FP8Uploader)
	if !is {
		return nil, false, nil
	}
	rows, cols := 0, 0
	for i, n := range names {
		info, found := m.Tensors.Info(n)
		if !found || info.DType != safetensors.F8E4 || len(info.Shape) != 2 || (i > 0 && info.Shape[1] != cols) {
			return nil, false, nil
		}
		rows, cols = rows+info.Shape[0], info.Shape[1]
	}
	if !fb.KeepsFP8(name, rows, cols) {
		return nil, false, nil
	}
	qs := make([][]byte, len(names))
	var scale []float32
	for i, n := range names {
		q, s, _, _, _, err := m.FP8Weight(n)
		if err != nil {
			return nil, false, err
		}
		qs[i], scale = q, append(scale, s...)
	}
	if w, err = fb.UploadFP8(name, rows, cols, qs, scale); err != nil {
		return nil, false, fmt.Errorf("engine: upload %s: %w", name, err)
	}
	return w, true, nil
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

// concat joins parts into one new slice, copying on several goroutines
// (the stacked projections of an 8B model are gigabytes: one goroutine's
// memmove from a mapped checkpoint was a good part of the load).
func concat(parts [][]byte) []byte {
	total := 0
	for _, p := range parts {
		total += len(p)
	}
	all := make([]byte, total)
	parallel.Ranges(total, 16<<20, func(lo, hi int) error {
		off := 0
		for _, p := range parts {
			if a, b := max(lo, off), min(hi, off+len(p)); a < b {
				copy(all[a:b], p[a-off:b-off])
			}
			off += len(p)
		}
		return nil
	})
	return all
}
