package gpu

import (
	"math/rand/v2"
	"slices"
	"testing"
)

// The graph layout's arithmetic, checked without a GPU.

func TestBucketIndex(t *testing.T) {
	for n := 1; n <= graphBuckets[len(graphBuckets)-1]; n++ {
		b := graphBuckets[bucketIndex(n)]
		if b < n {
			t.Fatalf("bucket for %d rows is %d", n, b)
		}
		if i := bucketIndex(n); i > 0 && graphBuckets[i-1] >= n {
			t.Fatalf("bucket for %d rows is %d, but %d fits", n, b, graphBuckets[i-1])
		}
	}
}

func TestRankClass(t *testing.T) {
	for _, c := range []struct{ rank, want int }{{0, 32}, {1, 32}, {8, 32}, {32, 32}, {33, 64}, {64, 64}, {65, 128}, {128, 128}, {129, 256}, {300, 512}, {512, 512}} {
		if got := rankClass(c.rank); got != c.want {
			t.Errorf("rankClass(%d) = %d, want %d", c.rank, got, c.want)
		}
	}
}

// TestTilesCap: however n rows split into segments of at most slots
// adapters, their SGMV tiles (one per sgTileRows rows of a segment) fit the
// recorded launch's tile count.
func TestTilesCap(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for range 20000 {
		n := 1 + rng.IntN(256)
		slots := 1 + rng.IntN(16)
		// segments: a random number of adapters in use, each a random share of the rows
		segs := 1 + rng.IntN(min(n, slots))
		sizes := make([]int, segs)
		for i := range sizes {
			sizes[i] = 1
		}
		for r := segs; r < n; r++ {
			sizes[rng.IntN(segs)]++
		}
		// some rows may have no adapter at all
		for i := range sizes {
			if sizes[i] > 1 && rng.IntN(4) == 0 {
				sizes[i] = 1 + rng.IntN(sizes[i])
			}
		}
		tiles := 0
		for _, s := range sizes {
			tiles += (s + sgTileRows - 1) / sgTileRows
		}
		if c := tilesCap(n, slots); tiles > c {
			t.Fatalf("%d rows in segments %v (%d slots): %d tiles > tilesCap %d", n, sizes, slots, tiles, c)
		}
	}
}

// TestPutTiles: tiles of up to size rows cover [start, end) in order, the
// last one partial, each tagged; tilesOf counts them.
func TestPutTiles(t *testing.T) {
	for _, c := range []struct {
		start, end, size int
		want             []int32
	}{
		{3, 3, 16, nil},
		{0, 16, 16, []int32{0, 16, 7, 0}},
		{5, 40, 16, []int32{5, 16, 7, 0, 21, 16, 7, 0, 37, 3, 7, 0}},
		{10, 11, 64, []int32{10, 1, 7, 0}},
	} {
		h := make([]int32, 2+4*tilesOf(c.end-c.start, c.size))
		at := putTiles(h, 2, c.start, c.end, c.size, 7)
		if at != len(h) || !slices.Equal(h[2:], c.want) {
			t.Errorf("rows [%d,%d) in %d: %v (end %d), want %v", c.start, c.end, c.size, h[2:at], at, c.want)
		}
	}
}
