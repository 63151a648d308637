package server

import (
	"testing"

	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
)

func TestKVBlocksFor(t *testing.T) {
	// Llama 3.1 8B on an 80 GB card with 70 GiB free.
	c, err := llama.ParseConfig([]byte(`{"vocab_size":128256,"hidden_size":4096,"intermediate_size":14336,"num_hidden_layers":32,
		"num_attention_heads":32,"num_key_value_heads":8,"max_position_embeddings":131072}`))
	if err != nil {
		t.Fatal(err)
	}
	opts := engine.Options{MaxTokens: 2048, BlockSize: 16, AdapterSlots: 8}
	free := uint64(70) << 30
	n := kvBlocksFor(free, c, opts)
	perBlock := 32 * 2 * 16 * 8 * 128 * 2 // 2 MiB a page: 128 KiB per token
	weights := 16.06e9
	// Expect roughly (70 GiB - 10% - 16 GB weights - 8 rank-64 adapters - activations) / 2 MiB.
	want := (0.9*float64(free) - weights - 8*32*64*81920*2 - 2048*(8*4096+3*14336+4*128256)*4) / float64(perBlock)
	if d := float64(n) - want; d > 0.02*want || d < -0.02*want {
		t.Errorf("blocks %d, want about %.0f", n, want)
	}
	if tokens := n * 16; tokens < 300_000 {
		t.Errorf("only %d tokens of KV on 70 GiB", tokens)
	}
	if kvBlocksFor(10<<30, c, opts) != 0 {
		t.Error("a card too small for the weights should get 0 blocks")
	}
}
