package server

import (
	"testing"

	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/gpu"
	"github.com/peftd/peftd/runtime/llama"
)

// TestKVBlocksFor: Llama 3.1 8B on a card with 70 GiB free gets what is
// left after 10% reserve, its weights (16 GB in bf16, ~8 GB in fp8), eight
// rank-64 adapters and a step's activations, in 2 MiB pages; a card too
// small for the weights gets none.
func TestKVBlocksFor(t *testing.T) {
	c, err := llama.ParseConfig([]byte(`{"vocab_size":128256,"hidden_size":4096,"intermediate_size":14336,"num_hidden_layers":32,
		"num_attention_heads":32,"num_key_value_heads":8,"max_position_embeddings":131072}`))
	if err != nil {
		t.Fatal(err)
	}
	opts := engine.Options{MaxTokens: 2048, BlockSize: 16, AdapterSlots: 8}
	free := uint64(70) << 30
	const perBlock = 32 * 2 * 16 * 8 * 128 * 2 // 2 MiB a page: 128 KiB per token
	adapters := 8.0 * 32 * 64 * 81920 * 2
	acts := 2048.0 * (8*4096 + 3*14336 + 4*128256) * 4
	for _, tc := range []struct {
		weights string
		bytes   float64 // the weights on the device
	}{
		{gpu.WeightsBF16, 16.06e9},
		// projections in e4m3 with a float32 scale per row; embeddings,
		// norms and lm_head (2 x 1.05 GB) stay bf16
		{gpu.WeightsFP8, 6.98e9 + 2*1.0507e9},
	} {
		n, err := kvBlocksFor(free, c, opts, tc.weights, gpu.KVBF16)
		if err != nil {
			t.Fatal(err)
		}
		want := (0.9*float64(free) - tc.bytes - adapters - acts) / perBlock
		if d := float64(n) - want; d > 0.01*want || d < -0.01*want {
			t.Errorf("%s: blocks %d, want about %.0f", tc.weights, n, want)
		}
		if tokens := n * 16; tokens < 300_000 {
			t.Errorf("%s: only %d tokens of KV on 70 GiB", tc.weights, tokens)
		}
		if n, err := kvBlocksFor(10<<30, c, opts, tc.weights, ""); n != 0 || err != nil {
			t.Errorf("%s: a card too small for the weights: %d blocks, %v; want 0", tc.weights, n, err)
		}
	}
	if _, err := kvBlocksFor(free, c, opts, "int4", ""); err == nil {
		t.Error("an unknown weight format was accepted")
	}
	// FP8 keys: 96 KiB + 1 KiB of scales a token instead of 128 KiB, so a
	// third more tokens
	n16, _ := kvBlocksFor(free, c, opts, gpu.WeightsBF16, gpu.KVBF16)
	n8, err := kvBlocksFor(free, c, opts, gpu.WeightsBF16, gpu.KVFP8)
	if err != nil {
		t.Fatal(err)
	}
	if r := float64(n8) / float64(n16); r < 1.31 || r > 1.33 {
		t.Errorf("FP8 keys: %d blocks against %d in bf16 (x%.3f), want x%.3f", n8, n16, r, 128.0/(96+1))
	}
	if _, err := kvBlocksFor(free, c, opts, gpu.WeightsBF16, "int8"); err == nil {
		t.Error("an unknown KV cache format was accepted")
	}
}
