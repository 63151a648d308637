package gpu

import (
	"fmt"

	"github.com/peftd/peftd/runtime/cuda"
)

// An FP8 ws product that quantizes its own activation rows (fp8_ws_qx_n*,
// and with the add_rmsnorm after it fp8_ws_qxnorm_n*: kernels/fp8.cu,
// ws_body's QX head): the o product's input, the attention output, is the
// one activation of a decode step that no kernel before it leaves
// quantized, so today a quant_rows_e4m3 launch of its own runs between
// attention and o (it added 2.1 µs a layer at 64 rows and 3.4 at 16 to
// an H200's FP8 step: PERFORMANCE v0.44). Here each block of the product
// quantizes its share of the rows after griddepcontrol.wait (its early
// weight stages landing meanwhile) with quant_rows_e4m3's bits, the grid
// meets at a barrier, and the product runs as fp8_ws's. Off by default
// until measured (wsQXAuto).

// wsQXAuto is whether FP8 products take the QX kernels by default. Off:
// session 80 built them with no GPU lent. kernelForce.wsQX 1 turns them on
// (TestDecodeBench +wsqx; TestWsQX and TestOpLinearQX check them against
// quant_rows_e4m3 and fp8_ws).
const wsQXAuto = false

// wsQX is whether the step's FP8 products may take the QX kernels
// (kernelForce.wsQX, else wsQXAuto), never on a green-context partition
// (the barrier needs every block resident).
func (b *Backend) wsQX() bool {
	if _, _, part := b.Partition(); part {
		return false
	}
	return forcedOn(b.force.wsQX, wsQXAuto)
}

// qxFits reports whether plan p of an N x K product has a QX kernel:
// loaded with the barrier words, every block resident (resident), rows of
// K values ws_quant_rows holds.
func (g *wsProduct) qxFits(p wsPlan, N, K int) bool {
	return g != nil && g.esize == 1 && g.resident(p, N) && g.qfn[p.i] != nil && g.nsync != nil && K%8 == 0 && K <= wsRowMax
}

// launchQX enqueues out [T, N] = xb [T, K] . w^T as fp8_ws does, the
// kernel first quantizing xb's bf16 rows into q [T, K] and qs [T] (the
// activation scratch, as quant_rows_e4m3 would) with plan p (qxFits).
func (g *wsProduct) launchQX(s *cuda.Stream, p wsPlan, out, xb, q, qs, w, sw cuda.DevicePtr, T, N, K int) error {
	if err := g.check(p, out, q, w, T, N, K); err != nil {
		return err
	}
	if !g.qxFits(p, N, K) {
		return fmt.Errorf("gpu: ws plan %v of %d x %d has no kernel quantizing its rows (or more blocks than the %d SMs: they must all be resident)", p, N, K, g.sms)
	}
	if xb%16 != 0 || qs == 0 {
		return fmt.Errorf("gpu: fp8_ws_qx: bf16 rows not 16-byte aligned, or no scale rows")
	}
	bn := wsWidths[p.i]
	return g.qfn[p.i].Launch(s, cuda.Dim3{X: N / bn, Y: p.split, Z: 1}, cuda.Dim3{X: 128, Y: 1, Z: 1}, wsShared(bn, g.esize),
		uint64(out), uint64(g.part.Ptr()), uint64(g.done.Ptr()), uint64(q), uint64(qs), uint64(w), uint64(sw), T, N, K, g.launchOpts(),
		uint64(xb), uint64(g.nsync.Ptr()))
}

// held reports whether the activation scratch holds x's T rows of K
// values quantized at write generation gen.
func (f *fp8State) held(x cuda.DevicePtr, T, K int, gen uint64) bool {
	return f.cValid && f.cIn == x && f.cRows == T && f.cCols == K && f.cGen == gen
}

// qxPlan is the plan of the step's T x N x K product of x on a QX kernel:
// where qx is on, no LoRA update runs beside (lone), x's rows are not
// held quantized already, they fit the scratch, and linear would put the
// product on fp8_ws (the same conditions, in its order, and the same
// plan).
func (f *fp8State) qxPlan(x cuda.DevicePtr, T, N, K int, gen uint64) (wsPlan, bool) {
	if !f.qx || !f.lone || f.ws == nil || f.held(x, T, K, gen) || !f.fits(T, K) || f.ltForce || f.ltRows[[4]int{T, N, K, f.mm.SMTarget()}] {
		return wsPlan{}, false
	}
	var p wsPlan
	ok := false
	switch {
	case T < wsMinRows:
		if f.wsFrom > 0 && (f.wsOn || f.wsAutoTakes()) {
			p, ok = f.ws.planFrom(T, N, K, f.wsFrom)
		}
	case f.wsOn || f.wsAutoTakes() || (f.wsWide && N >= 4*K) || (f.wsNarrow && wsNarrow(N, K)):
		p, ok = f.ws.plan(T, N, K)
	}
	return p, ok && f.ws.qxFits(p, N, K)
}
