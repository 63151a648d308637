package gpu

import (
	"fmt"

	"github.com/peftd/peftd/runtime/cuda"
)

// bfSkinny launches gemm_skinny_* (kernels/llama.cu): the bf16 product of a
// decode step's few rows (at most bfSkinnyMaxRows) with a weight, streaming
// the weight once at the copy rate in a grid of one wave. cuBLASLt's
// choices at 1-64 rows leave a quarter to a third of the bandwidth unused
// on the 8B shapes (v0.21 nsysdec: qkv 16.1 µs for 12.5 of bytes, o 10.9 +
// a 1.9 µs split-K reduce for 8.3; at 64 rows down 38 for 29).
type bfSkinny struct {
	fn      [3][3]*cuda.Function // [rows: 16, 32, 64][columns per block: 128, 192, 224]
	sms     int
	cluster bool // K splits merge through thread-block clusters (sm_90)
}

// bfSkinnyEarly is gemm_skinny's opts bit 0: the first weight tiles
// requested before griddepcontrol.wait.
const bfSkinnyEarly = 1

// bfSkinnyMaxRows is the most rows gemm_skinny takes (16 * MT, MT <= 4).
const bfSkinnyMaxRows = 64

var (
	bfSkinnyMT = [3]int{1, 2, 4}
	bfSkinnyNW = [3]int{4, 6, 7}
)

// bfSkinnyShared is SkShape<mt, nw>'s shared memory: ST stages of the weight
// tile (32 nw rows) and x's (16 mt rows), 128 bytes a row.
func bfSkinnyShared(mt, nw int) int {
	stage := (32*nw + 16*mt) * 64 * 2
	return min(8, 190*1024/stage) * stage
}

// newBFSkinny finds the gemm_skinny variants in the forward module and raises
// their shared memory limits; nil when the device cannot give a block that
// much shared memory (then cuBLASLt takes every product).
func newBFSkinny(mod *cuda.Module, dev cuda.Device) (*bfSkinny, error) {
	g := &bfSkinny{sms: dev.SMs, cluster: dev.Major >= 9}
	for i, mt := range bfSkinnyMT {
		for j, nw := range bfSkinnyNW {
			sh := bfSkinnyShared(mt, nw)
			if dev.MaxShared > 0 && sh > dev.MaxShared {
				return nil, nil
			}
			f, err := mod.Function(fmt.Sprintf("gemm_skinny_m%d_n%d", 16*mt, 32*nw))
			if err != nil {
				return nil, err
			}
			if err := f.SetMaxDynamicShared(sh); err != nil {
				return nil, err
			}
			g.fn[i][j] = f
		}
	}
	return g, nil
}

// bfSkinnyPlan is one product's launch: the variant, its K split.
type bfSkinnyPlan struct {
	f         *cuda.Function
	mt, nw, s int
}

// plan picks the variant for an M x N x K product: the columns per block
// (BN) and the K split S whose grid (N / BN) x S fills the most SMs in one
// wave (ties: fewer splits, then wider blocks). ok is false where none
// fits: more rows than bfSkinnyMaxRows, N no multiple of any BN, K no
// multiple of 64 S, or more blocks than SMs at every choice.
func (g *bfSkinny) plan(M, N, K int) (p bfSkinnyPlan, ok bool) {
	if g == nil || M < 1 || M > bfSkinnyMaxRows || K%64 != 0 {
		return p, false
	}
	mi := 0
	for 16*bfSkinnyMT[mi] < M {
		mi++
	}
	best := 0
	for j := len(bfSkinnyNW) - 1; j >= 0; j-- {
		bn := 32 * bfSkinnyNW[j]
		if N%bn != 0 {
			continue
		}
		for _, s := range []int{1, 2, 4, 8} {
			if s > 1 && !g.cluster || K%(64*s) != 0 {
				continue
			}
			if n := N / bn * s; n <= g.sms && n > best {
				best, p = n, bfSkinnyPlan{f: g.fn[mi][j], mt: bfSkinnyMT[mi], nw: bfSkinnyNW[j], s: s}
			}
		}
	}
	// a grid of fewer than half the SMs leaves bandwidth unused: cuBLASLt's
	return p, best > 0 && 2*best >= g.sms
}

// launch enqueues out[M, N] = x[M, K] . w[N, K]^T with plan p (whole rows,
// 16-byte aligned) and the kernel's opts.
func (g *bfSkinny) launch(s *cuda.Stream, p bfSkinnyPlan, out, x, w uint64, M, N, K, opts int) error {
	if (out|x|w)%16 != 0 || K%8 != 0 {
		return fmt.Errorf("gpu: gemm_skinny: operands not 16-byte aligned")
	}
	grid, block := cuda.Dim3{X: N / (32 * p.nw), Y: p.s, Z: 1}, cuda.Dim3{X: 128, Y: 1, Z: 1}
	args := []any{out, x, w, M, N, K, K / p.s, opts}
	sh := bfSkinnyShared(p.mt, p.nw)
	if p.s > 1 {
		return p.f.LaunchCluster(s, grid, block, cuda.Dim3{X: 1, Y: p.s, Z: 1}, sh, args...)
	}
	return p.f.Launch(s, grid, block, sh, args...)
}
