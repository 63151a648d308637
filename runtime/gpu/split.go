package gpu

import (
	"errors"

	"github.com/peftd/peftd/runtime/cuda"
)

// K-split products whose sum the next op takes.
//
// At decode rows the o and down projections read a few MB of weights into
// 32-64 output tiles: cuBLASLt splits them over K itself and sums the
// slices with a reduce kernel of its own (v0.20's batch-1 step: 64 of them,
// 3.4 µs each, plus a launch each). Here the split is ours
// (cuda.Matmul.GemmTNSplitK, float32 partials) and the sum is left pending
// (splitSum): add_rmsnorm, the op that reads those products next (the
// residual add), sums the partials itself, so the reduce kernel goes away.
// Any other op that needs the product first has it reduced (settleSplit).
// The FP8 path's split products (fp8_split.go) are left pending the same
// way.

// splitSum is a K-split product whose partials are not summed yet: out
// [T, N] bf16 = the sum of the S float32 partials part [S, T, N], times
// sx[t] * sw[n] when sx is set (FP8 row scales).
type splitSum struct {
	out, part, sx, sw cuda.DevicePtr
	T, N, S           int
}

// bf16SplitBytes is the bf16 products' partials buffer for a model of
// hidden width hidden and steps of up to maxT rows: splitFor's largest
// split of the widest step it splits, within splitPartBytes.
func bf16SplitBytes(hidden, maxT int) int {
	return max(256, min(splitPartBytes, 4*splitMaxS*min(maxT, splitMaxRows)*hidden))
}

// bf16Split is the number of K slices the bf16 product of T rows and an
// [N, K] weight takes (1: cuBLASLt's own product): only products of the
// model's hidden width (o and down, whose sum add_rmsnorm takes) and only
// where splitWays splits. kernelForce.bf16Split overrides it.
func (b *Backend) bf16Split(T, N, K int) int {
	switch f := b.force.bf16Split; {
	case f < 0 || b.spPart == nil:
		return 1
	case f > 0:
		if N%4 == 0 && K%(16*f) == 0 && 4*f*T*N <= b.spPart.Size() {
			return f
		}
		return 1
	}
	if N != b.cfg.Hidden || b.splitNo[[3]int{T, N, K}] {
		return 1
	}
	sms := b.ctx.Device().SMs
	if t := b.mm.SMTarget(); t > 0 {
		sms = min(sms, t)
	}
	return min(splitWays(T, N, K, sms), b.spPart.Size()/(4*T*N))
}

// linearSplit enqueues the bf16 product of x (T rows) and w as S K slices
// and leaves the sum pending; false when cuBLASLt has no plan for the
// split (nothing was enqueued: the caller takes the whole product, and so
// does every later product of this shape).
func (b *Backend) linearSplit(out, x cuda.DevicePtr, T int, w *weight, S int) bool {
	err := b.mm.GemmTNSplitK(b.s, b.spPart.Ptr(), x, cuda.R16BF, w.mem.Ptr(), cuda.R16BF, T, w.rows, w.cols, S)
	if errors.Is(err, cuda.ErrNotSupported) {
		if b.splitNo == nil {
			b.splitNo = map[[3]int]bool{}
		}
		b.splitNo[[3]int{T, w.rows, w.cols}] = true
		return false
	}
	b.fail(err)
	if b.err == nil {
		b.sp = splitSum{out: out, part: b.spPart.Ptr(), T: T, N: w.rows, S: S}
	}
	return true
}

// settleSplit sums a pending split product into its output (splitk_reduce).
func (b *Backend) settleSplit() {
	p := b.sp
	if p.part == 0 {
		return
	}
	b.sp = splitSum{}
	if b.err != nil {
		return
	}
	blocks := min((p.T*p.N/4+splitThreads-1)/splitThreads, 8*max(b.ctx.Device().SMs, 1))
	b.launch(b.fn.splitReduce, cuda.Dim3{X: blocks}, cuda.Dim3{X: splitThreads}, uint64(p.out), uint64(p.part), uint64(p.sx), uint64(p.sw), p.T, p.N, p.S)
	b.gen++
}

// takeSplit hands add_rmsnorm the pending split product when x (its delta,
// rows rows) is exactly that product's output and add_rmsnorm can sum it
// (16-byte words); else it settles any pending product and returns none.
func (b *Backend) takeSplit(x *Buffer, rows int) splitSum {
	p := b.sp
	if p.part == 0 {
		return splitSum{}
	}
	if x == nil || !x.whole() || ptr(x) != uint64(p.out) || p.T != rows || p.N != x.cols || x.cols%8 != 0 {
		b.settleSplit()
		return splitSum{}
	}
	b.sp = splitSum{}
	return p
}
