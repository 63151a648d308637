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
// (fp8State.wgOn, kernelForce.bwg).
//
// Two builds of each: one warpgroup a block (64 weight rows: fn) and two
// (prefix2_n*, 128 weight rows, x staged once for both: fn2); two (tests,
// benchmarks) launches the second where N allows. Grid (N / (64 wgs), S),
// K split S ways as fp8_gemm_skinny's (tileSplit with wgPerSM blocks an SM).
type wgProduct struct {
	fn, fn2    [len(skinnyVariants)]*cuda.Function
	two        bool               // fn2 where it fits
	part, done *cuda.DeviceBuffer // split partials, and per-64-row-tile counters left at zero between launches
	esize      int                // operand bytes: 1 (e4m3) or 2 (bf16)
	sms        int
}

// wgStages and wgRowBytes are wg_body's WG_STAGES and WG_RB.
const (
	wgStages   = 4
	wgRowBytes = 128
)

// wgShared is wg_body's dynamic shared memory for tr staged activation
// rows and wgs warpgroups: its stages, and 1 KB to round the base up to
// the swizzle's 1024 bytes.
func wgShared(tr, wgs int) int { return wgStages*(wgs*skinnyRows+tr)*wgRowBytes + 1024 }

// wgPerSM is the blocks an SM holds of the variant with tr staged rows and
// wgs warpgroups, as its K split plans for (two, but one for two
// warpgroups with 128 rows: 129 KB).
func wgPerSM(tr, wgs int) int {
	if wgs == 2 && tr > 64 {
		return 1
	}
	return 2
}

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
	for _, b := range []struct {
		wgs  int
		name string // the functions' prefix
		set  *[len(skinnyVariants)]*cuda.Function
	}{{1, prefix, &g.fn}, {2, prefix + "2", &g.fn2}} {
		wgs, set := b.wgs, b.set
		for i, v := range skinnyVariants {
			if wgShared(v.rows, wgs)+4 > maxShared {
				continue
			}
			fn, err := mod.Function(fmt.Sprintf("%s_n%d", b.name, v.rows))
			if err != nil {
				continue // not compiled in
			}
			if err := fn.SetMaxDynamicShared(wgShared(v.rows, wgs)); err != nil {
				return nil, err
			}
			set[i], found = fn, true
		}
	}
	if !found {
		return nil, nil
	}
	// two warpgroups a block split twice the 64-row tiles as far: twice
	// the partials and counters of fp8_gemm_skinny's bound (TestWgSplitBounds)
	var err error
	if g.part, err = ctx.Alloc(wgPartBytes(g.sms)); err == nil {
		if g.done, err = ctx.Alloc(4 * wgTiles(g.sms)); err == nil {
			err = s.Memset8(g.done.Ptr(), 0, 4*wgTiles(g.sms))
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

// wgPartBytes and wgTiles bound the split partials and counters on a GPU
// of sms SMs: a split happens only below perSM * sms blocks of tiles, so
// the 64-row tiles times the split stay under 8 sms (two warpgroups a
// block; 4 sms with one), and the 64-row tiles of a split product under
// 4 sms.
func wgPartBytes(sms int) int { return 2 * skinnyPartBytes(sms) }
func wgTiles(sms int) int     { return 4 * sms }

// set is the variants launched: fn, or fn2 with two.
func (g *wgProduct) set() *[len(skinnyVariants)]*cuda.Function {
	if g.two {
		return &g.fn2
	}
	return &g.fn
}

// wgs is the warpgroups a block of the variants launched.
func (g *wgProduct) wgs() int {
	if g.two {
		return 2
	}
	return 1
}

// top is the rows of the largest variant loaded (0: none).
func (g *wgProduct) top() int {
	if g == nil {
		return 0
	}
	top := 0
	for i, fn := range g.set() {
		if fn != nil {
			top = skinnyVariants[i].rows
		}
	}
	return top
}

// variant is the smallest variant that takes T rows (-1: none loaded).
func (g *wgProduct) variant(T int) int {
	for i, v := range skinnyVariants {
		if T <= v.rows && g.set()[i] != nil {
			return i
		}
	}
	return -1
}

// fits reports whether it computes a T x N x K product: more rows than the
// few-row kernels take (16) and no more than a loaded variant's, N a
// multiple of a block's weight rows and a row of K operands whole 64-byte
// spans.
func (g *wgProduct) fits(T, N, K int) bool {
	return g != nil && T > gemvMaxRows && g.variant(T) >= 0 && N%(skinnyRows*g.wgs()) == 0 && K*g.esize%64 == 0
}

// split is how many blocks split K for each block's weight rows of an [N,
// K] product of T rows.
func (g *wgProduct) split(T, N, K int) int {
	tr := skinnyVariants[max(g.variant(T), 0)].rows
	return tileSplit(N/(skinnyRows*g.wgs()), K*g.esize, g.sms, wgPerSM(tr, g.wgs()))
}

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
	wgs := g.wgs()
	return g.set()[i].Launch(s, cuda.Dim3{X: N / (skinnyRows * wgs), Y: g.split(T, N, K)}, cuda.Dim3{X: skinnyThreads * wgs},
		wgShared(skinnyVariants[i].rows, wgs), args...)
}
