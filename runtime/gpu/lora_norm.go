package gpu

import (
	"github.com/peftd/peftd/runtime/cuda"
	"github.com/peftd/peftd/runtime/llama"
)

// add_rmsnorm over a cluster of blocks a row, and the o and down LoRA
// expands inside it (add_rmsnorm_cl, kernels/llama.cu).
//
// At 1-16 rows add_rmsnorm is one block a row, and with adapters it waits
// for the o or down update: on the LoRA stream a shrink and an expand, two
// dependent launches for ~1 µs of bytes, which end after the product they
// run beside (v0.40 nsys, FP8 at 16 rows with four rank-32 adapters:
// add_rmsnorm added 119 µs a step over the base step). add_rmsnorm_cl
// spreads each row over addCl blocks, so each block reads 1 / addCl of the
// row's B (32 KB of a rank-32 adapter at hidden 4,096) and can expand the
// update itself: the LoRA stream runs the shrink alone, as it does for
// q/k/v at these rows (lora_rope.go).

// addCl, addClThreads and addClPairs are ADD_CL, ADD_CL_THREADS and
// ADD_CL_PR in llama.cu; addClRows is the most rows add_rmsnorm_cl takes
// by default.
const (
	addCl        = 8
	addClThreads = 256
	addClPairs   = 2
	addClRows    = 16
)

// addClFits reports whether this step's add_rmsnorm of rows h wide (with a
// delta and an output) runs as add_rmsnorm_cl: steps of up to addClRows
// rows (kernelForce.addCl), sm_90 and later, h a multiple of 2 * addCl of
// at most addCl * addClThreads * addClPairs * 2 values.
func (b *Backend) addClFits(h int) bool {
	return forcedOn(b.force.addCl, b.rows() <= addClRows) && b.ctx.Device().Major >= 9 && h%(2*addCl) == 0 &&
		h/(2*addCl) <= addClThreads*addClPairs
}

// normFold reports whether group mods' update (tc: its tensor-core chunks,
// 0 where that expand does not apply, as ropeFold has it) is left
// unexpanded for add_rmsnorm_cl: o's or down's (one projection onto the
// hidden width), where add_rmsnorm_cl runs, ranks of at most 128.
func (b *Backend) normFold(mods []llama.Module, tc int) bool {
	if len(mods) != 1 || tc == 0 || b.stepRank > 128 || !forcedOn(b.force.normLoRA, true) {
		return false
	}
	if g := groupIndex(mods); g != 1 && g != 3 {
		return false
	}
	_, out := b.cfg.Dims(mods[0])
	return out == b.cfg.Hidden && b.addClFits(out)
}

// takeNormIf takes the pending unexpanded update if cl (add_rmsnorm_cl
// runs) and d is exactly its output (add_rmsnorm_cl expands it), after the
// LoRA stream's work; false leaves it pending (fuse then expands it in
// place).
func (b *Backend) takeNormIf(cl bool, d *Buffer) (loraPend, bool) {
	p := b.la.pend
	l := p.lora
	if !cl || l == nil || len(l.offs) != 2 || b.err != nil || d == nil || ptr(d) != p.base || d.ld != p.ld || d.cols != l.offs[1] || !d.whole() {
		return loraPend{}, false
	}
	b.la.pend = pendingDelta{}
	b.waitUpdate(p)
	return *l, true
}

// addRMSNormCl enqueues add_rmsnorm_cl: x += delta (plus the float32
// update d2, or the unexpanded update fold), out = rmsnorm(x) * w, and
// with q set out quantized into q and qs.
func (b *Backend) addRMSNormCl(x, d, o *Buffer, d2, w cuda.DevicePtr, eps float32, q, qs cuda.DevicePtr, fold *loraPend) {
	var tmp, table cuda.DevicePtr
	entry, stride, tStride, ks := 0, 0, 0, 0
	if fold != nil {
		tmp, table = b.stepTmp, b.table.Ptr()
		entry, stride, tStride, ks = fold.base+fold.ms[0], fold.stride, fold.tStride, fold.ks
		b.normLoRALaunches++
	}
	b.launchCluster(b.fn.addRMSNormCl, cuda.Dim3{X: b.rows() * addCl}, cuda.Dim3{X: addClThreads}, cuda.Dim3{X: addCl},
		x.mem, ptr(d), d2, b.rowLora(), ptr(o), w, eps, x.cols, q, qs, tmp, table, entry, stride, tStride, b.rows(), ks)
}
