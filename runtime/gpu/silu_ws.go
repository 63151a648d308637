package gpu

import (
	"fmt"

	"github.com/peftd/peftd/runtime/cuda"
	"github.com/peftd/peftd/runtime/engine"
)

// The gate/up product and silu_mul in one launch (gemm_ws_silu_n*,
// kernels/llama.cu): in a bf16 step of 17-64 rows whose gate/up product
// gemm_ws takes with no LoRA update beside, each block streams BN / 2
// rows of gate and the same rows of up and writes silu(g) * u of them, so
// the gate/up output never reaches memory and silu_mul's launch (a
// dependent kernel of ~3.5 µs of its own a layer at 64 rows on an H200:
// PERFORMANCE v0.71) is gone. The values are rounded where the two
// kernels round them (ws_put_silu rounds g and u to bf16 first, as
// stored): bit for bit the two kernels' without the staggered K walk,
// within the last bits of g and u's float32 sums with it. Off by default
// until measured (wsSiLUAuto).

// siluFits reports whether plan p of an N x K gate/up product (N: gate's
// rows, then up's) has a fused kernel: one split, its width's
// gemm_ws_silu loaded, and each half whole blocks of BN / 2 rows.
func (g *wsProduct) siluFits(p wsPlan, N int) bool {
	return g != nil && p.sk == 0 && p.split == 1 && g.sfn[p.i] != nil && N%wsWidths[p.i] == 0
}

// launchSiLU enqueues act [T, N / 2] = silu(x . gate^T) * (x . up^T) with
// plan p (siluFits) on s, w [N, K] the two halves.
func (g *wsProduct) launchSiLU(s *cuda.Stream, p wsPlan, act, x, w cuda.DevicePtr, T, N, K int) error {
	if err := g.check(p, act, x, w, T, N, K); err != nil {
		return err
	}
	if !g.siluFits(p, N) {
		return fmt.Errorf("gpu: ws plan %v has no gate/up kernel with silu_mul for N %d", p, N)
	}
	bn, opts := wsWidths[p.i], min(max(g.early, 0), 15)
	if !g.noStagger {
		opts |= 16
	}
	return g.sfn[p.i].Launch(s, cuda.Dim3{X: N / bn, Y: 1, Z: 1}, cuda.Dim3{X: 128, Y: 1, Z: 1}, wsShared(bn, g.esize),
		uint64(act), uint64(g.part.Ptr()), uint64(g.done.Ptr()), uint64(x), uint64(0), uint64(w), uint64(0), T, N, K, opts)
}

// wsSiLUAuto is whether LinearSiLU takes the products it fits by default.
// Off: session 79 built and tested gemm_ws_silu on the CPU side (its SASS
// compiled; every other kernel's unchanged) but was lent no GPU after, so
// it is neither checked nor measured there yet. kernelForce.wsSiLU 1 turns
// it on (TestDecodeBench row +wssilu, the A/B; TestBF16WsSiLU and
// TestOpLinearSiLU check it against gemm_ws then silu_mul and float64).
const wsSiLUAuto = false

// LinearSiLU is engine.LinearSiLUOps: act = silu(gate) * up where [gate
// up] = in . w^T, as one gemm_ws_silu launch where the step's product
// would run on gemm_ws with no LoRA update beside (bwsTakes) and its plan
// has a fused kernel (siluFits); false, having done nothing, otherwise
// (FP8 weights, whose silu_mul also quantizes each row with the row's
// amax; other rows; a green-context partition; off by kernelForce.wsSiLU
// and wsSiLUAuto).
func (b *Backend) LinearSiLU(act, in engine.Buffer, w engine.Weight) bool {
	wt, ok := w.(*weight)
	if !ok || !forcedOn(b.force.wsSiLU, wsSiLUAuto) || b.bws == nil || !b.ok() {
		return false
	}
	if _, _, part := b.Partition(); part {
		return false
	}
	o, x, T := buf(act), buf(in), b.rows()
	if x.cols != wt.cols || 2*o.cols != wt.rows || !o.whole() || !x.whole() || !b.bwsTakes(T, wt.rows, wt.cols, false) {
		return false
	}
	p, ok := b.bws.plan(T, wt.rows, wt.cols)
	if !ok || !b.bws.siluFits(p, wt.rows) {
		return false
	}
	b.opStart()
	if !b.ok() {
		return true
	}
	b.wrote(act)
	b.bws.early = b.wsEarly()
	b.fail(b.bws.launchSiLU(b.s, p, o.mem.Ptr(), x.mem.Ptr(), wt.mem.Ptr(), T, wt.rows, wt.cols))
	return true
}
