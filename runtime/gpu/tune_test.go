package gpu

import (
	"slices"
	"testing"
)

// TestSharedShapes groups weights by shape in order of first appearance,
// drops a shape only one weight has and reports the kept shapes' largest
// dimensions.
func TestSharedShapes(t *testing.T) {
	type w struct {
		id   int
		n, k int
	}
	ws := []w{{0, 6144, 4096}, {1, 4096, 4096}, {2, 128256, 4096}, {3, 6144, 4096}, {4, 4096, 14336}, {5, 4096, 4096}, {6, 4096, 14336}}
	order, byShape, maxN, maxK := sharedShapes(ws, func(x w) tuneShape { return tuneShape{x.n, x.k} })
	if want := []tuneShape{{6144, 4096}, {4096, 4096}, {4096, 14336}}; !slices.Equal(order, want) {
		t.Errorf("order %v, want %v", order, want)
	}
	if got := byShape[tuneShape{6144, 4096}]; len(got) != 2 || got[0].id != 0 || got[1].id != 3 {
		t.Errorf("[6144, 4096]: %v, want weights 0 and 3 in turn", got)
	}
	if maxN != 6144 || maxK != 14336 {
		t.Errorf("largest %d x %d, want 6144 x 14336 (the one-weight [128256, 4096] left out)", maxN, maxK)
	}
	if order, _, maxN, _ := sharedShapes([]w{{0, 8, 8}}, func(x w) tuneShape { return tuneShape{x.n, x.k} }); len(order) != 0 || maxN != 0 {
		t.Errorf("one weight: %v, largest rows %d; want nothing", order, maxN)
	}
}
