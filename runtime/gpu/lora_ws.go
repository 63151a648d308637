package gpu

import (
	"github.com/peftd/peftd/runtime/cuda"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
)

// The LoRA expand in the FP8 product's end (PERFORMANCE v0.60).
//
// A step of 17-64 rows with no update runs each FP8 product on fp8_ws, one
// wave of blocks over every SM (4.42 ms at 64 rows, H200). With adapters
// the update ran on the LoRA stream beside the product, on SMs held from
// it, so the product ran on cuBLASLt or fp8_wg (5.10 ms, 0.867 of base):
// fp8_ws planned for fewer SMs loses its one-wave fit (v0.58-v0.59), and
// the update's shrink and expand are latency chains costing ~50 µs a layer
// in series (`4xr32+serial`, 6.03 ms).
//
// Here the group's shrink (sgmv_shrink, K in a few parts) is launched on
// the compute stream just before the product, which is fp8_ws_lora: the
// product's K loop does not wait for the shrink (it reads only what the
// kernel before the shrink wrote), B's columns of each block are staged in
// the pipeline buffers the drain frees, the shrink's sums after its
// griddepcontrol.wait, and the expand runs as MMAs on the accumulators
// before the one rounding to bf16 (kernels/common.cuh, WsLora). So the
// product keeps every SM and its plan, the update costs its bytes (B read
// once, the shrink's x and A) and one short tail, and there is no float32
// update for the next op to read.

// wsLoRADefault is the fused groups (bit g: llama.FusedGroups[g]) whose
// FP8 update of 17-64 rows runs in fp8_ws_lora's end by default.
const wsLoRADefault = 0b1111

// wsLoRAKCols is the K columns a part of the shrink before fp8_ws_lora
// takes where the product's pieces hold them: 8 warps of 32 columns, each
// with SG_SU = 4 iterations' loads in flight, take 1,024 in one round of
// loads, so the shrink ends well within the product's K loop.
const wsLoRAKCols = 1024

// wsLoRAGroups is kernelForce.wsLoRA, or wsLoRADefault.
func (b *Backend) wsLoRAGroups() int { return forced(b.force.wsLoRA, wsLoRADefault) }

// wsLoRAGeom is the pieces a block of fp8_ws_lora of bn weight rows needs
// (ws_lora_geom in common.cuh): ok false where a stage's room cannot hold
// one slot's B columns (RS ranks each) or one K part of a slice's tmp rows.
func wsLoRAGeom(bn, rank int) (rs, perB int, ok bool) {
	rs = (rank + 31) &^ 31
	sb := wsStageBytes(bn)
	perB = sb / (bn * rs * 2)
	return rs, perB, perB >= 1 && wsMaxRows*(rs+4)*4 <= sb
}

// wsLoRAFits reports whether plan p of fp8_ws_lora takes an N-column
// product whose slices start at offs (offs[len]: N) with adapters of rank
// up to rank and the shrink's sums in ks K parts: each block's pieces
// (one slot's B at least, and ks parts of each slice it covers) within
// the buffers its drain frees, and a split product's partials with the
// update's own.
func wsLoRAFits(p wsPlan, offs []int, rank, ks int) bool {
	bn := wsWidths[p.i]
	if _, _, ok := wsLoRAGeom(bn, rank); !ok {
		return false
	}
	n := len(offs) - 1
	N := offs[n]
	if p.split > 1 && (p.split+1)*N > wsMaxPart {
		return false
	}
	for _, o := range offs {
		if o%8 != 0 {
			return false
		}
	}
	slice := func(c int) int {
		s := 0
		for s+1 < n && c >= offs[s+1] {
			s++
		}
		return s
	}
	ahead := wsStages(bn) - 1 - wsInflight
	for n0 := 0; n0 < N; n0 += bn {
		if ahead < (slice(n0+bn-1)-slice(n0)+1)*ks+1 {
			return false
		}
	}
	return true
}

// loraWS enqueues the FP8 product of w and the group's update as the
// shrink and fp8_ws_lora, and reports whether it did; false leaves them to
// Linear and LoRA.
func (b *Backend) loraWS(out, in engine.Buffer, w engine.Weight, layer int, mods []llama.Module) bool {
	fw, ok := w.(*fp8Weight)
	if !ok || b.err != nil || b.f8 == nil || b.f8.ws == nil || b.nLora == 0 || b.stepRank == 0 || layer < 0 || layer >= b.cfg.Layers {
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
	if !ok || b.f8.ws.lfn[p.i] == nil {
		return false
	}
	// the shrink: one block per tile, slice and 8 ranks, K in parts of
	// about wsLoRAKCols columns (whole 256-column groups; each warp's loads
	// in one round), fewer where the product's pieces cannot hold them
	groups := (inF + 255) / 256
	tStride := len(mods) * b.stepRank
	sp := sgShrinkPlan{f: b.fn.sgShrinkC, nb: 8, rankTiles: (b.stepRank + 7) / 8}
	for ks := (inF + wsLoRAKCols - 1) / wsLoRAKCols; ; ks-- {
		if ks < 1 {
			return false
		}
		sp.kchunk = (groups + ks - 1) / ks * 256
		sp.ks = (inF + sp.kchunk - 1) / sp.kchunk
		if sp.ks*T*tStride <= b.stepTmpFloats && wsLoRAFits(p, offs, b.stepRank, sp.ks) {
			break
		}
	}
	b.join()
	b.wrote(out)
	b.la.forkIn = 0
	b.gateLayer(b.s, layer)
	if b.err != nil {
		return true
	}
	if err := b.f8.prepare(x.mem.Ptr(), T, fw.cols, b.gen); err != nil {
		b.fail(err)
		return true
	}
	base, stride := b.tableRows(layer)
	b.launchShrink(b.s, sp, x, base, stride, ms, inF, len(mods))
	if b.err != nil {
		return true
	}
	off1, off2 := slices12(offs)
	b.fail(b.f8.ws.launchLoRA(b.s, p, o.mem.Ptr(), b.f8.actQ.Ptr(), b.f8.actS.Ptr(), fw.q.Ptr(), fw.scale.Ptr(), T, fw.rows, fw.cols,
		wsLoRAArgs{tmp: b.stepTmp, rows: b.rowLora(), table: b.table.Ptr(), base: base, stride: stride, ms: ms, off1: off1, off2: off2,
			rank: b.stepRank, tStride: tStride, ks: sp.ks, kStride: T * tStride}))
	return true
}

// wsLoRAArgs is fp8_ws_lora's LoRA arguments (WsLora in common.cuh).
type wsLoRAArgs struct {
	tmp, rows, table              cuda.DevicePtr
	base, stride                  int
	ms                            [3]int
	off1, off2, rank, tStride, ks int
	kStride                       int
}

// launchLoRA enqueues fp8_ws_lora with plan p (valid): launch's product
// plus the update a.
func (g *wsProduct) launchLoRA(s *cuda.Stream, p wsPlan, out, x, sx, w, sw cuda.DevicePtr, T, N, K int, a wsLoRAArgs) error {
	if err := g.check(p, out, x, w, T, N, K); err != nil {
		return err
	}
	bn, opts := wsWidths[p.i], min(max(g.early, 0), 15)
	if !g.noStagger {
		opts |= 16
	}
	return g.lfn[p.i].Launch(s, cuda.Dim3{X: N / bn, Y: p.split, Z: 1}, cuda.Dim3{X: 128, Y: 1, Z: 1}, wsShared(bn),
		uint64(out), uint64(g.part.Ptr()), uint64(g.done.Ptr()), uint64(x), uint64(sx), uint64(w), uint64(sw), T, N, K, opts,
		uint64(a.tmp), uint64(a.rows), uint64(a.table), a.base, a.stride, a.ms[0], a.ms[1], a.ms[2], a.off1, a.off2,
		a.rank, a.tStride, a.ks, a.kStride)
}
