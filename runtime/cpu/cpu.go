// Package cpu is the pure-Go float32 backend: the numerical reference and the
// embedded default. Work is spread over GOMAXPROCS goroutines. It can also
// emulate the CUDA backend's FP8 scheme (Options), to measure what the
// scheme costs in quality on any model without a GPU.
package cpu

import (
	"time"

	"fmt"
	"math"
	"runtime"
	"sync"

	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/lora"
	"github.com/peftd/peftd/runtime/safetensors"
)

// Buffer is a row-major [rows, cols] float32 matrix.
type Buffer struct {
	data       []float32
	rows, cols int
	ld         int // row stride: cols, or the parent's for a view
}

// Cols is the row width.
func (b *Buffer) Cols() int { return b.cols }

func (b *Buffer) row(i int) []float32 { return b.data[i*b.ld : i*b.ld+b.cols : i*b.ld+b.cols] }

// weight is a row-major float32 matrix (vectors have rows = 1).
type weight struct {
	data       []float32
	rows, cols int
	fp8        bool // data holds e4m3 values times their row's scale; inputs are quantized too
}

// Options configure a CPU backend.
type Options struct {
	// Threads is the number of goroutines (0: GOMAXPROCS).
	Threads int
	// FP8Weights emulates the CUDA backend's FP8 projections (its
	// --weights fp8) in float32: each tensor llama.FP8Projection names is
	// rounded to bf16, then to e4m3 with one scale per output row
	// (amax / 448), and every input row of such a projection to bf16, then
	// to e4m3 with one scale per row, before the product. The values the
	// GPU multiplies, multiplied in float32: for quality checks of the
	// scheme (peftd eval), not for speed.
	FP8Weights bool
	// FP8Keys emulates the FP8 key cache (--kv-cache fp8): each rotated key
	// head is stored rounded to bf16, then to e4m3 with one scale per token
	// and KV head (amax / 448); values stay float32. Where the GPU's decode
	// kernel multiplies Q K^T on the FP8 tensor cores (qk8Decode: a
	// sequence's one row of the step, head_dim 64, 128 or 256), that row's
	// query heads are rounded the same way, one scale per head.
	FP8Keys bool
}

// Backend is the CPU backend.
type Backend struct {
	workers int
	opts    Options
	cfg     *llama.Config
	kv      engine.KVSpec
	kcache  [][]float32 // per layer: [blocks*blockSize, kvHeads*headDim]
	vcache  [][]float32
	slots   []*lora.Adapter
	meta    *engine.StepMeta
	rowSeq  []int32 // sequence index of each row
	// the compute time of the last step (engine.StepTimer): from Execute
	// to End
	began    time.Time
	lastStep time.Duration
}

// New returns a CPU backend using workers goroutines (0: GOMAXPROCS).
func New(workers int) *Backend { return NewWith(Options{Threads: workers}) }

// NewWith returns a CPU backend configured by o.
func NewWith(o Options) *Backend {
	workers := o.Threads
	if workers <= 0 {
		workers = runtime.GOMAXPROCS(0)
	}
	return &Backend{workers: workers, opts: o}
}

// Options are the options the backend was made with (Threads as given).
func (b *Backend) Options() Options { return b.opts }

// Name is "cpu".
func (b *Backend) Name() string { return "cpu" }

// Init allocates the KV cache.
func (b *Backend) Init(cfg *llama.Config, spec engine.Spec) error {
	kv, maxTokens := spec.KV, spec.MaxTokens
	b.cfg, b.kv = cfg, kv
	width := kv.KVHeads * kv.HeadDim
	n := kv.Blocks * kv.BlockSize * width
	b.kcache = make([][]float32, kv.Layers)
	b.vcache = make([][]float32, kv.Layers)
	for l := range b.kcache {
		b.kcache[l] = make([]float32, n)
		b.vcache[l] = make([]float32, n)
	}
	b.rowSeq = make([]int32, maxTokens)
	return nil
}

// Upload converts a tensor to float32.
func (b *Backend) Upload(name string, dtype safetensors.DType, shape []int, raw []byte) (engine.Weight, error) {
	n := 1
	for _, d := range shape {
		n *= d
	}
	w := &weight{data: make([]float32, n), rows: 1, cols: n}
	if len(shape) == 2 {
		w.rows, w.cols = shape[0], shape[1]
	}
	if err := safetensors.DecodeFloat32(w.data, raw, dtype); err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	if b.opts.FP8Weights && llama.FP8Projection(name, shape) {
		b.parallel(w.rows, w.cols, func(lo, hi int) {
			for r := lo; r < hi; r++ {
				row := w.data[r*w.cols : (r+1)*w.cols]
				roundBF16(row)
				QuantizeE4M3(row)
			}
		})
		w.fp8 = true
	}
	return w, nil
}

// roundBF16 rounds every value of x to bf16 (ties to even).
func roundBF16(x []float32) {
	for i, v := range x {
		x[i] = math.Float32frombits(uint32(safetensors.Float32ToBF16(v)) << 16)
	}
}

// QuantizeE4M3 replaces x by its FP8 e4m3 image with one scale, as the CUDA
// kernels quantize a row (quant_row_e4m3) or a key head: scale = amax / 448,
// x[i] = e4m3_satfinite(x[i] * min(448 / amax, FLT_MAX)) * scale; a zero row stays
// zero, a row holding Inf or NaN becomes NaN (the kernels' NaN scale).
func QuantizeE4M3(x []float32) {
	var amax float32
	bad := false
	for _, v := range x {
		if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
			bad = true
		}
		amax = max(amax, float32(math.Abs(float64(v))))
	}
	switch {
	case bad:
		for i := range x {
			x[i] = float32(math.NaN())
		}
	case amax == 0:
	default:
		scale, inv := amax/448, min(448/amax, math.MaxFloat32) // a subnormal amax: no Inf (0 * Inf is NaN)
		for i, v := range x {
			x[i] = safetensors.RoundE4M3(v*inv) * scale
		}
	}
}

// NewBuffer allocates an activation matrix.
func (b *Backend) NewBuffer(rows, cols int) (engine.Buffer, error) {
	return &Buffer{data: make([]float32, rows*cols), rows: rows, cols: cols, ld: cols}, nil
}

// NewView is columns [col, col+cols) of every row of parent.
func (b *Backend) NewView(parent engine.Buffer, col, cols int) (engine.Buffer, error) {
	p, ok := parent.(*Buffer)
	if !ok || p == nil {
		return nil, fmt.Errorf("cpu: view of a buffer of another backend")
	}
	if col < 0 || cols <= 0 || col+cols > p.cols {
		return nil, fmt.Errorf("cpu: view [%d, %d) of a buffer of %d columns", col, col+cols, p.cols)
	}
	return &Buffer{data: p.data[col:], rows: p.rows, cols: cols, ld: p.ld}, nil
}

// LoadAdapter keeps a reference to the adapter's weights in float32.
func (b *Backend) LoadAdapter(slot int, a *lora.Adapter) error {
	for len(b.slots) <= slot {
		b.slots = append(b.slots, nil)
	}
	b.slots[slot] = a.Float32() // bf16 pairs widened: the LoRA op computes in float32
	return nil
}

// UnloadAdapter drops the slot.
func (b *Backend) UnloadAdapter(slot int) error {
	if slot < len(b.slots) {
		b.slots[slot] = nil
	}
	return nil
}

// Begin records the step's metadata.
func (b *Backend) Begin(meta *engine.StepMeta) error {
	b.meta = meta
	for si, s := range meta.Seqs {
		for r := s.Start; r < s.Start+s.Len; r++ {
			b.rowSeq[r] = int32(si)
		}
	}
	return nil
}

// Execute runs the program's ops one after the other (the CPU backend
// records nothing).
func (b *Backend) Execute(meta *engine.StepMeta, prog engine.Program) error {
	b.began, b.lastStep = time.Now(), 0
	if err := b.Begin(meta); err != nil {
		return err
	}
	prog.Run(b)
	return nil
}

// End finishes the step (the CPU backend is synchronous).
func (b *Backend) End() error {
	if !b.began.IsZero() {
		b.lastStep, b.began = time.Since(b.began), time.Time{}
	}
	b.meta = nil
	return nil
}

// StepDeviceTime is the compute time of the last step run by Execute: the
// forward pass and whatever read its result before End (engine.StepTimer).
func (b *Backend) StepDeviceTime() (time.Duration, bool) { return b.lastStep, b.lastStep > 0 }

// Close releases memory.
func (b *Backend) Close() error { b.kcache, b.vcache, b.slots = nil, nil, nil; return nil }

func (b *Backend) rows() int { return len(b.meta.Tokens) }

// minParallelWork is the work (multiply-adds) below which splitting across
// goroutines costs more than it saves.
const minParallelWork = 1 << 16

// parallel runs fn over [0, n) split into contiguous chunks; cost is the
// work per item, so small jobs run inline.
func (b *Backend) parallel(n, cost int, fn func(lo, hi int)) {
	w := b.workers
	if w > n {
		w = n
	}
	if n*cost < minParallelWork {
		w = 1
	}
	if w <= 1 {
		fn(0, n)
		return
	}
	var wg sync.WaitGroup
	chunk := (n + w - 1) / w
	for lo := 0; lo < n; lo += chunk {
		hi := min(lo+chunk, n)
		wg.Add(1)
		go func() {
			defer wg.Done()
			fn(lo, hi)
		}()
	}
	wg.Wait()
}

// Embed gathers embedding rows.
func (b *Backend) Embed(out engine.Buffer, table engine.Weight) {
	o, t := out.(*Buffer), table.(*weight)
	for r, id := range b.meta.Tokens {
		copy(o.row(r), t.data[int(id)*t.cols:(int(id)+1)*t.cols])
	}
}

func rmsnorm(dst, x, w []float32, eps float32) {
	var ss float32
	for _, v := range x {
		ss += v * v
	}
	inv := float32(1 / math.Sqrt(float64(ss/float32(len(x))+eps)))
	for i, v := range x {
		dst[i] = w[i] * (v * inv)
	}
}

// AddRMSNorm adds delta into x, then normalizes x into out.
func (b *Backend) AddRMSNorm(x, delta, out engine.Buffer, w engine.Weight, eps float32) {
	xb := x.(*Buffer)
	n := b.rows()
	if delta != nil {
		d := delta.(*Buffer)
		for r := range n {
			xr, dr := xb.row(r), d.row(r)
			for i := range xr {
				xr[i] += dr[i]
			}
		}
	}
	if out == nil {
		return
	}
	o, wt := out.(*Buffer), w.(*weight)
	for r := 0; r < n; r++ {
		rmsnorm(o.row(r), xb.row(r), wt.data, eps)
	}
}

// AddBias adds bias to every row of out (engine.FamilyOps).
func (b *Backend) AddBias(out engine.Buffer, bias engine.Weight) {
	o, w := out.(*Buffer), bias.(*weight)
	for r := 0; r < b.rows(); r++ {
		row := o.row(r)
		for i, v := range w.data {
			row[i] += v
		}
	}
}

// HeadRMSNorm normalizes each head of every row of x in place
// (engine.FamilyOps).
func (b *Backend) HeadRMSNorm(x engine.Buffer, heads, headDim int, w engine.Weight, eps float32) {
	xb, wt := x.(*Buffer), w.(*weight)
	for r := 0; r < b.rows(); r++ {
		row := xb.row(r)
		for h := 0; h < heads; h++ {
			v := row[h*headDim : (h+1)*headDim]
			rmsnorm(v, v, wt.data, eps)
		}
	}
}

// Linear computes out = in @ W^T, parallel over output features. An FP8
// weight (Options.FP8Weights) multiplies the input rows' e4m3 images.
func (b *Backend) Linear(out, in engine.Buffer, w engine.Weight) {
	o, x, wt := out.(*Buffer), in.(*Buffer), w.(*weight)
	n := b.rows()
	if wt.fp8 {
		q := &Buffer{data: make([]float32, n*wt.cols), rows: n, cols: wt.cols, ld: wt.cols}
		b.parallel(n, wt.cols, func(lo, hi int) {
			for r := lo; r < hi; r++ {
				qr := q.row(r)
				copy(qr, x.row(r)[:wt.cols])
				roundBF16(qr)
				QuantizeE4M3(qr)
			}
		})
		x = q
	}
	matmulT(o, x, wt.data, wt.rows, wt.cols, n, b)
}

// matmulT: for rows r in [0,n), o[r] = x[r] @ W^T, parallel over output
// features. Rows go four at a time so each weight element loaded serves four
// multiply-adds.
func matmulT(o, x *Buffer, w []float32, outF, inF, n int, b *Backend) {
	b.parallel(outF, inF*n, func(lo, hi int) {
		r := 0
		for ; r+4 <= n; r += 4 {
			x0, x1, x2, x3 := x.row(r)[:inF], x.row(r + 1)[:inF], x.row(r + 2)[:inF], x.row(r + 3)[:inF]
			o0, o1, o2, o3 := o.row(r), o.row(r+1), o.row(r+2), o.row(r+3)
			for j := lo; j < hi; j++ {
				o0[j], o1[j], o2[j], o3[j] = dot4(x0, x1, x2, x3, w[j*inF:(j+1)*inF])
			}
		}
		for ; r < n; r++ {
			xr := x.row(r)[:inF]
			or := o.row(r)
			for j := lo; j < hi; j++ {
				or[j] = dot(xr, w[j*inF:(j+1)*inF])
			}
		}
	})
}

// dot4Go is the portable dot4: each row summed in dotGo's order.
func dot4Go(a0, a1, a2, a3, w []float32) (float32, float32, float32, float32) {
	n := len(w)
	a0, a1, a2, a3 = a0[:n], a1[:n], a2[:n], a3[:n]
	var s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, s30, s31, s32, s33 float32
	i := 0
	for ; i+4 <= n; i += 4 {
		w0, w1, w2, w3 := w[i], w[i+1], w[i+2], w[i+3]
		s00 += a0[i] * w0
		s01 += a0[i+1] * w1
		s02 += a0[i+2] * w2
		s03 += a0[i+3] * w3
		s10 += a1[i] * w0
		s11 += a1[i+1] * w1
		s12 += a1[i+2] * w2
		s13 += a1[i+3] * w3
		s20 += a2[i] * w0
		s21 += a2[i+1] * w1
		s22 += a2[i+2] * w2
		s23 += a2[i+3] * w3
		s30 += a3[i] * w0
		s31 += a3[i+1] * w1
		s32 += a3[i+2] * w2
		s33 += a3[i+3] * w3
	}
	for ; i < n; i++ {
		s00 += a0[i] * w[i]
		s10 += a1[i] * w[i]
		s20 += a2[i] * w[i]
		s30 += a3[i] * w[i]
	}
	return (s00 + s01) + (s02 + s03), (s10 + s11) + (s12 + s13), (s20 + s21) + (s22 + s23), (s30 + s31) + (s32 + s33)
}

// dot is a float32 dot product: AVX2+FMA over whole groups of eight where
// the CPU has them (the scalar tail added last), else four partial sums.
func dot(a, b []float32) float32 {
	n := len(a)
	b = b[:n]
	if !useAVX || n < 8 {
		return dotGo(a, b)
	}
	m := n &^ 7
	s := dotAVX(&a[0], &b[0], m)
	for i := m; i < n; i++ {
		s += a[i] * b[i]
	}
	return s
}

// dot4 is four dot products against one shared vector w, each row summed
// exactly as dot sums it (so a row's result does not depend on its batch).
func dot4(a0, a1, a2, a3, w []float32) (float32, float32, float32, float32) {
	n := len(w)
	a0, a1, a2, a3 = a0[:n], a1[:n], a2[:n], a3[:n]
	if !useAVX || n < 8 {
		return dot4Go(a0, a1, a2, a3, w)
	}
	m := n &^ 7
	r0, r1, r2, r3 := dot4AVX(&a0[0], &a1[0], &a2[0], &a3[0], &w[0], m)
	for i := m; i < n; i++ {
		r0 += a0[i] * w[i]
		r1 += a1[i] * w[i]
		r2 += a2[i] * w[i]
		r3 += a3[i] * w[i]
	}
	return r0, r1, r2, r3
}

// dotGo is the portable dot product with four partial sums.
func dotGo(a, b []float32) float32 {
	var s0, s1, s2, s3 float32
	n := len(a)
	b = b[:n]
	i := 0
	for ; i+4 <= n; i += 4 {
		s0 += a[i] * b[i]
		s1 += a[i+1] * b[i+1]
		s2 += a[i+2] * b[i+2]
		s3 += a[i+3] * b[i+3]
	}
	for ; i < n; i++ {
		s0 += a[i] * b[i]
	}
	return (s0 + s1) + (s2 + s3)
}

// LoRA adds each row's adapter update for the projections mods of layer,
// whose outputs sit side by side in out's columns.
func (b *Backend) LoRA(out, in engine.Buffer, layer int, mods []llama.Module) {
	o, x := out.(*Buffer), in.(*Buffer)
	off := 0
	for _, m := range mods {
		_, width := b.cfg.Dims(m)
		b.loraOne(o, x, layer, m, off)
		off += width
	}
}

// loraOne adds projection m's update to columns [off, off+out) of o.
func (b *Backend) loraOne(o, x *Buffer, layer int, m llama.Module, off int) {
	for _, seg := range b.meta.LoRA {
		a := b.slots[seg.Slot]
		p := a.Layers[layer][m]
		if p == nil {
			continue
		}
		inF := len(p.A) / p.Rank
		outF := len(p.B) / p.Rank
		b.parallel(seg.End-seg.Start, p.Rank*(inF+outF), func(lo, hi int) {
			t := make([]float32, p.Rank)
			for r := seg.Start + lo; r < seg.Start+hi; r++ {
				xr := x.row(r)[:inF]
				for k := range t {
					t[k] = dot(xr, p.A[k*inF:(k+1)*inF]) * p.Scale
				}
				or := o.row(r)[off : off+outF]
				for j := range or {
					or[j] += dot(t, p.B[j*p.Rank:(j+1)*p.Rank])
				}
			}
		})
	}
}

// RoPE rotates q and k in place (rotate-half: pairs i and i+headDim/2).
func (b *Backend) RoPE(q, k engine.Buffer, invFreq []float32, heads, kvHeads, headDim int) {
	qb, kb := q.(*Buffer), k.(*Buffer)
	half := headDim / 2
	cos := make([]float32, half)
	sin := make([]float32, half)
	for r, pos := range b.meta.Positions {
		for i, f := range invFreq {
			ang := float32(pos) * f
			cos[i] = float32(math.Cos(float64(ang)))
			sin[i] = float32(math.Sin(float64(ang)))
		}
		for _, t := range []struct {
			row []float32
			h   int
		}{{qb.row(r), heads}, {kb.row(r), kvHeads}} {
			for h := 0; h < t.h; h++ {
				v := t.row[h*headDim : (h+1)*headDim]
				for i := 0; i < half; i++ {
					x1, x2 := v[i], v[i+half]
					v[i] = x1*cos[i] - x2*sin[i]
					v[i+half] = x2*cos[i] + x1*sin[i]
				}
			}
		}
	}
}

// Attention rotates q and k (RoPE), stores k and v in the paged cache,
// then runs causal attention for every row and head over its sequence's pages.
func (b *Backend) Attention(out, q, k, v engine.Buffer, layer int, scale float32, invFreq []float32) {
	o, qb, kb, vb := out.(*Buffer), q.(*Buffer), k.(*Buffer), v.(*Buffer)
	kv := b.kv
	if invFreq != nil {
		b.RoPE(q, k, invFreq, b.cfg.Heads, kv.KVHeads, kv.HeadDim)
	}
	width := kv.KVHeads * kv.HeadDim
	kc, vc := b.kcache[layer], b.vcache[layer]
	for r, slot := range b.meta.KVSlots {
		kr := kc[int(slot)*width : (int(slot)+1)*width]
		copy(kr, kb.row(r))
		copy(vc[int(slot)*width:(int(slot)+1)*width], vb.row(r))
		if b.opts.FP8Keys {
			for h := range kv.KVHeads {
				head := kr[h*kv.HeadDim : (h+1)*kv.HeadDim]
				roundBF16(head)
				QuantizeE4M3(head)
			}
		}
	}
	heads, hd := b.cfg.Heads, kv.HeadDim
	group := heads / kv.KVHeads
	qk8 := b.opts.FP8Keys && qk8Decode(heads, kv.KVHeads, hd)
	n := b.rows()
	b.parallel(n*heads, hd*(kv.BlockSize+b.meta.Seqs[0].Context), func(lo, hi int) {
		var scores, q8 []float32
		for job := lo; job < hi; job++ {
			r, h := job/heads, job%heads
			s := &b.meta.Seqs[b.rowSeq[r]]
			ctx := s.Context - s.Len + (r - s.Start) + 1 // causal: positions [0, ctx)
			if cap(scores) < ctx {
				scores = make([]float32, ctx)
			}
			scores = scores[:ctx]
			qh := qb.row(r)[h*hd : (h+1)*hd]
			if qk8 && s.Len == 1 {
				q8 = append(q8[:0], qh...)
				roundBF16(q8)
				QuantizeE4M3(q8)
				qh = q8
			}
			kvOff := (h / group) * hd
			key := func(p int) []float32 {
				slot := int(s.Blocks[p/kv.BlockSize])*kv.BlockSize + p%kv.BlockSize
				return kc[slot*width+kvOff : slot*width+kvOff+hd]
			}
			// q·k four positions at a time (dot4 sums each exactly as dot does).
			p := 0
			for ; p+4 <= ctx; p += 4 {
				s0, s1, s2, s3 := dot4(key(p), key(p+1), key(p+2), key(p+3), qh)
				scores[p], scores[p+1], scores[p+2], scores[p+3] = s0*scale, s1*scale, s2*scale, s3*scale
			}
			for ; p < ctx; p++ {
				scores[p] = dot(key(p), qh) * scale
			}
			maxS := float32(math.Inf(-1))
			for _, sc := range scores {
				maxS = max(maxS, sc)
			}
			var sum float32
			for p := range scores {
				e := float32(math.Exp(float64(scores[p] - maxS)))
				scores[p] = e
				sum += e
			}
			oh := o.row(r)[h*hd : (h+1)*hd]
			clear(oh)
			inv := 1 / sum
			for p := 0; p < ctx; p++ {
				slot := int(s.Blocks[p/kv.BlockSize])*kv.BlockSize + p%kv.BlockSize
				wgt := scores[p] * inv
				vv := vc[slot*width+kvOff : slot*width+kvOff+hd]
				for i := range oh {
					oh[i] += wgt * vv[i]
				}
			}
		}
	})
}

// qk8Decode reports whether the CUDA backend's decode kernel multiplies
// Q K^T on the FP8 tensor cores for a model of these heads with FP8 keys
// (attn_decode8 in kernels/llama.cu, which takes each sequence with one row
// in the step): head_dim 64, 128 or 256 and at most 8 query heads per KV
// head. At head_dim 32 it widens the keys to bf16 instead, and other shapes
// take kernels whose Q stays bf16.
func qk8Decode(heads, kvHeads, hd int) bool {
	return (hd == 64 || hd == 128 || hd == 256) && heads%kvHeads == 0 && heads/kvHeads <= 8
}

// SiLUMul computes out = silu(gate) * up.
func (b *Backend) SiLUMul(out, gate, up engine.Buffer) {
	o, g, u := out.(*Buffer), gate.(*Buffer), up.(*Buffer)
	for r := range b.rows() {
		or, gr, ur := o.row(r), g.row(r), u.row(r)
		for i, x := range gr {
			or[i] = x / (1 + float32(math.Exp(float64(-x)))) * ur[i]
		}
	}
}

// Logits normalizes the selected rows and projects them onto the vocabulary.
func (b *Backend) Logits(out, x engine.Buffer, norm, head engine.Weight, eps float32) {
	o, xb, nw, hw := out.(*Buffer), x.(*Buffer), norm.(*weight), head.(*weight)
	rows := b.meta.LogitRows
	normed := &Buffer{data: make([]float32, len(rows)*xb.cols), rows: len(rows), cols: xb.cols, ld: xb.cols}
	for i, r := range rows {
		rmsnorm(normed.row(i), xb.row(int(r)), nw.data, eps)
	}
	matmulT(o, normed, hw.data, hw.rows, hw.cols, len(rows), b)
}

// Read copies rows of b into dst.
func (b *Backend) Read(buf engine.Buffer, rows int, dst []float32) error {
	x := buf.(*Buffer)
	if len(dst) < rows*x.cols {
		return fmt.Errorf("cpu: read of %d rows needs %d values, dst has %d", rows, rows*x.cols, len(dst))
	}
	for r := range rows {
		copy(dst[r*x.cols:(r+1)*x.cols], x.row(r))
	}
	return nil
}

var (
	_ engine.Backend   = (*Backend)(nil)
	_ engine.StepTimer = (*Backend)(nil)
)
