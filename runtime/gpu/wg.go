package gpu

import (
	"fmt"

	"github.com/peftd/peftd/kernels"
	"github.com/peftd/peftd/runtime/cuda"
)

// wgProduct launches wg_body's kernels (kernels/common.cuh): the product of
// 17-128 activation rows on Hopper's warpgroup MMAs, stream-K (wgPerSM
// blocks an SM, each streaming an equal share of the tiles' K stages),
// with e4m3 operands and row scales (fp8_wg_n* in the FP8 module; a bf16
// build, gemm_wg, lost to cuBLASLt at 32-128 rows: PERFORMANCE v0.30,
// removed in v0.80). They are compiled only with PEFTD_WG (the FP8
// module's kernels.FP8Wgmma build) and load only on sm_90a; by default
// FP8 products of 17-64 rows that fp8_ws does not plan take them
// (fp8State.wgAuto, wgAutoFits), and a test or benchmark asks for more
// (fp8State.wgOn).
//
// One warpgroup a block (64-row weight tiles). wg_body's two-warpgroup
// build (fp8_wg2_n*, 128-row tiles) left the module in v0.81: only
// benchmarks launched it (issue 9), and v0.31-v0.33 measured it no faster.
type wgProduct struct {
	fn         [len(skinnyVariants)]*cuda.Function
	part, done *cuda.DeviceBuffer // shared tiles' partials, and per-tile counters left at zero between launches
	esize      int                // operand bytes: 1 (e4m3; wg_body also compiles 2, bf16, which nothing loads since gemm_wg went)
	sms        int                // SMs planned for (the compute stream's: partition.go)
	smsMax     int                // the device's: the partials are sized for it
	forceG     int                // benchmarks: this many blocks (0: wgPerSM an SM; at most that)
	target     int                // SMs the products enqueued now may take (SetSMTarget; 0: sms)
}

// SetSMTarget makes the products enqueued from now on take n SMs (0: all
// it plans for), as cuda.Matmul's: beside the LoRA stream the held SMs
// stay free. A stream-K grid ends with its slowest block, so a block that
// shares its SM with the LoRA stream's kernels holds the whole product.
func (g *wgProduct) SetSMTarget(n int) { g.target = max(n, 0) }

// wgRowBytes is wg_body's WG_RB: bytes of K an atom holds of each row.
// wgPerSM and wgKA are WG_PER_SM (blocks an SM) and WG_KA (atoms a stage
// at most), or what PEFTD_KERNEL_DEFINES sets them to (an A/B); the
// defaults are common.cuh's (v0.30's best at 17-64 rows).
const (
	wgRowBytes = 128
	wgMaxTiles = 8192 // weight tiles a product may have (the counters)
)

var (
	wgPerSM = max(1, kernels.DefinedInt("WG_PER_SM", 1))
	wgKA    = max(1, kernels.DefinedInt("WG_KA", 4))
)

// wgSmem is WG_SMEM less the 1 KB of alignment: a block's stage bytes.
func wgSmem() int { return 200<<10/wgPerSM - 1024 }

// wgAtomBytes is WgShape's AB: one 128-byte atom of each of the variant's
// 64 weight rows and tr staged activation rows.
func wgAtomBytes(tr int) int { return (skinnyRows + tr) * wgRowBytes }

// wgAtoms is WgShape's KA: wgKA atoms a stage, or as many as leave room for
// three stages (1 at least).
func wgAtoms(tr int) int { return max(1, min(wgKA, wgSmem()/(3*wgAtomBytes(tr)))) }

// wgStageBytes is WgShape's SB: a stage of tr staged rows.
func wgStageBytes(tr int) int { return wgAtoms(tr) * wgAtomBytes(tr) }

// wgStages is WgShape's ST: the stages of the variant with tr staged rows
// (WG_SMEM bytes at most, but 3 at least).
func wgStages(tr int) int {
	return max(3, min(16, wgSmem()/wgStageBytes(tr)))
}

// wgShared is wg_body's dynamic shared memory for tr staged activation
// rows: its stages, and 1 KB to round the base up to the swizzle's 1024
// bytes.
func wgShared(tr int) int { return wgStages(tr)*wgStageBytes(tr) + 1024 }

// wgPartBytes bounds the shared tiles' partials on a GPU of sms SMs: two
// slots a block, wgPerSM blocks an SM, 128 weight rows by 128 activation
// rows of float32.
func wgPartBytes(sms int) int { return 2 * wgPerSM * sms * 2 * skinnyRows * skinnyMaxRows * 4 }

// loadWG finds prefix_n32/64/128 in mod on an sm_90a card, raises their
// shared memory limits (maxShared bytes a block), and allocates the split
// partials and counters now (a first launch may be inside a graph
// capture); nil where none is there (the module was compiled without
// PEFTD_WG, or another card).
func loadWG(ctx *cuda.Context, s *cuda.Stream, mod *cuda.Module, prefix string, esize, maxShared int) (*wgProduct, error) {
	if ctx.Device().Arch() != "sm_90a" {
		return nil, nil
	}
	g := &wgProduct{esize: esize, sms: ctx.Device().SMs, smsMax: ctx.Device().SMs}
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
	if g.part, g.done, err = splitBuffers(ctx, s, wgPartBytes(g.sms)); err != nil {
		return nil, fmt.Errorf("gpu: %s's split buffers: %w", prefix, err)
	}
	return g, nil
}

// splitBuffers allocates a split product's float32 partials (partBytes)
// and wgMaxTiles per-tile counters, zeroed (the kernels leave them at zero
// between launches); on an error nothing is kept.
func splitBuffers(ctx *cuda.Context, s *cuda.Stream, partBytes int) (part, done *cuda.DeviceBuffer, err error) {
	if part, err = ctx.Alloc(partBytes); err != nil {
		return nil, nil, err
	}
	if done, err = allocZero(ctx, s, 4*wgMaxTiles); err != nil {
		part.Free()
		return nil, nil, err
	}
	return part, done, nil
}

// allocZero is n bytes of device memory zeroed on s (nil where the
// allocation or the memset fails: nothing is left allocated).
func allocZero(ctx *cuda.Context, s *cuda.Stream, n int) (*cuda.DeviceBuffer, error) {
	b, err := ctx.Alloc(n)
	if err != nil {
		return nil, err
	}
	if err := s.Memset8(b.Ptr(), 0, n); err != nil {
		b.Free()
		return nil, err
	}
	return b, nil
}

// freeSplit releases a split product's buffers and clears them (nil-safe).
func freeSplit(part, done **cuda.DeviceBuffer) error {
	var first error
	for _, b := range []**cuda.DeviceBuffer{part, done} {
		if err := (*b).Free(); err != nil && first == nil {
			first = err
		}
		*b = nil
	}
	return first
}

// free releases the split buffers (nil-safe).
func (g *wgProduct) free() error {
	if g == nil {
		return nil
	}
	return freeSplit(&g.part, &g.done)
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

// rows is the activation rows staged by the variant launched for T rows:
// the smallest loaded one that takes them, or (none loaded: the CPU
// emulation) the smallest that would.
func (g *wgProduct) rows(T int) int {
	if i := g.variant(T); i >= 0 {
		return skinnyVariants[i].rows
	}
	return skinnyVariants[skinnyVariantFor(T)].rows
}

// fits reports whether it computes a T x N x K product: more rows than the
// few-row kernels take (16) and no more than a loaded variant's, N whole
// tiles (no more than the counters) and a row of K operands whole 64-byte
// spans.
func (g *wgProduct) fits(T, N, K int) bool {
	if g == nil || T <= gemvMaxRows || g.variant(T) < 0 || K*g.esize%64 != 0 {
		return false
	}
	bm := skinnyRows
	return N%bm == 0 && N/bm <= wgMaxTiles
}

// grid is the blocks of a T x N x K product: wgPerSM an SM (of the SM
// target's, when set), no more than
// its stage units (tiles of 64 weight rows a warpgroup, each row's K in
// stages of the variant's wgAtoms 128-byte atoms, the last zero-filled).
func (g *wgProduct) grid(T, N, K int) int {
	ka := wgAtoms(g.rows(T))
	units := N / skinnyRows * ((K*g.esize + ka*wgRowBytes - 1) / (ka * wgRowBytes))
	sms := g.sms
	if g.target > 0 {
		sms = min(sms, g.target)
	}
	G := wgPerSM * sms
	if g.forceG > 0 {
		G = min(G, g.forceG)
	}
	return max(1, min(G, units))
}

// launch enqueues out [T, N] = x [T, K] . w [N, K]^T, times sx[t] sw[n]
// where sx is set (e4m3 operands), on s. The caller checked fits.
func (g *wgProduct) launch(s *cuda.Stream, out, x, sx, w, sw cuda.DevicePtr, T, N, K int) error {
	i := g.variant(T)
	if i < 0 {
		return fmt.Errorf("gpu: no wgmma product for %d rows", T)
	}
	return g.fn[i].Launch(s, cuda.Dim3{X: g.grid(T, N, K)}, cuda.Dim3{X: skinnyThreads},
		wgShared(skinnyVariants[i].rows), uint64(out), uint64(g.part.Ptr()), uint64(g.done.Ptr()), uint64(x),
		uint64(sx), uint64(w), uint64(sw), T, N, K)
}
