package gpu

import (
	"testing"

	"github.com/peftd/peftd/runtime/cuda"
	"github.com/peftd/peftd/runtime/llama"
)

// TestGuSplitPlan: which updates the LoRA stream splits (kernelForce.guSplit:
// the gate/up group's bf16 update of the rank-32 class, where
// sgmv_expand_tch1sr loaded) and where the compute stream's columns begin
// (splitAt: N 512-column blocks of each slice, only where the expand is
// sgmv_expand_tch1s's and some slice is wider than the split).
func TestGuSplitPlan(t *testing.T) {
	gu := []llama.Module{llama.Gate, llama.Up}
	b := &Backend{nLora: 240, guSplitN: guSplitAuto}
	b.fn.sgExpandTCHSR = &cuda.Function{}
	for _, c := range []struct {
		name  string
		force int
		mods  []llama.Module
		tc    int
		acc   loraAcc
		want  int
	}{
		{"default (off)", 0, gu, 1, accHalf, 0},
		{"forced off", -1, gu, 1, accHalf, 0},
		{"gate/up, rank 32, bf16", 22, gu, 1, accHalf, 22},
		{"float32 update", 22, gu, 1, accFloat, 0},
		{"in place", 22, gu, 1, accAdd, 0},
		{"rank 64", 22, gu, 2, accHalf, 0},
		{"down", 22, []llama.Module{llama.Down}, 1, accHalf, 0},
		{"q/k/v", 22, []llama.Module{llama.Q, llama.K, llama.V}, 1, accHalf, 0},
	} {
		b.force.guSplit = c.force
		if got := b.guSplitFor(c.mods, c.tc, c.acc); got != c.want {
			t.Errorf("%s: guSplitFor %d, want %d", c.name, got, c.want)
		}
	}
	b.force.guSplit, b.guSplitN = 0, 24 // PEFTD_LORA_GU_SPLIT=24
	if got := b.guSplitFor(gu, 1, accHalf); got != 24 {
		t.Errorf("guSplitN 24: guSplitFor %d, want 24", got)
	}
	b.fn.sgExpandTCHSR = nil
	b.force.guSplit = 22
	if got := b.guSplitFor(gu, 1, accHalf); got != 0 {
		t.Errorf("without sgmv_expand_tch1sr: guSplitFor %d, want 0", got)
	}

	t8b := expandTail{tc: 1, out: 1 << 20, stride: 2 * 14336, offs: []int{0, 14336, 2 * 14336}}
	for _, c := range []struct {
		name       string
		t          expandTail
		acc        loraAcc
		halfStage  int
		nLora      int
		upTo, want int
	}{
		{"8B gate/up, 22 blocks", t8b, accHalf, 0, 240, 22, 22 * 512},
		{"8B gate/up, 27 blocks", t8b, accHalf, 0, 240, 27, 27 * 512},
		{"8B gate/up, 28 blocks: all of it", t8b, accHalf, 0, 240, 28, 0},
		{"no split asked", t8b, accHalf, 0, 240, 0, 0},
		{"float32 update", t8b, accFloat, 0, 240, 22, 0},
		{"tch1s off", t8b, accHalf, -1, 240, 22, 0},
		{"below halfStageMinRows (tch1)", t8b, accHalf, 0, halfStageMinRows - 1, 22, 0},
		{"misaligned rows", expandTail{tc: 1, out: 1 << 20, stride: 2*14336 + 2, offs: t8b.offs}, accHalf, 0, 240, 22, 0},
		{"one slice wider", expandTail{tc: 1, out: 1 << 20, stride: 2048, offs: []int{0, 1024, 1280, 1536}}, accHalf, 0, 240, 1, 512},
	} {
		b.force.halfStage, b.nLora = c.halfStage, c.nLora
		if got := b.splitAt(c.t, c.acc, c.upTo); got != c.want {
			t.Errorf("%s: splitAt %d, want %d", c.name, got, c.want)
		}
	}
}
