package gpu

import (
	"testing"

	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
)

// TestProductSMs: the SMs a product leaves to the LoRA stream beside it,
// by the step's rows (none up to 16 rows, 16 above; the fused q/k/v product
// 48 from 64 rows, and FP8 o and down 32 there; above 64 rows q/k/v and o
// 32, gate/up 16, down 24, or 32 for an FP8 down, and FP8 o and down 48
// above 192 rows; FP8 at 17-32 rows as above 64),
// its group found by its shape (bf16 or FP8; o and down are equally wide,
// told apart by their inputs), an override per group (kernelForce.holds;
// negative: none), or Options.LoRASMs for all.
func TestProductSMs(t *testing.T) {
	cfg := &llama.Config{VocabSize: 1000, Hidden: 256, Intermediate: 512, Layers: 2, Heads: 4, KVHeads: 2, HeadDim: 64}
	ws := [...]engine.Weight{
		&weight{rows: 256 + 2*128, cols: 256}, &fp8Weight{rows: 256 + 2*128, cols: 256}, // q/k/v
		&weight{rows: 256, cols: 256}, &fp8Weight{rows: 256, cols: 256}, // o
		&weight{rows: 1024, cols: 256},                                  // gate/up
		&weight{rows: 256, cols: 512}, &fp8Weight{rows: 256, cols: 512}, // down
		&weight{rows: 1000, cols: 256}, // lm_head: no group
	}
	for _, c := range []struct {
		rows, sms int
		holds     [4]int
		want      [8]int // q/k/v, q/k/v FP8, o, o FP8, gate/up, down, down FP8, lm_head
	}{
		{rows: 1},
		{rows: 4},
		{rows: 16},
		{rows: 17, want: [8]int{16, 32, 16, 32, 16, 16, 32, 16}},
		{rows: 32, want: [8]int{16, 32, 16, 32, 16, 16, 32, 16}},
		{rows: 33, want: [8]int{16, 16, 16, 16, 16, 16, 16, 16}},
		{rows: 63, want: [8]int{16, 16, 16, 16, 16, 16, 16, 16}},
		{rows: 64, want: [8]int{48, 48, 16, 32, 16, 16, 32, 16}},
		{rows: 65, want: [8]int{32, 48, 32, 32, 16, 24, 32, 16}},
		{rows: 128, want: [8]int{32, 48, 32, 32, 16, 24, 32, 16}},
		{rows: 129, want: [8]int{32, 32, 32, 32, 16, 24, 32, 16}},
		{rows: 192, want: [8]int{32, 32, 32, 32, 16, 24, 32, 16}},
		{rows: 193, want: [8]int{32, 32, 32, 48, 16, 24, 48, 16}},
		{rows: 256, want: [8]int{32, 32, 32, 48, 16, 24, 48, 16}},
		{rows: 256, sms: 24, want: [8]int{24, 24, 24, 24, 24, 24, 24, 24}},
		{rows: 2, sms: 8, want: [8]int{8, 8, 8, 8, 8, 8, 8, 8}},
		{rows: 64, holds: [4]int{32}, want: [8]int{32, 32, 16, 32, 16, 16, 32, 16}},
		{rows: 64, holds: [4]int{0, 32, 8, 24}, want: [8]int{48, 48, 32, 32, 8, 24, 24, 16}},
		{rows: 256, holds: [4]int{48, 0, 0, 8}, want: [8]int{48, 48, 32, 48, 16, 8, 8, 16}},
		{rows: 256, sms: 24, holds: [4]int{0, 0, 0, 40}, want: [8]int{24, 24, 24, 24, 24, 40, 40, 24}},
		{rows: 1, holds: [4]int{48}, want: [8]int{48, 48, 0, 0, 0, 0, 0, 0}},
		{rows: 256, holds: [4]int{-1, 0, 0, -1}, want: [8]int{0, 0, 32, 48, 16, 0, 0, 16}}, // negative: none held
	} {
		sms := c.sms // Options.LoRASMs; 0 in the table: automatic
		if sms == 0 {
			sms = -1
		}
		b := &Backend{cfg: cfg, nRows: c.rows, la: loraAside{sms: sms}, force: kernelForce{holds: c.holds}}
		var got [8]int
		for i, w := range ws {
			got[i] = b.productSMs(w)
		}
		if got != c.want {
			t.Errorf("%d rows, LoRASMs %d, holds %v: q/k/v, q/k/v FP8, o, o FP8, gate/up, down, down FP8, lm_head leave %v SMs, want %v", c.rows, c.sms, c.holds, got, c.want)
		}
	}
}

// TestBigShrinkSplit: sgmv_shrink64's K parts fill whole waves of the SMs
// (the 4 x 512 prefill's groups on 132 SMs), never above the cap, and the
// fewest parts among equal times.
func TestBigShrinkSplit(t *testing.T) {
	for _, c := range []struct{ blocks, sms, ksMax, want int }{
		{96, 132, 4, 4},  // q/k/v: 384 blocks, three full waves
		{96, 132, 2, 1},  // 192 blocks would take two waves for half the work each: no gain
		{64, 132, 6, 2},  // gate/up: one wave of 128
		{32, 132, 12, 4}, // o, down: one wave of 128
		{12, 132, 8, 8},  // 256 rows' q/k/v: the cap
		{200, 132, 8, 3}, // 600 blocks in 5 waves: 1.98 against 2.125 unsplit
		{132, 132, 8, 1},
		{1, 132, 1, 1},
	} {
		if got := bigShrinkSplit(c.blocks, c.sms, c.ksMax); got != c.want {
			t.Errorf("bigShrinkSplit(%d, %d, %d) = %d, want %d", c.blocks, c.sms, c.ksMax, got, c.want)
		}
	}
}
