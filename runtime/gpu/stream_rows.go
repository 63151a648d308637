package gpu

import (
	"fmt"

	"github.com/peftd/peftd/runtime/cuda"
)

// streamVariant is one kernel of the weight-streaming products for a few
// rows (gemm_skinny for bf16 weights, fp8_stream for FP8): its output
// columns per block and the values of each weight row a tile holds.
type streamVariant struct {
	bn, tile int
}

// streamRows is a family of those kernels as loaded on a device.
type streamRows struct {
	vs  []streamVariant
	fn  []*cuda.Function
	sms int
}

// loadStreamRows finds kernel name(bn) for each variant and raises its
// shared memory limit to shared(v); nil where the device cannot give a
// block that much (the caller's other product takes every shape then).
func loadStreamRows(mod *cuda.Module, dev cuda.Device, vs []streamVariant, name func(bn int) string, shared func(streamVariant) int) (*streamRows, error) {
	g := &streamRows{vs: vs, fn: make([]*cuda.Function, len(vs)), sms: dev.SMs}
	for i, v := range vs {
		sh := shared(v)
		if dev.MaxShared > 0 && sh > dev.MaxShared {
			return nil, nil
		}
		f, err := mod.Function(name(v.bn))
		if err != nil {
			return nil, err
		}
		if err := f.SetMaxDynamicShared(sh); err != nil {
			return nil, fmt.Errorf("gpu: %s: %w", name(v.bn), err)
		}
		g.fn[i] = f
	}
	return g, nil
}

// pick is the variant for an N x K weight: the first (widest) whose width
// divides N, whose tile divides K, and whose grid (N / bn blocks) fits one
// wave while filling at least half the SMs; ok is false where none does.
func (g *streamRows) pick(N, K int) (i int, ok bool) {
	for i, v := range g.vs {
		if N%v.bn != 0 || K%v.tile != 0 {
			continue
		}
		if n := N / v.bn; n <= g.sms && 2*n >= g.sms {
			return i, true
		}
	}
	return 0, false
}

// stageShared is the shared memory of a streaming kernel whose stage holds
// rows rows of rowBytes each: as many stages as fit 190 KB, at most 8
// (SkShape, FsShape).
func stageShared(rows, rowBytes int) int {
	stage := rows * rowBytes
	return min(8, 190*1024/stage) * stage
}
