package gpu

import (
	"fmt"

	"github.com/peftd/peftd/runtime/cuda"
)

// wgProduct launches wg_body's kernels (kernels/common.cuh): fp8_gemm_skinny's
// product on Hopper's warpgroup MMAs for 17-128 rows, with e4m3 operands and
// row scales (fp8_wg_n* in the FP8 module) or bf16 ones (gemm_wg_n* in the
// forward module). They are compiled only with PEFTD_WG (PEFTD_KERNEL_DEFINES)
// and load only on sm_90a; a test or benchmark asks for them
// (fp8State.wgOn, kernelForce.bwg). Grid (N / 64, S), K split S ways as
// fp8_gemm_skinny's (skinnySplit with two blocks an SM).
type wgProduct struct {
	fn         [len(skinnyVariants)]*cuda.Function
	part, done *cuda.DeviceBuffer // split partials, and per-tile counters left at zero between launches
	esize      int                // operand bytes: 1 (e4m3) or 2 (bf16)
	sms        int
}

// wgStages and wgRowBytes are wg_body's WG_STAGES and WG_RB.
const (
	wgStages   = 4
	wgRowBytes = 128
)

// wgShared is wg_body's dynamic shared memory for tr staged activation
// rows: its stages, and 1 KB to round the base up to the swizzle's 1024
// bytes.
func wgShared(tr int) int { return wgStages*(skinnyRows+tr)*wgRowBytes + 1024 }

// loadWG finds prefix_n32/64/128 in mod on an sm_90a card, raises their
// shared memory limits (maxShared bytes a block), and allocates the split
// partials and counters now (a first launch may be inside a graph
// capture); nil where none is there (the module was compiled without
// PEFTD_WG, or another card).
func loadWG(ctx *cuda.Context, s *cuda.Stream, mod *cuda.Module, prefix string, esize, maxShared int) (*wgProduct, error) {
	if ctx.Device().Arch() != "sm_90a" {
		return nil, nil
	}
	g := &wgProduct{esize: esize, sms: ctx.Device().SMs}
	found := false
	for i, v := range skinnyVariants {
		if wgShared(v.rows)+4 > maxShared {
			continue
		}
		fn, err := mod.Function(fmt.Sprintf("%s_n%d", prefix, v.rows))
		if err != nil {
			continue // not compiled in
		}
		if err := fn.SetMaxDynamicShared(wgShared(v.rows)); err != nil {
			return nil, err
		}
		g.fn[i], found = fn, true
	}
	if !found {
		return nil, nil
	}
	var err error
	if g.part, err = ctx.Alloc(skinnyPartBytes(g.sms)); err == nil {
		if g.done, err = ctx.Alloc(4 * 2 * g.sms); err == nil {
			err = s.Memset8(g.done.Ptr(), 0, 4*2*g.sms)
		}
	}
	if err != nil {
		g.free()
		return nil, fmt.Errorf("gpu: %s's split buffers: %w", prefix, err)
	}
	return g, nil
}

// free releases the split buffers (nil-safe).
func (g *wgProduct) free() error {
	if g == nil {
		return nil
	}
	var first error
	for _, b := range []*cuda.DeviceBuffer{g.part, g.done} {
		if err := b.Free(); err != nil && first == nil {
			first = err
		}
	}
	g.part, g.done = nil, nil
	return first
}

// top is the rows of the largest variant loaded (0: none).
func (g *wgProduct) top() int {
	if g == nil {
		return 0
	}
	top := 0
	for i, fn := range g.fn {
		if fn != nil {
			top = skinnyVariants[i].rows
		}
	}
	return top
}

// variant is the smallest variant that takes T rows (-1: none loaded).
func (g *wgProduct) variant(T int) int {
	for i, v := range skinnyVariants {
		if T <= v.rows && g.fn[i] != nil {
			return i
		}
	}
	return -1
}

// fits reports whether it computes a T x N x K product: more rows than the
// few-row kernels take (16) and no more than a loaded variant's, N a
// multiple of its 64-row tiles and a row of K operands whole 64-byte spans.
func (g *wgProduct) fits(T, N, K int) bool {
	return g != nil && T > gemvMaxRows && g.variant(T) >= 0 && N%skinnyRows == 0 && K*g.esize%64 == 0
}

// split is how many blocks split K for each 64-row tile of an [N, K] weight.
func (g *wgProduct) split(N, K int) int { return skinnySplit(N, K*g.esize, g.sms, 2) }

// launch enqueues out [T, N] = x [T, K] . w [N, K]^T, times sx[t] sw[n]
// where sx is set (e4m3 operands), on s. The caller checked fits.
func (g *wgProduct) launch(s *cuda.Stream, out, x, sx, w, sw cuda.DevicePtr, T, N, K int) error {
	i := g.variant(T)
	if i < 0 {
		return fmt.Errorf("gpu: no wgmma product for %d rows", T)
	}
	args := []any{uint64(out), uint64(g.part.Ptr()), uint64(g.done.Ptr()), uint64(x)}
	if g.esize == 1 { // fp8_wg: (out, part, done, qx, sx, qw, sw, M, N, K)
		args = append(args, uint64(sx), uint64(w), uint64(sw))
	} else { // gemm_wg: (out, part, done, x, w, M, N, K)
		args = append(args, uint64(w))
	}
	args = append(args, T, N, K)
	return g.fn[i].Launch(s, cuda.Dim3{X: N / skinnyRows, Y: g.split(N, K)}, cuda.Dim3{X: skinnyThreads}, wgShared(skinnyVariants[i].rows), args...)
}
