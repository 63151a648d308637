package gpu

import (
	"fmt"

	"github.com/peftd/peftd/runtime/cuda"
)

// wgskProduct launches wgsk_body's kernels (kernels/wgsk.cuh): the FP8
// product of up to 256 activation rows on Hopper's warpgroup MMAs,
// stream-K over the SMs it is given (one block an SM, each streaming an
// equal share of the 128-row weight tiles' K stages), its stages copied by
// the TMA (tensor maps: the weight's made once, the activations' at each
// launch) and consumed by two warpgroups while a third asks for the next.
// Why: cuBLASLt runs one block per 128 x 128 output tile, so o and down at
// 129-256 rows (64 tiles at 8B shapes) leave a third of the SMs idle
// beside the LoRA stream (PERFORMANCE v0.85, v0.95). Only in the FP8
// module's wgmma build (PEFTD_WG), on sm_90a; nothing routes to it by
// default yet: fp8State.wgskOn (tests, TestDecodeBench `+wgsk`) sends
// every product of wgskMinRows-256 rows it fits to it.
type wgskProduct struct {
	fn         [len(wgskRows)]*cuda.Function
	part, done *cuda.DeviceBuffer // shared tiles' partials, and per-tile counters left at zero between launches
	sms        int                // SMs planned for (the compute stream's: partition.go)
	smsMax     int                // the device's: the partials are sized for it
	target     int                // SMs the products enqueued now may take (SetSMTarget; 0: sms)
	forceG     int                // tests: this many blocks (0: one an SM; at most that)
	times      cuda.DevicePtr     // tests: each block's phases (WK_TIMES uint64 a block; 0: none)
}

// wgskRows are the variants' staged activation rows (fp8_wgsk_n128,
// fp8_wgsk_n256); wgskBM the weight rows of a tile (WK_BM), wgskThreads a
// block's threads (WK_THREADS), wgskSmem the stages' shared memory at
// most (WK_SMEM).
var wgskRows = [...]int{128, 256}

const (
	wgskBM        = 128
	wgskThreads   = 384
	wgskConsumers = 256 // WK_CONSUMERS: the two consumer warpgroups' threads (each arrives on a stage's empty barrier)
	wgskSmem      = 200 << 10
	// wgskMinRows is the fewest rows wgskOn sends to the kernels: below
	// it fp8_ws, fp8_wg and fp8_stream take the products.
	wgskMinRows = 65
)

// wgskStageBytes is WkShape's SB: a stage of WK_BM weight rows and tr
// activation rows of 128 bytes.
func wgskStageBytes(tr int) int { return (wgskBM + tr) * wgRowBytes }

// wgskStages is WkShape's ST: as many stages as WK_SMEM holds, 8 at most.
func wgskStages(tr int) int { return min(8, (wgskSmem-1024)/wgskStageBytes(tr)) }

// wgskShared is a block's dynamic shared memory: its stages and 1 KB to
// round their base up to the swizzle's 1024 bytes.
func wgskShared(tr int) int { return wgskStages(tr)*wgskStageBytes(tr) + 1024 }

// wgskPartBytes is the partials of a GPU of sms SMs: two slots a block, a
// block an SM, a tile's WK_BM weight rows by 256 activation rows of
// float32.
func wgskPartBytes(sms int) int { return 2 * sms * wgskBM * wgskRows[len(wgskRows)-1] * 4 }

// loadWGSK finds fp8_wgsk_n* in mod on an sm_90a card whose driver encodes
// tensor maps, raises their shared memory limits and allocates the
// partials and counters now (a first launch may be inside a graph
// capture); nil where none is there (the module was compiled without
// PEFTD_WG, or another card).
func loadWGSK(ctx *cuda.Context, s *cuda.Stream, mod *cuda.Module, maxShared int) (*wgskProduct, error) {
	if ctx.Device().Arch() != "sm_90a" || !cuda.TMA() {
		return nil, nil
	}
	g := &wgskProduct{sms: ctx.Device().SMs, smsMax: ctx.Device().SMs}
	found := false
	for i, tr := range wgskRows {
		if wgskShared(tr)+4096 > maxShared { // and the static barriers, scales and counter
			continue
		}
		fn, err := mod.Function(fmt.Sprintf("fp8_wgsk_n%d", tr))
		if err != nil {
			continue // not compiled in
		}
		if err := fn.SetMaxDynamicShared(wgskShared(tr)); err != nil {
			return nil, err
		}
		g.fn[i], found = fn, true
	}
	if !found {
		return nil, nil
	}
	var err error
	if g.part, g.done, err = splitBuffers(ctx, s, wgskPartBytes(g.smsMax)); err != nil {
		return nil, fmt.Errorf("gpu: fp8_wgsk's split buffers: %w", err)
	}
	return g, nil
}

// SetSMTarget makes the products enqueued from now on take n SMs (0: all
// it plans for), as wgProduct's.
func (g *wgskProduct) SetSMTarget(n int) { g.target = max(n, 0) }

// variant is the smallest loaded variant that takes T rows (-1: none).
func (g *wgskProduct) variant(T int) int {
	for i, tr := range wgskRows {
		if T <= tr && g.fn[i] != nil {
			return i
		}
	}
	return -1
}

// fits reports whether the kernels take a T x N x K product: a variant
// for T rows, N in whole tiles (within the counters), K a multiple of the
// TMA's 16-byte row stride.
func (g *wgskProduct) fits(T, N, K int) bool {
	return g != nil && T >= 1 && g.variant(T) >= 0 && N%wgskBM == 0 && N/wgskBM <= wgMaxTiles && K >= 16 && K%16 == 0
}

// grid is the blocks of a T x N x K product: one an SM (of the SM
// target's, when set), no more than its stage units (tiles of WK_BM
// weight rows, each row's K in 128-byte stages).
func (g *wgskProduct) grid(N, K int) int {
	units := N / wgskBM * ((K + wgRowBytes - 1) / wgRowBytes)
	sms := g.sms
	if g.target > 0 {
		sms = min(sms, g.target)
	}
	G := min(sms, g.smsMax) // the partials hold two slots a block of smsMax
	if g.forceG > 0 {
		G = min(G, g.forceG)
	}
	return max(1, min(G, units))
}

// weightMap is w's tensor map for the kernels (boxes of 128 bytes x WK_BM
// rows), made at its first launch and kept with the weight.
func (g *wgskProduct) weightMap(s *cuda.Stream, w *fp8Weight) (*cuda.TensorMap, error) {
	if w.wgskMap != nil {
		return w.wgskMap, nil
	}
	m := new(cuda.TensorMap)
	if err := cuda.EncodeTiled2D(s, m, cuda.TMapUint8, w.q.Ptr(), uint64(w.cols), uint64(w.rows), uint64(w.cols), wgRowBytes, wgskBM, cuda.TMapSwizzle128B); err != nil {
		return nil, fmt.Errorf("gpu: fp8_wgsk weight map: %w", err)
	}
	w.wgskMap = m
	return m, nil
}

// launch enqueues out [T, N] = x [T, K] . w [N, K]^T times sx[t] sw[n] on
// s (e4m3 operands: x the quantized activation rows, K bytes apart).
func (g *wgskProduct) launch(s *cuda.Stream, out, x, sx cuda.DevicePtr, w *fp8Weight, T int) error {
	N, K := w.rows, w.cols
	if !g.fits(T, N, K) {
		return fmt.Errorf("gpu: fp8_wgsk does not take a %d x %d x %d product", T, N, K)
	}
	if x%16 != 0 || w.q.Ptr()%16 != 0 {
		return fmt.Errorf("gpu: fp8_wgsk operands not 16-byte aligned (%#x, %#x)", uint64(x), uint64(w.q.Ptr()))
	}
	i := g.variant(T)
	wm, err := g.weightMap(s, w)
	if err != nil {
		return err
	}
	var xm cuda.TensorMap // the activation rows: rows past T read as zeros
	if err := cuda.EncodeTiled2D(s, &xm, cuda.TMapUint8, x, uint64(K), uint64(T), uint64(K), wgRowBytes, uint32(wgskRows[i]), cuda.TMapSwizzle128B); err != nil {
		return fmt.Errorf("gpu: fp8_wgsk activation map: %w", err)
	}
	return g.fn[i].Launch(s, cuda.Dim3{X: g.grid(N, K)}, cuda.Dim3{X: wgskThreads}, wgskShared(wgskRows[i]),
		wm, &xm, uint64(out), uint64(g.part.Ptr()), uint64(g.done.Ptr()), uint64(g.times), uint64(sx), uint64(w.scale.Ptr()), T, N, K)
}

// free releases the split buffers (nil-safe).
func (g *wgskProduct) free() error {
	if g == nil {
		return nil
	}
	return freeSplit(&g.part, &g.done)
}
