package gpu

import (
	"testing"

	"github.com/peftd/peftd/runtime/llama"
)

// TestMemoryNeeds: the fixed part counts the weights in their format (FP8
// projections at one byte a value plus a float32 scale per row), adapter
// slots and activations; a page holds K and V of every layer (bf16, or e4m3
// keys with a float32 scale per token and KV head beside bf16 values); bad
// options are refused.
func TestMemoryNeeds(t *testing.T) {
	c := &llama.Config{VocabSize: 1000, Hidden: 256, Intermediate: 512, Layers: 2, Heads: 4, KVHeads: 2, HeadDim: 64}
	b16, page, err := MemoryNeeds(c, 64, 16, 0, WeightsBF16, KVBF16)
	if err != nil {
		t.Fatal(err)
	}
	f8, page8, err := MemoryNeeds(c, 64, 16, 0, WeightsFP8, "")
	if err != nil {
		t.Fatal(err)
	}
	// projections per layer: q, o 256x256; k, v 128x256; gate, up 512x256; down 256x512
	proj := int64(2 * (2*256*256 + 2*128*256 + 3*512*256))
	rows := int64(2 * (256 + 128 + 128 + 256 + 512 + 512 + 256))
	if got := int64(b16) - int64(f8); got != 2*proj-(proj+4*rows) {
		t.Errorf("bf16 - fp8 = %d bytes, want %d (projections in e4m3 with row scales)", got, 2*proj-(proj+4*rows))
	}
	if want := uint64(2 * 2 * 16 * 2 * 64 * 2); page != want || page8 != want {
		t.Errorf("a page: %d / %d bytes, want %d", page, page8, want)
	}
	_, pageK8, err := MemoryNeeds(c, 64, 16, 0, WeightsBF16, KVFP8)
	if err != nil {
		t.Fatal(err)
	}
	// 2 layers x 16 tokens x (2 heads x 64 values x (1 + 2) bytes + 2 scales x 4 bytes)
	if want := uint64(2 * 16 * (2*64*3 + 2*4)); pageK8 != want {
		t.Errorf("a page with FP8 keys: %d bytes, want %d", pageK8, want)
	}
	with, _, err := MemoryNeeds(c, 64, 16, 3, WeightsBF16, KVBF16)
	if err != nil {
		t.Fatal(err)
	}
	// three rank-64 adapters on the seven projections of two layers
	if want := uint64(3 * 2 * 64 * 2 * (256 + 256 + 256 + 128 + 256 + 128 + 256 + 256 + 256 + 512 + 256 + 512 + 512 + 256)); with-b16 != want {
		t.Errorf("three adapter slots: %d bytes, want %d", with-b16, want)
	}
	for _, bad := range []struct {
		rows, block, slots int
		format, kv         string
	}{{0, 16, 1, WeightsBF16, ""}, {64, 0, 1, WeightsBF16, ""}, {64, 16, -1, WeightsBF16, ""}, {64, 16, 1, "int4", ""}, {64, 16, 1, WeightsBF16, "int8"}} {
		if _, _, err := MemoryNeeds(c, bad.rows, bad.block, bad.slots, bad.format, bad.kv); err == nil {
			t.Errorf("%+v accepted", bad)
		}
	}
}

// TestKScaleAt: the FP8 key scales' layout [page][KV head][slot in page]
// (kscale_at in llama.cu): every (slot, head) of a cache gets its own
// index, and a page's slots of one head are contiguous.
func TestKScaleAt(t *testing.T) {
	for _, c := range []struct{ blocks, bs, kvh int }{{4, 16, 8}, {5, 5, 2}, {3, 1, 4}, {2, 12, 3}} {
		seen := make([]bool, c.blocks*c.bs*c.kvh)
		for slot := range c.blocks * c.bs {
			for h := range c.kvh {
				i := kscaleAt(slot, c.kvh, h, c.bs)
				if i < 0 || i >= len(seen) || seen[i] {
					t.Fatalf("%+v: slot %d head %d -> %d (out of range or taken)", c, slot, h, i)
				}
				seen[i] = true
				if slot%c.bs > 0 && kscaleAt(slot-1, c.kvh, h, c.bs) != i-1 {
					t.Fatalf("%+v: slots %d and %d of head %d not adjacent", c, slot-1, slot, h)
				}
			}
		}
	}
}
