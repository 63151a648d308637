package gpu

import (
	"slices"

	"github.com/peftd/peftd/runtime/cuda"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
)

// The LoRA shrink inside the product (PERFORMANCE v0.34).
//
// Beside a decode step's q/k/v product (gemm_skinny, 1-16 rows) the LoRA
// stream's update outlasts the product: its fork, shrink and expand are
// three dependent launches for a few µs of bytes, and they share the SMs
// with the product's one-wave grid (TestLoRABesideBench, v0.33: rope waits
// 7.2 µs a layer at 16 rows with four rank-32 adapters). The shrink is a
// product of the same x, so gemm_skinny_lora streams the step's A rows
// beside the weight rows as extra outputs (their bytes, 3 MB a layer for
// four rank-32 adapters, stream with the weights' 50), and the expand
// (sgmv_expand_tc, its B fetched before griddepcontrol.wait) writes the
// update right after it on the compute stream, into the float32 buffer
// the LoRA stream's updates use, for the op reading the output to add (as
// rope_store_rows does q/k/v's): no fork, no join.

// LinearLoRA is Linear and then LoRA of the same input
// (engine.LinearLoRAOps): inline where loraInline takes the group.
func (b *Backend) LinearLoRA(out, in engine.Buffer, w engine.Weight, layer int, mods []llama.Module) {
	if b.loraInline(out, in, w, layer, mods) {
		return
	}
	b.Linear(out, in, w)
	b.LoRA(out, in, layer, mods)
}

// inlineGroups is the fused groups (bit g: llama.FusedGroups[g]) whose
// update runs inside the product where it can: kernelForce.loraInline, or
// by default q/k/v alone (the one group whose update outlasts its product
// on the LoRA stream at 1-16 rows).
func (b *Backend) inlineGroups() int {
	return forced(b.force.loraInline, 1<<0)
}

// groupIndex is mods' index in llama.FusedGroups (-1: none).
func groupIndex(mods []llama.Module) int {
	return slices.IndexFunc(llama.FusedGroups[:], func(fg []llama.Module) bool { return slices.Equal(fg, mods) })
}

// loraInline enqueues the product of w and the group's update with the
// shrink inside the product and the expand after it, and reports whether
// it did; false leaves everything to Linear and LoRA (another kernel, or
// an operand they report as bad).
func (b *Backend) loraInline(out, in engine.Buffer, w engine.Weight, layer int, mods []llama.Module) bool {
	wt, isBF := w.(*weight)
	if !isBF || b.err != nil || b.sk == nil || !b.stepLoRA() || layer < 0 || layer >= b.cfg.Layers {
		return false
	}
	if g := groupIndex(mods); g < 0 || b.inlineGroups()&(1<<g) == 0 {
		return false
	}
	if _, _, ok := b.Partition(); ok {
		return false
	}
	o, x := buf(out), buf(in)
	if x == nil || o == nil || x.cols != wt.cols || o.cols != wt.rows || !o.whole() || !x.whole() {
		return false
	}
	offs, ms, inF, same := b.groupSlices(mods)
	tc := b.tcChunks(mods)
	if !same || inF != wt.cols || offs[len(mods)] != wt.rows || tc == 0 || !b.sgmvOK(x, mods, o.ld, ptr(o)) {
		return false
	}
	p, ok := b.skinnyPlan(wt.rows, wt.cols, false)
	if !ok {
		return false
	}
	// every tile's rank rows of every slice, dealt to the product's blocks
	tStride := len(mods) * b.stepRank
	extra := b.nTiles * tStride
	blocks := wt.rows / p.bn
	if p, ok = b.sk.loraPlan(p, (extra+blocks-1)/blocks); !ok || b.rows()*tStride > b.stepTmpFloats {
		return false
	}
	if !b.enterFused(out, layer) {
		return true
	}
	opts := bfSkinnyEarly
	if b.force.skLate {
		opts = 0
	}
	base, stride := b.tableRows(layer)
	b.fail(p.f.Launch(b.s, cuda.Dim3{X: blocks}, cuda.Dim3{X: p.threads}, p.sh,
		ptr(o), ptr(x), wt.mem.Ptr(), b.rows(), wt.rows, wt.cols, opts,
		b.stepTmp, b.table, b.i32(b.off.tiles), base, stride, ms[0], ms[1], ms[2], len(mods), b.stepRank, extra, tStride))
	if !b.asideOK() { // no update buffer (Options.SerialLoRA): added in place
		b.expandTC(b.s, tc, ptr(o), o.ld, offs, ms, base, stride, tStride, 1, accAdd)
		return true
	}
	if b.ropeFold(mods, tc) { // RoPE expands it (lora_rope.go)
		b.la.pend = b.pendLoRA(o, layer, mods, tc, 1, true)
		return true
	}
	// the update as float32 into delta, which the op reading out adds as it
	// reads (fuse), as for an update from the LoRA stream: product + update
	// is rounded once, there, and the expand need not read the product
	d := b.la.delta.Ptr()
	b.expandTC(b.s, tc, d, wt.rows, offs, ms, base, stride, tStride, 1, accFloat)
	if b.err == nil {
		b.la.pend = pendingDelta{base: ptr(o), delta: d, ld: o.ld, cols: wt.rows, local: true}
	}
	return true
}

// enterFused readies the compute stream for a product that carries its
// group's LoRA update (loraInline, loraWS): the LoRA stream joined, out
// marked written, the layer's adapter uploads waited for; false where the
// backend has failed (the caller has taken the group all the same).
func (b *Backend) enterFused(out engine.Buffer, layer int) bool {
	b.join()
	b.wrote(out)
	b.la.forkIn = 0
	b.gateLayer(b.s, layer)
	return b.err == nil
}
