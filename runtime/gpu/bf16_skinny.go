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
	fn  [len(bfSkinnyBN)]*cuda.Function
	sms int
}

// bfSkinnyMaxRows is the most rows gemm_skinny takes (one m16 tile).
const bfSkinnyMaxRows = 16

// bfSkinnyEarly is gemm_skinny's opts bit 0: the first weight tiles
// requested before griddepcontrol.wait.
const bfSkinnyEarly = 1

// bfSkinnyBN: the variants' output columns per block (gemm_skinny_n*),
// widest first.
var bfSkinnyBN = [...]int{224, 48, 32}

// bfSkinnyShared is SkShape<bn>'s shared memory: ST stages of the weight
// tile (bn rows) and x's (16 rows) of BK columns (256 for the warps-along-K
// variants, 32 and 48; 64 for 224).
func bfSkinnyShared(bn int) int {
	bk := 256
	if bn == 224 {
		bk = 64
	}
	stage := (bn + 16) * bk * 2
	return min(8, 190*1024/stage) * stage
}

// newBFSkinny finds the gemm_skinny variants in the forward module and
// raises their shared memory limits; nil when the device cannot give a
// block that much (then cuBLASLt takes every product).
func newBFSkinny(mod *cuda.Module, dev cuda.Device) (*bfSkinny, error) {
	g := &bfSkinny{sms: dev.SMs}
	for i, bn := range bfSkinnyBN {
		sh := bfSkinnyShared(bn)
		if dev.MaxShared > 0 && sh > dev.MaxShared {
			return nil, nil
		}
		f, err := mod.Function(fmt.Sprintf("gemm_skinny_n%d", bn))
		if err != nil {
			return nil, err
		}
		if err := f.SetMaxDynamicShared(sh); err != nil {
			return nil, err
		}
		g.fn[i] = f
	}
	return g, nil
}

// bfSkinnyPlan is one product's variant: its columns per block.
type bfSkinnyPlan struct {
	f  *cuda.Function
	bn int
}

// plan picks the variant for an M x N x K product: the widest block whose
// grid (N / BN blocks) fits one wave and fills at least half the SMs. ok is
// false where none does (more than bfSkinnyMaxRows rows, K no multiple of
// the variant's tile, N no multiple of its width, too few or too many
// blocks): cuBLASLt's product then.
func (g *bfSkinny) plan(M, N, K int) (p bfSkinnyPlan, ok bool) {
	if g == nil || M < 1 || M > bfSkinnyMaxRows {
		return p, false
	}
	for i, bn := range bfSkinnyBN {
		bk := 256
		if bn == 224 {
			bk = 64
		}
		if N%bn != 0 || K%bk != 0 {
			continue
		}
		if n := N / bn; n <= g.sms && 2*n >= g.sms {
			return bfSkinnyPlan{f: g.fn[i], bn: bn}, true
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
	return p.f.Launch(s, cuda.Dim3{X: N / p.bn, Y: 1, Z: 1}, cuda.Dim3{X: 128, Y: 1, Z: 1}, bfSkinnyShared(p.bn), out, x, w, M, N, K, opts)
}
