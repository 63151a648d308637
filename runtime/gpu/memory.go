package gpu

import (
	"fmt"

	"github.com/peftd/peftd/runtime/llama"
)

// MemoryNeeds is what a Backend for model c takes of device memory besides
// its KV cache (fixed: the weights in weightFormat, adapterSlots adapters
// of rank 64 on every projection, a step of maxTokens rows' activations and
// logits) and what one KV page of blockSize tokens takes (perBlock: K and V
// of every layer, in kvFormat). A caller sizes the KV cache from free device
// memory with it before it creates the backend.
func MemoryNeeds(c *llama.Config, maxTokens, blockSize, adapterSlots int, weightFormat, kvFormat string) (fixed, perBlock uint64, err error) {
	format, err := ParseWeightFormat(weightFormat)
	if err != nil {
		return 0, 0, err
	}
	kv, err := ParseKVFormat(kvFormat)
	if err != nil {
		return 0, 0, err
	}
	if maxTokens <= 0 || blockSize <= 0 || adapterSlots < 0 {
		return 0, 0, fmt.Errorf("gpu: memory needs of %d rows, pages of %d, %d adapter slots", maxTokens, blockSize, adapterSlots)
	}
	const bf16 = 2
	var weights, adapter uint64
	for _, s := range c.Expected() {
		n := uint64(1)
		for _, d := range s.Shape {
			n *= uint64(d)
		}
		if format == WeightsFP8 && fp8Projection(s.Name, s.Shape) {
			weights += n + 4*uint64(s.Shape[0]) // e4m3 values, a float32 scale per row
			continue
		}
		weights += n * bf16
	}
	for m := llama.Module(0); m < llama.NumModules; m++ {
		in, out := c.Dims(m)
		adapter += uint64(c.Layers) * 64 * uint64(in+out) * bf16
	}
	// activations: the residual, norms and projections' outputs (bf16 and
	// float32 scratch), the LoRA updates, and float32 logits of every row
	acts := uint64(maxTokens) * uint64(8*c.Hidden+3*c.Intermediate+4*c.VocabSize) * 4
	perToken := uint64(c.KVHeads*c.HeadDim) * 2 * bf16 // K and V
	if kv == KVFP8 {
		perToken = uint64(c.KVHeads*c.HeadDim)*(1+bf16) + uint64(c.KVHeads)*4 // e4m3 K, its scales, bf16 V
	}
	perBlock = uint64(c.Layers) * uint64(blockSize) * perToken
	return weights + uint64(adapterSlots)*adapter + acts, perBlock, nil
}
