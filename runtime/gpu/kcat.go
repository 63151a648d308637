package gpu

import (
	"fmt"
	"math"

	"github.com/peftd/peftd/runtime/cuda"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/safetensors"
)

// kcat.go: a LoRA update carried in an FP8 product's K (K concatenation).
//
// With e4m3 operands and float32 row scales on both sides, the product
// [qx | S'] . [qw | B']^T scaled by sx[t] * sw[n] is x . W^T + S . B^T when
//
//	S'[t, j] = e4m3(S[t, j] * f / sx[t])  (lora_cat_e4m3, from the shrink)
//	B'[n, j] = e4m3(B[n, j] / (sw[n] * f)) (kcatExtension, at adapter load)
//
// S = x . A^T (the adapter's scale applied) and f a power of two chosen
// per adapter slice so that B' spans e4m3's range (kcatFactor). The
// extension holds P adapter positions of R columns for each slice of a
// fused group (q/k/v: 3 slices, gate/up 2, o and down 1): a row's S' sits
// at its adapter's position, zeros elsewhere, so one product serves rows
// of P adapters. Where it could pay: the expands of 65-256-row steps,
// whose products are cuBLASLt's. PERFORMANCE v0.88-v0.89 (H100, 240
// rows): the extension of four rank-32 positions costs 5.6 µs a layer,
// but the shrink must run ahead of each product, and the best of eight
// ways (cuBLASLt's K-split e4m3 shrink, then kcat_select_split_e4m3)
// brings the update to 39.2 µs a layer against ~45 beside the products.
// So the engine does not use it, and its kernels build only with
// PEFTD_KERNEL_DEFINES=-DPEFTD_KCAT.

// kcatBMax is the largest |B'| kcatFactor aims for. Each extension
// column's product S' B' must stay within e4m3's 448 on both sides: f
// moves magnitude between them (B' = B / (sw f), S' = S f / sx). B' is
// known at load, so it takes the top of e4m3's range (2^8, its values
// normal down to 2^-6: 14 binades), and S' = S f / sx gets as much room
// as f can give it: S / sx runs to a few hundred where a row's largest
// value is an outlier channel (sx = amax / 448 leaves the other values
// high in e4m3's range). A value past 448 saturates (e4m3's SATFINITE):
// TestKCatGroup counts them. On trained-like data (PERFORMANCE v0.89)
// 32 saturated 0.1-0.4% of S' and 4 (f 8x larger) ~15%.
const kcatBMax = 256

// kcatFactor is f for one adapter slice: the power of two that puts
// max |B[n, j]| / (sw[n] f) at or just below kcatBMax (1 for an all-zero
// B).
// b is the slice's B, out x rank row-major; sw the weight's row scales.
func kcatFactor(b []float32, rank int, sw []float32) (float32, error) {
	if rank <= 0 || len(b) != len(sw)*rank {
		return 0, fmt.Errorf("gpu: kcat: B of %d values for %d rows of rank %d", len(b), len(sw), rank)
	}
	m := 0.0
	for n, s := range sw {
		if !(s > 0) || math.IsInf(float64(s), 0) {
			return 0, fmt.Errorf("gpu: kcat: weight row %d scale %g", n, s)
		}
		for _, v := range b[n*rank : (n+1)*rank] {
			m = max(m, math.Abs(float64(v))/float64(s))
		}
	}
	if math.IsNaN(m) || math.IsInf(m, 0) {
		return 0, fmt.Errorf("gpu: kcat: B is not finite")
	}
	if m == 0 {
		return 1, nil
	}
	return float32(math.Exp2(math.Ceil(math.Log2(m / kcatBMax)))), nil
}

// kcatExtension writes B' for one adapter slice into ext, the extension
// columns of the slice's weight rows (out rows, ld bytes apart, R columns
// from col; R >= rank, the columns past rank 0).
func kcatExtension(ext []byte, ld, col, R int, b []float32, rank int, sw []float32, f float32) error {
	if rank > R || col+R > ld || len(ext) < len(sw)*ld || len(b) != len(sw)*rank || !(f > 0) {
		return fmt.Errorf("gpu: kcat: extension of rank %d in %d columns at %d of %d (%d bytes, %d values, factor %g)", rank, R, col, ld, len(ext), len(b), f)
	}
	for n, s := range sw {
		row := ext[n*ld+col : n*ld+col+R]
		inv := 1 / (float64(s) * float64(f))
		for j := range row {
			row[j] = 0
			if j < rank {
				row[j] = safetensors.Float32ToE4M3(float32(float64(b[n*rank+j]) * inv))
			}
		}
	}
	return nil
}

// loraCat launches lora_cat_e4m3 on st: the extension columns of the
// step's rows of the product input at xq (rows ldq bytes apart, the
// extension's first column at xq itself), from the step's shrink of group
// mods (ks K parts in the LoRA scratch) and the rows' e4m3 scales sx; kpos
// the slots' K positions (-1: none), fac their factors (slot * slices + s).
func (b *Backend) loraCat(st *cuda.Stream, xq cuda.DevicePtr, ldq int, sx, kpos, fac cuda.DevicePtr, layer int, mods []llama.Module, P, R, ks int) {
	if !b.ok() || !b.stepLoRA() {
		return
	}
	if !b.check(b.fn.loraCat != nil && len(mods) >= 1 && len(mods) <= 3 && P > 0 && R > 0 && ks > 0 && ldq >= len(mods)*P*R, "kcat: %d slices, %d positions of %d columns, rows %d bytes apart", len(mods), P, R, ldq) {
		return
	}
	_, ms, _, _ := b.groupSlices(mods)
	base, stride := b.tableRows(layer)
	b.launchOn(st, b.fn.loraCat, cuda.Dim3{X: b.rows()}, cuda.Dim3{X: 128},
		xq, int64(ldq), b.stepTmp, sx, b.rowLora(), kpos, fac, b.table, base, stride, ms[0], ms[1], ms[2],
		len(mods), P, R, ks, b.rows(), len(mods)*b.stepRank, b.stepRank)
}

// kcatSelectSplit launches kcat_select_split_e4m3 on st: the extension
// columns (E = slices * P * R of them, the first at xq, rows ldq bytes
// apart) of the step's rows from the splits float32 partials of a dense
// shrink (GemmTNSplitK's [splits, rows, E]: x against every position's A
// rows in the extension's order, the adapter's scale and factor folded
// into A); g the e4m3 A rows' scales for an e4m3 shrink, 0 for a bf16 one
// (then the rows' e4m3 scales sx divide).
func (b *Backend) kcatSelectSplit(st *cuda.Stream, xq cuda.DevicePtr, ldq int, part cuda.DevicePtr, splits int, g, sx, kpos cuda.DevicePtr, slices, P, R int) {
	if !b.ok() {
		return
	}
	E := slices * P * R
	if !b.check(b.fn.kcatSelectSplit != nil && splits >= 1 && slices >= 1 && slices <= 3 && P > 0 && R > 0 && ldq >= E,
		"kcat: select of %d slices, %d positions of %d columns from %d splits, rows %d bytes apart", slices, P, R, splits, ldq) {
		return
	}
	b.launchOn(st, b.fn.kcatSelectSplit, cuda.Dim3{X: b.rows()}, cuda.Dim3{X: 128},
		xq, int64(ldq), part, splits, b.rows(), g, sx, b.rowLora(), kpos, E, P, R)
}
