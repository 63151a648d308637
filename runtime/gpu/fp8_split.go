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
	// that needs more is not taken.
	splitPartBytes = 16 << 20
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
	tiles := ((N + splitTile - 1) / splitTile) * ((T + splitTile - 1) / splitTile)
	s := 1
	for c := 2; c <= splitMaxS; c *= 2 {
		if tiles*c > sms || K%(c*splitTile) != 0 || 4*c*T*N > splitPartBytes {
			break
		}
		s = c
	}
	return s
}

// split is the number of K slices this state's FP8 product takes for T rows
// of an [N, K] weight: splitForce where a test or benchmark set one (1: no
// split), 1 for a shape cuBLASLt had no split plan for, else splitFor on
// the SMs the products may use (the SM target when the LoRA stream holds
// some back).
func (f *fp8State) split(T, N, K int) int {
	if f.splitForce > 0 {
		return f.splitForce
	}
	if f.splitNo[[3]int{T, N, K}] || f.splitWhole[[4]int{T, N, K, f.mm.SMTarget()}] {
		return 1
	}
	return splitFor(T, N, K, splitSMs(T, f.planSMs(), f.mm.SMTarget(), f.shared, f.splitBeside))
}

// splitSMs is the SMs a K split of T rows is planned for: the card's sms,
// or the SM target (0: none) of a product beside the LoRA stream (shared),
// except in steps of splitBesideRows or with every row count forced (all).
func splitSMs(T, sms, target int, shared, all bool) int {
	whole := shared && (all || T > splitBesideRows[0] && T <= splitBesideRows[1])
	if target > 0 && !whole {
		return min(sms, target)
	}
	return sms
}

// splitBesideRows: FP8 products of more than [0] and up to [1] rows beside
// the LoRA stream plan their K split for the whole card (o and down then
// take 2 slices at 192 rows), not for the SMs left to them. H200, four
// rank-32 adapters, device ms a step: 192 rows 10.45 vs 10.84 (v0.43) and
// 10.90 vs 11.30 (v0.37); it loses at 128 rows (7.24 vs 6.96: 4 slices
// instead of 2), at 256 (11.70 vs 11.56) and in mixed steps (8.76 vs 8.61).
var splitBesideRows = [2]int{128, 192}

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
