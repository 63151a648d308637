package gpu

import (
	"fmt"

	"github.com/peftd/peftd/runtime/cuda"
)

// fp8Stream launches fp8_stream_* (kernels/fp8.cu): the FP8 product of a
// decode step's few rows (at most fp8StreamMaxRows) the way gemm_skinny
// streams bf16 weights: one wave of blocks over the whole of K, cp.async
// stages, no reduce launch. Its alternative at these rows is fp8_gemv, at
// 0.51-0.80 of the FP8 byte floor on the 8B shapes at one row (v0.16
// fp8gemm: qkv 10.7 µs for 6.3, o 8.2 for 4.2, gate_up 36.4 for 29.2,
// down 19.3 for 14.6), where gemm_skinny took the bf16 products to
// 0.78-1.07 (v0.22).
//
// v0.22 (H200, TestDecodeBench with FP8 weights, one call): batch 16 4.20
// -> 3.81 device ms a step (four rank-32 adapters 4.80 -> 4.35); batch 1
// 3.16 -> 3.13, but 3.43 -> 3.61 with the adapters. So it took steps of
// 9-16 rows (where fp8_gemv runs its two-tile variant), and fp8_gemv and
// fp8_gemv_seg kept the smaller ones. v0.58 (H200, one call, `+fs`):
// 8 rows 3.23 -> 3.11 ms (four rank-32 adapters 3.67 -> 3.42), 4 rows
// 3.06 -> 2.99 (3.46 -> 3.39), so it takes fp8StreamMinRows-16 rows; at
// one row fp8_gemv_seg is ahead on gate/up (fp8bench 29.9 vs 34.6 µs).
//
// The variants are fp8_stream_n{bn}_e1: with opts bit 0 one weight tile
// before griddepcontrol.wait (fp8State's comment on stream has why one).
type fp8Stream struct {
	*streamRows
}

// fp8StreamMaxRows is the most rows fp8_stream takes (one m16 tile);
// fp8StreamMinRows the fewest it takes by default (fp8State.streamOn: any).
const (
	fp8StreamMaxRows = 16
	fp8StreamMinRows = 4
)

// fp8StreamVariants: fp8_stream_n{bn}_e1, widest first, with the bytes (e4m3
// values) of each weight row a tile holds.
var fp8StreamVariants = []streamVariant{{bn: 224, tile: 128}, {bn: 48, tile: 512}, {bn: 32, tile: 512}}

// fp8StreamShared is FsShape<bn, tile>'s shared memory: stages of the
// weight tile (bn rows) and 16 activation rows.
func fp8StreamShared(v streamVariant) int { return stageShared(v.bn+16, v.tile) }

// newFP8Stream finds the variants in the FP8 module and raises their
// shared memory limits; nil where the card cannot give a block that much.
func newFP8Stream(mod *cuda.Module, dev cuda.Device) (*fp8Stream, error) {
	g, err := loadStreamRows(mod, dev, fp8StreamVariants, func(bn int) string { return fmt.Sprintf("fp8_stream_n%d_e1", bn) }, fp8StreamShared)
	if g == nil || err != nil {
		return nil, err
	}
	return &fp8Stream{streamRows: g}, nil
}

// fp8StreamPlan is one product's variant.
type fp8StreamPlan struct {
	i int // index into the variants
}

// plan picks the variant for an M x N x K product (streamRows.pick); ok is
// false for more than fp8StreamMaxRows rows or a shape no variant fits one
// wave with.
func (g *fp8Stream) plan(M, N, K int) (p fp8StreamPlan, ok bool) {
	if g == nil || M < 1 || M > fp8StreamMaxRows {
		return p, false
	}
	i, ok := g.pick(N, K)
	return fp8StreamPlan{i: i}, ok
}

// launch enqueues out = sx sw (qx . qw^T) for M activation rows (qx, sx)
// and weight w with plan p and the kernel's opts (bit 0: one weight tile
// before griddepcontrol.wait).
func (g *fp8Stream) launch(s *cuda.Stream, p fp8StreamPlan, out, qx, sx cuda.DevicePtr, w *fp8Weight, M, opts int) error {
	v := g.vs[p.i]
	if (uint64(out)|uint64(qx)|uint64(w.q.Ptr()))%16 != 0 {
		return fmt.Errorf("gpu: fp8_stream: operands not 16-byte aligned")
	}
	return g.fn[p.i].Launch(s, cuda.Dim3{X: w.rows / v.bn, Y: 1, Z: 1}, cuda.Dim3{X: 128, Y: 1, Z: 1}, fp8StreamShared(v),
		uint64(out), uint64(qx), uint64(sx), uint64(w.q.Ptr()), uint64(w.scale.Ptr()), M, w.rows, w.cols, opts)
}
