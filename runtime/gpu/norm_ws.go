package gpu

import (
	"fmt"

	"github.com/peftd/peftd/runtime/cuda"
	"github.com/peftd/peftd/runtime/engine"
)

// The o or down product and the add_rmsnorm after it in one launch
// (gemm_ws_norm_n*, kernels/llama.cu; fp8_ws_norm_n*, kernels/fp8.cu): in
// a step of 17-64 rows whose product a ws kernel takes with no LoRA update
// beside, the kernel stores the product's rows (the delta) as gemm_ws_n*
// does, meets the grid at a barrier, and then each block does
// add_rmsnorm's work on its share of the rows (x += delta; the next
// norm's rows, FP8: quantized into the activation scratch), bit for bit
// the two kernels' (ws_add_norm's 128 threads sum as add_rmsnorm's 256).
// add_rmsnorm's launch (2 x ~2.85 µs of its own a layer at 64 rows on an
// H200 with bf16: PERFORMANCE v0.71) and the handoff to it go. Off by
// default: measured slower (wsNormAuto).

// wsSync is the NORM kernels' sync words: grid_meet's arrival and
// grid_leave's departure counters (the QX head's two after them went with
// it in v0.80).
const wsSync = 2

// wsRowMax is the widest row a ws block's 128 threads hold in registers,
// 8 16-byte words of bf16 each: ws_add_norm's (2 ADD_RC, add_rmsnorm's
// limit at 256 threads) and ws_quant_rows' (common.cuh).
const wsRowMax = 2 * 4 * 128 * 8

// normFits reports whether plan p of a product of N output columns (the
// hidden width) has a NORM kernel: one that is loaded, with its barrier
// words, not stream-K, no more blocks than SMs (the barrier needs them
// all resident), and rows ws_add_norm holds.
func (g *wsProduct) normFits(p wsPlan, N int) bool {
	return g != nil && g.resident(p, N) && g.nfn[p.i] != nil && g.nsync != nil && N%8 == 0 && N <= wsRowMax
}

// resident reports whether plan p of a product of N output columns is one
// grid of at most the device's SMs: the fused kernels' grid-wide barriers
// (SILU's FP8 end, NORM) need every block resident at once.
func (g *wsProduct) resident(p wsPlan, N int) bool {
	return N%wsWidths[p.i] == 0 && N/wsWidths[p.i]*p.split <= g.sms
}

// launchNorm enqueues delta [T, N] = x . w^T (times sx[t] sw[n] with e4m3
// operands) with plan p (normFits) on s, then xr [T, N] += delta and,
// where nout is set, nout = rmsnorm(xr) * nw (eps), its rows quantized
// into q and qscale where q is set (e4m3 operands only).
func (g *wsProduct) launchNorm(s *cuda.Stream, p wsPlan, delta, x, sx, w, sw, xr, nout, nw, q, qscale cuda.DevicePtr, eps float32, T, N, K int) error {
	if err := g.check(p, delta, x, w, T, N, K); err != nil {
		return err
	}
	if !g.normFits(p, N) {
		return fmt.Errorf("gpu: ws plan %v has no kernel with add_rmsnorm for N %d", p, N)
	}
	if (nout == 0) != (nw == 0) || q != 0 && (g.esize != 1 || nout == 0 || qscale == 0) {
		return fmt.Errorf("gpu: ws product with add_rmsnorm: the norm's output and weight go together, and the quantized rows need e4m3 operands and the output")
	}
	if (uint64(xr)|uint64(nout)|uint64(nw))%16 != 0 {
		return fmt.Errorf("gpu: ws product with add_rmsnorm: rows not 16-byte aligned")
	}
	bn := wsWidths[p.i]
	return g.nfn[p.i].Launch(s, cuda.Dim3{X: N / bn, Y: p.split, Z: 1}, cuda.Dim3{X: 128, Y: 1, Z: 1}, wsShared(bn, g.esize),
		g.args(delta, x, sx, w, sw, T, N, K, uint64(xr), uint64(nout), uint64(nw), eps, uint64(q), uint64(qscale), uint64(g.nsync.Ptr()))...)
}

// wsNormAuto is whether LinearAddRMSNorm takes the products it fits by
// default. Off: the grid-wide barrier costs more than add_rmsnorm's launch
// and handoff (FP8: PERFORMANCE v0.76; bf16 base steps, H100, v0.81: 32 /
// 64 rows 6.66 / 7.63 -> 6.77 / 7.73 ms). kernelForce.wsNorm 1 turns them on (TestDecodeBench row
// +wsnorm, the A/B; TestWsNorm and TestOpLinearAddRMSNorm check them
// against the separate kernels).
const wsNormAuto = false

// LinearAddRMSNorm is engine.LinearAddRMSNormOps: delta = in . w^T, x +=
// delta and, where out is set, out = rmsnorm(x) * norm, as one
// gemm_ws_norm or fp8_ws_norm launch where the step's product would run
// on a ws kernel with no LoRA update beside (wsAlone) and its plan has a
// NORM kernel (normFits); with FP8 weights out's rows are also left
// quantized in the activation scratch, as add_rmsnorm leaves them, for the
// projections that read out next. False, having done nothing, otherwise
// (other rows, a green-context partition, off by kernelForce.wsNorm and
// wsNormAuto).
func (b *Backend) LinearAddRMSNorm(delta, in engine.Buffer, w engine.Weight, x, out engine.Buffer, norm engine.Weight, eps float32) bool {
	if !forcedOn(b.force.wsNorm, wsNormAuto) || !b.ok() {
		return false
	}
	N, K := weightShape(w)
	d, xi, xr, o, T := buf(delta), buf(in), buf(x), buf(out), b.rows()
	if N == 0 || xi.cols != K || d.cols != N || xr.cols != N || !d.whole() || !xi.whole() || !xr.whole() || d == xr || d == xi {
		return false
	}
	var nw cuda.DevicePtr
	if o != nil {
		nt, ok := norm.(*weight)
		if !ok || nt.cols != N || o.cols != N || !o.whole() {
			return false
		}
		nw = nt.mem.Ptr()
	}
	ws, p, ok := b.wsAlone(w, xi, T, N, K)
	if !ok || !ws.normFits(p, N) {
		return false
	}
	_, fp8 := w.(*fp8Weight)
	// add_rmsnorm quantizes out's rows wherever an FP8 state is and they
	// fit its scratch: so does this op, and only with e4m3 operands
	quant := o != nil && b.f8 != nil && b.f8.fits(T, N)
	if quant && !fp8 {
		return false
	}
	// FP8: out's quantized rows replace in's in the scratch (after every
	// block has read its activation stages: the kernel's barrier)
	if !b.wsFusedStart(xi, T, K, fp8) {
		return true
	}
	b.wrote(delta)
	b.wrote(x)
	var op cuda.DevicePtr
	if o != nil {
		b.wrote(out)
		op = o.mem.Ptr()
	}
	b.fused.norm++
	xp, sx, wp, sw := b.wsOperands(xi, w)
	var q, qs cuda.DevicePtr // quant (FP8 only): out's rows quantized into the scratch
	if quant {
		q, qs = b.f8.actQ.Ptr(), b.f8.actS.Ptr()
	}
	b.fail(ws.launchNorm(b.s, p, d.mem.Ptr(), xp, sx, wp, sw, xr.mem.Ptr(), op, nw, q, qs, eps, T, N, K))
	if quant && b.err == nil {
		b.f8.holds(op, T, N, b.gen)
	}
	return true
}
