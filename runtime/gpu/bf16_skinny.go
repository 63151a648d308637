package gpu

import (
	"fmt"

	"github.com/peftd/peftd/runtime/cuda"
)

// bfSkinny launches gemm_skinny_* (kernels/llama.cu): the bf16 product of a
// decode step's few rows (at most bfSkinnyMaxRows) with a weight, streaming
// the weight once in a grid of one wave and no reduce launch. cuBLASLt's
// choices at 1-16 rows leave a quarter to a third of the bandwidth unused
// on the 8B shapes' narrow products (v0.21 nsysdec: qkv 16.1 µs for 12.5
// of bytes; o 10.9 + a 1.9 µs split-K reduce for 8.4).
type bfSkinny struct {
	*streamRows
	// lora[i][x]: gemm_skinny_lora_n{bn}_x{8 << x} for variant i (nil: a
	// variant without one, or the module lacks it): the product with its
	// LoRA group's shrink inside (lora_inline.go)
	lora [][2]*cuda.Function
}

// skLoraRows is the extra rows a block of gemm_skinny_lora_n*_x{8,16} streams.
var skLoraRows = [2]int{8, 16}

// bfSkinnyLoraShared is gemm_skinny_lora's shared memory: v's stages with
// xr rows of A beside the weight tile.
func bfSkinnyLoraShared(v streamVariant, xr int) int { return stageShared(v.bn+xr+16, 2*v.tile) }

// bfSkinnyMaxRows is the most rows gemm_skinny takes (one m16 tile).
const bfSkinnyMaxRows = 16

// bfSkinnyEarly is gemm_skinny's opts bit 0: the first weight tiles
// requested before griddepcontrol.wait.
const bfSkinnyEarly = 1

// bfSkinnyVariants: gemm_skinny_n{bn}, widest first, with the bf16 values
// of each weight row a tile holds (256 for the warps-along-K variants, 32
// and 48; 64 for 224). v0.32's n64 and n256 (narrower grids beside the
// LoRA stream) were retired in v0.33: the LoRA stream's blocks now share
// every SM with these one-wave grids (autoLoRASMs holds none up to 16 rows).
var bfSkinnyVariants = []streamVariant{{bn: 224, tile: 64}, {bn: 48, tile: 256}, {bn: 32, tile: 256}}

// bfSkinnyShared is SkShape<bn>'s shared memory: stages of the weight tile
// (bn rows) and x's (16 rows).
func bfSkinnyShared(v streamVariant) int { return stageShared(v.bn+16, 2*v.tile) }

// newBFSkinny finds the gemm_skinny variants in the forward module and
// raises their shared memory limits; nil when the device cannot give a
// block that much (then cuBLASLt takes every product).
func newBFSkinny(mod *cuda.Module, dev cuda.Device) (*bfSkinny, error) {
	g, err := loadStreamRows(mod, dev, bfSkinnyVariants, func(bn int) string { return fmt.Sprintf("gemm_skinny_n%d", bn) }, bfSkinnyShared)
	if g == nil || err != nil {
		return nil, err
	}
	sk := &bfSkinny{streamRows: g, lora: make([][2]*cuda.Function, len(g.vs))}
	for i, v := range g.vs {
		if v.tile != 256 { // the warps-along-K variants only
			continue
		}
		for x, xr := range skLoraRows {
			if sh := bfSkinnyLoraShared(v, xr); dev.MaxShared > 0 && sh > dev.MaxShared {
				continue
			}
			name := fmt.Sprintf("gemm_skinny_lora_n%d_x%d", v.bn, xr)
			f, err := mod.Function(name)
			if err != nil {
				continue // a module built before these kernels: the LoRA stream takes every update
			}
			if err := f.SetMaxDynamicShared(bfSkinnyLoraShared(v, xr)); err != nil {
				return nil, fmt.Errorf("gpu: %s: %w", name, err)
			}
			sk.lora[i][x] = f
		}
	}
	return sk, nil
}

// bfSkinnyPlan is one product's variant: its kernel, columns per block,
// shared memory and threads.
type bfSkinnyPlan struct {
	f               *cuda.Function
	bn, sh, threads int
	i               int // the variant's index
}

// plan picks the variant for an M x N x K product (streamRows.pick); ok is
// false for more than bfSkinnyMaxRows rows or a shape no variant fits one
// wave with: cuBLASLt's product then.
func (g *bfSkinny) plan(M, N, K int) (p bfSkinnyPlan, ok bool) {
	if g == nil || M < 1 || M > bfSkinnyMaxRows {
		return p, false
	}
	i, ok := g.pick(N, K)
	if !ok {
		return p, false
	}
	return bfSkinnyPlan{f: g.fn[i], bn: g.vs[i].bn, sh: bfSkinnyShared(g.vs[i]), threads: 128, i: i}, true
}

// loraPlan is p's product with extra rows of A a block beside its weight
// rows (gemm_skinny_lora): the narrowest variant that holds them; ok false
// where none does.
func (g *bfSkinny) loraPlan(p bfSkinnyPlan, extra int) (bfSkinnyPlan, bool) {
	if g == nil || p.i >= len(g.lora) {
		return p, false
	}
	for x, xr := range skLoraRows {
		if f := g.lora[p.i][x]; f != nil && extra <= xr {
			p.f, p.sh = f, bfSkinnyLoraShared(g.vs[p.i], xr)
			return p, true
		}
	}
	return p, false
}

// launch enqueues out[M, N] = x[M, K] . w[N, K]^T with plan p (whole rows,
// 16-byte aligned) and the kernel's opts.
func (g *bfSkinny) launch(s *cuda.Stream, p bfSkinnyPlan, out, x, w uint64, M, N, K, opts int) error {
	if (out|x|w)%16 != 0 || K%8 != 0 {
		return fmt.Errorf("gpu: gemm_skinny: operands not 16-byte aligned")
	}
	return p.f.Launch(s, cuda.Dim3{X: N / p.bn, Y: 1, Z: 1}, cuda.Dim3{X: p.threads, Y: 1, Z: 1}, p.sh, out, x, w, M, N, K, opts)
}

// Products says which kernels take the projections by step rows, for the
// startup log: bf16 weights through gemm_skinny at 1-16 rows (where the
// card holds it), gemm_ws at 17-64 where it is on (bwsAuto) and cuBLASLt
// above; FP8 weights through fp8_gemv, then fp8_stream, then fp8_ws where
// it is on (wsAuto), then cuBLASLt's FP8 GEMM.
func (b *Backend) Products() string {
	if b.f8 != nil {
		if b.f8.stream == nil {
			return fmt.Sprintf("fp8_gemv 1-%d rows, cuBLASLt FP8 above", gemvMaxRows)
		}
		ws := ""
		if b.f8.wsAuto {
			from := wsMinRows
			if f := b.f8.wsLoneFrom; f > 0 {
				from = min(from, f)
			}
			if f := b.f8.wsBesideFrom; f > 0 {
				from = min(from, f)
			}
			ws = fmt.Sprintf(", fp8_ws %d-%d", from, wsMaxRows)
		}
		return fmt.Sprintf("fp8_gemv 1-%d rows, fp8_stream %d-%d where a shape fits it%s, cuBLASLt FP8 above", fp8StreamMinRows-1, fp8StreamMinRows, fp8StreamMaxRows, ws)
	}
	ws := ""
	if b.bwsAuto {
		ws = fmt.Sprintf(", gemm_ws %d-%d", wsMinRows, wsMaxRows)
		if bwsBesideRows < wsMaxRows {
			ws += fmt.Sprintf(" (beside a LoRA update %d-%d)", wsMinRows, bwsBesideRows)
		}
	}
	if b.sk == nil {
		return "cuBLASLt" + ws
	}
	return fmt.Sprintf("gemm_skinny 1-%d rows where a shape fits it%s, cuBLASLt above", bfSkinnyMaxRows, ws)
}
