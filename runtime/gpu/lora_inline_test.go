package gpu

import (
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
