package llama

import (
	"errors"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const base = `"vocab_size":32,"hidden_size":16,"intermediate_size":24,"num_hidden_layers":1,"num_attention_heads":4,`

func TestParseConfig(t *testing.T) {
	for _, tc := range []struct {
		name, json string
		eos        []int
		kvHeads    int
		headDim    int
		err        string
	}{
		{"eos int, MHA default", `{` + base + `"eos_token_id":2}`, []int{2}, 4, 4, ""},
		{"eos list, GQA", `{` + base + `"num_key_value_heads":2,"eos_token_id":[128001,128009]}`, []int{128001, 128009}, 2, 4, ""},
		{"explicit head_dim", `{` + base + `"head_dim":8}`, nil, 4, 8, ""},
		{"bad GQA", `{` + base + `"num_key_value_heads":3}`, nil, 0, 0, "not a multiple"},
		{"bad rope", `{` + base + `"rope_scaling":{"rope_type":"yarn","factor":4}}`, nil, 0, 0, `"yarn" is not supported`},
		{"bad act", `{` + base + `"hidden_act":"gelu"}`, nil, 0, 0, "hidden_act"},
		{"mistral", `{` + base + `"model_type":"mistral","sliding_window":null}`, nil, 4, 4, ""},
		{"qwen2", `{` + base + `"model_type":"qwen2","use_sliding_window":false,"sliding_window":4096}`, nil, 4, 4, ""},
		{"qwen3", `{` + base + `"model_type":"qwen3","head_dim":8}`, nil, 4, 8, ""},
		{"unknown family", `{` + base + `"model_type":"gemma2"}`, nil, 0, 0, `model_type "gemma2" is not supported`},
		{"moe", `{` + base + `"model_type":"qwen3","num_experts":8}`, nil, 0, 0, "mixture-of-experts"},
		{"attention_bias", `{` + base + `"model_type":"qwen3","attention_bias":true}`, nil, 0, 0, "attention_bias"},
		{"missing size", `{"vocab_size":32}`, nil, 0, 0, "hidden_size = 0"},
		{"eos string", `{` + base + `"eos_token_id":"x"}`, nil, 0, 0, "eos_token_id"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := ParseConfig([]byte(tc.json))
			if tc.err != "" {
				if !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err = %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if c.KVHeads != tc.kvHeads || c.HeadDim != tc.headDim || len(c.EOS) != len(tc.eos) {
				t.Errorf("kv %d head %d eos %v", c.KVHeads, c.HeadDim, c.EOS)
			}
		})
	}
}

func TestGenerationConfigEOSWins(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "config.json"), []byte(`{`+base+`"eos_token_id":2}`), 0o644)
	os.WriteFile(filepath.Join(dir, "generation_config.json"), []byte(`{"eos_token_id":[2,1]}`), 0o644)
	c, err := LoadConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(c.EOS) != 2 || c.EOS[1] != 1 {
		t.Errorf("eos %v", c.EOS)
	}
}

// TestInvFreq checks RoPE frequencies against values computed with
// transformers' _compute_llama3_parameters (theta 500000, head_dim 128,
// factor 8, low 1, high 4, original 8192).
func TestInvFreq(t *testing.T) {
	c, err := ParseConfig([]byte(`{"vocab_size":32,"hidden_size":4096,"intermediate_size":24,"num_hidden_layers":1,"num_attention_heads":32,
		"rope_theta":500000,"rope_scaling":{"rope_type":"llama3","factor":8,"low_freq_factor":1,"high_freq_factor":4,"original_max_position_embeddings":8192}}`))
	if err != nil {
		t.Fatal(err)
	}
	f := c.InvFreq()
	if len(f) != 64 {
		t.Fatalf("%d frequencies", len(f))
	}
	// High frequencies are unchanged, low ones divided by the factor, the band between smoothed.
	if f[0] != 1 {
		t.Errorf("f[0] = %v", f[0])
	}
	plain := func(i int) float64 { return 1 / math.Pow(500000, float64(2*i)/128) }
	if math.Abs(float64(f[10])-plain(10)) > 1e-7*plain(10) {
		t.Errorf("f[10] = %v, want unchanged %v", f[10], plain(10))
	}
	if math.Abs(float64(f[63])-plain(63)/8) > 1e-6*plain(63) {
		t.Errorf("f[63] = %v, want %v", f[63], plain(63)/8)
	}
	for i := 1; i < 64; i++ {
		if f[i] >= f[i-1] {
			t.Fatalf("frequencies not decreasing at %d", i)
		}
	}
	lin, _ := ParseConfig([]byte(`{` + base + `"rope_scaling":{"type":"linear","factor":2}}`))
	if got := lin.InvFreq()[0]; got != 0.5 {
		t.Errorf("linear scaling f[0] = %v", got)
	}
}

// TestFamilies: what each family adds, and the context a sliding window
// in use caps.
func TestFamilies(t *testing.T) {
	for _, tc := range []struct {
		name, json     string
		family         string
		qkvBias, qkNrm bool
		maxContext     int
	}{
		{"llama", `{` + base + `"max_position_embeddings":8192}`, "llama", false, false, 8192},
		{"mistral window in use", `{` + base + `"model_type":"mistral","max_position_embeddings":32768,"sliding_window":4096}`, "mistral", false, false, 4096},
		{"mistral no window", `{` + base + `"model_type":"mistral","max_position_embeddings":32768,"sliding_window":null}`, "mistral", false, false, 32768},
		{"qwen2 window off", `{` + base + `"model_type":"qwen2","max_position_embeddings":32768,"use_sliding_window":false,"sliding_window":4096}`, "qwen2", true, false, 32768},
		{"qwen2 window on", `{` + base + `"model_type":"qwen2","max_position_embeddings":32768,"use_sliding_window":true,"sliding_window":4096}`, "qwen2", true, false, 4096},
		{"qwen3", `{` + base + `"model_type":"qwen3","max_position_embeddings":40960}`, "qwen3", false, true, 40960},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := ParseConfig([]byte(tc.json))
			if err != nil {
				t.Fatal(err)
			}
			if c.Family() != tc.family || c.QKVBias() != tc.qkvBias || c.QKNorm() != tc.qkNrm || c.MaxContext() != tc.maxContext {
				t.Errorf("family %s bias %v qknorm %v context %d", c.Family(), c.QKVBias(), c.QKNorm(), c.MaxContext())
			}
		})
	}
}
