// Package gpu is the CUDA backend of the engine: bf16 weights and
// activations with float32 arithmetic, a paged bf16 KV cache, cuBLASLt GEMMs,
// NVRTC-compiled kernels (package kernels) and segmented LoRA (SGMV) over
// per-slot adapter weights. Everything runs on one stream of one device,
// driven from one goroutine (the engine's); CUDA calls hop to the context's
// locked executor thread, once per step when the engine wraps the step in
// Backend.Run (engine.Runner).
package gpu

import (
	"errors"
	"fmt"
	"math"
	"sync"

	"github.com/peftd/peftd/kernels"
	"github.com/peftd/peftd/runtime/cuda"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/lora"
	"github.com/peftd/peftd/runtime/safetensors"
	"github.com/peftd/peftd/runtime/sample"
)

// ErrBadStep marks step metadata the backend refuses (it would index outside its buffers).
var ErrBadStep = errors.New("gpu: bad step metadata")

// Available reports whether a usable GPU is present: nil when the driver,
// a device, NVRTC and cuBLASLt all load; otherwise an error wrapping
// cuda.ErrNoDriver, cuda.ErrNoDevice or cuda.ErrNoLibrary.
func Available() error {
	if err := cuda.Init(); err != nil {
		return err
	}
	if _, _, err := cuda.NVRTCVersion(); err != nil {
		return err
	}
	if _, err := cuda.CublasLtVersion(); err != nil {
		return err
	}
	return nil
}

// Options configure New.
type Options struct {
	Device         int             // CUDA device ordinal
	Kernels        kernels.Options // kernel cache and NVRTC options
	WorkspaceBytes int             // cuBLASLt workspace; default 32 MiB
	// WeightFormat is the format of the decoder layers' projection weights:
	// WeightsBF16 ("" too) or WeightsFP8 (e4m3 with per-output-row scales,
	// activations quantized per token; see fp8.go).
	WeightFormat string
	// Eager runs every step op by op: no CUDA graphs for decode steps.
	Eager bool
}

// Buffer is a device activation matrix [rows, cols], bf16 (or float32 once
// Logits has written it); a view (NewView) is columns [off, off+cols) of
// another buffer's rows, ld values apart.
type Buffer struct {
	mem        *cuda.DeviceBuffer // bf16
	f32        *cuda.DeviceBuffer // float32 storage, allocated by Logits
	isF32      bool
	rows, cols int
	off, ld    int // first column and row stride, in values
}

// whole reports whether the buffer is not a view (its rows are contiguous).
func (x *Buffer) whole() bool { return x.off == 0 && x.ld == x.cols }

// Cols is the row width.
func (b *Buffer) Cols() int { return b.cols }

type weight struct {
	mem        *cuda.DeviceBuffer
	rows, cols int
}

type slotState struct {
	mem     *cuda.DeviceBuffer
	maxRank int
}

type funcs struct {
	embed, addRMSNorm, rmsnormRows, ropeStore, attention, siluMul, shrink, expand *cuda.Function
	addBias, headRMSNorm                                                          *cuda.Function
	sgShrink, sgShrink4, sgExpand, sample                                         *cuda.Function
	attnReduce                                                                    *cuda.Function
	attnDecode                                                                    [4]*cuda.Function // attn_decode_g1, g2, g4, g8
}

// Backend implements engine.Backend on one CUDA device.
type Backend struct {
	ctx *cuda.Context
	s   *cuda.Stream
	mm  *cuda.Matmul
	mod *cuda.Module
	fn  funcs
	// KernelInfo tells whether the kernels were compiled or read from the cache.
	KernelInfo kernels.Info

	cfg    *llama.Config
	kv     engine.KVSpec
	maxT   int
	kcache *cuda.DeviceBuffer
	vcache *cuda.DeviceBuffer
	layerB int // bytes of one layer's K (or V) cache

	meta     *engine.StepMeta
	metaHost *cuda.HostBuffer
	metaDev  *cuda.DeviceBuffer

	// The step's launch parameters, set by Begin (eager, the metadata in
	// metaDev) or fillGraphMeta (graph layout, padded to a bucket): the ops
	// read nothing else of the step.
	off           metaOffsets
	metaBase      cuda.DevicePtr // device address of the metadata words
	nRows         int            // rows the ops run over
	nLogit        int            // logits rows
	nLora         int            // LoRA rows (v0 kernels)
	stepRank      int            // LoRA rank the launches are sized for (0: no LoRA)
	stepTmp       cuda.DevicePtr // LoRA scratch and its size in floats
	stepTmpFloats int
	part          *cuda.DeviceBuffer // attn_decode partials
	graphLayout   bool               // the fixed-layout launches (graph.go)
	g             graphState

	invFreqHost []float32
	invFreq     *cuda.DeviceBuffer
	normed      *cuda.DeviceBuffer
	readHost    *cuda.HostBuffer
	smpHost     *cuda.HostBuffer // SampleRows: parameters, then results
	smpDev      *cuda.DeviceBuffer

	slots     []*slotState
	table     *cuda.DeviceBuffer
	tableHost []uint64 // 4 words per entry: a, b, rank|scale<<32, 0
	loraTmp   *cuda.DeviceBuffer
	maxRank   int
	nTiles    int // SGMV row tiles of the step
	// loraV0 forces the first (row-at-a-time) LoRA kernels; the benchmark compares them.
	loraV0      bool
	shrinkNB    int // 0: choose; 1 or 4: force sgmv_shrink or sgmv_shrink4 (benchmark)
	expandShmem int // dynamic shared memory sgmv_expand may use (raised on demand)
	// SGMV v2 (kernels/sgmv.cu, shrink + expand in one launch per op), loaded
	// with the first adapter; nil when that module failed to build or load
	// (sgErr), and then v1 runs. loraV1 / loraV2 force v1 / v2 (benchmark,
	// tests); otherwise v2 runs where tiles average >= sgV2MinRows rows.
	sgMod      *cuda.Module
	sgFused    [2]*cuda.Function // 8 and 32 rank rows per shrink item
	sgErr      error
	sgTried    bool
	loraV1     bool
	loraV2     bool
	fusedShmem int

	// Split-KV decode attention (attn_decode + attn_reduce) for sequences
	// with one row in the step; the per-row kernel takes the other rows.
	// attnV0 forces the per-row kernel for every row (benchmark, tests).
	attnV0     bool
	decOK      bool // the model's head shape suits attn_decode
	nDec, nPre int  // decode sequences and prefill rows of the step
	decChunk   int  // positions per split
	decSplit   int  // splits per (sequence, KV head)
	attnPart   *cuda.DeviceBuffer

	// asynchronous adapter loads (PrepareAdapter / LoadPrepared)
	cs       *cuda.Stream // copy stream
	loads    []*pendingLoad
	hostMu   sync.Mutex
	hostPool []*cuda.HostBuffer
	events   []*cuda.Event

	weights []*weight
	// FP8 projections (Options.WeightFormat fp8; nil for bf16) and the write
	// generation of the activation buffers: ops that may write one bump gen,
	// so the FP8 path re-uses a quantized input only while it is unchanged.
	f8      *fp8State
	gen     uint64
	buffers []*Buffer
	err     error

	// step timing (SetTiming): events around the device work of a step
	timing       bool
	evBeg, evEnd *cuda.Event
	timed        bool
	lastStepMs   float32
}

// SetTiming turns on device timing of each step: from the metadata upload
// in Begin to the start of the result copy in Read (StepMs reads it).
func (b *Backend) SetTiming(on bool) error {
	if on && b.evBeg == nil {
		var err error
		if b.evBeg, err = b.ctx.NewEvent(true); err != nil {
			return err
		}
		if b.evEnd, err = b.ctx.NewEvent(true); err != nil {
			return err
		}
	}
	b.timing = on
	return nil
}

// StepMs is the device time of the last timed step in milliseconds (0 if none).
func (b *Backend) StepMs() float32 { return b.lastStepMs }

type metaOffsets struct {
	tokens, pos, kvSlots, rowSeq, seqInfo, pages, loraRows, loraSlots, logitRows, tiles, decSeqs, preRows, end int
}

// New opens device opts.Device and loads the kernels (compiling them on a cold cache).
func New(opts Options) (*Backend, error) {
	ctx, err := cuda.NewContext(opts.Device)
	if err != nil {
		return nil, err
	}
	b := &Backend{ctx: ctx}
	if err := b.open(opts); err != nil {
		b.Close()
		return nil, err
	}
	return b, nil
}

func (b *Backend) open(opts Options) error {
	b.g.off = opts.Eager
	var err error
	if b.s, err = b.ctx.NewStream(); err != nil {
		return err
	}
	if b.cs, err = b.ctx.NewStream(); err != nil {
		return err
	}
	ws := opts.WorkspaceBytes
	if ws <= 0 {
		ws = 32 << 20
	}
	if b.mm, err = b.ctx.NewMatmul(ws); err != nil {
		return err
	}
	if b.mod, b.KernelInfo, err = kernels.Load(b.ctx, kernels.Llama, opts.Kernels); err != nil {
		return err
	}
	format, err := ParseWeightFormat(opts.WeightFormat)
	if err != nil {
		return err
	}
	if format == WeightsFP8 {
		if b.f8, err = newFP8(b.ctx, b.s, b.mm, opts.Kernels); err != nil {
			return err
		}
	}
	for _, f := range []struct {
		p    **cuda.Function
		name string
	}{{&b.fn.embed, "embed"}, {&b.fn.addRMSNorm, "add_rmsnorm"}, {&b.fn.rmsnormRows, "rmsnorm_rows"}, {&b.fn.ropeStore, "rope_store"},
		{&b.fn.attention, "attention"}, {&b.fn.siluMul, "silu_mul"},
		{&b.fn.shrink, "lora_shrink"}, {&b.fn.expand, "lora_expand"},
		{&b.fn.sgShrink, "sgmv_shrink"}, {&b.fn.sgShrink4, "sgmv_shrink4"}, {&b.fn.sgExpand, "sgmv_expand"},
		{&b.fn.sample, "sample_rows"}, {&b.fn.attnDecode[0], "attn_decode_g1"}, {&b.fn.attnDecode[1], "attn_decode_g2"},
		{&b.fn.attnDecode[2], "attn_decode_g4"}, {&b.fn.attnDecode[3], "attn_decode_g8"}, {&b.fn.attnReduce, "attn_reduce"},
		{&b.fn.addBias, "add_bias"}, {&b.fn.headRMSNorm, "head_rmsnorm"}} {
		if *f.p, err = b.mod.Function(f.name); err != nil {
			return err
		}
	}
	return nil
}

// Device describes the GPU.
func (b *Backend) Device() cuda.Device { return b.ctx.Device() }

// Name is "cuda".
func (b *Backend) Name() string { return "cuda" }

// Init allocates the KV cache and per-step scratch.
func (b *Backend) Init(cfg *llama.Config, spec engine.Spec) error {
	kv, maxTokens := spec.KV, spec.MaxTokens
	if kv.KVHeads != cfg.KVHeads || kv.HeadDim != cfg.HeadDim || kv.Layers != cfg.Layers {
		return fmt.Errorf("gpu: KV spec %+v does not match the model", kv)
	}
	if cfg.HeadDim > 256 {
		return fmt.Errorf("gpu: head_dim %d > 256 is not supported by the attention kernel", cfg.HeadDim)
	}
	b.cfg, b.kv, b.maxT = cfg, kv, maxTokens
	hd := kv.HeadDim
	b.decOK = hd >= 8 && hd <= 256 && hd&(hd-1) == 0 && cfg.Heads%kv.KVHeads == 0 && cfg.Heads/kv.KVHeads <= decMaxG
	width := kv.KVHeads * kv.HeadDim
	b.layerB = kv.Blocks * kv.BlockSize * width * 2
	var err error
	if b.kcache, err = b.ctx.Alloc(kv.Layers * b.layerB); err != nil {
		return fmt.Errorf("gpu: KV cache: %w", err)
	}
	if b.vcache, err = b.ctx.Alloc(kv.Layers * b.layerB); err != nil {
		return fmt.Errorf("gpu: KV cache: %w", err)
	}
	if err := b.growMeta(11*maxTokens + kv.Blocks + 16); err != nil {
		return err
	}
	if b.normed, err = b.ctx.Alloc(maxTokens * cfg.Hidden * 2); err != nil {
		return err
	}
	if b.invFreq, err = b.ctx.Alloc(cfg.HeadDim / 2 * 4); err != nil {
		return err
	}
	// Sized once, so that recorded graphs never see them move.
	if err := b.growTable(max(spec.AdapterSlots, 1)); err != nil {
		return err
	}
	if b.f8 != nil {
		if err := b.f8.reserve(maxTokens, max(cfg.Hidden, cfg.Intermediate)); err != nil {
			return err
		}
	}
	b.g.slots = max(spec.AdapterSlots, 1)
	maxContext := spec.MaxContext
	if maxContext <= 0 {
		maxContext = kv.Blocks * kv.BlockSize
	}
	if !graphsUsable() {
		b.g.off = true
	}
	return b.initGraphs(maxContext)
}

func (b *Backend) growMeta(n int) error {
	if b.metaHost != nil && b.metaHost.Size() >= 4*n {
		return nil
	}
	if err := b.s.Synchronize(); err != nil {
		return err
	}
	b.metaHost.Free()
	b.metaDev.Free()
	var err error
	if b.metaHost, err = b.ctx.AllocHost(4 * n); err != nil {
		return err
	}
	b.metaDev, err = b.ctx.Alloc(4 * n)
	return err
}

// Upload converts a tensor to bf16 on the device; with FP8 weights, a
// decoder layer's projection is then quantized to e4m3 on the device (one
// float32 scale per output row) and only the e4m3 copy is kept.
func (b *Backend) Upload(name string, dtype safetensors.DType, shape []int, raw []byte) (engine.Weight, error) {
	n := 1
	for _, d := range shape {
		n *= d
	}
	w := &weight{rows: 1, cols: n}
	if len(shape) == 2 {
		w.rows, w.cols = shape[0], shape[1]
	} else if len(shape) != 1 {
		return nil, fmt.Errorf("gpu: %s: %d-dimensional tensors are not supported", name, len(shape))
	}
	host := make([]uint16, n)
	if err := encodeBF16(host, raw, dtype); err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	if b.f8 != nil && fp8Projection(name, shape) {
		fw, err := b.f8.upload(host, w.rows, w.cols)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		return fw, nil
	}
	var err error
	if w.mem, err = b.ctx.Alloc(2 * n); err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	if err := cuda.CopyHtoD(b.s, w.mem.Ptr(), host); err != nil {
		return nil, err
	}
	b.weights = append(b.weights, w)
	return w, nil
}

// NewBuffer allocates a bf16 activation matrix.
func (b *Backend) NewBuffer(rows, cols int) (engine.Buffer, error) {
	m, err := b.ctx.Alloc(rows * cols * 2)
	if err != nil {
		return nil, err
	}
	buf := &Buffer{mem: m, rows: rows, cols: cols, ld: cols}
	b.buffers = append(b.buffers, buf)
	return buf, nil
}

// NewView is columns [col, col+cols) of every row of parent (a buffer from
// NewBuffer): the q, k and v of a fused qkv output, the gate and up of a
// fused gate_up output.
func (b *Backend) NewView(parent engine.Buffer, col, cols int) (engine.Buffer, error) {
	p, ok := parent.(*Buffer)
	if !ok || p == nil || !p.whole() {
		return nil, fmt.Errorf("gpu: view of a buffer that is not a whole buffer of this backend")
	}
	if col < 0 || cols <= 0 || col+cols > p.cols {
		return nil, fmt.Errorf("gpu: view [%d, %d) of a buffer of %d columns", col, col+cols, p.cols)
	}
	return &Buffer{mem: p.mem, rows: p.rows, cols: cols, off: col, ld: p.ld}, nil
}

const entryWords = 4 // a, b, rank|scale, pad: struct LoraEntry in llama.cu

func (b *Backend) entry(slot, layer int, m llama.Module) int {
	return (slot*b.cfg.Layers+layer)*int(llama.NumModules) + int(m)
}

// LoadAdapter copies an adapter's A and B matrices (bf16, exact ranks) into
// one device allocation for the slot and points the slot's table entries at them.
func (b *Backend) LoadAdapter(slot int, a *lora.Adapter) error {
	if slot < 0 {
		return fmt.Errorf("gpu: slot %d", slot)
	}
	if len(a.Layers) != b.cfg.Layers {
		return fmt.Errorf("gpu: adapter %s has %d layers, model has %d", a.Name, len(a.Layers), b.cfg.Layers)
	}
	const align = 128 // elements (256 bytes)
	total := 0
	st := &slotState{}
	for _, l := range a.Layers {
		for m, p := range l {
			if p == nil {
				continue
			}
			in, out := b.cfg.Dims(llama.Module(m))
			if len(p.A) != p.Rank*in || len(p.B) != out*p.Rank {
				return fmt.Errorf("gpu: adapter %s: %s has A %d and B %d values for rank %d, want %d and %d",
					a.Name, llama.Module(m), len(p.A), len(p.B), p.Rank, p.Rank*in, out*p.Rank)
			}
			total += (len(p.A)+align-1)/align*align + (len(p.B)+align-1)/align*align
			st.maxRank = max(st.maxRank, p.Rank)
		}
	}
	if err := b.s.Synchronize(); err != nil { // nothing in flight may read the old slot
		return err
	}
	if err := b.settle(slot); err != nil { // nor an asynchronous load still fill it
		return err
	}
	for len(b.slots) <= slot {
		b.slots = append(b.slots, nil)
	}
	if err := b.growTable(len(b.slots)); err != nil {
		return err
	}
	b.clearSlot(slot)
	host := make([]uint16, max(total, 1))
	var err error
	if st.mem, err = b.ctx.Alloc(2 * len(host)); err != nil {
		return fmt.Errorf("gpu: adapter %s: %w", a.Name, err)
	}
	off := 0
	base := st.mem.Ptr()
	for l, lay := range a.Layers {
		for m, p := range lay {
			if p == nil {
				continue
			}
			aOff := off
			f32ToBF16(host[off:off+len(p.A)], p.A)
			off += (len(p.A) + align - 1) / align * align
			bOff := off
			f32ToBF16(host[off:off+len(p.B)], p.B)
			off += (len(p.B) + align - 1) / align * align
			e := b.entry(slot, l, llama.Module(m)) * entryWords
			b.tableHost[e] = base + uint64(2*aOff)
			b.tableHost[e+1] = base + uint64(2*bOff)
			b.tableHost[e+2] = uint64(uint32(p.Rank)) | uint64(math.Float32bits(p.Scale))<<32
		}
	}
	if err := cuda.CopyHtoD(b.s, base, host); err != nil {
		st.mem.Free()
		b.clearSlot(slot)
		return err
	}
	b.slots[slot] = st
	return b.syncTable()
}

func (b *Backend) clearSlot(slot int) {
	if slot < len(b.slots) && b.slots[slot] != nil {
		b.slots[slot].mem.Free()
		b.slots[slot] = nil
	}
	n := b.cfg.Layers * int(llama.NumModules) * entryWords
	clear(b.tableHost[slot*n : (slot+1)*n])
}

func (b *Backend) growTable(slots int) error {
	n := slots * b.cfg.Layers * int(llama.NumModules) * entryWords
	if len(b.tableHost) >= n {
		return nil
	}
	b.tableHost = append(b.tableHost, make([]uint64, n-len(b.tableHost))...)
	b.table.Free()
	var err error
	b.table, err = b.ctx.Alloc(8 * n)
	return err
}

// syncTable uploads the LoRA table and sizes the shrink scratch for the largest rank.
func (b *Backend) syncTable() error {
	b.maxRank = 0
	for _, s := range b.slots {
		if s != nil {
			b.maxRank = max(b.maxRank, s.maxRank)
		}
	}
	if need := b.tmpFloats()*4 + sgCtrBytes; b.loraTmp == nil || b.loraTmp.Size() < need {
		b.loraTmp.Free()
		var err error
		if b.loraTmp, err = b.ctx.Alloc(need); err != nil {
			return err
		}
	}
	// the fused kernels' counters sit after the scratch, whose size follows
	// maxRank: zero them where they now are (stream-ordered after any launch)
	if err := b.s.Memset32(b.loraCtr(), 0, sgCtrBytes/4); err != nil {
		return err
	}
	if !b.sgTried && b.maxRank > 0 {
		b.sgTried = true
		b.loadSgmv()
	}
	if err := cuda.CopyHtoD(b.s, b.table.Ptr(), b.tableHost); err != nil {
		return err
	}
	return b.s.Synchronize()
}

// UnloadAdapter frees the slot's device weights.
func (b *Backend) UnloadAdapter(slot int) error {
	if slot < 0 || slot >= len(b.slots) || b.slots[slot] == nil {
		return nil
	}
	if err := b.s.Synchronize(); err != nil {
		return err
	}
	if err := b.settle(slot); err != nil {
		return err
	}
	b.clearSlot(slot)
	return b.syncTable()
}

func (b *Backend) i32(off int) cuda.DevicePtr { return b.metaBase + uint64(4*off) }

// Begin validates the step's metadata and uploads it in one copy.
func (b *Backend) Begin(meta *engine.StepMeta) error {
	b.err = nil
	b.gen++
	T := len(meta.Tokens)
	if T == 0 || T > b.maxT {
		return fmt.Errorf("%w: %d rows (max %d)", ErrBadStep, T, b.maxT)
	}
	if len(meta.Positions) != T || len(meta.KVSlots) != T {
		return fmt.Errorf("%w: %d tokens, %d positions, %d KV slots", ErrBadStep, T, len(meta.Positions), len(meta.KVSlots))
	}
	pages, nLora := 0, 0
	for _, s := range meta.Seqs {
		pages += len(s.Blocks)
	}
	for _, g := range meta.LoRA {
		if g.Start < 0 || g.End > T || g.Start > g.End {
			return fmt.Errorf("%w: LoRA segment [%d,%d) outside %d rows", ErrBadStep, g.Start, g.End, T)
		}
		if g.Slot < 0 || g.Slot >= len(b.slots) || b.slots[g.Slot] == nil {
			return fmt.Errorf("%w: LoRA segment uses empty slot %d", ErrBadStep, g.Slot)
		}
		nLora += g.End - g.Start
	}
	o := metaOffsets{tokens: 0, pos: T, kvSlots: 2 * T, rowSeq: 3 * T, seqInfo: 4 * T}
	o.pages = o.seqInfo + 4*len(meta.Seqs)
	o.loraRows = o.pages + pages
	o.loraSlots = o.loraRows + nLora
	o.logitRows = o.loraSlots + nLora
	o.tiles = (o.logitRows + len(meta.LogitRows) + 3) &^ 3 // int4 aligned
	nTiles := 0
	for _, g := range meta.LoRA {
		nTiles += (g.End - g.Start + sgTileRows - 1) / sgTileRows
	}
	o.decSeqs = o.tiles + 4*nTiles
	nDec, maxDecCtx := 0, 0
	useDec := b.decOK && !b.attnV0
	if useDec {
		for _, s := range meta.Seqs {
			if s.Len == 1 {
				nDec++
				maxDecCtx = max(maxDecCtx, s.Context)
			}
		}
	}
	o.preRows = o.decSeqs + nDec
	nPre := T
	if nDec > 0 {
		nPre = T - nDec
	}
	o.end = o.preRows + nPre
	if err := b.s.Synchronize(); err != nil { // the pinned staging may still feed a copy
		return err
	}
	if err := b.growMeta(o.end); err != nil {
		return err
	}
	b.decSplit, b.decChunk = 1, max(maxDecCtx, 1)
	if nDec > 0 {
		if err := b.planDecode(nDec, maxDecCtx); err != nil {
			return err
		}
	}
	if err := b.waitLoads(meta); err != nil {
		return err
	}
	b.timed = false
	if b.timing {
		if err := b.evBeg.Record(b.s); err != nil {
			return err
		}
		b.timed = true
	}
	h := b.metaHost.Int32s()
	V := int32(b.cfg.VocabSize)
	nSlots := int32(b.kv.Blocks * b.kv.BlockSize)
	for i, t := range meta.Tokens {
		if t < 0 || t >= V {
			return fmt.Errorf("%w: token %d outside the vocabulary", ErrBadStep, t)
		}
		if meta.KVSlots[i] < 0 || meta.KVSlots[i] >= nSlots {
			return fmt.Errorf("%w: KV slot %d outside the cache (%d)", ErrBadStep, meta.KVSlots[i], nSlots)
		}
		h[o.tokens+i] = t
	}
	copy(h[o.pos:], meta.Positions)
	copy(h[o.kvSlots:], meta.KVSlots)
	for i := range T {
		h[o.rowSeq+i] = -1
	}
	p := o.pages
	for si, s := range meta.Seqs {
		if s.Start < 0 || s.Len <= 0 || s.Start+s.Len > T || s.Context < s.Len || (s.Context+b.kv.BlockSize-1)/b.kv.BlockSize > len(s.Blocks) {
			return fmt.Errorf("%w: sequence %d %+v", ErrBadStep, si, s)
		}
		for r := s.Start; r < s.Start+s.Len; r++ {
			h[o.rowSeq+r] = int32(si)
		}
		h[o.seqInfo+4*si] = int32(s.Start)
		h[o.seqInfo+4*si+1] = int32(s.Len)
		h[o.seqInfo+4*si+2] = int32(s.Context)
		h[o.seqInfo+4*si+3] = int32(p - o.pages) // offset into the pages array
		for _, blk := range s.Blocks {
			if blk < 0 || int(blk) >= b.kv.Blocks {
				return fmt.Errorf("%w: KV block %d outside the cache (%d)", ErrBadStep, blk, b.kv.Blocks)
			}
			h[p] = blk
			p++
		}
	}
	for i := range T {
		if h[o.rowSeq+i] < 0 {
			return fmt.Errorf("%w: row %d belongs to no sequence", ErrBadStep, i)
		}
	}
	l := 0
	for _, g := range meta.LoRA {
		for r := g.Start; r < g.End; r++ {
			h[o.loraRows+l] = int32(r)
			h[o.loraSlots+l] = int32(g.Slot)
			l++
		}
	}
	for i, r := range meta.LogitRows {
		if r < 0 || int(r) >= T {
			return fmt.Errorf("%w: logit row %d outside %d rows", ErrBadStep, r, T)
		}
		h[o.logitRows+i] = r
	}
	if nDec > 0 {
		d, p := o.decSeqs, o.preRows
		for si, s := range meta.Seqs {
			if s.Len == 1 {
				h[d] = int32(si)
				d++
			} else {
				for r := s.Start; r < s.Start+s.Len; r++ {
					h[p] = int32(r)
					p++
				}
			}
		}
	}
	tl := o.tiles
	for _, g := range meta.LoRA {
		for r := g.Start; r < g.End; r += sgTileRows {
			h[tl], h[tl+1], h[tl+2], h[tl+3] = int32(r), int32(min(sgTileRows, g.End-r)), int32(g.Slot), 0
			tl += 4
		}
	}
	if err := cuda.CopyHtoD(b.s, b.metaDev.Ptr(), h[:o.end]); err != nil {
		return err
	}
	b.meta, b.off, b.nLora, b.nTiles = meta, o, nLora, nTiles
	b.metaBase, b.nRows, b.nLogit, b.graphLayout = b.metaDev.Ptr(), T, len(meta.LogitRows), false
	b.nDec, b.nPre, b.part = nDec, nPre, b.attnPart
	b.stepRank, b.stepTmp, b.stepTmpFloats = b.maxRank, 0, 0
	if b.loraTmp != nil {
		b.stepTmp, b.stepTmpFloats = b.loraTmp.Ptr(), b.tmpFloats()
	}
	return nil
}

// decMaxG is DEC_MAXG in llama.cu: query heads per KV head attn_decode handles.
const decMaxG = 8

// planDecode chooses the KV split of the step's decode sequences: enough
// splits that the grid covers the SMs about four times, at least 32
// positions per split, and the partials' scratch sized for it. The stream is
// idle (Begin synchronized it).
func (b *Backend) planDecode(nDec, maxCtx int) error {
	const minChunk = 32
	blocks := nDec * b.kv.KVHeads
	want := (4*b.ctx.Device().SMs + blocks - 1) / blocks
	split := max(1, min(want, (maxCtx+minChunk-1)/minChunk, 64))
	chunk := (maxCtx + split - 1) / split
	chunk = (chunk + 7) &^ 7
	split = (maxCtx + chunk - 1) / chunk
	b.decSplit, b.decChunk = split, chunk
	if split > 1 {
		need := 4 * nDec * b.cfg.Heads * split * (b.kv.HeadDim + 2)
		if b.attnPart == nil || b.attnPart.Size() < need {
			b.attnPart.Free()
			b.attnPart = nil
			var err error
			if b.attnPart, err = b.ctx.Alloc(max(need, 1<<20)); err != nil {
				return err
			}
		}
	}
	return nil
}

// fail records the first error of the step.
func (b *Backend) fail(err error) {
	if err != nil && b.err == nil {
		b.err = err
	}
}

func (b *Backend) ok() bool { return b.err == nil && b.meta != nil }

func (b *Backend) rows() int { return b.nRows }

func (b *Backend) launch(f *cuda.Function, grid, block cuda.Dim3, args ...any) {
	if b.err != nil {
		return
	}
	b.fail(f.Launch(b.s, grid, block, 0, args...))
}

func buf(x engine.Buffer) *Buffer {
	if x == nil {
		return nil
	}
	return x.(*Buffer)
}

func ptr(x *Buffer) uint64 {
	if x == nil {
		return 0
	}
	return x.mem.Ptr() + uint64(2*x.off)
}

func (b *Backend) check(cond bool, format string, args ...any) bool {
	if !cond {
		b.fail(fmt.Errorf("gpu: "+format, args...))
	}
	return cond
}

// Embed gathers embedding rows.
func (b *Backend) Embed(out engine.Buffer, table engine.Weight) {
	b.gen++
	if !b.ok() {
		return
	}
	o, t := buf(out), table.(*weight)
	if !b.check(o.cols == t.cols && o.whole(), "embed: buffer width %d, table width %d", o.cols, t.cols) {
		return
	}
	b.launch(b.fn.embed, cuda.Dim3{X: b.rows()}, cuda.Dim3{X: 256}, o.mem, t.mem, b.i32(b.off.tokens), t.cols)
}

// AddRMSNorm: x += delta (if any), then out = rmsnorm(x) * w (if out).
func (b *Backend) AddRMSNorm(x, delta, out engine.Buffer, w engine.Weight, eps float32) {
	b.gen++
	if !b.ok() {
		return
	}
	xb, d, o := buf(x), buf(delta), buf(out)
	if d == nil && o == nil {
		return
	}
	if !b.check(xb.whole() && (d == nil || d.whole()) && (o == nil || o.whole()), "rmsnorm: views are not supported") {
		return
	}
	var wp uint64
	if o != nil {
		wt := w.(*weight)
		if !b.check(wt.cols == xb.cols && o.cols == xb.cols, "rmsnorm: widths %d, %d, %d", xb.cols, o.cols, wt.cols) {
			return
		}
		wp = wt.mem.Ptr()
	}
	b.launch(b.fn.addRMSNorm, cuda.Dim3{X: b.rows()}, cuda.Dim3{X: 256}, xb.mem, ptr(d), ptr(o), wp, eps, xb.cols)
}

// AddBias adds bias to every row of out (engine.FamilyOps: Qwen2).
func (b *Backend) AddBias(out engine.Buffer, bias engine.Weight) {
	b.gen++
	if !b.ok() {
		return
	}
	o, wt := buf(out), bias.(*weight)
	if !b.check(wt.cols == o.cols && o.whole(), "add_bias: widths %d, %d", o.cols, wt.cols) {
		return
	}
	b.launch(b.fn.addBias, cuda.Dim3{X: b.rows()}, cuda.Dim3{X: 256}, o.mem, wt.mem.Ptr(), o.cols)
	b.wrote(out)
}

// HeadRMSNorm normalizes each head of every row of x in place
// (engine.FamilyOps: Qwen3's q_norm, k_norm).
func (b *Backend) HeadRMSNorm(x engine.Buffer, heads, headDim int, w engine.Weight, eps float32) {
	b.gen++
	if !b.ok() {
		return
	}
	xb, wt := buf(x), w.(*weight)
	if !b.check(heads*headDim == xb.cols && wt.cols == headDim, "head_rmsnorm: %d heads x %d for width %d, weight %d", heads, headDim, xb.cols, wt.cols) {
		return
	}
	b.launch(b.fn.headRMSNorm, cuda.Dim3{X: b.rows(), Y: heads}, cuda.Dim3{X: 32}, ptr(xb), wt.mem.Ptr(), eps, heads, headDim, xb.ld)
	b.wrote(x)
}

// Linear: out = in @ W^T through cuBLASLt (bf16 in, float32 accumulate, bf16
// out); for an FP8 weight, in's rows are quantized per token (once for
// consecutive projections of the same input) and the product is cuBLASLt's
// FP8 GEMM with both operands' row scales.
func (b *Backend) Linear(out, in engine.Buffer, w engine.Weight) {
	if !b.ok() {
		return
	}
	b.wrote(out)
	if fw, ok := w.(*fp8Weight); ok {
		o, x := buf(out), buf(in)
		if !b.check(x.cols == fw.cols && o.cols == fw.rows && o != x && o.whole() && x.whole(), "linear: in width %d, out width %d, fp8 weight [%d,%d]", x.cols, o.cols, fw.rows, fw.cols) {
			return
		}
		b.fail(b.f8.linear(o.mem.Ptr(), x.mem.Ptr(), b.rows(), fw, b.gen))
		return
	}
	o, x, wt := buf(out), buf(in), w.(*weight)
	if !b.check(x.cols == wt.cols && o.cols == wt.rows && o.whole() && x.whole(), "linear: in width %d, out width %d, weight [%d,%d]", x.cols, o.cols, wt.rows, wt.cols) {
		return
	}
	b.fail(b.mm.GemmTN(b.s, o.mem.Ptr(), cuda.R16BF, x.mem.Ptr(), cuda.R16BF, wt.mem.Ptr(), cuda.R16BF, b.rows(), wt.rows, wt.cols, 1, 0))
}

// LoRA adds each row's adapter update: one shrink launch and one expand
// launch over every segment, each row at its own adapter's rank.
func (b *Backend) LoRA(out, in engine.Buffer, layer int, m llama.Module) {
	b.wrote(out)
	if !b.ok() || b.nLora == 0 || b.stepRank == 0 {
		return
	}
	o, x := buf(out), buf(in)
	inF, outF := b.cfg.Dims(m)
	if !b.check(x.cols == inF && o.cols == outF, "lora %s: widths %d -> %d, want %d -> %d", m, x.cols, o.cols, inF, outF) {
		return
	}
	b.loraSlices(ptr(o), o.ld, x, layer, []llama.Module{m})
}

// wrote tells the FP8 path that x may change (a Linear or LoRA output):
// a quantized copy of it is stale.
func (b *Backend) wrote(x engine.Buffer) {
	if b.f8 != nil && x != nil && b.f8.cIn == ptr(buf(x)) {
		b.f8.invalidate()
	}
}

// sgTileRows is SG_TR in llama.cu: rows per SGMV tile.
const sgTileRows = 16

// SGMV v2 limits, as in kernels/sgmv.cu: threads per block, output columns
// per expand item, tiles and slots*slices staged in shared memory.
const (
	sgFuThreads  = 256
	sgFuCols     = 2 * sgFuThreads
	sgFuMaxTiles = 128
	sgFuMaxEnt   = 192
	sgCtrBytes   = 64 // ticket, shrink items done, blocks done (+ pad)
	// v2 is chosen when the step's LoRA rows fill its tiles to at least this
	// many rows on average: below it (T = 1; 4 adapters at T = 8; 16 adapters
	// up to T = 64) v2 measured 0.82-0.97x of v1 on the H100, above it
	// 1.02-1.36x (docs/PERFORMANCE.md, v0.6).
	sgV2MinRows = 6
)

// loadSgmv loads the fused SGMV module (compiling it on a cold cache, default
// kernel options). A failure is kept in sgErr, not returned: v1 then runs.
func (b *Backend) loadSgmv() {
	m, _, err := kernels.Load(b.ctx, kernels.Sgmv, kernels.Options{})
	if err == nil {
		var f1, f4 *cuda.Function
		if f1, err = m.Function("sgmv_fused1"); err == nil {
			if f4, err = m.Function("sgmv_fused4"); err == nil {
				b.sgMod, b.sgFused = m, [2]*cuda.Function{f1, f4}
				return
			}
		}
		m.Unload()
	}
	b.sgErr = fmt.Errorf("gpu: SGMV v2 unavailable, using v1: %w", err)
}

// loraCtr is the fused kernels' counters: sgCtrBytes after the scratch.
func (b *Backend) loraCtr() cuda.DevicePtr { return b.loraTmp.Ptr() + uint64(4*b.tmpFloats()) }

// tmpFloats is the size of the LoRA scratch: room for three fused slices at
// the largest rank for every row, times 4 for K-split partial sums.
func (b *Backend) tmpFloats() int { return 4 * b.maxT * 3 * max(b.maxRank, 1) }

// loraSlices adds the LoRA updates of up to three projections that read the
// same input x (fused q/k/v or gate/up) to the output rows at outPtr (row
// stride outStride elements), the projections' outputs side by side in
// mods order. Segments come from the step's metadata.
func (b *Backend) loraSlices(outPtr cuda.DevicePtr, outStride int, x *Buffer, layer int, mods []llama.Module) {
	if !b.ok() || b.nLora == 0 || b.stepRank == 0 {
		return
	}
	if !b.check(len(mods) >= 1 && len(mods) <= 3 && layer >= 0 && layer < b.cfg.Layers, "lora: %d slices, layer %d", len(mods), layer) {
		return
	}
	inF, _ := b.cfg.Dims(mods[0])
	offs := make([]int, len(mods)+1)
	for i, m := range mods {
		in, out := b.cfg.Dims(m)
		if !b.check(in == inF, "lora: fused projections read different widths") {
			return
		}
		offs[i+1] = offs[i] + out
	}
	total := offs[len(mods)]
	if !b.check(x.cols >= inF && outStride >= total, "lora: input width %d < %d or output stride %d < %d", x.cols, inF, outStride, total) {
		return
	}
	base, stride := layer*int(llama.NumModules), b.cfg.Layers*int(llama.NumModules)
	even := outStride%2 == 0 && outPtr%4 == 0
	for i := range mods {
		even = even && offs[i+1]%2 == 0
	}
	if b.loraV0 || inF%8 != 0 || x.ld%8 != 0 || ptr(x)%16 != 0 || !even {
		rows, slots := b.i32(b.off.loraRows), b.i32(b.off.loraSlots)
		for i, m := range mods {
			_, outF := b.cfg.Dims(m)
			b.launch(b.fn.shrink, cuda.Dim3{X: b.nLora, Y: (b.stepRank + 7) / 8}, cuda.Dim3{X: 256},
				b.stepTmp, ptr(x), b.table, rows, slots, base+int(m), stride, inF, x.ld, b.stepRank)
			b.launch(b.fn.expand, cuda.Dim3{X: b.nLora, Y: (outF + 255) / 256}, cuda.Dim3{X: 256},
				outPtr+uint64(2*offs[i]), b.stepTmp, b.table, rows, slots, base+int(m), stride, outF, outStride, b.stepRank)
		}
		return
	}
	ms := [3]int{int(mods[0]), -1, -1}
	off1, off2 := total, total
	if len(mods) > 1 {
		ms[1], off1 = int(mods[1]), offs[1]
	}
	if len(mods) > 2 {
		ms[2], off2 = int(mods[2]), offs[2]
	}
	T := b.rows()
	tStride := len(mods) * b.stepRank
	// Rank rows per shrink block: 32 when the tiles are well filled (each x
	// tile is then read once per 32 ranks, not per 8), else 8 for more blocks.
	shrink, nb := b.fn.sgShrink, 8
	if b.shrinkNB == 4 || (b.shrinkNB == 0 && !b.graphLayout && b.nLora >= 8*b.nTiles && b.nTiles*len(mods) >= 16) {
		shrink, nb = b.fn.sgShrink4, 32
	}
	rankTiles := (b.stepRank + nb - 1) / nb
	blocks := b.nTiles * len(mods) * rankTiles
	// Split K across blocks until the grid covers the SMs about twice over,
	// keeping at least 512 columns per block and the partials in the scratch.
	groups := (inF + 255) / 256
	ks := min(max(1, (2*b.ctx.Device().SMs+blocks-1)/blocks), max(1, groups/2), max(1, b.stepTmpFloats/(T*tStride)))
	kchunk := (groups + ks - 1) / ks * 256
	ks = (inF + kchunk - 1) / kchunk
	tiles := b.i32(b.off.tiles)
	// v2: one launch, blocks taking shrink items first and expand items
	// (512 output columns of one tile) after them; see kernels/sgmv.cu.
	v2 := !b.graphLayout && (b.loraV2 || (!b.loraV1 && b.nLora >= sgV2MinRows*b.nTiles))
	if f := b.sgFused[nb/32]; f != nil && v2 && b.nTiles <= sgFuMaxTiles && len(b.slots)*len(mods) <= sgFuMaxEnt {
		nShrink := b.nTiles * len(mods) * rankTiles * ks
		grid := nShrink + b.nTiles*((total+sgFuCols-1)/sgFuCols)
		shmem := max(8*sgTileRows*nb*4, sgTileRows*len(mods)*((b.stepRank+7)&^7)*4)
		if shmem > 39<<10 && shmem > b.fusedShmem { // 8.2 KB of static shared memory besides
			for _, g := range b.sgFused {
				if err := g.SetMaxDynamicShared(shmem); err != nil {
					b.fail(err)
					return
				}
			}
			b.fusedShmem = shmem
		}
		if b.err != nil {
			return
		}
		b.fail(f.Launch(b.s, cuda.Dim3{X: grid}, cuda.Dim3{X: sgFuThreads}, shmem,
			outPtr, b.stepTmp, ptr(x), b.table, tiles, b.loraCtr(), b.nTiles, len(b.slots), base, stride,
			ms[0], ms[1], ms[2], len(mods), rankTiles, ks, kchunk, nShrink, off1, off2, total,
			b.stepRank, inF, x.ld, outStride, tStride, T))
		return
	}
	b.launch(shrink, cuda.Dim3{X: b.nTiles, Y: len(mods) * rankTiles, Z: ks}, cuda.Dim3{X: 256},
		b.stepTmp, ptr(x), b.table, tiles, base, stride, ms[0], ms[1], ms[2], rankTiles, b.stepRank,
		inF, x.ld, tStride, T, kchunk)
	shmem := sgTileRows * len(mods) * ((b.stepRank + 7) &^ 7) * 4 // [16][slices * rank rounded up to 8] floats
	if shmem > 48<<10 && shmem > b.expandShmem {
		if err := b.fn.sgExpand.SetMaxDynamicShared(shmem); err != nil {
			b.fail(err)
			return
		}
		b.expandShmem = shmem
	}
	if b.err != nil {
		return
	}
	b.fail(b.fn.sgExpand.Launch(b.s, cuda.Dim3{X: b.nTiles, Y: (total + 255) / 256}, cuda.Dim3{X: 128}, shmem,
		outPtr, b.stepTmp, b.table, tiles, base, stride, ms[0], ms[1], ms[2], len(mods), off1, off2, total,
		b.stepRank, outStride, tStride, T, ks))
}

// RoPE rotates q and k in place at the step's positions (the rotation
// Attention applies before it stores k; the op tests check it alone).
func (b *Backend) RoPE(q, k engine.Buffer, invFreq []float32, heads, kvHeads, headDim int) {
	b.ropeStore(buf(q), buf(k), nil, -1, invFreq, heads, kvHeads, headDim)
}

// ropeStore launches rope_store: q and k rotated in place and, for layer >=
// 0, k and v stored in that layer's cache at the step's KV slots.
func (b *Backend) ropeStore(qb, kb, vb *Buffer, layer int, invFreq []float32, heads, kvHeads, headDim int) {
	b.gen++
	if !b.ok() {
		return
	}
	if !b.check(qb.cols == heads*headDim && kb.cols == kvHeads*headDim && (invFreq == nil || len(invFreq) == headDim/2) && 4*len(invFreq) <= b.invFreq.Size(),
		"rope: widths %d, %d for %d/%d heads of %d", qb.cols, kb.cols, heads, kvHeads, headDim) {
		return
	}
	var freq uint64 // nil invFreq: no rotation
	if invFreq != nil {
		if !equalF32(b.invFreqHost, invFreq) {
			b.invFreqHost = append(b.invFreqHost[:0], invFreq...)
			b.fail(cuda.CopyHtoD(b.s, b.invFreq.Ptr(), b.invFreqHost))
		}
		freq = b.invFreq.Ptr()
	}
	var kc, vc uint64
	ldv, ny := 0, heads+kvHeads
	if layer >= 0 {
		kc, vc = b.kcache.Ptr()+uint64(layer*b.layerB), b.vcache.Ptr()+uint64(layer*b.layerB)
		ldv, ny = vb.ld, heads+2*kvHeads
	}
	threads := min(128, max(32, (headDim/2+31)&^31))
	b.launch(b.fn.ropeStore, cuda.Dim3{X: b.rows(), Y: ny}, cuda.Dim3{X: threads}, ptr(qb), ptr(kb), ptr(vb), kc, vc,
		freq, b.i32(b.off.pos), b.i32(b.off.kvSlots), heads, kvHeads, headDim, qb.ld, kb.ld, ldv)
}

func equalF32(a, c []float32) bool {
	if len(a) != len(c) {
		return false
	}
	for i := range a {
		if a[i] != c[i] {
			return false
		}
	}
	return true
}

// Attention rotates q and k (RoPE at the step's positions; none for a nil
// invFreq), stores k and v at the step's KV slots (one kernel for the
// three), then attends each row over its sequence's pages (causal).
func (b *Backend) Attention(out, q, k, v engine.Buffer, layer int, scale float32, invFreq []float32) {
	if !b.ok() {
		return
	}
	o, qb, kb, vb := buf(out), buf(q), buf(k), buf(v)
	c := b.cfg
	width := b.kv.KVHeads * b.kv.HeadDim
	if !b.check(kb.cols == width && vb.cols == width && qb.cols == c.Heads*c.HeadDim && o.cols == qb.cols && o.whole() && layer >= 0 && layer < b.kv.Layers,
		"attention: widths q %d k %d v %d out %d, layer %d", qb.cols, kb.cols, vb.cols, o.cols, layer) {
		return
	}
	b.ropeStore(qb, kb, vb, layer, invFreq, c.Heads, b.kv.KVHeads, b.kv.HeadDim)
	kc, vc := b.kcache.Ptr()+uint64(layer*b.layerB), b.vcache.Ptr()+uint64(layer*b.layerB)
	if b.nDec == 0 {
		b.launch(b.fn.attention, cuda.Dim3{X: b.rows(), Y: c.Heads}, cuda.Dim3{X: 128}, ptr(o), ptr(qb), kc, vc,
			b.i32(b.off.rowSeq), b.i32(b.off.seqInfo), b.i32(b.off.pages), c.Heads, b.kv.KVHeads, b.kv.HeadDim, b.kv.BlockSize, scale, uint64(0), qb.ld)
		return
	}
	if b.nPre > 0 {
		b.launch(b.fn.attention, cuda.Dim3{X: b.nPre, Y: c.Heads}, cuda.Dim3{X: 128}, ptr(o), ptr(qb), kc, vc,
			b.i32(b.off.rowSeq), b.i32(b.off.seqInfo), b.i32(b.off.pages), c.Heads, b.kv.KVHeads, b.kv.HeadDim, b.kv.BlockSize, scale,
			b.i32(b.off.preRows), qb.ld)
	}
	hd, G := b.kv.HeadDim, c.Heads/b.kv.KVHeads
	shmem := (decThreads / (hd / 8)) * G * (hd + 2) * 4
	var part uint64
	if b.decSplit > 1 {
		part = b.part.Ptr()
	}
	if b.err != nil {
		return
	}
	b.fail(b.decodeKernel(G).Launch(b.s, cuda.Dim3{X: b.nDec, Y: b.kv.KVHeads, Z: b.decSplit}, cuda.Dim3{X: decThreads}, shmem,
		ptr(o), part, ptr(qb), kc, vc, b.i32(b.off.decSeqs), b.i32(b.off.seqInfo), b.i32(b.off.pages),
		c.Heads, b.kv.KVHeads, hd, b.kv.BlockSize, scale, b.decChunk, b.decSplit, qb.ld))
	if b.decSplit > 1 {
		b.launch(b.fn.attnReduce, cuda.Dim3{X: b.nDec, Y: c.Heads}, cuda.Dim3{X: 128}, ptr(o), part,
			b.i32(b.off.decSeqs), b.i32(b.off.seqInfo), c.Heads, hd, b.decSplit)
	}
}

// decodeKernel is the attn_decode variant whose registers hold G query
// heads per KV head: the smallest of 1, 2, 4, 8 that is >= G.
func (b *Backend) decodeKernel(G int) *cuda.Function {
	switch {
	case G <= 1:
		return b.fn.attnDecode[0]
	case G <= 2:
		return b.fn.attnDecode[1]
	case G <= 4:
		return b.fn.attnDecode[2]
	}
	return b.fn.attnDecode[3]
}

// decThreads is DEC_THREADS in llama.cu.
const decThreads = 128

// SiLUMul computes out = silu(gate) * up.
func (b *Backend) SiLUMul(out, gate, up engine.Buffer) {
	b.gen++
	if !b.ok() {
		return
	}
	o, g, u := buf(out), buf(gate), buf(up)
	if !b.check(o.cols == g.cols && g.cols == u.cols && o.whole() && g.ld == u.ld, "silu_mul: widths %d %d %d", o.cols, g.cols, u.cols) {
		return
	}
	words := b.rows() * o.cols
	if o.cols%8 == 0 && g.ld%8 == 0 {
		words /= 8
	}
	b.launch(b.fn.siluMul, cuda.Dim3{X: max(1, min((words+255)/256, 8192))}, cuda.Dim3{X: 256}, ptr(o), ptr(g), ptr(u), b.rows(), o.cols, g.ld)
}

// Logits normalizes the LogitRows rows of x and projects them to float32 logits in out.
func (b *Backend) Logits(out, x engine.Buffer, norm, head engine.Weight, eps float32) {
	b.gen++
	if !b.ok() {
		return
	}
	o, xb, nw, hw := buf(out), buf(x), norm.(*weight), head.(*weight)
	n := b.nLogit
	if n == 0 {
		return
	}
	if !b.check(hw.cols == xb.cols && nw.cols == xb.cols && o.cols == hw.rows && n <= o.rows && n <= b.maxT && o.whole() && xb.whole(),
		"logits: x width %d, norm %d, head [%d,%d], out width %d", xb.cols, nw.cols, hw.rows, hw.cols, o.cols) {
		return
	}
	if need := n * xb.cols * 2; b.normed == nil || b.normed.Size() < need {
		b.normed.Free()
		var err error
		if b.normed, err = b.ctx.Alloc(max(need, b.maxT*b.cfg.Hidden*2)); err != nil {
			b.fail(err)
			return
		}
	}
	if o.f32 == nil {
		var err error
		if o.f32, err = b.ctx.Alloc(o.rows * o.cols * 4); err != nil {
			b.fail(err)
			return
		}
	}
	o.isF32 = true
	b.launch(b.fn.rmsnormRows, cuda.Dim3{X: n}, cuda.Dim3{X: 256}, b.normed, xb.mem, b.i32(b.off.logitRows), nw.mem, eps, xb.cols)
	if b.err == nil {
		b.fail(b.mm.GemmTN(b.s, o.f32.Ptr(), cuda.R32F, b.normed.Ptr(), cuda.R16BF, hw.mem.Ptr(), cuda.R16BF, n, hw.rows, hw.cols, 1, 0))
	}
}

// Read waits for the step and copies the first rows of buf to dst as float32.
func (b *Backend) Read(x engine.Buffer, rows int, dst []float32) error {
	if b.err != nil {
		return b.err
	}
	xb := buf(x)
	n := rows * xb.cols
	if len(dst) < n || rows > xb.rows {
		return fmt.Errorf("gpu: read of %d rows of %d needs %d values, dst has %d", rows, xb.cols, n, len(dst))
	}
	if n == 0 {
		return nil
	}
	if b.timed {
		if err := b.evEnd.Record(b.s); err != nil {
			return err
		}
	}
	size := 4 * n
	if b.readHost == nil || b.readHost.Size() < size {
		b.readHost.Free()
		var err error
		if b.readHost, err = b.ctx.AllocHost(max(size, 1<<20)); err != nil {
			return err
		}
	}
	var err error
	if xb.isF32 {
		err = cuda.CopyDtoH(b.s, b.readHost.Float32s()[:n], xb.f32.Ptr())
	} else {
		err = cuda.CopyDtoH(b.s, b.readHost.Uint16s()[:n], xb.mem.Ptr())
	}
	if err != nil {
		return err
	}
	if err := b.s.Synchronize(); err != nil {
		return fmt.Errorf("gpu: step failed: %w", err)
	}
	if b.timed {
		b.timed = false
		if ms, err := b.evEnd.Since(b.evBeg); err == nil {
			b.lastStepMs = ms
		}
	}
	if xb.isF32 {
		copy(dst, b.readHost.Float32s()[:n])
	} else {
		for i, h := range b.readHost.Uint16s()[:n] {
			dst[i] = fromBF16(h)
		}
	}
	return nil
}

// End finishes the step, reporting the first error of any op.
func (b *Backend) End() error {
	err := b.err
	if err == nil {
		err = b.s.Synchronize()
	}
	b.meta = nil
	return err
}

// Close frees every device resource and releases the context.
func (b *Backend) Close() error {
	if b.ctx == nil {
		return nil
	}
	var errs []error
	if b.s != nil {
		errs = append(errs, b.s.Synchronize())
	}
	for _, w := range b.weights {
		errs = append(errs, w.mem.Free())
	}
	for _, x := range b.buffers {
		errs = append(errs, x.mem.Free(), x.f32.Free())
	}
	for _, s := range b.slots {
		if s != nil {
			errs = append(errs, s.mem.Free())
		}
	}
	errs = append(errs, b.closeLoads())
	errs = append(errs, b.dropGraphs())
	for _, d := range []*cuda.DeviceBuffer{b.kcache, b.vcache, b.metaDev, b.invFreq, b.normed, b.table, b.loraTmp, b.smpDev, b.attnPart,
		b.g.dev, b.g.part, b.g.tmp} {
		errs = append(errs, d.Free())
	}
	for _, h := range []*cuda.HostBuffer{b.metaHost, b.readHost, b.smpHost, b.g.host} {
		errs = append(errs, h.Free())
	}
	errs = append(errs, b.evBeg.Destroy(), b.evEnd.Destroy())
	errs = append(errs, b.f8.close())
	errs = append(errs, b.mm.Close(), b.mod.Unload(), b.s.Destroy(), b.cs.Destroy(), b.ctx.Close())
	b.weights, b.buffers, b.slots, b.ctx = nil, nil, nil, nil
	return errors.Join(errs...)
}

// Run calls fn on the CUDA context's thread: every op fn issues runs inline
// there (no per-op hop to the executor goroutine). The engine wraps each
// step in it (engine.Runner).
func (b *Backend) Run(fn func() error) error { return b.ctx.Do(fn) }

// Words per row of the sample_rows kernel's parameters and results (SP_WORDS,
// SO_WORDS, SO_MAXTOP in llama.cu).
const (
	spWords  = 12
	soMaxTop = 20
	soWords  = 2 + 2*soMaxTop
)

// SampleRows draws one token per requested logits row on the device
// (kernel sample_rows) and copies back only the tokens and log-probabilities.
// It waits for the step.
func (b *Backend) SampleRows(logits engine.Buffer, rows []engine.RowSample, out []sample.Choice) error {
	if b.err != nil {
		return b.err
	}
	if b.meta == nil {
		return fmt.Errorf("%w: SampleRows outside a step", ErrBadStep)
	}
	lb := buf(logits)
	n := len(rows)
	if len(out) < n {
		return fmt.Errorf("gpu: sample: %d rows, %d results", n, len(out))
	}
	if n == 0 {
		return nil
	}
	if !lb.isF32 || lb.f32 == nil {
		return fmt.Errorf("gpu: sample: the buffer holds no float32 logits")
	}
	if soMaxTop < sample.MaxLogprobs {
		return fmt.Errorf("gpu: sample: %d alternatives, the kernel returns %d", sample.MaxLogprobs, soMaxTop)
	}
	words := n * (spWords + soWords)
	if b.smpHost == nil || b.smpHost.Size() < 4*words {
		b.smpHost.Free()
		b.smpDev.Free()
		b.smpHost, b.smpDev = nil, nil
		var err error
		if b.smpHost, err = b.ctx.AllocHost(4 * max(words, 4096)); err != nil {
			return err
		}
		if b.smpDev, err = b.ctx.Alloc(4 * max(words, 4096)); err != nil {
			return err
		}
	}
	h := b.smpHost.Int32s()
	nLogit := len(b.meta.LogitRows)
	for i, r := range rows {
		if r.Row < 0 || r.Row >= nLogit {
			return fmt.Errorf("%w: sample row %d outside %d logits rows", ErrBadStep, r.Row, nLogit)
		}
		if err := r.Params.Validate(); err != nil {
			return err
		}
		p := h[i*spWords : (i+1)*spWords]
		p[0] = int32(math.Float32bits(float32(r.Params.Temperature)))
		p[1] = int32(math.Float32bits(float32(r.Params.TopP)))
		p[2] = int32(r.Params.TopK)
		p[3] = int32(r.Params.Logprobs)
		p[4], p[5] = int32(uint32(r.Seed)), int32(uint32(r.Seed>>32))
		p[6], p[7] = int32(uint32(r.Counter)), int32(uint32(r.Counter>>32))
		p[8] = int32(r.Row)
		p[9], p[10], p[11] = 0, 0, 0
	}
	pDev := b.smpDev.Ptr()
	oDev := pDev + uint64(4*n*spWords)
	if err := cuda.CopyHtoD(b.s, pDev, h[:n*spWords]); err != nil {
		return err
	}
	b.launch(b.fn.sample, cuda.Dim3{X: n}, cuda.Dim3{X: 1024}, oDev, lb.f32, pDev, lb.cols)
	if b.err != nil {
		return b.err
	}
	if b.timed {
		if err := b.evEnd.Record(b.s); err != nil {
			return err
		}
	}
	res := h[n*spWords : n*spWords+n*soWords]
	if err := cuda.CopyDtoH(b.s, res, oDev); err != nil {
		return err
	}
	if err := b.s.Synchronize(); err != nil {
		return fmt.Errorf("gpu: step failed: %w", err)
	}
	if b.timed {
		b.timed = false
		if ms, err := b.evEnd.Since(b.evBeg); err == nil {
			b.lastStepMs = ms
		}
	}
	for i, r := range rows {
		o := res[i*soWords : (i+1)*soWords]
		id := o[0]
		if id < 0 || int(id) >= lb.cols {
			return fmt.Errorf("gpu: sample: kernel returned token %d", id)
		}
		c := sample.Choice{ID: id, Logprob: float64(math.Float32frombits(uint32(o[1])))}
		for j := 0; j < r.Params.Logprobs && j < lb.cols; j++ {
			c.Top = append(c.Top, sample.TokenLogprob{ID: o[2+j], Logprob: float64(math.Float32frombits(uint32(o[2+soMaxTop+j])))})
		}
		out[i] = c
	}
	return nil
}

var (
	_ engine.Backend       = (*Backend)(nil)
	_ engine.Runner        = (*Backend)(nil)
	_ engine.DeviceSampler = (*Backend)(nil)
)
