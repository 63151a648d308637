package adaptertest

import (
	"encoding/binary"
	"fmt"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/safetensors"
)

// Llama8B is the config of Llama-3.1-8B (no weights): hidden 4096,
// intermediate 14336, 32 layers, 32 heads, 8 KV heads, head_dim 128.
func Llama8B(tb testing.TB) *llama.Config {
	tb.Helper()
	c, err := llama.ParseConfig([]byte(`{"architectures":["LlamaForCausalLM"],"model_type":"llama","vocab_size":128256,
		"hidden_size":4096,"intermediate_size":14336,"num_hidden_layers":32,"num_attention_heads":32,
		"num_key_value_heads":8,"head_dim":128,"max_position_embeddings":131072,"rms_norm_eps":1e-5,"rope_theta":500000}`))
	if err != nil {
		tb.Fatal(err)
	}
	return c
}

// Random is an adapter for base (config and weights) of rank r on all seven
// projections of every layer, its weights bf16 drawn like LoRA weights
// (normal, std 0.02) from seed: about 168 MB for Llama8B at rank 32.
func Random(tb testing.TB, base *llama.Config, r int, seed uint64) (cfg, weights []byte) {
	tb.Helper()
	rng := rand.New(rand.NewPCG(seed, 1))
	var ts []safetensors.Tensor
	bf16 := func(n int) []byte {
		b := make([]byte, 2*n)
		for i := 0; i < len(b); i += 2 {
			binary.LittleEndian.PutUint16(b[i:], uint16(math.Float32bits(float32(rng.NormFloat64()*0.02))>>16))
		}
		return b
	}
	for l := range base.Layers {
		for m := llama.Module(0); m < llama.NumModules; m++ {
			in, out := base.Dims(m)
			name := "base_model.model." + m.Path(l)
			ts = append(ts,
				safetensors.Tensor{Name: name + ".lora_A.weight", DType: safetensors.BF16, Shape: []int{r, in}, Data: bf16(r * in)},
				safetensors.Tensor{Name: name + ".lora_B.weight", DType: safetensors.BF16, Shape: []int{out, r}, Data: bf16(out * r)})
		}
	}
	weights, err := safetensors.Encode(ts, map[string]string{"format": "pt"})
	if err != nil {
		tb.Fatal(err)
	}
	cfg = fmt.Appendf(nil, `{"peft_type":"LORA","task_type":"CAUSAL_LM","r":%d,"lora_alpha":%d,"bias":"none",`+
		`"target_modules":["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]}`, r, 2*r)
	return cfg, weights
}
