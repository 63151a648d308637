package gpu

import (
	"fmt"
	"math"
	"strings"

	"github.com/peftd/peftd/kernels"
	"github.com/peftd/peftd/runtime/cuda"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
)

// Weight formats of the base model's projections on the device (Options.WeightFormat).
const (
	WeightsBF16 = "bf16"
	// WeightsFP8: the seven projections of every decoder layer in FP8 e4m3
	// with one float32 scale per output row (amax / 448, computed on the
	// GPU at upload); activations quantized per token (row) before each
	// projection; cuBLASLt's FP8 GEMM with outer-vector scales on both
	// operands, float32 accumulation, bf16 output. The embedding table, the
	// norms and lm_head stay bf16, and LoRA runs in bf16 on the bf16
	// activations.
	WeightsFP8 = "fp8"
)

// KV cache formats (Options.KVFormat).
const (
	// KVBF16: keys and values in bf16.
	KVBF16 = "bf16"
	// KVFP8: keys in e4m3 with one float32 scale per token and KV head
	// (amax / 448, set when the key is stored), values in bf16: a quarter
	// less memory per token, and decode attention reads a quarter fewer
	// bytes. Needs FP8 conversions (sm_89 and later).
	KVFP8 = "fp8"
)

// ParseKVFormat checks a KV cache format name ("" means bf16).
func ParseKVFormat(s string) (string, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "", KVBF16:
		return KVBF16, nil
	case KVFP8, "fp8-e4m3", "e4m3":
		return KVFP8, nil
	}
	return "", fmt.Errorf("gpu: unknown KV cache format %q (want bf16 or fp8)", s)
}

// ParseWeightFormat checks a weight format name ("" means bf16).
func ParseWeightFormat(s string) (string, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "", WeightsBF16:
		return WeightsBF16, nil
	case WeightsFP8, "fp8-e4m3", "e4m3":
		return WeightsFP8, nil
	}
	return "", fmt.Errorf("gpu: unknown weight format %q (want bf16 or fp8)", s)
}

// fp8Projection reports whether an uploaded tensor is stored in FP8 under
// WeightsFP8 (llama.FP8Projection).
func fp8Projection(name string, shape []int) bool { return llama.FP8Projection(name, shape) }

// fp8Weight is a projection weight [rows, cols] in e4m3 with a float32
// scale per row: W[r, k] ~= q[r, k] * scale[r].
type fp8Weight struct {
	q, scale   *cuda.DeviceBuffer
	rows, cols int
	wgskMap    *cuda.TensorMap // fp8_wgsk's tensor map of q (wgsk.go; made at its first launch)
}

// fp8State holds the FP8 path's module, scratch and weights for a Backend
// (or a test rig): the activation scratch is one e4m3 matrix and one scale
// per row, re-used by consecutive projections of the same input.
type fp8State struct {
	ctx   *cuda.Context
	s     *cuda.Stream
	sms   int // SMs the stream's kernels run on, for the plans (0: the device's; partition.go sets it)
	mm    *cuda.Matmul
	mod   *cuda.Module
	quant *cuda.Function
	gemv  [2]*cuda.Function // fp8_gemv_n8, fp8_gemv_n16
	// fp8_splitk_reduce, the K-split product's partials (fp8_split.go), and
	// the split a test or benchmark forces (0: splitFor's); splitNo: the
	// shapes (T, N, K) cuBLASLt had no split plan for
	reduce     *cuda.Function
	spPart     *cuda.DeviceBuffer
	splitForce int
	splitNo    map[[3]int]bool
	// splitWhole: the products (T, N, K, cuBLASLt's SM target) that
	// Options.TuneGEMMs found faster whole, in their tuned configuration,
	// than split (tune.go)
	splitWhole map[[4]int]bool
	// padNo: the products (T, N, K, SM target) that Options.TuneGEMMs
	// found faster unpadded in their own tuned configuration than padded
	// to scaledRows' rows in theirs (tune.go)
	padNo map[[4]int]bool
	// ltRows: the products (T, N, K, SM target) of wsMaxRows rows or fewer
	// that Options.TuneFP8From found faster on cuBLASLt's scaled product
	// in its tuned configuration at T rows than on the route linear takes
	// otherwise (peftd's own kernels, or cuBLASLt padded or split); ltForce
	// sends every product there (the tuning's timing of it)
	ltRows  map[[4]int]bool
	ltForce bool
	// splitBeside: a product beside the LoRA stream plans its K split for
	// the whole card, not its SM target, at every row count (a benchmark's
	// knob; by default only steps of splitBesideRows, fp8_split.go)
	splitBeside bool
	// room: the rows the output of the product being enqueued holds
	// (Backend.Linear sets it; 0: its T rows only); padOff: scaledRows'
	// padding off (a benchmark's knob)
	room   int
	padOff bool
	// padOld: v0.43's rule (a benchmark's knob): products of 129-255 rows
	// padded, not of 33-127, whose gate/up goes to fp8_wg (wgAutoFits)
	padOld bool
	// fp8_gemm_skinny_n32, _n64, _n128 (skinnyVariants), and their split-K
	// partials and counters (reserveSkinny)
	skinny         [len(skinnyVariants)]*cuda.Function
	skPart, skDone *cuda.DeviceBuffer
	skTop          int // the most rows sent to fp8_gemm_skinny (0: skinnyAutoRows); benchmarks set it
	skMax          int // rows of the largest fp8_gemm_skinny variant the card holds (0: none)
	// fp8_wg_n32, _n64, _n128 (fp8_gemm_skinny on wgmma, wg.go; only in a
	// module compiled with PEFTD_WG, and only on sm_90a): nil where absent.
	// wgOn (tests, benchmarks) sends 17-128 rows to them instead of
	// cuBLASLt.
	wg   *wgProduct
	wgOn bool
	// fp8_ws_n* (ws.go: 17-64 rows streamed through wgmma, one wave of
	// blocks; only in the PEFTD_WG build, on sm_90a): nil where absent.
	// wsOn (tests, benchmarks) sends the rows it plans to them before
	// fp8_gemm_skinny, fp8_wg and cuBLASLt.
	ws           *wsProduct
	wsOn, wsWide bool // wsWide: only the wide products (N >= 4 K: gate/up)
	wsNarrow     bool // only the narrow ones (wsNarrow: q/k/v, o)
	// wsAuto (unless Options.NoWS) sends every product it plans to them
	// (wsAutoDefault: as New set it), beside a LoRA update too unless
	// wsLone (benchmarks: v0.58-v0.62's rule, lone products only).
	// v0.56 sent only the narrow ones (q/k/v, o); v0.57 moved fp8_ws's
	// scale reads to shared memory (gate/up at 64 rows 43.5 -> 33.1 us,
	// 0.91 of its bytes, against cuBLASLt's 42.3) and measured FP8 decode
	// at 64 rows 4.60 ms with the v0.56 rule, 4.54 with every lone product
	// there (H200); v0.58 made it the default. Beside the LoRA stream
	// fp8_ws lost to cuBLASLt until v0.63's WS_INFLIGHT 1: four rank-32
	// adapters 32 / 64 rows 4.35 / 5.13 -> 4.13 / 4.95 ms (H200)
	wsAuto, wsAutoDefault, wsLone bool
	// fp8_wgsk_n* (wgsk.go: up to 256 rows, stream-K over any SMs, TMA
	// stages; only in the PEFTD_WG build, on sm_90a): nil where absent.
	// wgskOn (tests, benchmarks) sends the products of wgskMinRows-256
	// rows it takes to them ahead of every other route.
	wgsk   *wgskProduct
	wgskOn bool
	// wsFrom (benchmarks, tests; 0: off): fp8_ws's products from wsFrom
	// rows below wsMinRows too, ahead of fp8_stream, fp8_gemv_seg and
	// fp8_gemv (wsMinRows dates from before v0.57's scale fix and v0.63's
	// WS_INFLIGHT 1; TestDecodeBench `+wsN`)
	wsFrom int
	// wsLoneFrom (0: off; wsLoneFromDefault as New sets it): under wsAuto,
	// a lone product (no LoRA update beside it) takes fp8_ws from this many
	// rows below wsMinRows too (benchmarks turn it off: TestDecodeBench
	// +nowslone)
	wsLoneFrom int
	// wsBesideFrom (0: off; wsBesideFromDefault as New sets it): under
	// wsAuto (and not wsLone), a product beside a LoRA update takes fp8_ws
	// from this many rows below wsMinRows too, planned for the SMs the
	// step's products leave it (autoSmallHoldsFP8: holdFor; benchmarks
	// turn it off: TestDecodeBench +nowsbeside)
	wsBesideFrom int
	// wgAuto (unless Options.NoFP8Wgmma) sends wgAutoFits' products to
	// fp8_wg (wgAutoDefault: as New set it, for benchmarks that switch it);
	// shared is set by Backend.Linear while the LoRA stream runs beside
	// the product (SMs held back from cuBLASLt); wgBeside (benchmarks)
	// then sends every 33-64-row product to fp8_wg, as v0.31-v0.32 did
	wgAuto, wgAutoDefault, shared, wgBeside bool
	Info                                    kernels.Info

	tmp        *cuda.DeviceBuffer // bf16 staging of a weight being quantized (freed at the first Linear)
	actQ, actS *cuda.DeviceBuffer // quantized activation rows and their scales
	weights    []*fp8Weight

	// the activation rows in actQ/actS: input pointer, rows, width, and the
	// Backend's write generation when they were quantized
	cIn          cuda.DevicePtr
	cRows, cCols int
	cGen         uint64
	cValid       bool

	gvWarps int // warps per fp8_gemv block when set (benchmarks, 1-16), else gemvWarpsFor

	// fp8_stream in place of fp8_gemv (fp8_stream.go; nil where the card
	// lacks the shared memory) for steps of fp8StreamMinRows-16 rows;
	// benchmarks and tests set streamOn (every 1-16 rows), streamOff (none)
	// or streamLate (without its early weight tiles)
	stream                          *fp8Stream
	streamOn, streamOff, streamLate bool
	// fp8_stream's _e1 variants (one early weight tile, not every stage
	// but one) take every product. H200, FP8 decode, v0.45: base 9 / 12 /
	// 16 rows 3.38 / 3.43 / 3.52 -> 3.29 / 3.34 / 3.41 ms (the small kernel
	// before each product no longer queues its reads behind ~18 MB of
	// early tiles: add_rmsnorm 4.5 / 5.9 -> 3.3 / 3.1 µs at 16 rows).
	// Beside a LoRA update they made no difference until the LoRA shrink
	// kept its loads in flight (v0.46): four r32 adapters, 9 / 16 rows 3.69
	// / 3.84 -> 3.62 / 3.78. The variants with every stage but one early
	// left the module in v0.81 (issue 9: no benchmark-only kernels).
	// lone: no LoRA update runs beside the product being enqueued (set by
	// Backend.Linear)
	lone bool
	// plain: the step runs no LoRA update at all (set by Backend.Linear);
	// fp8_gemv_seg's early twins take its products
	// unless segEarlyOff (benchmarks and tests)
	plain, segEarlyOff bool

	// fp8_gemv_seg (fp8_seg.go) for steps of 1-4 rows; benchmarks and
	// tests set segOff (fp8_gemv instead)
	seg    *fp8Seg
	segOff bool
}

func newFP8(ctx *cuda.Context, s *cuda.Stream, mm *cuda.Matmul, ko kernels.Options) (*fp8State, error) {
	f := &fp8State{ctx: ctx, s: s, mm: mm}
	var err error
	if f.mod, f.Info, err = kernels.Load(ctx, kernels.FP8, ko); err != nil {
		return nil, err
	}
	for _, fn := range []struct {
		p    **cuda.Function
		name string
	}{{&f.quant, "quant_rows_e4m3"}, {&f.gemv[0], "fp8_gemv_n8"}, {&f.gemv[1], "fp8_gemv_n16"}, {&f.reduce, "fp8_splitk_reduce"}} {
		if *fn.p, err = f.mod.Function(fn.name); err != nil {
			f.mod.Unload()
			return nil, err
		}
	}
	limit := ctx.Device().MaxShared
	if limit <= 0 { // not reported: try them all
		limit = math.MaxInt
	}
	if err := f.skinnyLoad(limit); err != nil {
		f.mod.Unload()
		return nil, err
	}
	if f.wg, err = loadWG(ctx, s, f.mod, "fp8_wg", 1, limit); err != nil {
		f.mod.Unload()
		return nil, err
	}
	if f.ws, err = loadWS(ctx, s, f.mod, "fp8_ws", 1, limit); err != nil {
		f.wg.free()
		f.mod.Unload()
		return nil, err
	}
	if f.wgsk, err = loadWGSK(ctx, s, f.mod, limit); err != nil {
		f.ws.free()
		f.wg.free()
		f.mod.Unload()
		return nil, err
	}
	if f.stream, err = newFP8Stream(f.mod, ctx.Device()); err != nil {
		f.mod.Unload()
		return nil, err
	}
	if f.seg, err = newFP8Seg(f.mod); err != nil {
		f.mod.Unload()
		return nil, err
	}
	return f, nil
}

// quantRows enqueues q[r] = e4m3(x[r] / scale[r]), scale[r] = amax(x[r]) / 448
// for rows rows of cols bf16 values, ldx apart.
func (f *fp8State) quantRows(q, scale, x cuda.DevicePtr, rows, cols, ldx int) error {
	return f.quant.Launch(f.s, cuda.Dim3{X: rows}, cuda.Dim3{X: 256}, 0, uint64(q), uint64(scale), uint64(x), cols, int64(ldx))
}

// grow makes *b at least n bytes (contents not kept).
func (f *fp8State) grow(b **cuda.DeviceBuffer, n int) error {
	if *b != nil && (*b).Size() >= n {
		return nil
	}
	if *b != nil {
		if err := f.s.Synchronize(); err != nil { // nothing in flight may still use it
			return err
		}
		(*b).Free()
		*b = nil
	}
	var err error
	*b, err = f.ctx.Alloc(n)
	return err
}

// reserve sizes the activation scratch for rows rows of up to cols values,
// so that it never moves afterwards (recorded graphs use it).
func (f *fp8State) reserve(rows, cols int) error {
	if err := f.grow(&f.actQ, (rows*cols+15)&^15); err != nil {
		return err
	}
	if err := f.grow(&f.actS, 4*rows); err != nil {
		return err
	}
	if err := f.reserveSplit(); err != nil {
		return err
	}
	return f.reserveSkinny()
}

// newWeight allocates an FP8 weight [rows, cols], fills it with fill and
// keeps it (freed by close); on an error nothing is kept.
func (f *fp8State) newWeight(rows, cols int, fill func(*fp8Weight) error) (*fp8Weight, error) {
	w := &fp8Weight{rows: rows, cols: cols}
	var err error
	if w.q, err = f.ctx.Alloc(rows * cols); err != nil {
		return nil, err
	}
	if w.scale, err = f.ctx.Alloc(4 * rows); err != nil {
		w.q.Free()
		return nil, err
	}
	if err := fill(w); err != nil {
		w.q.Free()
		w.scale.Free()
		return nil, err
	}
	f.weights = append(f.weights, w)
	return w, nil
}

// upload quantizes a bf16 weight [rows, cols] on the device.
func (f *fp8State) upload(host []uint16, rows, cols int) (*fp8Weight, error) {
	if len(host) != rows*cols || cols%16 != 0 {
		return nil, fmt.Errorf("gpu: fp8 weight [%d,%d] from %d values", rows, cols, len(host))
	}
	if err := f.grow(&f.tmp, 2*len(host)); err != nil {
		return nil, err
	}
	return f.newWeight(rows, cols, func(w *fp8Weight) error {
		if err := cuda.CopyHtoD(f.s, f.tmp.Ptr(), host); err != nil {
			return err
		}
		if err := f.quantRows(w.q.Ptr(), w.scale.Ptr(), f.tmp.Ptr(), rows, cols, cols); err != nil {
			return err
		}
		return f.s.Synchronize() // the staging is re-used by the next upload
	})
}

// fits reports whether the activation scratch holds rows rows of cols
// values (reserve sized it; it never moves).
func (f *fp8State) fits(rows, cols int) bool {
	return f.actQ != nil && f.actS != nil && f.actQ.Size() >= rows*cols && f.actS.Size() >= 4*rows
}

// holds records that a kernel that wrote x (rows of cols values, write
// generation gen) also quantized it into the activation scratch: the next
// FP8 projection of x uses it as it is.
func (f *fp8State) holds(x cuda.DevicePtr, rows, cols int, gen uint64) {
	f.cIn, f.cRows, f.cCols, f.cGen, f.cValid = x, rows, cols, gen, true
}

// held reports whether the activation scratch holds x's T rows of K
// values quantized at write generation gen.
func (f *fp8State) held(x cuda.DevicePtr, T, K int, gen uint64) bool {
	return f.cValid && f.cIn == x && f.cRows == T && f.cCols == K && f.cGen == gen
}

// invalidate forgets the quantized activation rows.
func (f *fp8State) invalidate() { f.cValid = false }

// wsAutoTakes reports whether wsAuto sends this product to fp8_ws where it
// plans it: every product, or with wsLone only one no LoRA update runs beside.
func (f *fp8State) wsAutoTakes() bool { return f.wsAuto && (f.lone || !f.wsLone) }

// wsLoneFromDefault is fp8State.wsLoneFrom as New sets it: FP8 products of
// 9-16 rows with no LoRA update beside them on fp8_ws (with its half-row
// gate/up), not fp8_stream. H200, v0.77 (TestDecodeBench +ws9, which sent
// every 9-16-row product there): 16 rows base 3.31 -> 3.23 ms, but four
// rank-32 adapters 3.68 -> 3.82 (beside the LoRA stream fp8_ws's one-wave
// plans lose the SMs the LoRA blocks take), so only lone products.
const wsLoneFromDefault = 9

// wsBesideFromDefault is fp8State.wsBesideFrom as New sets it: FP8
// products of 9-16 rows beside a LoRA update on fp8_ws too, with the
// step's products holding autoSmallHoldsFP8 SMs for the LoRA stream.
// v0.77 (H200) measured fp8_ws there with no SMs held and lost (four
// rank-32 adapters 3.68 -> 3.82 ms at 16 rows: the one-wave plans and the
// LoRA blocks took turns); with 16 SMs held from each product ws plans
// for the rest (H100, four rank-32 adapters, device ms a step, against
// fp8_stream with no hold; PERFORMANCE v0.84, two calls): 16 rows 4.69 ->
// 4.61 and 4.57 -> 4.52, 12 rows 4.45 -> 4.40, 9 rows 4.37 -> 4.32; 1 and
// 8 rows unchanged (fp8_gemv_seg and fp8_stream take those).
const wsBesideFromDefault = 9

// wsBelowFrom is the fewest rows below wsMinRows from which a product
// takes fp8_ws (0: none), lone if no LoRA update runs beside it: wsFrom
// where set and wsOn or wsAuto would take it, else under wsAuto
// wsLoneFrom for a lone product and wsBesideFrom (unless wsLone) for one
// beside a LoRA update.
func (f *fp8State) wsBelowFrom(lone bool) int {
	if f.wsFrom > 0 && (f.wsOn || f.wsAuto && (lone || !f.wsLone)) {
		return f.wsFrom
	}
	if f.wsLoneFrom > 0 && f.wsAuto && lone {
		return f.wsLoneFrom
	}
	if f.wsBesideFrom > 0 && f.wsAuto && !lone && !f.wsLone {
		return f.wsBesideFrom
	}
	return 0
}

// wsBeside reports whether a step of T rows sends its products beside a
// LoRA update to fp8_ws by wsBesideFrom (wsBelowFrom's rule for them, not
// a benchmark's wsFrom, which names its own holds; holdFor then holds
// autoSmallHoldsFP8 for the LoRA stream).
func (f *fp8State) wsBeside(T int) bool {
	from := f.wsBelowFrom(false)
	return f.ws != nil && f.wsFrom == 0 && from > 0 && T >= from && T < wsMinRows
}

// linear enqueues out[T, w.rows] (bf16) = x[T, w.cols] (bf16) @ W^T through
// the FP8 GEMM: x's rows are quantized per token into the scratch unless
// the scratch already holds them (same input, rows and write generation gen).
func (f *fp8State) linear(out, x cuda.DevicePtr, T int, w *fp8Weight, gen uint64) error {
	if f.tmp != nil { // uploads are over: the staging is not needed any more
		if err := f.s.Synchronize(); err != nil {
			return err
		}
		f.tmp.Free()
		f.tmp = nil
	}
	K := w.cols
	if err := f.prepare(x, T, K, gen); err != nil {
		return err
	}
	if f.wgskOn && T >= wgskMinRows && f.wgsk.fits(T, w.rows, K) {
		return f.wgsk.launch(f.s, out, f.actQ.Ptr(), f.actS.Ptr(), w, T)
	}
	if f.ltForce || f.ltRows[[4]int{T, w.rows, K, f.mm.SMTarget()}] {
		return f.mm.GemmTNScaled(f.s, out, cuda.R16BF, f.actQ.Ptr(), f.actS.Ptr(), w.q.Ptr(), w.scale.Ptr(), T, w.rows, K)
	}
	if from := f.wsBelowFrom(f.lone); from > 0 && T < wsMinRows {
		if p, ok := f.ws.planFrom(T, w.rows, K, from); ok {
			return f.ws.launch(f.s, p, out, f.actQ.Ptr(), f.actS.Ptr(), w.q.Ptr(), w.scale.Ptr(), T, w.rows, K)
		}
	}
	if p, ok := f.stream.plan(T, w.rows, K); ok && !f.streamOff && (f.streamOn || T >= fp8StreamMinRows) {
		opts := 1 // the first weight tiles before griddepcontrol.wait
		if f.streamLate {
			opts = 0
		}
		return f.stream.launch(f.s, p, out, f.actQ.Ptr(), f.actS.Ptr(), w, T, opts)
	}
	if p, ok := planSeg(T, w.rows, K); ok && !f.segOff {
		return f.seg.launch(f.s, p, out, f.actQ.Ptr(), f.actS.Ptr(), w, T, f.plain && !f.segEarlyOff)
	}
	if gemvFits(T, w.rows, K) {
		return f.gemvLaunch(out, T, w)
	}
	if f.wsOn || f.wsAutoTakes() || (f.wsWide && w.rows >= 4*K) || (f.wsNarrow && wsNarrow(w.rows, K)) {
		if p, ok := f.ws.plan(T, w.rows, K); ok {
			return f.ws.launch(f.s, p, out, f.actQ.Ptr(), f.actS.Ptr(), w.q.Ptr(), w.scale.Ptr(), T, w.rows, K)
		}
	}
	if skinnyFits(T, w.rows, K, f.skinnyTop()) {
		return f.skinnyLaunch(out, T, w)
	}
	Tp := f.padRows(T, K)
	// cuBLASLt's product padded beats fp8_wg's (scaledRowsFrom), and its
	// own at T rows unless the tuning found otherwise (padNo)
	pads := Tp != T && !f.padNo[[4]int{T, w.rows, K, f.mm.SMTarget()}]
	if f.wgAuto && !pads && wgAutoFits(T, w.rows, K, f.shared && f.wgBeside) && f.wg.fits(T, w.rows, K) {
		return f.wg.launch(f.s, out, f.actQ.Ptr(), f.actS.Ptr(), w.q.Ptr(), w.scale.Ptr(), T, w.rows, K)
	}
	if S := f.split(T, w.rows, K); S > 1 {
		return f.splitLaunch(out, T, w, S)
	}
	if pads {
		T = Tp // the rows past T are scratch: their products land in out's rows past T, which nothing reads
	}
	return f.mm.GemmTNScaled(f.s, out, cuda.R16BF, f.actQ.Ptr(), f.actS.Ptr(), w.q.Ptr(), w.scale.Ptr(), T, w.rows, K)
}

// prepare quantizes x's T rows of K values per token into the activation
// scratch (actQ, actS) unless it holds them already (same input, rows and
// write generation gen).
func (f *fp8State) prepare(x cuda.DevicePtr, T, K int, gen uint64) error {
	if f.held(x, T, K, gen) {
		return nil
	}
	if err := f.grow(&f.actQ, (T*K+15)&^15); err != nil {
		return err
	}
	if err := f.grow(&f.actS, 4*T); err != nil {
		return err
	}
	if err := f.quantRows(f.actQ.Ptr(), f.actS.Ptr(), x, T, K, K); err != nil {
		f.cValid = false
		return err
	}
	f.cIn, f.cRows, f.cCols, f.cGen, f.cValid = x, T, K, gen, true
	return nil
}

// scaledRows is the rows this state's scaled FP8 product of T rows is
// asked for (scaledRowsFrom; none with padOff, from 129 rows with padOld).
func (f *fp8State) scaledRows(T int) int {
	switch {
	case f.padOff:
		return T
	case f.padOld && T < 256:
		return scaledRowsFrom(T, f.room, 128)
	case f.padOld:
		return T
	}
	return scaledRowsFrom(T, f.room, scaledPadFrom)
}

// padRows is the rows cuBLASLt's scaled product of T rows of K values
// runs for when it pads (scaledRows, where the scratch holds them), else T.
func (f *fp8State) padRows(T, K int) int {
	if p := f.scaledRows(T); p != T && f.fits(p, K) {
		return p
	}
	return T
}

// scaledRowsFrom is the rows the scaled FP8 product of T rows is asked
// for, out holding room rows: steps of from+1 to 511 rows run it for the
// next multiple of 128 (33-127 for 128: decode; 129-255 for 256: the
// 192-row recording; 257-383 for 384, 385-511 for 512: eager steps) where
// out and the scratch hold them.
// cuBLASLt offers one outer-vector-scaled algorithm (v0.15), and it runs
// slower between multiples of 128 rows than at the next one (H200, µs,
// TestFP8AlgoSweep in v0.43: gate/up 76.7 / 69.7 / 60.3 at 160 / 192 /
// 224 rows against 53.2 at 256, 95.3 at 320 against 73.4 at 384; q/k/v
// 20.2 / 17.3 / 15.2 against 14.6; o and down flat). Decode steps of the
// 192-row recording: 8.45 vs 8.99 ms base, 9.87 vs 10.44 with four
// adapters. Eager steps (v0.44, `+nopad`): 320 / 448 rows 14.07 / 18.02
// -> 13.27 / 16.71 ms. At 33-127 rows the product padded to 128 beats
// fp8_wg's for gate/up (sweep: 47.2 µs at 64 rows, 38.4 at 128); decode
// against v0.43's rule (v0.44, ms, base then four rank-32 adapters): 33 /
// 40 / 48 / 64 / 80 / 96 rows 4.52 / 4.69 / 4.86 / 4.83 / 5.72 / 6.05 ->
// 4.45 / 4.61 / 4.79 / 4.75 / 5.67 / 6.00, and 5.03 / 5.26 / 5.48 / 5.35 /
// 6.39 / 6.75 -> 4.91 / 5.17 / 5.38 / 5.29 / 6.39 / 6.75 (112 rows
// equal). The padded rows' products are bit-identical
// (TestFP8ScaledPadding).
func scaledRowsFrom(T, room, from int) int {
	if T <= from || T >= scaledRowsTop {
		return T
	}
	if Tp := (T + 127) &^ 127; room >= Tp {
		return Tp
	}
	return T
}

// scaledRowsTop: steps of this many rows or more are not padded (above
// 512 the sweep's times do not fall at each multiple of 128: gate/up 134.6
// / 108.3 / 125.4 µs at 576 / 640 / 768 rows); scaledPadFrom: nor of this
// many or fewer (fp8_wg and fp8_stream take them).
const (
	scaledRowsTop = 512
	scaledPadFrom = 32
)

// wgAutoFits reports whether the default routing (Options.NoFP8Wgmma
// unset) sends a T x N x K FP8 product to fp8_wg rather than cuBLASLt, by
// what v0.30 measured on an H200
// (fp8bench at 17 / 32 / 64 rows, decode with every product on fp8_wg):
// every shape at 17-32 rows (fp8_wg ties cuBLASLt on qkv, o and down and
// beats it by 6-10 us on gate_up; decode at 32 rows 5% faster); at 33-64
// rows the wide products (N >= 4 K: gate_up, 37.9 vs 43.9 us at 64 rows).
// With shared, every shape at 33-64 rows: v0.31-v0.32's rule beside the
// LoRA stream (decode with four adapters at 64 rows 5.6% faster than
// cuBLASLt then, when fp8_wg's grid covered every SM; Backend.Linear
// passes it only for fp8State.wgBeside since fp8_wg keeps to the SM
// target, v0.33).
func wgAutoFits(T, N, K int, shared bool) bool {
	switch {
	case T <= gemvMaxRows || T > 64:
		return false
	case T <= fp8WgAllRows:
		return true
	}
	return shared || N >= 4*K
}

// gemvMaxRows is the most rows fp8_gemv takes: below it cuBLASLt pads the
// rows to its smallest tile and reads the weights at a fraction of the
// bandwidth (FP8 decode at batch 1 ran slower than bf16 with it alone).
const gemvMaxRows = 16

// gemvFits reports whether fp8_gemv computes a [T, N] x [N, K] product: a
// few rows, K a multiple of its 64-byte spans, N of its 16-row tiles.
func gemvFits(T, N, K int) bool { return T >= 1 && T <= gemvMaxRows && K%64 == 0 && N%16 == 0 }

// gemvMaxWarps is GV_MAX_WARPS in fp8.cu: the most warps of an fp8_gemv
// block.
const gemvMaxWarps = 16

// gemvWarpsFor is the warps per fp8_gemv block for an N-row
// weight on a GPU of sms SMs: 16 when the grid (N/16 blocks) is under two
// blocks per SM, so that each SM has enough loads in flight; else 8 (more
// blocks resident). H200, TestFP8GemmBench, v0.15, us at T = 1 and 16 for
// 8 vs 16 warps: o (256 blocks) 9.6/12.0 vs 8.4/11.0, down (256) 25.7/30.0
// vs 19.7/23.8; qkv (384) 11.0/12.9 vs 13.1/17.1, gate_up (1792) 36.8/45.5
// vs 41.8/52.8.
func gemvWarpsFor(N, sms int) int {
	if N/16 < 2*sms {
		return 16
	}
	return 8
}

// gemvWarps is the warps per fp8_gemv block for w: gvWarps when
// a benchmark set it, else gemvWarpsFor.
func (f *fp8State) gemvWarps(w *fp8Weight) int {
	if f.gvWarps > 0 {
		return f.gvWarps
	}
	return gemvWarpsFor(w.rows, f.planSMs())
}

// gemvLaunch enqueues fp8_gemv on the quantized activation rows.
func (f *fp8State) gemvLaunch(out cuda.DevicePtr, T int, w *fp8Weight) error {
	fn := f.gemv[0]
	if T > 8 {
		fn = f.gemv[1]
	}
	return fn.Launch(f.s, cuda.Dim3{X: w.rows / 16}, cuda.Dim3{X: 32 * f.gemvWarps(w)}, 0, uint64(out), uint64(f.actQ.Ptr()), uint64(f.actS.Ptr()),
		uint64(w.q.Ptr()), uint64(w.scale.Ptr()), T, w.rows, w.cols)
}

func (f *fp8State) close() error {
	if f == nil {
		return nil
	}
	var first error
	keep := func(err error) {
		if err != nil && first == nil {
			first = err
		}
	}
	for _, w := range f.weights {
		keep(w.q.Free())
		keep(w.scale.Free())
	}
	f.weights = nil
	for _, b := range []*cuda.DeviceBuffer{f.tmp, f.actQ, f.actS, f.skPart, f.skDone, f.spPart} {
		keep(b.Free())
	}
	f.tmp, f.actQ, f.actS, f.skPart, f.skDone, f.spPart = nil, nil, nil, nil, nil, nil
	keep(f.wg.free())
	keep(f.ws.free())
	keep(f.wgsk.free())
	if f.mod != nil {
		keep(f.mod.Unload())
		f.mod = nil
	}
	return first
}

// KeepsFP8 reports whether the backend keeps the weight name [rows, cols]
// in FP8 (engine.FP8Uploader): with FP8 weights, a decoder layer's
// projections.
func (b *Backend) KeepsFP8(name string, rows, cols int) bool {
	return b.f8 != nil && fp8Projection(name, []int{rows, cols})
}

// UploadFP8 copies an FP8 checkpoint's weight to the device as it is
// stored: e4m3 bytes q [rows, cols] and one float32 scale per row, what the
// FP8 projections compute with (engine.FP8Uploader).
func (b *Backend) UploadFP8(name string, rows, cols int, q [][]byte, scale []float32) (engine.Weight, error) {
	if !b.KeepsFP8(name, rows, cols) {
		return nil, fmt.Errorf("gpu: %s [%d,%d] is not kept in FP8", name, rows, cols)
	}
	total := 0
	for _, p := range q {
		total += len(p)
	}
	if total != rows*cols || len(scale) != rows || cols%16 != 0 {
		return nil, fmt.Errorf("gpu: %s: fp8 weight [%d,%d] from %d bytes and %d scales", name, rows, cols, total, len(scale))
	}
	// each part to its rows through the pinned staging buffers (parallel
	// copies out of the mapped checkpoint): no joined copy on the host, no
	// pageable copy of each weight
	fw, err := b.f8.newWeight(rows, cols, func(w *fp8Weight) error {
		off := 0
		for _, p := range q {
			if err := b.stageBytes(w.q.Ptr()+cuda.DevicePtr(off), p); err != nil {
				return err
			}
			off += len(p)
		}
		return b.stageBytes(w.scale.Ptr(), asBytes(scale))
	})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	return fw, nil
}

// planSMs is the SMs the FP8 products plan their grids for.
func (f *fp8State) planSMs() int {
	if f.sms > 0 {
		return f.sms
	}
	return f.ctx.Device().SMs
}

// markProduct adds T rows x [N, K] at SM target sms to one of the
// tuning's decision maps (padNo, splitWhole, ltRows; tune.go).
func markProduct(m *map[[4]int]bool, T, N, K, sms int) {
	if *m == nil {
		*m = map[[4]int]bool{}
	}
	(*m)[[4]int{T, N, K, sms}] = true
}
