package gpu

import (
	"fmt"

	"github.com/peftd/peftd/runtime/cuda"
)

// fp8_gemm_skinny (kernels/fp8.cu): the FP8 product for 17-128 rows.
const (
	skinnyMaxRows = 128 // the most rows it takes (fp8_gemm_skinny_n128)
	// skinnyAutoRows is the most rows the FP8 product sends to it (cuBLASLt
	// above). It equals gemvMaxRows: none. TestFP8GemmBench on the H200
	// (v0.16) measured it 2-3x slower than cuBLASLt at 32-64 rows; v0.28's
	// parallel read-back of the split partials (skinny_store) brought qkv
	// at 32 rows to 18.7 vs 17.2 us, but down at 64 rows is 57.2 vs 37.6
	// and n128 still 3.5x slower, so it stays a benchmark's choice (skTop)
	// until it beats cuBLASLt there.
	skinnyAutoRows = gemvMaxRows
	skinnyRows     = 64 // SK_ROWS: weight rows per block
	skinnyThreads  = 128
	skinnyStages   = 4   // SK_STAGES
	skinnyLD       = 192 // SK_LD: bytes per staged row
	skinnyMaxS     = 8   // the most blocks splitting one weight tile's K
)

// skinnyFits reports whether fp8_gemm_skinny computes a [T, N] x [N, K]
// product when it takes up to top rows (skinnyAutoRows, or skinnyMaxRows
// where a benchmark asks): more rows than fp8_gemv takes, N a multiple of
// its 64-row tiles and K of its 64-byte spans.
func skinnyFits(T, N, K, top int) bool {
	return T > gemvMaxRows && T <= min(top, skinnyMaxRows) && N%skinnyRows == 0 && K%64 == 0
}

// skinnyTop is the most rows this state sends to fp8_gemm_skinny: at most
// the largest variant this card's shared memory holds (skMax); with wgOn,
// the largest fp8_wg variant loaded.
func (f *fp8State) skinnyTop() int {
	if top := f.wg.top(); f.wgOn && top > 0 {
		return top
	}
	if f.skTop > 0 {
		return min(f.skTop, f.skMax)
	}
	return min(skinnyAutoRows, f.skMax)
}

// skinnyLoad raises the shared memory limit of each fp8_gemm_skinny
// variant that fits a block on this card (maxShared bytes; the kernel's
// 4 bytes of static shared memory beside it) and records the largest in
// skMax; a larger variant is left out (n128 needs 147 KB: sm_86/sm_89 allow
// 99 KB), so that FP8 weights still start there.
func (f *fp8State) skinnyLoad(maxShared int) error {
	for i, v := range skinnyVariants {
		if skinnyShared(v.rows)+4 > maxShared {
			f.skinny[i] = nil
			continue
		}
		fn, err := f.mod.Function(v.name)
		if err == nil {
			err = fn.SetMaxDynamicShared(skinnyShared(v.rows))
		}
		if err != nil {
			return err
		}
		f.skinny[i], f.skMax = fn, v.rows
	}
	return nil
}

// skinnyVariants are the kernel's instantiations: staged activation rows
// (8 per MMA n-tile) and function name.
var skinnyVariants = [...]struct {
	rows int
	name string
}{{32, "fp8_gemm_skinny_n32"}, {64, "fp8_gemm_skinny_n64"}, {128, "fp8_gemm_skinny_n128"}}

// skinnyVariantFor is the smallest variant that stages T rows (the largest
// where none does): the one a launch of T rows takes.
func skinnyVariantFor(T int) int {
	for i, v := range skinnyVariants {
		if T <= v.rows {
			return i
		}
	}
	return len(skinnyVariants) - 1
}

// skinnySplit is how many blocks split K for each 64-row weight tile of an
// [N, K] weight on a GPU of sms SMs holding perSM blocks each (2 for the
// 32- and 64-row variants, 1 for n128's 147 KB): enough for one wave (o and
// down at 8B shapes have 64 tiles), at most skinnyMaxS, and at least four
// 64-byte spans per block. perSM is at most 2 (the partials are sized so).
func skinnySplit(N, K, sms, perSM int) int { return tileSplit(N/skinnyRows, K, sms, perSM) }

// tileSplit is skinnySplit for a grid of tiles weight tiles a row of K
// bytes wide.
func tileSplit(tiles, K, sms, perSM int) int {
	if tiles >= perSM*sms {
		return 1
	}
	return max(1, min(skinnyMaxS, (perSM*sms+tiles-1)/tiles, K/64/4))
}

// skinnyPerSM is the blocks per SM the split plans for with tr staged rows.
func skinnyPerSM(tr int) int {
	if tr > 64 {
		return 1
	}
	return 2
}

// skinnyShared is the dynamic shared memory of fp8_gemm_skinny for tr
// staged activation rows (32, 64 or 128).
func skinnyShared(tr int) int { return skinnyStages * (skinnyRows + tr) * skinnyLD }

// skinnyPartBytes bounds the float32 partials of a split product on a GPU
// of sms SMs: a split happens only below 2*sms tiles, so tiles * S stays
// under 4*sms, each tile [skinnyRows][64] floats.
func skinnyPartBytes(sms int) int { return 4 * sms * skinnyRows * skinnyMaxRows * 4 }

// reserveSkinny allocates the partials and the per-tile counters (zero) of
// split products once: recorded graphs use them.
func (f *fp8State) reserveSkinny() error {
	sms := f.ctx.Device().SMs
	if err := f.grow(&f.skPart, skinnyPartBytes(sms)); err != nil {
		return err
	}
	if f.skDone != nil {
		return nil
	}
	var err error
	if f.skDone, err = f.ctx.Alloc(4 * 2 * sms); err != nil {
		return err
	}
	return f.s.Memset8(f.skDone.Ptr(), 0, 4*2*sms)
}

// skinnyLaunch enqueues fp8_gemm_skinny on the quantized activation rows.
func (f *fp8State) skinnyLaunch(out cuda.DevicePtr, T int, w *fp8Weight) error {
	if err := f.reserveSkinny(); err != nil {
		return err
	}
	i := skinnyVariantFor(T)
	if f.wgOn && f.wg.fits(T, w.rows, w.cols) {
		return f.wg.launch(f.s, out, f.actQ.Ptr(), f.actS.Ptr(), w.q.Ptr(), w.scale.Ptr(), T, w.rows, w.cols)
	}
	fn, tr := f.skinny[i], skinnyVariants[i].rows
	if fn == nil {
		return fmt.Errorf("gpu: fp8_gemm_skinny for %d rows is not loaded", T)
	}
	S := skinnySplit(w.rows, w.cols, f.planSMs(), skinnyPerSM(tr))
	return fn.Launch(f.s, cuda.Dim3{X: w.rows / skinnyRows, Y: S}, cuda.Dim3{X: skinnyThreads}, skinnyShared(tr),
		uint64(out), uint64(f.skPart.Ptr()), uint64(f.skDone.Ptr()), uint64(f.actQ.Ptr()), uint64(f.actS.Ptr()),
		uint64(w.q.Ptr()), uint64(w.scale.Ptr()), T, w.rows, w.cols)
}
