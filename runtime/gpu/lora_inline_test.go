package gpu

import (
	"slices"
	"testing"

	"github.com/peftd/peftd/runtime/llama"
)

func TestSlices12(t *testing.T) {
	for _, c := range []struct {
		bounds []int
		a1, a2 int
	}{
		{[]int{0, 4096}, 4096, 4096},             // o: one slice
		{[]int{0, 14336, 28672}, 14336, 28672},   // gate/up
		{[]int{0, 4096, 5120, 6144}, 4096, 5120}, // q/k/v
		{[]int{0, 8, 10, 12}, 8, 10},             // expand blocks a slice
	} {
		if a1, a2 := slices12(c.bounds); a1 != c.a1 || a2 != c.a2 {
			t.Errorf("slices12(%v) = %d, %d; want %d, %d", c.bounds, a1, a2, c.a1, c.a2)
		}
	}
}

// TestInlineGroups: which fused groups loraInline may take: q/k/v by
// default, none with kernelForce.loraInline -1, the mask otherwise; groups
// are found by their modules in order.
func TestInlineGroups(t *testing.T) {
	b := &Backend{}
	for _, c := range []struct {
		force, want int
	}{{0, 1}, {-1, 0}, {0b1011, 0b1011}} {
		b.force.loraInline = c.force
		if got := b.inlineGroups(); got != c.want {
			t.Errorf("loraInline %d: groups %b, want %b", c.force, got, c.want)
		}
	}
	for g, mods := range llama.FusedGroups {
		if got := groupIndex(mods); got != g {
			t.Errorf("groupIndex(%v) = %d, want %d", mods, got, g)
		}
	}
	if got := groupIndex([]llama.Module{llama.K, llama.Q, llama.V}); got != -1 {
		t.Errorf("groupIndex(k, q, v) = %d, want -1 (not a fused group's order)", got)
	}
}

// TestGroupSlices: the fused groups' layouts at 8B shapes, and a group
// whose projections read different widths.
func TestGroupSlices(t *testing.T) {
	b := &Backend{cfg: &llama.Config{Hidden: 4096, Intermediate: 14336, Heads: 32, KVHeads: 8, HeadDim: 128}}
	for _, c := range []struct {
		mods []llama.Module
		offs []int
		ms   [3]int
		inF  int
		same bool
	}{
		{[]llama.Module{llama.Q, llama.K, llama.V}, []int{0, 4096, 5120, 6144}, [3]int{int(llama.Q), int(llama.K), int(llama.V)}, 4096, true},
		{[]llama.Module{llama.O}, []int{0, 4096}, [3]int{int(llama.O), -1, -1}, 4096, true},
		{[]llama.Module{llama.Gate, llama.Up}, []int{0, 14336, 28672}, [3]int{int(llama.Gate), int(llama.Up), -1}, 4096, true},
		{[]llama.Module{llama.Down}, []int{0, 4096}, [3]int{int(llama.Down), -1, -1}, 14336, true},
		{[]llama.Module{llama.Q, llama.Down}, nil, [3]int{}, 4096, false},
	} {
		offs, ms, inF, same := b.groupSlices(c.mods)
		if same != c.same || inF != c.inF || same && (!slices.Equal(offs, c.offs) || ms != c.ms) {
			t.Errorf("groupSlices(%v) = %v, %v, %d, %v; want %v, %v, %d, %v", c.mods, offs, ms, inF, same, c.offs, c.ms, c.inF, c.same)
		}
	}
}
