package gpu

import (
	"log/slog"
	"os"
	"slices"
	"strconv"

	"github.com/peftd/peftd/runtime/cuda"
	"github.com/peftd/peftd/runtime/llama"
)

// The gate/up update split between the two streams (kernelForce.guSplit).
//
// In an FP8 mixed step (240 rows, four rank-32 adapters) the LoRA stream
// expands the gate/up update (sgmv_expand_tch1s, 1,176 blocks) on the 20
// SMs the product leaves it in 73 µs, and the product takes 62: silu_mul
// waits ~12 µs a layer for the expand's tail (PERFORMANCE v0.97's trace).
// Split, the LoRA stream expands the first N 512-column blocks of each
// slice beside the product, so that it ends with it, and the compute
// stream expands the rest right after the product on every SM
// (launchTail: the first kernel after the join), before silu_mul. Every
// column is computed as the whole expand computes it (sgmv_expand_tch1sr:
// tch1s over a column range), so the update's bits are the same.

// expandTail is a tensor-core expand's launch (expandTCRange): the update
// of the group whose projections' outputs start at offs in rows stride
// values apart at out, from the step's LoRA scratch (ks K parts, tStride
// floats a row; table rows base, eStride apart); c0: where the compute
// stream's columns of each slice begin (launchTail).
type expandTail struct {
	tc              int
	out             cuda.DevicePtr
	stride          int
	offs            []int
	ms              [3]int
	base, eStride   int
	tStride, ks, c0 int
}

// guSplitAuto is kernelForce.guSplit's default: off until measured.
const guSplitAuto = 0

// guSplitDefault is guSplitAuto, or the blocks PEFTD_LORA_GU_SPLIT gives
// (0 for none; the whole engine's A/B, serving included; New reads it).
func guSplitDefault() int {
	v := os.Getenv("PEFTD_LORA_GU_SPLIT")
	if v == "" {
		return guSplitAuto
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 0 || n > 1024 {
		slog.Warn("gpu: PEFTD_LORA_GU_SPLIT is not 0 to 1024 blocks; using the default", "value", v, "default", guSplitAuto)
		return guSplitAuto
	}
	return n
}

// guSplitFor is the 512-column blocks of each slice the LoRA stream
// expands of group mods' update (tc, acc: expandTCRange's), 0 for all:
// the gate/up group's bf16 update where kernelForce.guSplit (or
// guSplitN, New's guSplitDefault) gives a split.
func (b *Backend) guSplitFor(mods []llama.Module, tc int, acc loraAcc) int {
	n := forced(b.force.guSplit, b.guSplitN)
	if n <= 0 || tc != 1 || acc != accHalf || b.fn.sgExpandTCHSR == nil || !slices.Equal(mods, []llama.Module{llama.Gate, llama.Up}) {
		return 0
	}
	return n
}

// splitAt is the first column of each slice the compute stream expands
// when the LoRA stream takes upTo blocks of t's update: 0 (no split)
// unless the expand is sgmv_expand_tch1s's and some slice is wider.
func (b *Backend) splitAt(t expandTail, acc loraAcc, upTo int) int {
	if upTo <= 0 || !b.halfStaged(t, acc) {
		return 0
	}
	c0 := upTo * tcBlockCols(t.tc)
	for i := 1; i < len(t.offs); i++ {
		if t.offs[i]-t.offs[i-1] > c0 {
			return c0
		}
	}
	return 0
}

// launchTail expands t's columns from c0 on the compute stream.
func (b *Backend) launchTail(t *expandTail) {
	if b.err != nil {
		return
	}
	wide := 0
	for i := 1; i < len(t.offs); i++ {
		wide = max(wide, t.offs[i]-t.offs[i-1])
	}
	b.expandTCRange(b.s, *t, accHalf, t.c0, wide)
	b.guSplits++
}

// joinFullDefault is kernelForce.joinFull's default: none, or the fused
// groups' mask PEFTD_LORA_JOIN_FULL gives (0-15; the whole engine's A/B,
// serving included; New reads it).
func joinFullDefault() int {
	v := os.Getenv("PEFTD_LORA_JOIN_FULL")
	if v == "" {
		return 0
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 0 || n > 15 {
		slog.Warn("gpu: PEFTD_LORA_JOIN_FULL is not a mask of the four fused groups (0 to 15); using none", "value", v)
		return 0
	}
	return n
}
