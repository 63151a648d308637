package gpu

import (
	"github.com/peftd/peftd/runtime/cuda"
	"github.com/peftd/peftd/runtime/llama"
)

// The q/k/v LoRA expand inside RoPE (rope_store_lora, kernels/llama.cu).
//
// At 1-16 rows a fused group's update is two dependent launches of a few
// µs for ~1 µs of bytes. q/k/v's output is read by one op, RoPE and the
// K/V store, so the expand can happen there: rope_store_lora takes a
// block per head and row, reads the row's adapter's B for that head's
// columns (8 KB a rank-32 head) and the shrink's output, and adds the
// update before the rotation. Then
//   - bf16 weights (lora_inline.go): the shrink rides the product and no
//     LoRA kernel is left on the compute stream's path;
//   - FP8 weights (the LoRA stream): the stream runs the shrink alone, so
//     the op after the product waits for one kernel, not two (v0.37: the
//     q/k/v join cost 119 µs a step at 16 rows).
// The update is summed in float32 and added to the product rounded once,
// as rope_store_rows adds the expand's float32 update.

// ropeLoRARows is the most rows whose update goes into RoPE by default
// (rope_store_lora takes any; kernelForce.ropeLoRA 1 sends every step's).
// Measured on an H200 with four rank-32 adapters, device ms a step, expand
// in RoPE vs apart: bf16 1 / 4 / 16 rows 4.33 / 4.78 / 5.09 vs 4.38 /
// 4.84 / 5.15, FP8 2 / 4 / 8 / 16 rows 3.54 / 3.90 / 4.12 / 4.01 vs 3.56 /
// 3.98 / 4.22 / 4.09 (v0.38); FP8 1 row 2.96 vs 3.01 and 3.07 vs 3.13 in
// two calls (v0.39: with fp8_gemv_seg the stream's expand no longer ends
// beside the product; with fp8_gemv it did, 3.35 vs 3.31, v0.38).
const ropeLoRARows = 16

// loraPend is a q/k/v update left unexpanded: the shrink's output is in
// the step's LoRA scratch (ks K parts, tStride floats a row), the group's
// table entries at base + slot * stride + module, its slices at offs.
type loraPend struct {
	ks, tStride, base, stride, tc int
	offs                          []int
	ms                            [3]int
}

// ropeFold reports whether group mods' update (tc: its tensor-core chunks,
// 0 where the tensor-core expand does not apply) is left to
// rope_store_lora, whether its shrink runs on the LoRA stream or inside
// the product.
func (b *Backend) ropeFold(mods []llama.Module, tc int) bool {
	hd := b.cfg.HeadDim
	return forcedOn(b.force.ropeLoRA, b.rows() <= ropeLoRARows) && tc > 0 && b.stepRank <= 128 && groupIndex(mods) == 0 && len(mods) == 3 &&
		(hd == 32 || hd == 64 || hd == 128 || hd == 256) && !b.force.ropeHeads
}

// loraShrink enqueues group mods' shrink alone on st (the expand is
// rope_store_lora's) and returns its K parts.
func (b *Backend) loraShrink(st *cuda.Stream, x *Buffer, layer int, mods []llama.Module) int {
	b.gateLayer(st, layer)
	_, ms, inF, _ := b.groupSlices(mods)
	base, stride := b.tableRows(layer)
	sp := b.shrinkPlan(st, inF, len(mods))
	b.launchShrink(st, sp, x, base, stride, ms, inF, len(mods))
	return sp.ks
}

// pendLoRA is the pending update of group mods, left for rope_store_lora.
func (b *Backend) pendLoRA(o *Buffer, layer int, mods []llama.Module, tc, ks int, local bool) pendingDelta {
	offs, ms, _, _ := b.groupSlices(mods)
	base, stride := b.tableRows(layer)
	return pendingDelta{base: ptr(o), ld: o.ld, cols: offs[len(mods)], local: local, lora: &loraPend{
		ks: ks, tStride: len(mods) * b.stepRank, base: base, stride: stride, tc: tc, offs: offs, ms: ms}}
}

// takeQKV takes the pending unexpanded update if q, k and v are its
// output's three slices (in place: rope_store_lora expands it), after the
// LoRA stream's work; false leaves it pending.
func (b *Backend) takeQKV(qb, kb, vb *Buffer) (loraPend, bool) {
	p := b.la.pend
	l := p.lora
	if l == nil || len(l.offs) != 4 || b.err != nil {
		return loraPend{}, false
	}
	for i, v := range []*Buffer{qb, kb, vb} {
		if v == nil || ptr(v) != p.base+uint64(2*l.offs[i]) || v.ld != p.ld || v.cols != l.offs[i+1]-l.offs[i] {
			return loraPend{}, false
		}
	}
	b.la.pend = pendingDelta{}
	b.waitUpdate(p)
	return *l, true
}
