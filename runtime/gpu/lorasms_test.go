package gpu

import (
	"testing"

	"github.com/peftd/peftd/runtime/llama"
)

// TestProductSMs: the SMs a product leaves to the LoRA stream beside it,
// by the step's rows (none up to 16 rows, 16 above; the fused q/k/v product
// 48 from 64 rows, found by its width, bf16 or FP8), an override for the
// q/k/v product alone (kernelForce.qkvSMs), or Options.LoRASMs for all.
func TestProductSMs(t *testing.T) {
	cfg := &llama.Config{VocabSize: 1000, Hidden: 256, Intermediate: 512, Layers: 2, Heads: 4, KVHeads: 2, HeadDim: 64}
	qkv := &weight{rows: 256 + 2*128, cols: 256}
	qkv8 := &fp8Weight{rows: 256 + 2*128, cols: 256}
	o := &weight{rows: 256, cols: 256}
	for _, c := range []struct {
		rows, force, sms int
		qkv, qkv8, oSMs  int
	}{
		{rows: 1, qkv: 0, qkv8: 0, oSMs: 0},
		{rows: 4, qkv: 0, qkv8: 0, oSMs: 0},
		{rows: 16, qkv: 0, qkv8: 0, oSMs: 0},
		{rows: 17, qkv: 16, qkv8: 16, oSMs: 16},
		{rows: 63, qkv: 16, qkv8: 16, oSMs: 16},
		{rows: 64, qkv: 48, qkv8: 48, oSMs: 16},
		{rows: 256, qkv: 48, qkv8: 48, oSMs: 16},
		{rows: 256, sms: 24, qkv: 24, qkv8: 24, oSMs: 24},
		{rows: 2, sms: 8, qkv: 8, qkv8: 8, oSMs: 8},
		{rows: 256, force: 32, qkv: 32, qkv8: 32, oSMs: 16},
		{rows: 1, force: 48, qkv: 48, qkv8: 48, oSMs: 0},
	} {
		sms := c.sms // Options.LoRASMs; 0 in the table: automatic
		if sms == 0 {
			sms = -1
		}
		b := &Backend{cfg: cfg, nRows: c.rows, la: loraAside{sms: sms}, force: kernelForce{qkvSMs: c.force}}
		if got := [3]int{b.productSMs(qkv), b.productSMs(qkv8), b.productSMs(o)}; got != [3]int{c.qkv, c.qkv8, c.oSMs} {
			t.Errorf("%d rows, qkvSMs %d: q/k/v, q/k/v FP8, o leave %v SMs, want %v", c.rows, c.force, got, [3]int{c.qkv, c.qkv8, c.oSMs})
		}
	}
}
