package gpu

import (
	"github.com/peftd/peftd/runtime/cuda"
)

// fp8_gemm_skinny (kernels/fp8.cu): the FP8 product for 17-64 rows.
const (
	skinnyMaxRows = 64 // the most rows it takes (fp8_gemm_skinny_n64)
	skinnyRows    = 64 // SK_ROWS: weight rows per block
	skinnyThreads = 128
	skinnyStages  = 4   // SK_STAGES
	skinnyLD      = 192 // SK_LD: bytes per staged row
	skinnyMaxS    = 8   // the most blocks splitting one weight tile's K
)

// skinnyFits reports whether fp8_gemm_skinny computes a [T, N] x [N, K]
// product: more rows than fp8_gemv takes, at most 64, N a multiple of its
// 64-row tiles and K of its 64-byte spans.
func skinnyFits(T, N, K int) bool {
	return T > gemvMaxRows && T <= skinnyMaxRows && N%skinnyRows == 0 && K%64 == 0
}

// skinnySplit is how many blocks split K for each 64-row weight tile of an
// [N, K] weight on a GPU of sms SMs: enough for about two blocks per SM
// (o and down at 8B shapes have 64 tiles), at most skinnyMaxS, and at least
// four 64-byte spans per block.
func skinnySplit(N, K, sms int) int {
	tiles := N / skinnyRows
	if tiles >= 2*sms {
		return 1
	}
	return max(1, min(skinnyMaxS, (2*sms+tiles-1)/tiles, K/64/4))
}

// skinnyShared is the dynamic shared memory of fp8_gemm_skinny for tr
// staged activation rows (32 or 64).
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
	fn, tr := f.skinny[0], 32
	if T > 32 {
		fn, tr = f.skinny[1], 64
	}
	S := skinnySplit(w.rows, w.cols, f.ctx.Device().SMs)
	return fn.Launch(f.s, cuda.Dim3{X: w.rows / skinnyRows, Y: S}, cuda.Dim3{X: skinnyThreads}, skinnyShared(tr),
		uint64(out), uint64(f.skPart.Ptr()), uint64(f.skDone.Ptr()), uint64(f.actQ.Ptr()), uint64(f.actS.Ptr()),
		uint64(w.q.Ptr()), uint64(w.scale.Ptr()), T, w.rows, w.cols)
}
