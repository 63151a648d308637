package gpu

import (
	"errors"
	"fmt"

	"github.com/peftd/peftd/runtime/cuda"
)

// The K-split FP8 product (17-256 rows). cuBLASLt's FP8 product at these
// rows runs one block per output tile: o and down at 8B shapes have 32 of
// them, a quarter of an H200's SMs, and run at 0.3-0.4 of the byte roofline
// (docs/PERFORMANCE.md, v0.16: down at 64 rows 38 us against a 15 us
// floor). Split over K, the same product is a strided batch of products of
// K/S columns each (cuda.Matmul.GemmTNSplitK: unscaled e4m3, float32
// partials), so S times as many blocks read the weights; fp8_splitk_reduce
// then sums the S partials in order and applies both row scales.
const (
	splitMaxRows = 256 // the most rows the split is taken for
	// splitTile is the output tile (weight rows x activation rows) the
	// wave count assumes for cuBLASLt's FP8 kernels.
	splitTile = 128
	splitMaxS = 8 // the most K slices
	// splitPartBytes is the partials' buffer (reserved with the activation
	// scratch, so recorded graphs never see it move): an automatic split
	// that needs more is not taken. 32 MB: down and o at 256 rows in four
	// slices (splitWaves beside the LoRA stream).
	splitPartBytes = 32 << 20
	splitThreads   = 256
)

// splitFor is how many K slices the FP8 product of T activation rows and an
// [N, K] weight takes on sms SMs (1: no split): the most of 2, 4, 8 that
// keeps the blocks (tiles times slices) within one wave, with slices of a
// whole number of tiles' K (128) and partials within splitPartBytes. Only
// for rows fp8_gemv does not take, up to splitMaxRows.
func splitFor(T, N, K, sms int) int {
	if T <= gemvMaxRows || T > splitMaxRows || N%4 != 0 || sms <= 0 {
		return 1
	}
	tiles := splitTiles(T, N)
	s := 1
	for c := 2; c <= splitMaxS; c *= 2 {
		if tiles*c > sms || !splitFits(T, N, K, c) {
			break
		}
		s = c
	}
	return s
}

// splitWaves is splitFor, but for a product whose tiles split in two do
// not fit one wave on its sms SMs (an SM target beside the LoRA stream) it
// takes 2 or 4 slices by time in waves, ceil(tiles * c / sms) waves of
// 1/c of K each, where that saves a tenth (more slices: more partials to
// write and sum). Down at 192-256 rows with 32 SMs held: 64 tiles, no
// split by splitFor (one wave of 64 blocks over all of K, 28 -> 42 µs
// beside the LoRA stream, PERFORMANCE v0.37), 4 slices here (three
// waves of a quarter).
func splitWaves(T, N, K, sms int) int {
	if T <= gemvMaxRows || T > splitMaxRows || N%4 != 0 || sms <= 0 {
		return 1
	}
	tiles := splitTiles(T, N)
	if 2*tiles <= sms {
		return splitFor(T, N, K, sms)
	}
	best, cost := 1, float64((tiles+sms-1)/sms)
	for c := 2; c <= 4; c *= 2 {
		if !splitFits(T, N, K, c) {
			break
		}
		if w := float64((tiles*c+sms-1)/sms) / float64(c); w < 0.9*cost {
			best, cost = c, w
		}
	}
	return best
}

// splitTiles is the output tiles of a T x N product (splitTile square).
func splitTiles(T, N int) int {
	return ((N + splitTile - 1) / splitTile) * ((T + splitTile - 1) / splitTile)
}

// splitFits reports whether K splits into c slices of whole tiles' K and
// the partials fit splitPartBytes.
func splitFits(T, N, K, c int) bool { return K%(c*splitTile) == 0 && 4*c*T*N <= splitPartBytes }

// split is the number of K slices this state's FP8 product takes for T rows
// of an [N, K] weight: splitForce where a test or benchmark set one (1: no
// split), 1 for a shape cuBLASLt had no split plan for, else splitFor on
// the SMs the products may use, or splitWaves on the SM target when the
// LoRA stream holds some back (splitPlan: 1 splitFor on the target, 2
// splitFor on the whole card; benchmarks).
func (f *fp8State) split(T, N, K int) int {
	if f.splitForce > 0 {
		return f.splitForce
	}
	if f.splitNo[[3]int{T, N, K}] {
		return 1
	}
	sms := f.planSMs()
	t := f.mm.SMTarget()
	switch {
	case t <= 0 || t >= sms:
		return splitFor(T, N, K, sms)
	case f.splitPlan == 1: // v0.36's: one wave on the SMs the target leaves
		return splitFor(T, N, K, t)
	case f.splitPlan == 2: // as on the whole card
		return splitFor(T, N, K, sms)
	}
	return splitWaves(T, N, K, t)
}

// reserveSplit allocates the partials' buffer once (recorded graphs use it).
func (f *fp8State) reserveSplit() error { return f.grow(&f.spPart, splitPartBytes) }

// splitLaunch enqueues the K-split product of the quantized activation rows
// (T of them) and w into out (bf16 [T, w.rows]), S slices.
func (f *fp8State) splitLaunch(out cuda.DevicePtr, T int, w *fp8Weight, S int) error {
	N, K := w.rows, w.cols
	if N%4 != 0 || K%(16*S) != 0 {
		return fmt.Errorf("gpu: fp8 product [%d,%d] cannot split K %d ways", N, K, S)
	}
	if err := f.grow(&f.spPart, max(splitPartBytes, 4*S*T*N)); err != nil { // more only for a forced split
		return err
	}
	if err := f.mm.GemmTNSplitK(f.s, f.spPart.Ptr(), f.actQ.Ptr(), cuda.R8FE4M3, w.q.Ptr(), cuda.R8FE4M3, T, N, K, S); err != nil {
		if errors.Is(err, cuda.ErrNotSupported) && f.splitForce == 0 {
			// cuBLASLt has no plan for this split (nothing was enqueued):
			// products of this shape stay whole from now on
			if f.splitNo == nil {
				f.splitNo = map[[3]int]bool{}
			}
			f.splitNo[[3]int{T, N, K}] = true
			return f.mm.GemmTNScaled(f.s, out, cuda.R16BF, f.actQ.Ptr(), f.actS.Ptr(), w.q.Ptr(), w.scale.Ptr(), T, N, K)
		}
		return err
	}
	blocks := min((T*N/4+splitThreads-1)/splitThreads, 8*max(f.ctx.Device().SMs, 1))
	return f.reduce.Launch(f.s, cuda.Dim3{X: blocks}, cuda.Dim3{X: splitThreads}, 0,
		uint64(out), uint64(f.spPart.Ptr()), uint64(f.actS.Ptr()), uint64(w.scale.Ptr()), T, N, S)
}
