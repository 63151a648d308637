package gpu

import (
	"math/bits"

	"github.com/peftd/peftd/runtime/cuda"
	"github.com/peftd/peftd/runtime/llama"
)

// The gate/up LoRA expand inside silu_mul (silu_mul_lora, kernels/llama.cu).
//
// With FP8 weights the gate/up update runs on the LoRA stream beside the
// product: a shrink, then an expand writing the update in float32 (28 MB
// at 256 rows of an 8B model's 28,672 columns) for silu_mul to read. On
// the SMs the product leaves it the expand outlasted the product (v0.67's
// trace of a 256-row mixed step with four rank-32 adapters: the expand 56
// µs on 16 SMs beside a 55 µs product, silu_mul then done 30 µs after the
// product against 14 without adapters). With the fold the LoRA stream runs
// the shrink alone, and silu_mul_lora expands each LoRA tile's update on
// the tensor cores as it reads g and u, 512 columns of a tile a block, its
// loads in flight together (rows with no adapter: tiles of their own in the
// same launch); it writes out in bf16 only, and the down projection
// quantizes it as any FP8 input (quant_rows_e4m3). No float32 update in
// memory and no expand on the held SMs.

// siluLoRAMinRows is the fewest rows whose gate/up update goes into
// silu_mul by default (kernelForce.siluLoRA 1 sends every FP8 step's).
//
// Off: measured on an H200 (PERFORMANCE v0.67, FP8, four rank-32
// adapters, device ms a step) it is slower at every row count: 64 / 128 /
// 256 rows 5.25 / 6.89 / 11.47 against 4.94 / 6.65 / 11.03, a 240-row
// mixed step 8.75 against 8.40 (silu_mul_lora 35 µs where the expand's
// tail and silu_mul took 30, and the down projection quantizing its input
// again). Kept for the A/B (decode rows +sfold) and the next form.
const siluLoRAMinRows = 1 << 30

// gateUpGroup is the gate/up group's index in llama.FusedGroups.
const gateUpGroup = 2

// siluLoRACols is the columns of each half one block of silu_mul_lora takes.
const siluLoRACols = 512

// siluFold reports whether group mods' update (tc: its tensor-core
// chunks) is left to silu_mul_lora: the gate/up group of an FP8 step, by
// the rows or kernelForce.siluLoRA.
func (b *Backend) siluFold(mods []llama.Module, tc int) bool {
	if b.f8 == nil || tc == 0 || groupIndex(mods) != gateUpGroup { // tc 0: ranks the tensor-core expand does not take
		return false
	}
	return forcedOn(b.force.siluLoRA, b.rows() >= siluLoRAMinRows) && b.cfg.Intermediate%8 == 0
}

// siluLoRA enqueues silu_mul_lora for out = silu(g) * u when the pending
// update is gate/up's, left unexpanded (siluFold), and g and u are its
// output's two halves; false leaves everything to SiLUMul's other paths
// (which expand a pending update in place first).
func (b *Backend) siluLoRA(o, g, u *Buffer) bool {
	p := b.la.pend
	l := p.lora
	if l == nil || l.late || len(l.offs) != 3 || b.err != nil || o == nil || g == nil || u == nil {
		return false
	}
	I := l.offs[1]
	if l.offs[2] != 2*I || I%8 != 0 || ptr(g) != p.base || ptr(u) != p.base+uint64(2*I) || g.ld != p.ld || u.ld != p.ld || p.ld%8 != 0 ||
		g.cols != I || u.cols != I || o.cols != I || !o.whole() {
		return false
	}
	b.la.pend = pendingDelta{}
	b.waitUpdate(p)
	b.opStart()
	if !b.ok() {
		return true
	}
	b.siluLoRALaunches++
	b.launch(b.fn.siluMulLoRA[bits.TrailingZeros(uint(l.tc))], cuda.Dim3{X: (I + siluLoRACols - 1) / siluLoRACols, Y: b.nTiles + (b.rows()+sgTileRows-1)/sgTileRows}, cuda.Dim3{X: 256},
		ptr(o), ptr(g), ptr(u), b.stepTmp, b.table, b.i32(b.off.tiles), b.rowLora(), b.nTiles, l.base, l.stride, l.ms[0], l.ms[1],
		b.stepRank, l.tStride, b.rows(), l.ks, I, p.ld)
	return true
}
