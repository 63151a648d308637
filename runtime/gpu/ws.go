package gpu

import (
	"fmt"

	"github.com/peftd/peftd/kernels"
	"github.com/peftd/peftd/runtime/cuda"
)

// wsProduct launches ws_body's kernels (kernels/common.cuh): the product of
// 17-64 activation rows (FP8: 9-64, those of 1-16 rows on the fp8_ws16
// kernels, which stage 16 activation rows, not 64: rows16) streamed
// through Hopper's warpgroup MMAs the way fp8_stream streams 1-16 rows.
// The activation rows are the wgmma's M (64, zeros past T) and each
// block's BN weight rows its N, so every block reads
// its weight rows once over its share of K and the activations once per BN
// weight rows: one wave of blocks, no stream-K tiles to flush (fp8_wg's
// 64-row weight tiles re-read the activations once per 64 rows, as many
// bytes as the weights at 64 rows). A K split (grid.y) meets in the
// kernel: float32 partials summed in split order by the tile's last block.
// Each stage is copied by cp.async (TMA copies were measured no faster:
// PERFORMANCE v0.55-v0.56, removed in v0.80). fp8_ws is in the FP8
// module's wgmma build (kernels.FP8Wgmma, loaded by default on sm_90a);
// gemm_ws_n* (bf16 operands, no scales) in the forward module
// only with PEFTD_WS or PEFTD_WG. By default fp8State.wsAuto sends every
// FP8 product of 17-64 rows it plans to fp8_ws (PERFORMANCE v0.56: q/k/v
// and o with no LoRA update beside; v0.58: every such one, after v0.57
// measured them ahead, 4.54 vs 4.60 ms at 64 rows; v0.63: beside the
// LoRA stream too, after WS_INFLIGHT 1); fp8State.wsOn / wsWide /
// wsNarrow and kernelForce.bws force the rest for A/Bs (gemm_ws:
// faster in the H100's steps, slower in the H200's, in isolation too:
// v0.57).
// No launch allocates device memory: the split buffers are made at load
// (a launch may be inside a graph capture).
type wsProduct struct {
	fn         [len(wsWidths)]*cuda.Function
	sfn        [len(wsWidths)]*cuda.Function // gate/up and silu_mul in one (gemm_ws_silu_n*, fp8_ws_silu_n*: silu_ws.go), where compiled
	ssync      *cuda.DeviceBuffer            // fp8_ws_silu's row maxima and barrier counters (zero between launches)
	nfn        [len(wsWidths)]*cuda.Function // the o or down product and add_rmsnorm in one (gemm_ws_norm_n*, fp8_ws_norm_n*: norm_ws.go), where compiled
	hfn        [len(wsWidths)]*cuda.Function // fn's products with half-row stages (gemm_wsh_n*, fp8_wsh_n*: 224 and 256), where compiled
	hsfn       [len(wsWidths)]*cuda.Function // sfn's (gemm_wsh_silu_n*, fp8_wsh_silu_n*)
	half       bool                          // the products enqueued now take hfn and hsfn where loaded (kernelForce.wsHalf)
	f16        [len(wsWidths)]*cuda.Function // fn's products of 1-16 rows with 16 activation rows staged, not 64 (fp8_ws16_n*: 32-128), where compiled
	rows16     bool                          // the products of 1-16 rows enqueued now take f16 where loaded (kernelForce.ws16, ws16Auto)
	long16     bool                          // benchmarks: plans of 1-16 rows on f16 keep narrow blocks over long K (wsShortRows waived; kernelForce.wsLong16)
	hf16       [len(wsWidths)]*cuda.Function // hfn's products of 1-16 rows with 16 activation rows staged (fp8_wsh16_n224, n256), where compiled
	half16     bool                          // benchmarks: the half-row products of 1-16 rows take hf16 where loaded (kernelForce.wsHalf16)
	nsync      *cuda.DeviceBuffer            // nfn's barrier counters (zero between launches: wsSync)
	part, done *cuda.DeviceBuffer            // the splits' partials and per-tile counters (zero between launches)
	esize      int                           // operand bytes: 1 (e4m3)
	sms        int                           // the device's SMs
	target     int                           // SMs the products enqueued now may take (0: sms)
	early      int                           // stages' weights asked before griddepcontrol.wait (opts bits 0-3; the kernel caps it at ST - 1)
	noStagger  bool                          // benchmarks: every block walks K from its start (opts bit 4 off)
	force      wsPlan                        // benchmarks: this plan where it fits (zero: plan's choice)
}

// wsWidths are the kernels' weight rows a block (BN: fp8_ws_n{BN}).
var wsWidths = [...]int{32, 48, 64, 96, 128, 224, 256}

// wsMaxRows is the most activation rows a product takes (the wgmma's M);
// wsMinRows the fewest it is planned for (fp8_stream and fp8_gemv take
// fewer); wsAtom is an atom's bytes of K a row (WG_RB); wsMaxPart bounds
// a split product's S x N (its partials: S N 64 floats).
const (
	wsMaxRows = 64
	wsMinRows = 17
	wsAtom    = 128
	wsMaxPart = 32768
)

// wsKA is WS_KA: 128-byte atoms a stage (common.cuh's default 2;
// PEFTD_KERNEL_DEFINES may set it); wsKABF16 is WS_KA_BF16, gemm_ws's
// (WS_KA unless set).
var (
	wsKA     = max(1, kernels.DefinedInt("WS_KA", 2))
	wsKABF16 = max(1, kernels.DefinedInt("WS_KA_BF16", wsKA))
)

// wsSmem is WS_SMEM: a ws block's stage buffers at most (200 KB unless
// PEFTD_KERNEL_DEFINES sets it, e.g. to leave room for a LoRA kernel's
// block on the same SM).
var wsSmem = kernels.DefinedInt("WS_SMEM", 200<<10)

// wsFit is how many stages of ka atoms (of the 64 activation rows and bn
// weight rows) wsSmem less the alignment holds.
func wsFit(bn, ka int) int { return (wsSmem - 1024) / (ka * (wsMaxRows + bn) * wsAtom) }

// wsKAFor is WsShape's KA for operands of esize bytes: WS_KA (2:
// WS_KA_BF16) atoms a stage, halved while fewer than 3 stages would fit.
func wsKAFor(bn, esize int) int {
	ka := wsKA
	if esize == 2 {
		ka = wsKABF16
	}
	for ka > 1 && wsFit(bn, ka) < 3 {
		ka /= 2
	}
	return ka
}

// wsStageBytes is WsShape's SB.
func wsStageBytes(bn, esize int) int { return wsKAFor(bn, esize) * (wsMaxRows + bn) * wsAtom }

// wsStages is WsShape's ST: as many stages as fit, 16 at most.
func wsStages(bn, esize int) int { return min(16, wsFit(bn, wsKAFor(bn, esize))) }

// wsShared is a block's dynamic shared memory: its stages and 1 KB to round
// the base up to the swizzle's 1024 bytes.
func wsShared(bn, esize int) int { return wsStages(bn, esize)*wsStageBytes(bn, esize) + 1024 }

// wshSmem is WSH_SMEM: the half-row blocks' stage buffers at most (226 KB
// unless PEFTD_KERNEL_DEFINES sets it).
var wshSmem = kernels.DefinedInt("WSH_SMEM", 226<<10)

// wshStageBytes is WsShape<bn, ES, true>'s SB: two atoms of the 64
// activation rows and half the block's bn weight rows; wshStages its ST
// and wshShared the block's dynamic shared memory.
func wshStageBytes(bn int) int { return 2 * (wsMaxRows + bn/2) * wsAtom }
func wshStages(bn int) int     { return min(16, (wshSmem-1024)/wshStageBytes(bn)) }
func wshShared(bn int) int     { return wshStages(bn)*wshStageBytes(bn) + 1024 }

// wshStatic is room left for a half-row kernel's static shared memory
// (its scales and counters: 2.4 KB at most as compiled) beside wshShared
// within the card's limit.
const wshStatic = 4 << 10

// halfOn reports whether the products enqueued now take width i's
// half-row kernel (half set and the kernel loaded).
func (g *wsProduct) halfOn(i int) bool { return g.half && g.hfn[i] != nil }

// ws16KA is WS16_KA: the 16-row kernels' 128-byte atoms a stage
// (common.cuh's default 4; PEFTD_KERNEL_DEFINES may set it).
var ws16KA = max(1, kernels.DefinedInt("WS16_KA", 4))

// ws16Rows is the most activation rows fp8_ws16_n* stages (ws_body's TR
// 16); the wgmma's M stays 64, its rows 16-63 read from the bytes after
// them and never stored.
const ws16Rows = 16

// ws16Pad is WsShape<bn, 1, false, 16>'s PAD: the bytes the last atom's
// 64-row A read goes past it (bn 32 only), kept inside the allocation.
func ws16Pad(bn int) int { return max(0, wsMaxRows-ws16Rows-bn) * wsAtom }

// ws16Fit is how many stages of ka atoms (16 activation rows and bn
// weight rows) wsSmem less the alignment and ws16Pad holds.
func ws16Fit(bn, ka int) int { return (wsSmem - 1024 - ws16Pad(bn)) / (ka * (ws16Rows + bn) * wsAtom) }

// ws16KAFor is the 16-row kernels' KA: WS16_KA, halved while fewer than 3
// stages would fit (WsShape's ka).
func ws16KAFor(bn int) int {
	ka := ws16KA
	for ka > 1 && ws16Fit(bn, ka) < 3 {
		ka /= 2
	}
	return ka
}

// ws16Stages and ws16Shared are the 16-row kernels' ST (16 at most) and
// dynamic shared memory (the stages, ws16Pad and 1 KB to round the base up
// to the swizzle's 1024 bytes).
func ws16Stages(bn int) int { return min(16, ws16Fit(bn, ws16KAFor(bn))) }
func ws16Shared(bn int) int {
	return ws16Stages(bn)*ws16KAFor(bn)*(ws16Rows+bn)*wsAtom + ws16Pad(bn) + 1024
}

// wsh16Stages and wsh16Shared are the 16-row half-row kernels' ST and
// dynamic shared memory (fp8_wsh16_n*: two atoms of 16 activation rows
// and half the block's bn weight rows a stage; the A read stays inside
// an atom of 128 rows or more).
func wsh16Stages(bn int) int { return min(16, (wshSmem-1024)/(2*(ws16Rows+bn/2)*wsAtom)) }
func wsh16Shared(bn int) int { return wsh16Stages(bn)*2*(ws16Rows+bn/2)*wsAtom + 1024 }

// half16On reports whether a product of T rows takes width i's 16-row
// half-row kernel (half16 and the half-row kernels on, T at most
// ws16Rows, the kernel loaded).
func (g *wsProduct) half16On(i, T int) bool {
	return g.half16 && g.halfOn(i) && T <= ws16Rows && g.hf16[i] != nil
}

// ws16Auto is whether products of 1-16 rows take the 16-row kernels by
// default (kernelForce.ws16 1 or -1 sets it; TestDecodeBench +ws16,
// +nows16; PEFTD_FP8_WS16=on|off for the whole engine: serving's A/B).
// On since PERFORMANCE v1.01 (H100, FP8, device ms a step, one process):
// 16 rows base 4.13 -> 4.10, four rank-32 adapters 4.49 -> 4.47; under
// nsys o (n32) 10.2 -> 9.2 µs a layer, q/k/v (n48) 12.9 -> 12.6, down
// (n64x2) unchanged; WS16_KA 8 4.12. Serving (steps of ~59 rows and
// more) the same: 9,500 against 9,509 tok/s with four adapters.
const ws16Auto = true

// ws16Default is PEFTD_FP8_WS16's switch (ws16Auto where unset).
func ws16Default() bool { return envOnOff("PEFTD_FP8_WS16", ws16Auto) }

// on16 reports whether a product of T rows takes width i's 16-row kernel
// (rows16 set, T at most ws16Rows and the kernel loaded).
func (g *wsProduct) on16(i, T int) bool { return g.rows16 && T <= ws16Rows && g.f16[i] != nil }

// loadWS finds prefix_n{BN} in mod on an sm_90a card and raises their
// shared memory limits; nil where none is there.
func loadWS(ctx *cuda.Context, s *cuda.Stream, mod *cuda.Module, prefix string, esize, maxShared int) (*wsProduct, error) {
	if ctx.Device().Arch() != "sm_90a" {
		return nil, nil
	}
	g := &wsProduct{esize: esize, sms: ctx.Device().SMs, early: wsEarlyStages, rows16: ws16Auto}
	found := false
	// kernel is name from mod with its shared memory limit raised to
	// shared (nil where it is not compiled in)
	kernel := func(name string, shared int) (*cuda.Function, error) {
		fn, err := mod.Function(name)
		if err != nil {
			return nil, nil
		}
		if err := fn.SetMaxDynamicShared(shared); err != nil {
			return nil, err
		}
		return fn, nil
	}
	optional := func(name string, shared int) *cuda.Function {
		fn, err := kernel(name, shared)
		if err != nil {
			return nil
		}
		return fn
	}
	for i, bn := range wsWidths {
		if wsStages(bn, esize) < 3 || wsShared(bn, esize) > maxShared {
			continue
		}
		sh := wsShared(bn, esize)
		var err error
		if g.fn[i], err = kernel(fmt.Sprintf("%s_n%d", prefix, bn), sh); err != nil {
			return nil, err
		}
		if g.fn[i] == nil {
			continue // not compiled in
		}
		found = true
		// the fused and half-row variants (off by default: silu_ws.go,
		// norm_ws.go, wsHalf) are optional: one the card will not give its
		// shared memory is left out, never an error for the products
		g.sfn[i] = optional(fmt.Sprintf("%s_silu_n%d", prefix, bn), sh)
		g.nfn[i] = optional(fmt.Sprintf("%s_norm_n%d", prefix, bn), sh)
		if wshStages(bn) >= 3 && wshShared(bn)+wshStatic <= maxShared {
			g.hfn[i] = optional(fmt.Sprintf("%sh_n%d", prefix, bn), wshShared(bn))
			g.hsfn[i] = optional(fmt.Sprintf("%sh_silu_n%d", prefix, bn), wshShared(bn))
		}
		if esize == 1 && bn <= 128 && ws16Stages(bn) >= 3 && ws16Shared(bn) <= maxShared {
			g.f16[i] = optional(fmt.Sprintf("%s16_n%d", prefix, bn), ws16Shared(bn))
		}
		// n224's seven stages leave its 2 KB of static shared memory exactly
		// the card's 227 KB: SetMaxDynamicShared refuses it (and optional
		// leaves it out) where the compiled static size is more
		if esize == 1 && g.hfn[i] != nil && wsh16Stages(bn) >= 3 && wsh16Shared(bn) <= maxShared {
			g.hf16[i] = optional(fmt.Sprintf("%sh16_n%d", prefix, bn), wsh16Shared(bn))
		}
	}
	if !found {
		return nil, nil
	}
	var err error
	if g.part, g.done, err = splitBuffers(ctx, s, wsMaxPart*wsMaxRows*4); err != nil {
		return nil, fmt.Errorf("gpu: %s's split buffers: %w", prefix, err)
	}
	if esize == 1 && g.sfn != ([len(wsWidths)]*cuda.Function{}) {
		if g.ssync, err = allocZero(ctx, s, 4*wsSiluSync); err != nil {
			g.free()
			return nil, fmt.Errorf("gpu: %s_silu's barrier: %w", prefix, err)
		}
	}
	if g.nfn != ([len(wsWidths)]*cuda.Function{}) {
		if g.nsync, err = allocZero(ctx, s, 4*wsSync); err != nil {
			g.free()
			return nil, fmt.Errorf("gpu: %s_norm's barrier: %w", prefix, err)
		}
	}
	return g, nil
}

// free releases the split buffers (nil-safe).
func (g *wsProduct) free() error {
	if g == nil {
		return nil
	}
	err := freeSplit(&g.part, &g.done)
	if e := g.ssync.Free(); e != nil && err == nil {
		err = e
	}
	g.ssync = nil
	if e := g.nsync.Free(); e != nil && err == nil {
		err = e
	}
	g.nsync = nil
	return err
}

// SetSMTarget makes the products enqueued from now on plan for n SMs (0:
// the device's), as cuda.Matmul's: beside the LoRA stream the held SMs
// stay free.
func (g *wsProduct) SetSMTarget(n int) { g.target = max(n, 0) }

// wsNarrow reports whether an N x K weight is one of the narrow products
// (q/k/v, o: K <= N < 4 K) that fp8State.wsNarrow and kernelForce.bws 2
// send to the ws kernels (fp8State.wsAuto's products in v0.56; v0.57 found
// fp8_ws ahead on gate/up too once its scale reads left global memory).
func wsNarrow(N, K int) bool { return K <= N && N < 4*K }

// wsPlan is one product's kernel (index into wsWidths) and K split.
type wsPlan struct{ i, split int }

func (p wsPlan) String() string { return fmt.Sprintf("n%dx%d", wsWidths[p.i], p.split) }

// valid reports whether plan p computes a T x N x K product: a loaded
// kernel, N whole blocks of its rows, each split whole stages of K, and
// room for the partials and counters.
func (g *wsProduct) valid(p wsPlan, T, N, K int) bool {
	if g == nil || T < 1 || T > wsMaxRows || p.i < 0 || p.i >= len(wsWidths) || p.split < 1 {
		return false
	}
	bn := wsWidths[p.i]
	if N%bn != 0 || N/bn > wgMaxTiles {
		return false
	}
	// each split whole stages (a half-row stage is two atoms)
	stage := wsAtom * wsKAFor(bn, g.esize)
	if g.halfOn(p.i) {
		stage = max(stage, 2*wsAtom)
	}
	if g.on16(p.i, T) { // whole stages of both kernels (powers of two: the larger is a multiple of the other)
		stage = max(stage, wsAtom*ws16KAFor(bn))
	}
	return g.fn[p.i] != nil && (K*g.esize)%(stage*p.split) == 0 && (p.split == 1 || p.split*N <= wsMaxPart)
}

// plan picks the kernel and K split of a T x N x K product (ok false: none
// fits, or T is outside wsMinRows-wsMaxRows): the force plan where set and
// valid; else the most blocks that fit one wave of the SM target, and of
// those the fewest splits, except that a block of fewer than 64 weight
// rows over more than wsLongSplit bytes of K gives way to a plan of 64 or
// more rows with the same blocks (wsShortRows).
func (g *wsProduct) plan(T, N, K int) (wsPlan, bool) { return g.planFrom(T, N, K, wsMinRows) }

// planFrom is plan for products of from-64 rows (from >= 1; the kernel
// zeroes the activation rows past T).
func (g *wsProduct) planFrom(T, N, K, from int) (wsPlan, bool) {
	if g == nil || T < max(from, 1) || T > wsMaxRows {
		return wsPlan{}, false
	}
	if g.force.split > 0 {
		return g.force, g.valid(g.force, T, N, K)
	}
	sms := g.sms
	if g.target > 0 {
		sms = min(sms, g.target)
	}
	best, blocks := g.oneWave(T, N, K, sms)
	return best, blocks > 0
}

// oneWave is the one-wave plan of a T x N x K product on sms SMs and its
// blocks (0: none fits): the most blocks, then the fewest splits but as
// wsShortRows says.
func (g *wsProduct) oneWave(T, N, K, sms int) (wsPlan, int) {
	best, bestBlocks := wsPlan{}, 0
	for _, S := range []int{1, 2, 4, 8} {
		for i := range wsWidths {
			p := wsPlan{i: i, split: S}
			if !g.valid(p, T, N, K) {
				continue
			}
			blocks := N / wsWidths[i] * S
			if blocks > sms {
				continue
			}
			if blocks > bestBlocks || blocks == bestBlocks && g.wsShortRows(best, T, K) && wsWidths[i] >= 64 {
				best, bestBlocks = p, blocks
			}
		}
	}
	return best, bestBlocks
}

// wsLongSplit is the most bytes of K a block of fewer than 64 weight rows
// is planned for when a plan of wider blocks makes as many.
const wsLongSplit = 8 << 10

// wsShortRows reports whether plan p's blocks stream fewer than 64 weight
// rows each over more than wsLongSplit bytes of K. A stage holds the 64
// activation rows beside the BN weight rows, so at BN 32 two thirds of
// the stages' room and of each block's reads are activations and a third
// is weights in flight; over a long K range that costs more than a split.
// H200, 64 rows, PERFORMANCE v0.57: FP8 down (14,336 bytes of K) n32x1
// 26.4 us against n64x2 21.3; bf16 down n32x1 46.5 against n64x2 36.3;
// with 4,096-8,192 bytes the fewest splits stay ahead (FP8 q/k/v n48x1
// 11.0 against n96x2 12.7).
//
// At 1-16 rows on fp8_ws16 a 32-row block's stage is two thirds weights,
// not one third, so long16 (kernelForce.wsLong16, TestDecodeBench
// +wslong16) waives the rule there for the A/B: FP8 down at 16 rows
// n32x1 (no partials to sum) against n64x2.
func (g *wsProduct) wsShortRows(p wsPlan, T, K int) bool {
	if g.long16 && g.on16(p.i, T) {
		return false
	}
	return wsWidths[p.i] < 64 && K*g.esize/p.split > wsLongSplit
}

// wsEarlyStages is the K stages of weights a ws product asks before
// griddepcontrol.wait (opts bits 0-3), so that they land while the kernel
// before it ends. One since v0.55, measured in isolation only (0-3 stages
// within noise there: PERFORMANCE v0.56). In FP8 decode steps (H100,
// PERFORMANCE v1.00) 2, 4 or 7 stages for every ws product, or 4 or 7 for
// o alone (it launches under attention), were even or 0.2-2.2% slower at
// 16 and 64 rows, with and without adapters, so the count stays one.
const wsEarlyStages = 1

// wsKernels sets which of ws's kernels the step's products take: the
// half-row ones (wsHalf), the 16-row ones (kernelForce.ws16, else ws16On)
// and the benchmarks' 16-row A/Bs (kernelForce.wsLong16, wsHalf16).
func (b *Backend) wsKernels(ws *wsProduct) {
	ws.half, ws.rows16 = b.wsHalf(ws.esize), forcedOn(b.force.ws16, b.ws16On)
	ws.long16, ws.half16 = b.force.wsLong16, b.force.wsHalf16
}

// wsHalfAuto is whether the ws products of widths 224 and 256 take their
// half-row kernels (gemm_wsh_n*, fp8_wsh_n*: two 128-byte atoms of half the
// block's weight rows a stage, the halves alternating) by default, for
// bf16 weights (esize 2) and for FP8 (esize 1). PERFORMANCE v0.71 section
// 3 measured what they are for: gate/up read tile-major (each row 256
// bytes and more at a time) 61.9 -> 60.1 µs (bf16) and 34.0 -> 33.1 µs
// (FP8) at 64 rows. PERFORMANCE v0.75 (H100, TestWsHalf passing on the
// same tree): FP8 steps 4.74 -> 4.63 ms at 32 rows and 5.62 -> 5.56 at 64
// with them forced on, so FP8 takes them by default (session 84, checked on
// the tree that sets it: PERFORMANCE v0.76). bf16 base steps gain with
// them forced on (PERFORMANCE v0.81: H100 32 / 64 rows 6.66 / 7.63 ->
// 6.61 / 7.57 ms; H200 with gemm_ws_silu 17 / 32 / 64 rows 4.90 / 5.10 /
// 5.79 -> 4.86 / 5.05 / 5.75), but bf16 products of 17-32 rows run
// gemm_ws beside the LoRA stream too and the half-row kernels were not
// measured there, and no device was lent for the call that would, so bf16
// stays off until it runs. kernelForce.wsHalf 1 or -1 sets both
// (TestDecodeBench +wshalf, +nowshalf; TestWsHalf checks them against the
// one-atom kernels).
const (
	wsHalfAuto    = false // bf16
	wsHalfFP8Auto = true
)

// wsHalf is whether the step's ws products of element size esize take the
// half-row kernels (kernelForce.wsHalf, else wsHalfAuto or wsHalfFP8Auto).
func (b *Backend) wsHalf(esize int) bool {
	if esize == 1 {
		return forcedOn(b.force.wsHalf, wsHalfFP8Auto)
	}
	return forcedOn(b.force.wsHalf, wsHalfAuto)
}

// launch enqueues out [T, N] = x [T, K] . w [N, K]^T, times sx[t] sw[n]
// where sx is set (e4m3 operands), with plan p (valid) on s.
func (g *wsProduct) launch(s *cuda.Stream, p wsPlan, out, x, sx, w, sw cuda.DevicePtr, T, N, K int) error {
	if err := g.check(p, out, x, w, T, N, K); err != nil {
		return err
	}
	bn := wsWidths[p.i]
	fn, shared := g.fn[p.i], wsShared(bn, g.esize)
	switch {
	case g.on16(p.i, T):
		fn, shared = g.f16[p.i], ws16Shared(bn)
	case g.half16On(p.i, T):
		fn, shared = g.hf16[p.i], wsh16Shared(bn)
	case g.halfOn(p.i):
		fn, shared = g.hfn[p.i], wshShared(bn)
	}
	return fn.Launch(s, cuda.Dim3{X: N / bn, Y: p.split, Z: 1}, cuda.Dim3{X: 128, Y: 1, Z: 1}, shared, g.args(out, x, sx, w, sw, T, N, K)...)
}

// args is a ws kernel's argument list for out [T, N] = x [T, K] . w [N,
// K]^T (ws_body's: the split buffers and launchOpts' opts), then more, a
// fused kernel's own arguments.
func (g *wsProduct) args(out, x, sx, w, sw cuda.DevicePtr, T, N, K int, more ...any) []any {
	return append([]any{uint64(out), uint64(g.part.Ptr()), uint64(g.done.Ptr()), uint64(x), uint64(sx), uint64(w), uint64(sw), T, N, K, g.launchOpts()}, more...)
}

// launchOpts is the kernels' opts: the early weight stages (bits 0-3)
// and, unless noStagger, bit 4: each block's K walk from its own stage, so
// that the grid does not read one activation line at once.
func (g *wsProduct) launchOpts() int {
	opts := min(max(g.early, 0), 15)
	if !g.noStagger {
		opts |= 16
	}
	return opts
}

// check reports a plan that does not take a T x N x K product, or
// operands that are not 16-byte aligned.
func (g *wsProduct) check(p wsPlan, out, x, w cuda.DevicePtr, T, N, K int) error {
	if !g.valid(p, T, N, K) {
		return fmt.Errorf("gpu: ws plan %v does not take %d x %d x %d", p, T, N, K)
	}
	if (uint64(out)|uint64(x)|uint64(w))%16 != 0 {
		return fmt.Errorf("gpu: ws product: operands not 16-byte aligned")
	}
	return nil
}
