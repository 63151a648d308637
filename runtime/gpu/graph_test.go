package gpu

import (
	"math/rand/v2"
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
	for _, c := range []struct{ rank, want int }{{0, 64}, {1, 64}, {8, 64}, {64, 64}, {65, 128}, {128, 128}, {129, 256}, {300, 512}, {512, 512}} {
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
