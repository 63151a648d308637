package gpu

import (
	"github.com/peftd/peftd/runtime/cuda"
	"github.com/peftd/peftd/runtime/llama"
)

// The gate/up LoRA expand inside silu_mul (silu_mul_fold, kernels/llama.cu).
//
// Beside the gate/up product the LoRA stream runs the shrink and an expand
// that writes the update (bf16, guHalf) for silu_mul_h to read. In FP8
// mixed steps (240 rows) that expand takes 72.5 µs on the 20 SMs the
// product leaves it and ends 12 µs after the product; silu_mul then reads
// the update back (PERFORMANCE v0.84's trace: 22 µs a layer of the step's
// 33 µs of adapter time). With the fold the LoRA stream runs the shrink
// alone, and silu_mul_fold expands each row's update on the tensor cores
// as it reads g and u (sgmv_expand_tch1's fragments and K order, the
// update rounded to bf16 as guHalf rounds it, added as silu_mul_h adds
// it: the default path's bits), so no update goes through memory. With
// FP8 weights the down projection then quantizes silu_mul's output itself
// (quant_rows_e4m3: the bytes silu_mul's own quantization writes).
// v0.33, v0.67 and v0.68 measured earlier forms slower (docs/TRIED.md:
// 512 columns a block, too few blocks and their loads in dependent round
// trips); this one takes 256 columns of 16 rows a block, its adapters' B
// before griddepcontrol.wait, g and u through shared memory in 16-byte
// pieces. Off by default until measured (siluFoldAuto).

// siluFoldAuto is kernelForce.siluFold's default.
const siluFoldAuto = false

// siluFoldDefault is siluFoldAuto, or what PEFTD_LORA_SILU_FOLD=on|off says
// (the whole engine's A/B: serving, and every test of the LoRA paths).
func siluFoldDefault() bool { return envOnOff("PEFTD_LORA_SILU_FOLD", siluFoldAuto) }

// siluFold reports whether group mods' update (tc: its tensor-core
// chunks) is left for silu_mul_fold: the gate/up group of the rank-32
// class (tc 1) where the kernel loaded and the intermediate width is a
// multiple of 8: kernelForce.siluFold 1, or 0 and siluFoldOn (New sets it
// from siluFoldDefault).
func (b *Backend) siluFold(mods []llama.Module, tc int) bool {
	if tc != 1 || b.fn.siluFold == nil || b.cfg.Intermediate%8 != 0 || !forcedOn(b.force.siluFold, b.siluFoldOn) {
		return false
	}
	return len(mods) == 2 && mods[0] == llama.Gate && mods[1] == llama.Up
}

// takeGU takes the pending unexpanded update if g and u are its output's
// two slices and out is a whole buffer of their width (silu_mul_fold
// expands it), after the LoRA stream's work; false leaves it pending.
func (b *Backend) takeGU(o, g, u *Buffer) (loraPend, bool) {
	if !b.pendSlices(g, u) || b.la.pend.lora.tc != 1 || o == nil || !o.whole() {
		return loraPend{}, false
	}
	// 16-byte pieces of whole rows (the kernel's staging and stores)
	if g.cols != u.cols || o.cols != g.cols || o.cols%8 != 0 || g.ld%8 != 0 || ptr(g)%16 != 0 || ptr(u)%16 != 0 || ptr(o)%16 != 0 {
		return loraPend{}, false
	}
	return b.takePend(), true
}

// sfCols and sfRows are SF_COLS and SG_TR in llama.cu: a silu_mul_fold
// block's columns of g (and of u) and rows.
const (
	sfCols = 256
	sfRows = 16
)

// siluFoldLaunch enqueues silu_mul_fold: out = silu(g + dg) * (u + du) with
// the update of pending l expanded in the kernel.
func (b *Backend) siluFoldLaunch(o, g, u *Buffer, l loraPend) {
	if !b.ok() {
		return
	}
	rows := b.rows()
	b.siluFolds++
	b.launch(b.fn.siluFold, cuda.Dim3{X: (o.cols + sfCols - 1) / sfCols, Y: (rows + sfRows - 1) / sfRows}, cuda.Dim3{X: 256},
		ptr(o), ptr(g), ptr(u), b.rowLora(), rows, o.cols, g.ld, b.stepTmp, b.table, l.base, l.stride, l.ms[0], l.ms[1],
		b.stepRank, l.tStride, rows, l.ks)
}
