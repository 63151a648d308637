package gpu

import (
	"fmt"

	"github.com/peftd/peftd/runtime/cuda"
)

// fp8Seg launches fp8_gemv_seg_s{S}_c{CH} (kernels/fp8.cu): the FP8 product
// of a decode step's 1-4 rows with every warp load a few runs of contiguous
// weight bytes (S segments of 64 bytes a weight row) where fp8_gemv's loads
// are 64-byte pieces of 8 rows. H200, v0.39 gemvlab (graph replays, us at
// one row; a plain read of the same bytes in brackets): qkv 10.07 -> 8.43
// (7.51), o 7.32 -> 5.94 (6.12), gate_up 35.76 -> 28.64 (27.74), down
// 18.06 -> 16.35 (14.71); at two rows 10.16 / 7.43 / 36.28 / 18.23 ->
// 9.23 / 6.21 / 29.71 / 16.50; at four 10.17 / 7.67 / 36.54 / 18.33 ->
// 9.83 / 6.31 / 31.82 / 17.28. At eight rows (S = 1) it lost gate_up and
// down to fp8_gemv, so fp8_gemv keeps 5-8 rows.
//
// efn: the fp8_gemv_seg_e_* twins, which ask for their weights before
// griddepcontrol.wait, for steps with no LoRA update (fp8State.plain).
// v0.61-v0.62: early weights slowed steps with adapters, as early weights
// for every step (d84c1d4), as a flag for lone products (db4f37b) and as a
// flag for plain steps (820c92d, whose late path was slower too); twins
// leave the default kernels' code as it is. v0.63 (H200): FP8 base 1 / 2 /
// 4 rows 2.68 / 2.88 / 2.97 -> 2.61 / 2.73 / 2.98 ms, four rank-32
// adapters unchanged.
type fp8Seg struct {
	fn, efn map[segKernel]*cuda.Function
}

// segKernel names one variant: S segments a weight row, CH chunks a warp.
type segKernel struct{ S, CH int }

// segChunks are the chunks a warp takes (each S * 64 bytes of two weight
// rows, in flight at once), in the order planSeg tries them: 7 fits K =
// 14,336 (the 8B MLP) in 4-16 warps, 4 K = 4,096, 2 smaller K.
var segChunks = []int{7, 4, 2}

// segMaxRows is the most rows fp8_gemv_seg takes; segMaxWarps is
// SEG_MAX_WARPS in fp8.cu.
const (
	segMaxRows  = 4
	segMaxWarps = 16
)

// segPlan is one product's launch: the variant, KS warps splitting K and G
// groups of 16 / S weight rows a block.
type segPlan struct {
	k     segKernel
	KS, G int
}

// rows is the weight rows a block takes.
func (p segPlan) rows() int { return p.G * 16 / p.k.S }

// planSeg picks the variant for an M x N x K product: S = 8 / M rounded
// down to a power of two, the first of segChunks whose chunk (CH * S * 64
// bytes) divides K into at most segMaxWarps warps, and enough row groups
// that a block has 4 warps (gemvlab: 4-warp blocks were the fastest or
// within 2% at K = 4,096; 7- and 8-warp ones at K = 14,336). ok is false
// for more than segMaxRows rows or a shape no variant divides.
func planSeg(M, N, K int) (p segPlan, ok bool) {
	var S int
	switch {
	case M == 1:
		S = 8
	case M == 2:
		S = 4
	case M >= 3 && M <= segMaxRows:
		S = 2
	default:
		return p, false
	}
	for _, ch := range segChunks {
		cb := ch * S * 64
		if K%cb != 0 || K/cb > segMaxWarps {
			continue
		}
		ks := K / cb
		g := max(1, 4/ks)
		for g > 1 && N%(g*16/S) != 0 {
			g /= 2
		}
		if N%(g*16/S) != 0 {
			continue
		}
		return segPlan{k: segKernel{S: S, CH: ch}, KS: ks, G: g}, true
	}
	return p, false
}

// newFP8Seg finds the variants in the FP8 module.
func newFP8Seg(mod *cuda.Module) (*fp8Seg, error) {
	g := &fp8Seg{fn: map[segKernel]*cuda.Function{}, efn: map[segKernel]*cuda.Function{}}
	for _, S := range []int{8, 4, 2} {
		for _, ch := range segChunks {
			fn, err := mod.Function(fmt.Sprintf("fp8_gemv_seg_s%d_c%d", S, ch))
			if err != nil {
				return nil, err
			}
			g.fn[segKernel{S: S, CH: ch}] = fn
			if fn, err = mod.Function(fmt.Sprintf("fp8_gemv_seg_e_s%d_c%d", S, ch)); err != nil {
				return nil, err
			}
			g.efn[segKernel{S: S, CH: ch}] = fn
		}
	}
	return g, nil
}

// launch enqueues out = sx sw (qx . qw^T) for M activation rows (qx, sx)
// and weight w with plan p; early: its early twin (steps with no LoRA update).
func (g *fp8Seg) launch(s *cuda.Stream, p segPlan, out, qx, sx cuda.DevicePtr, w *fp8Weight, M int, early bool) error {
	if (uint64(qx)|uint64(w.q.Ptr()))%16 != 0 {
		return fmt.Errorf("gpu: fp8_gemv_seg: operands not 16-byte aligned")
	}
	fn := g.fn[p.k]
	if early {
		fn = g.efn[p.k]
	}
	return fn.Launch(s, cuda.Dim3{X: w.rows / p.rows()}, cuda.Dim3{X: 32 * p.KS * p.G}, 0,
		uint64(out), uint64(qx), uint64(sx), uint64(w.q.Ptr()), uint64(w.scale.Ptr()), M, w.rows, w.cols, p.KS)
}
