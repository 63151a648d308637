package gpu

import (
	"github.com/peftd/peftd/runtime/cuda"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
)

// The LoRA update inside the FP8 product (PERFORMANCE v0.60).
//
// A step of 17-64 rows with no update runs each FP8 product on fp8_ws, one
// wave of blocks over every SM (4.42 ms at 64 rows, H200). With adapters
// the update ran on the LoRA stream beside the product, on SMs held from
// it, so the product ran on cuBLASLt or fp8_wg (5.10 ms, 0.867 of base):
// fp8_ws planned for fewer SMs loses its one-wave fit (v0.58-v0.59), and
// the update's shrink and expand are latency chains costing ~50 µs a layer
// in series (`4xr32+serial`, 6.03 ms).
//
// Here the product is fp8_ws_lora, whose blocks have two more warps for
// the group's shrink: the grid's shrink warps take its units (16 rows of
// one adapter, a slice, 8 ranks, a K part) while the warpgroups stream the
// weights; each block stages B's columns in the pipeline buffers its drain
// frees, waits after its K loop for every shrink warp of the grid (one
// wave: the plan has at most a block an SM) and adds the update to its
// accumulators as MMAs before the one rounding to bf16 (kernels/common.cuh,
// WsLora). So the product keeps every SM and its plan, the update costs its
// bytes (B once, the shrink's x and A from L2) and one short tail, and no
// kernel or float32 update is added to the step.
//
// Measured (H200, PERFORMANCE v0.60), it loses: four rank-32 adapters at
// 64 rows 6.15 ms a step against 5.11 for the LoRA stream beside fp8_ws
// (base 4.42). Without the update's MMAs (-DPEFTD_WSL_NOADD) 5.52, and
// the shrink and the wait cost nothing measurable (-DPEFTD_WSL_NOSHRINK,
// -DPEFTD_WSL_NOWAIT): each product is ~8 µs longer for the variant's
// tail and footprint alone. So the kernels are compiled only with
// PEFTD_KERNEL_DEFINES=-DPEFTD_WSL, and without them loraWS takes no group.
// (v0.60's first version launched the shrink as its own kernel just
// before the product: 6.57 ms.)

// wsLoRADefault is the fused groups (bit g: llama.FusedGroups[g]) whose
// FP8 update of 17-64 rows runs in fp8_ws_lora by default, where the
// kernels are compiled in (-DPEFTD_WSL).
const wsLoRADefault = 0b1111

// wsLoRAShrinkWarps is WSL_SW (common.cuh): a block's shrink warps.
const wsLoRAShrinkWarps = 2

// wsLoRAKMin is the fewest K columns a shrink unit takes (a warp's eight
// iterations of 32 columns in flight, one round of loads); wsLoRAMaxParts
// the most K parts (each block's warps read every part of their rows'
// sums, four loads in flight).
const (
	wsLoRAKMin     = 256
	wsLoRAMaxParts = 4
)

// wsLoRAGroups is kernelForce.wsLoRA, or wsLoRADefault.
func (b *Backend) wsLoRAGroups() int { return forced(b.force.wsLoRA, wsLoRADefault) }

// wsLoRAGeom is the B pieces a block of fp8_ws_lora of bn weight rows
// needs (ws_lora_geom in common.cuh): RS ranks a staged column, perB
// slots a piece; ok false where a stage's room cannot hold one slot's B.
func wsLoRAGeom(bn, rank int) (rs, perB int, ok bool) {
	rs = (rank + 31) &^ 31
	perB = wsStageBytes(bn, 1) / (bn * rs * 2)
	return rs, perB, perB >= 1
}

// wsLoRAFits reports whether plan p of fp8_ws_lora takes an N-column
// product whose slices start at offs (offs[len]: N) with adapters of rank
// up to rank on a card of sms SMs: one wave (the blocks wait for the
// grid's shrink warps), a stage's room for one slot's B, slices on 8-column
// bounds, and a split product's partials with the update's own.
func wsLoRAFits(p wsPlan, offs []int, rank, sms int) bool {
	bn := wsWidths[p.i]
	if _, _, ok := wsLoRAGeom(bn, rank); !ok {
		return false
	}
	N := offs[len(offs)-1]
	if N/bn*p.split > sms || p.split > 1 && (p.split+1)*N > wsMaxPart {
		return false
	}
	for _, o := range offs {
		if o%8 != 0 {
			return false
		}
	}
	return true
}

// wsLoRAParts is the K parts of the shrink of a group of ns slices for T
// rows at rank: about one unit (16 rows, a slice, 8 ranks, a part) for
// each of the grid's shrink warps, wsLoRAMaxParts at most, each part
// wsLoRAKMin columns at least,
// within the scratch's room (room floats, tStride a row); kchunk is a
// part's columns.
func wsLoRAParts(warps, T, ns, rank, inF, tStride, room int) (ks, kchunk int) {
	units := (T + 15) / 16 * ns * ((rank + 7) / 8)
	ks = max(1, min(warps/max(units, 1), inF/wsLoRAKMin, wsLoRAMaxParts))
	for ks > 1 && ks*T*tStride > room {
		ks--
	}
	kchunk = (inF + ks - 1) / ks
	kchunk = (kchunk + 7) &^ 7 // whole 16-byte loads
	return (inF + kchunk - 1) / kchunk, kchunk
}

// loraWS enqueues the FP8 product of w and the group's update as one
// fp8_ws_lora, and reports whether it did; false leaves them to Linear and
// LoRA.
func (b *Backend) loraWS(out, in engine.Buffer, w engine.Weight, layer int, mods []llama.Module) bool {
	fw, ok := w.(*fp8Weight)
	if !ok || b.err != nil || b.f8 == nil || b.f8.ws == nil || !b.stepLoRA() || layer < 0 || layer >= b.cfg.Layers {
		return false
	}
	if g := groupIndex(mods); g < 0 || b.wsLoRAGroups()&(1<<g) == 0 {
		return false
	}
	if _, _, ok := b.Partition(); ok || !b.asideOK() {
		return false
	}
	T := b.rows()
	o, x := buf(out), buf(in)
	if x == nil || o == nil || o == x || x.cols != fw.cols || o.cols != fw.rows || !o.whole() || !x.whole() {
		return false
	}
	offs, ms, inF, same := b.groupSlices(mods)
	if !same || inF != fw.cols || offs[len(mods)] != fw.rows || b.tcChunks(mods) == 0 || !b.sgmvOK(x, mods, o.ld, ptr(o)) {
		return false
	}
	p, ok := b.f8.ws.plan(T, fw.rows, fw.cols)
	if !ok || b.f8.ws.lfn[p.i] == nil || !wsLoRAFits(p, offs, b.stepRank, b.f8.ws.sms) {
		return false
	}
	tStride := len(mods) * b.stepRank
	ks, kchunk := wsLoRAParts(fw.rows/wsWidths[p.i]*p.split*wsLoRAShrinkWarps, T, len(mods), b.stepRank, inF, tStride, b.stepTmpFloats)
	if ks*T*tStride > b.stepTmpFloats {
		return false
	}
	if !b.enterFused(out, layer) {
		return true
	}
	if err := b.f8.prepare(x.mem.Ptr(), T, fw.cols, b.gen); err != nil {
		b.fail(err)
		return true
	}
	base, stride := b.tableRows(layer)
	off1, off2 := slices12(offs)
	b.fail(b.f8.ws.launchLoRA(b.s, p, o.mem.Ptr(), b.f8.actQ.Ptr(), b.f8.actS.Ptr(), fw.q.Ptr(), fw.scale.Ptr(), T, fw.rows, fw.cols,
		wsLoRAArgs{tmp: b.stepTmp, rows: b.rowLora(), table: b.table.Ptr(), base: base, stride: stride, ms: ms, off1: off1, off2: off2,
			rank: b.stepRank, tStride: tStride, ks: ks, kStride: T * tStride,
			x: ptr(x), tiles: b.i32(b.off.tiles), nTiles: b.nTiles, ns: len(mods), kChunk: kchunk, inF: inF, xStride: x.ld}))
	return true
}

// wsLoRAArgs is fp8_ws_lora's LoRA arguments (WsLora in common.cuh).
type wsLoRAArgs struct {
	tmp, rows, table              cuda.DevicePtr
	base, stride                  int
	ms                            [3]int
	off1, off2, rank, tStride, ks int
	kStride                       int
	x, tiles                      cuda.DevicePtr // the shrink's activations and the step's row tiles
	nTiles, ns, kChunk            int
	inF, xStride                  int
}

// launchLoRA enqueues fp8_ws_lora with plan p (valid): launch's product
// plus the update a.
func (g *wsProduct) launchLoRA(s *cuda.Stream, p wsPlan, out, x, sx, w, sw cuda.DevicePtr, T, N, K int, a wsLoRAArgs) error {
	if err := g.check(p, out, x, w, T, N, K); err != nil {
		return err
	}
	bn, opts := wsWidths[p.i], g.launchOpts()
	return g.lfn[p.i].Launch(s, cuda.Dim3{X: N / bn, Y: p.split, Z: 1}, cuda.Dim3{X: 128 + 32*wsLoRAShrinkWarps, Y: 1, Z: 1}, wsShared(bn, 1),
		uint64(out), uint64(g.part.Ptr()), uint64(g.done.Ptr()), uint64(x), uint64(sx), uint64(w), uint64(sw), T, N, K, opts,
		uint64(a.tmp), uint64(a.rows), uint64(a.table), a.base, a.stride, a.ms[0], a.ms[1], a.ms[2], a.off1, a.off2,
		a.rank, a.tStride, a.ks, a.kStride, uint64(a.x), uint64(a.tiles), a.nTiles, a.ns, a.kChunk, a.inF, a.xStride,
		uint64(g.lsync.Ptr()))
}
