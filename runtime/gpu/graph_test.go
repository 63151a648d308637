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

// TestGraphRowsFor: the largest recorded bucket is 256 by default, up to
// 512 when Options.GraphRows asks, never above the engine's rows a step,
// and always a bucket.
func TestGraphRowsFor(t *testing.T) {
	for _, c := range []struct{ maxT, limit, want int }{
		{512, 0, 256}, {512, 256, 256}, {512, 300, 256}, {512, 384, 384}, {512, 512, 512}, {512, 4096, 512},
		{300, 512, 256}, {100, 0, 96}, {1, 0, 1}, {0, 0, 0}, {4096, 0, 256},
	} {
		got := graphRowsFor(c.maxT, c.limit)
		if got != c.want {
			t.Errorf("graphRowsFor(%d, %d) = %d, want %d", c.maxT, c.limit, got, c.want)
		}
		if got > 0 && graphBuckets[bucketIndex(got)] != got {
			t.Errorf("graphRowsFor(%d, %d) = %d is not a bucket", c.maxT, c.limit, got)
		}
	}
}

// TestRecordedRows: the server's default step bound on a GPU is the
// largest recording --graph-rows asks for (256 when 0).
func TestRecordedRows(t *testing.T) {
	for _, c := range []struct{ graphRows, want int }{{0, 256}, {-1, 256}, {256, 256}, {300, 256}, {384, 384}, {512, 512}, {4096, 512}, {100, 96}} {
		if got := RecordedRows(c.graphRows); got != c.want {
			t.Errorf("RecordedRows(%d) = %d, want %d", c.graphRows, got, c.want)
		}
	}
}

// TestLogitCapFor: mixed recordings of 128 rows and more come with the
// logits of half their rows and of all; a step replays the first that
// holds its logit rows; decode recordings, small mixed ones and
// kernelForce.allLogits compute every row's.
func TestLogitCapFor(t *testing.T) {
	for _, c := range []struct {
		n      int
		mixed  bool
		logits int
		all    bool
		want   int
	}{
		{256, true, 65, false, 128}, {256, true, 1, false, 128}, {256, true, 128, false, 128}, {256, true, 129, false, 256},
		{256, true, 256, false, 256}, {192, true, 64, false, 96}, {128, true, 64, false, 64}, {128, true, 65, false, 128},
		{512, true, 200, false, 256}, {96, true, 2, false, 96}, {64, true, 1, false, 64},
		{256, false, 65, false, 256}, {256, false, 256, false, 256},
		{256, true, 65, true, 256},
	} {
		b := &Backend{}
		b.force.allLogits = c.all
		got := b.logitCapFor(c.n, c.mixed, c.logits)
		if got != c.want {
			t.Errorf("logitCapFor(%d rows, mixed %v, %d logit rows, allLogits %v) = %d, want %d", c.n, c.mixed, c.logits, c.all, got, c.want)
		}
		if caps := b.logitCaps(c.n, c.mixed); !slices.Contains(caps, got) || caps[len(caps)-1] != c.n || !slices.IsSorted(caps) {
			t.Errorf("logitCaps(%d, %v) = %v: not ascending to %d, or without %d", c.n, c.mixed, caps, c.n, got)
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
		if c := tilesCap(n, slots, sgTileRows); tiles > c {
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

// TestKVSplitFor: attn_decode's KV split for a step's (sequence, KV head)
// pairs, at H200's resident blocks (132 SMs: 2 blocks an SM with 4 warps,
// 4 with 2), clusters of at most 8 and without.
func TestKVSplitFor(t *testing.T) {
	for _, c := range []struct{ pairs, resident, top, want int }{
		{8, 264, 8, 8},    // batch 1: as many splits as a cluster holds
		{8, 264, 64, 33},  // batch 1 without clusters: one wave of 264
		{128, 264, 8, 2},  // batch 16: two splits fill one wave
		{512, 264, 8, 1},  // batch 64 with 4 warps: two waves of whole contexts beat four of halves
		{512, 528, 8, 1},  // batch 64 with 2 warps: one wave
		{2048, 528, 8, 1}, // batch 256
		{1, 1, 8, 1},      // a one-block GPU never splits
		{528, 528, 64, 1}, // exactly one wave
		{529, 528, 64, 3}, // one pair over a wave: 4 waves of thirds beat 2 of whole contexts
		{66, 528, 64, 8},  // 8 splits fill the wave exactly
		{67, 528, 64, 7},  // 8 would take two waves
		{264, 264, 8, 1},  // a full wave of whole contexts
		{132, 264, 8, 2},  // half a wave: two splits
		{100, 264, 8, 2},  // 2 x 100 fits, 3 x 100 does not
	} {
		if got := kvSplitFor(c.pairs, c.resident, c.top); got != c.want {
			t.Errorf("kvSplitFor(%d pairs, %d resident, top %d) = %d, want %d", c.pairs, c.resident, c.top, got, c.want)
		}
	}
}

// TestDecVariantFor: attn_decode2 (2 warps) at decW2SmallMin-decW2SmallMax
// rows and, with bf16 keys, from decWarps2MinRows rows or where the pairs
// outgrow one wave of attn_decode (34 rows: 272 of 264 resident blocks)
// and fit one of attn_decode2 (528); attn_decode_w8 (8)
// from decWarps8MinRows rows while the (sequence, KV head) pairs fit its
// resident blocks, where it fits the head dimension; attn_decode (4)
// otherwise; kernelForce.decVar overrides the rows and the key format (not
// w8 where it does not fit).
func TestDecVariantFor(t *testing.T) {
	for _, c := range []struct {
		kv8, w8  bool
		force, n int
		want     decVariant
	}{
		{false, true, 0, 1, decV4}, {false, true, 0, 2, decV4}, {false, true, 0, 3, decV2}, {false, true, 0, 4, decV2},
		{false, true, 0, decWarps8MinRows, decV8}, {false, true, 0, 16, decV8}, {false, true, 0, 17, decV4},
		{false, false, 0, 16, decV4}, {false, false, 0, 4, decV2}, {false, true, 0, 33, decV4}, {false, true, 0, 34, decV2},
		{false, true, 0, 48, decV2}, {false, true, 0, decWarps2MinRows - 1, decV2}, {true, true, 0, 48, decV4},
		{false, true, 0, decWarps2MinRows, decV2}, {false, true, 0, 256, decV2},
		{false, true, 1 + int(decV4), 256, decV4}, {false, true, 1 + int(decV2), 1, decV2},
		{false, true, 1 + int(decV8), 64, decV8}, {false, false, 1 + int(decV8), 1, decV4},
		{false, true, 1 + int(decVariants), 16, decV8}, // out of range: the rows decide
		{true, true, 0, 1, decV4}, {true, true, 0, 4, decV2}, {true, true, 0, 8, decV8}, {true, true, 0, 16, decV8},
		{true, true, 0, 17, decV4}, {true, true, 0, 64, decV4}, {true, true, 0, 256, decV4}, {true, false, 0, 16, decV4},
		{true, true, 1 + int(decV2), 1, decV2}, {true, true, 1 + int(decV8), 64, decV8}, {true, false, 1 + int(decV8), 64, decV4},
	} {
		b := &Backend{kv8: c.kv8}
		b.kv.HeadDim, b.kv.KVHeads = 128, 8
		b.decW8Fit[2] = c.w8
		b.decResident = [decVariants]int{264, 528, 132}
		b.force.decVar = c.force
		if got := b.decVariantFor(c.n); got != c.want {
			t.Errorf("kv8 %v, w8 %v, force %d, %d rows: %v, want %v", c.kv8, c.w8, c.force, c.n, got, c.want)
		}
	}
}

// TestW8Fits: attn_decode_w8 exists up to head_dim 128 and needs 192 KB
// there (attn_decode8_w8: 179 KB).
func TestW8Fits(t *testing.T) {
	if got, want := w8Fits(227<<10, false), [4]bool{true, true, true, false}; got != want {
		t.Errorf("227 KB: %v, want %v", got, want)
	}
	if got, want := w8Fits(99<<10, false), [4]bool{true, true, false, false}; got != want {
		t.Errorf("99 KB: %v, want %v", got, want)
	}
	if got, want := w8Fits(227<<10, true), [4]bool{true, true, true, false}; got != want {
		t.Errorf("FP8 keys, 227 KB: %v, want %v", got, want)
	}
	if got, want := w8Fits(177<<10, true), [4]bool{true, true, false, false}; got != want {
		t.Errorf("FP8 keys, 177 KB: %v, want %v", got, want)
	}
}

// TestDecShared: the variants' shared memory (DecShape in llama.cu): 96 KB
// with 4 warps of 3 stages at head_dim 128, a third with 2 warps; 2 stages
// at 256. FP8 keys: a stage holds bf16 V, e4m3 K and 16 scales padded to
// 128 bytes (6,272 bytes at 128), and a warp one bf16 K tile (4 KB: the
// widened keys, or with e4m3 Q K^T room kept empty for two blocks an SM):
// 89.5 KB.
func TestDecShared(t *testing.T) {
	for _, c := range []struct {
		hd   int
		k8   bool
		v    decVariant
		want int
	}{
		{128, false, decV4, 96 << 10}, {128, false, decV2, 48 << 10}, {256, false, decV4, 128 << 10},
		{256, false, decV2, 64 << 10}, {64, false, decV4, 48 << 10}, {128, false, decV8, 192 << 10}, {64, false, decV8, 96 << 10},
		{128, true, decV4, 4 * (3*6272 + 4096)},
		{64, true, decV4, 4 * (3*(2048+1024+128) + 2048)},
		{256, true, decV4, 4 * (2*(8192+4096+128) + 8192)},
	} {
		if got := decShared(c.hd, c.k8, c.v); got != c.want {
			t.Errorf("decShared(%d, k8 %v, %v) = %d, want %d", c.hd, c.k8, c.v, got, c.want)
		}
	}
}
