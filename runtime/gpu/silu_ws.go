package gpu

import (
	"fmt"

	"github.com/peftd/peftd/runtime/cuda"
	"github.com/peftd/peftd/runtime/engine"
)

// The gate/up product and silu_mul in one launch (gemm_ws_silu_n*,
// kernels/llama.cu; fp8_ws_silu_n*, kernels/fp8.cu, which also quantizes
// the rows as silu_mul does): in a step of 17-64 rows whose gate/up
// product a ws kernel takes with no LoRA update beside, each block streams
// BN / 2 rows of gate and the same rows of up and writes silu(g) * u of
// them, so the gate/up output never reaches memory and silu_mul's launch
// (a dependent kernel of ~3.5 µs of its own a layer at 64 rows on an H200
// with bf16, 5.0 with FP8: PERFORMANCE v0.71, v0.68) is gone. The values are rounded where the two
// kernels round them (ws_put_silu rounds g and u to bf16 first, as
// stored): bit for bit the two kernels' without the staggered K walk,
// within the last bits of g and u's float32 sums with it. On by default
// for bf16 weights, off for FP8 (wsSiLUAuto).

// wsSiluSync is WsSiluQ's sync words: 64 row maxima and two counters.
const wsSiluSync = 66

// siluFits reports whether plan p of an N x K gate/up product (N: gate's
// rows, then up's) has a fused kernel: one split, its width's
// gemm_ws_silu or fp8_ws_silu loaded (FP8: with its barrier words, and
// every block resident at once for the barrier), and each half whole
// blocks of BN / 2 rows.
func (g *wsProduct) siluFits(p wsPlan, N int) bool {
	return g != nil && p.split == 1 && g.sfn[p.i] != nil && N%wsWidths[p.i] == 0 &&
		(g.esize != 1 || g.ssync != nil && g.resident(p, N))
}

// launchSiLU enqueues act [T, N / 2] = silu(x . gate^T) * (x . up^T) with
// plan p (siluFits) on s, w [N, K] the two halves. With e4m3 operands (sx,
// sw their rows' scales) act's rows are also quantized into q [T, N / 2]
// and qscale [T] as silu_mul quantizes them (fp8_ws_silu: every block of
// the one-wave plan must be resident at once, which a plan of at most the
// SMs on an otherwise idle card is; the caller keeps it off green-context
// partitions).
func (g *wsProduct) launchSiLU(s *cuda.Stream, p wsPlan, act, x, sx, w, sw, q, qscale cuda.DevicePtr, T, N, K int) error {
	if err := g.check(p, act, x, w, T, N, K); err != nil {
		return err
	}
	if !g.siluFits(p, N) {
		return fmt.Errorf("gpu: ws plan %v has no gate/up kernel with silu_mul for N %d", p, N)
	}
	var sync uint64
	if g.esize == 1 {
		if sx == 0 || sw == 0 || q == 0 || qscale == 0 {
			return fmt.Errorf("gpu: fp8_ws_silu needs the rows' scales and the quantized rows' place")
		}
		sync = uint64(g.ssync.Ptr())
	}
	bn, fn, sh := wsWidths[p.i], g.sfn[p.i], wsShared(wsWidths[p.i], g.esize)
	if g.halfOn(p.i) && g.hsfn[p.i] != nil { // the half-row twin (loaded with hfn)
		fn, sh = g.hsfn[p.i], wshShared(bn)
	}
	return fn.Launch(s, cuda.Dim3{X: N / bn, Y: 1, Z: 1}, cuda.Dim3{X: 128, Y: 1, Z: 1}, sh, g.args(act, x, sx, w, sw, T, N, K, uint64(q), uint64(qscale), sync)...)
}

// wsSiLUAuto is whether LinearSiLU takes the products it fits by default,
// by weight format. bf16 on: base steps of 32 / 64 rows 6.66 / 7.63 ->
// 6.62 / 7.50 ms on an H100 (PERFORMANCE v0.81; the bf16 end has no grid
// barrier). FP8 off: fp8_ws_silu's grid barrier costs more than silu_mul's
// own launch (v0.76). kernelForce.wsSiLU 1 / -1 turns both on / off
// (TestDecodeBench rows +wssilu / +nowssilu, the A/Bs; TestBF16WsSiLU,
// TestFP8WsSiLU, TestOpLinearSiLU and TestOpLinearSiLUFP8 check them
// against the separate kernels and float64).
func wsSiLUAuto(fp8 bool) bool { return !fp8 }

// LinearSiLU is engine.LinearSiLUOps: act = silu(gate) * up where [gate
// up] = in . w^T, as one gemm_ws_silu or fp8_ws_silu launch where the
// step's product would run on gemm_ws (bf16: bwsTakes, no LoRA update
// beside) or fp8_ws (FP8: fp8State's ws routing, not a product its tuning
// gave to cuBLASLt) and its plan has a fused kernel (siluFits); the FP8
// kernel also leaves act quantized in the activation scratch, as silu_mul
// does, for the down projection. False, having done nothing, otherwise
// (other rows, a green-context partition, off by kernelForce.wsSiLU and
// wsSiLUAuto).
func (b *Backend) LinearSiLU(act, in engine.Buffer, w engine.Weight) bool {
	_, fp8 := w.(*fp8Weight)
	if !forcedOn(b.force.wsSiLU, wsSiLUAuto(fp8)) || !b.ok() {
		return false
	}
	N, K := weightShape(w)
	o, x, T := buf(act), buf(in), b.rows()
	if N == 0 || x.cols != K || 2*o.cols != N || !o.whole() || !x.whole() {
		return false
	}
	ws, p, ok := b.wsAlone(w, x, T, N, K)
	if !ok || !ws.siluFits(p, N) {
		return false
	}
	if fp8 && !b.f8.fits(T, o.cols) {
		return false
	}
	// FP8: act's quantized rows replace in's in the scratch (written after
	// every block has read its activation stages: ws_put_silu_q's barrier)
	// for the down product
	if !b.wsFusedStart(x, T, K, fp8) {
		return true
	}
	b.wrote(act)
	b.fused.silu++
	xp, sx, wp, sw := b.wsOperands(x, w)
	var q, qs cuda.DevicePtr // FP8: act's rows quantized into the scratch
	if fp8 {
		q, qs = b.f8.actQ.Ptr(), b.f8.actS.Ptr()
	}
	b.fail(ws.launchSiLU(b.s, p, o.mem.Ptr(), xp, sx, wp, sw, q, qs, T, N, K))
	if fp8 && b.err == nil {
		b.f8.holds(o.mem.Ptr(), T, o.cols, b.gen)
	}
	return true
}

// wsOperands is a fused op's product operands for in and w, after
// wsFusedStart: with an FP8 weight the activation scratch (in's rows
// quantized) and the weight's e4m3 bytes, each with its rows' scales;
// else in's and w's bf16 values, with no scales.
func (b *Backend) wsOperands(in *Buffer, w engine.Weight) (x, sx, wv, sw cuda.DevicePtr) {
	if fw, ok := w.(*fp8Weight); ok {
		return b.f8.actQ.Ptr(), b.f8.actS.Ptr(), fw.q.Ptr(), fw.scale.Ptr()
	}
	return in.mem.Ptr(), 0, w.(*weight).mem.Ptr(), 0
}

// wsFusedStart starts a fused op (LinearSiLU, LinearAddRMSNorm) of the
// step's T rows of in (K values): with FP8 operands in's rows are
// quantized into the scratch before the op's write generation, as Linear
// quantizes them (prepare: none where add_rmsnorm or silu_mul left them
// so); then the op's start (opStart). false: the backend has failed (the
// op is taken, nothing enqueued).
func (b *Backend) wsFusedStart(in *Buffer, T, K int, fp8 bool) bool {
	if fp8 {
		b.join()
		if err := b.f8.prepare(in.mem.Ptr(), T, K, b.gen); err != nil {
			b.fail(err)
			return false
		}
	}
	b.opStart()
	return b.ok()
}

// wsAlone is the ws products and plan that take the step's T x N x K
// product of in with weight w (its early stages set as Linear sets them)
// where no LoRA update runs beside it: bf16 where
// bwsTakes routes it to gemm_ws, FP8 where fp8State's routing gives it to
// fp8_ws (its activation rows fit the scratch, and its tuning did not give
// it to cuBLASLt); ok false otherwise, and on a green-context partition
// (the fused kernels' grid-wide barriers need every block resident at
// once, on SMs the partition may not have). The fused ops (LinearSiLU,
// LinearAddRMSNorm) take a product only where it says so, with the plan
// Linear would have launched.
func (b *Backend) wsAlone(w engine.Weight, in *Buffer, T, N, K int) (*wsProduct, wsPlan, bool) {
	if _, _, part := b.Partition(); part {
		return nil, wsPlan{}, false
	}
	ws := b.wsFor(w)
	if ws == nil {
		return nil, wsPlan{}, false
	}
	from := wsMinRows
	if _, fp8 := w.(*fp8Weight); fp8 {
		f := b.f8
		if !(f.wsOn || f.wsAuto) || f.ltForce || f.ltRows[[4]int{T, N, K, f.mm.SMTarget()}] || !f.fits(T, K) {
			return nil, wsPlan{}, false
		}
		if T < wsMinRows { // as fp8State.linear sends them (wsBelowFrom; TestDecodeBench +wsN: its 9-16-row A/B)
			if from = f.wsBelowFrom(true); from == 0 { // a fused op has no LoRA update beside it
				return nil, wsPlan{}, false
			}
		}
	} else if !b.bwsTakes(T, N, K, false) {
		return nil, wsPlan{}, false
	}
	b.wsKernels(ws)
	p, ok := ws.planFrom(T, N, K, from)
	if !ok {
		return nil, wsPlan{}, false
	}
	return ws, p, true
}
