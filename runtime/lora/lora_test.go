package lora

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/safetensors"
)

const fixture = "../../testdata/tiny-llama-lora"

func baseConfig(t testing.TB) *llama.Config {
	c, err := llama.LoadConfig(filepath.Join(fixture, "base"))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestLoadFixtureAdapters(t *testing.T) {
	base := baseConfig(t)
	for _, tc := range []struct {
		name    string
		rank    int
		scale   float32
		modules string
	}{
		{"qv-r8", 8, 2, "q_proj,v_proj"},
		{"all-r16", 16, 2, "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"},
		{"attn-r32-rslora", 32, 32 / 5.656854, "q_proj,k_proj,v_proj,o_proj"},
		{"mlp-r64", 64, 2, "gate_proj,up_proj,down_proj"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, err := Load(filepath.Join(fixture, "adapters", tc.name), base)
			if err != nil {
				t.Fatal(err)
			}
			if a.MaxRank() != tc.rank {
				t.Errorf("rank %d, want %d", a.MaxRank(), tc.rank)
			}
			var names []string
			for _, m := range a.Modules() {
				names = append(names, m.String())
			}
			if got := strings.Join(names, ","); got != tc.modules {
				t.Errorf("modules %s, want %s", got, tc.modules)
			}
			p := a.Layers[1][a.Modules()[0]]
			if d := p.Scale - tc.scale; d > 1e-5 || d < -1e-5 {
				t.Errorf("scale %v, want %v", p.Scale, tc.scale)
			}
		})
	}
}

func TestTargetsAndPatterns(t *testing.T) {
	for _, tc := range []struct {
		cfg   string
		path  string
		layer int
		want  bool
		rank  int
	}{
		{`{"r":8,"target_modules":["q_proj"]}`, "model.layers.0.self_attn.q_proj", 0, true, 8},
		{`{"r":8,"target_modules":["q_proj"]}`, "model.layers.0.self_attn.k_proj", 0, false, 8},
		{`{"r":8,"target_modules":".*\\.(q|v)_proj"}`, "model.layers.3.self_attn.v_proj", 3, true, 8},
		{`{"r":8,"target_modules":".*\\.(q|v)_proj"}`, "model.layers.3.mlp.up_proj", 3, false, 8},
		{`{"r":8,"target_modules":"all-linear"}`, "model.layers.1.mlp.down_proj", 1, true, 8},
		{`{"r":8,"target_modules":["q_proj"],"layers_to_transform":[1]}`, "model.layers.0.self_attn.q_proj", 0, false, 8},
		{`{"r":8,"target_modules":["q_proj"],"layers_to_transform":1,"layers_pattern":"layers"}`, "model.layers.1.self_attn.q_proj", 1, true, 8},
		{`{"r":8,"target_modules":["q_proj","v_proj"],"exclude_modules":["v_proj"]}`, "model.layers.0.self_attn.v_proj", 0, false, 8},
		{`{"r":8,"target_modules":["q_proj"],"rank_pattern":{"layers.0.self_attn.q_proj":4,"q_proj":2}}`, "model.layers.0.self_attn.q_proj", 0, true, 4},
		{`{"r":8,"target_modules":["q_proj"],"rank_pattern":{"layers.0.self_attn.q_proj":4,"q_proj":2}}`, "model.layers.1.self_attn.q_proj", 1, true, 2},
	} {
		c, err := ParseConfig([]byte(tc.cfg))
		if err != nil {
			t.Fatalf("%s: %v", tc.cfg, err)
		}
		if got := c.Targets(tc.path, tc.layer); got != tc.want {
			t.Errorf("%s: Targets(%s) = %v", tc.cfg, tc.path, got)
		}
		if r, _ := c.RankAlpha(tc.path); r != tc.rank {
			t.Errorf("%s: rank of %s = %d, want %d", tc.cfg, tc.path, r, tc.rank)
		}
	}
}

func TestRefused(t *testing.T) {
	for _, tc := range []struct {
		cfg  string
		want error
		msg  string
	}{
		{`{"r":8,"target_modules":["q_proj"],"use_dora":true}`, ErrUnsupported, "use_dora"},
		{`{"r":8,"target_modules":["q_proj"],"bias":"all"}`, ErrUnsupported, "bias"},
		{`{"r":8,"target_modules":["q_proj"],"modules_to_save":["lm_head"]}`, ErrUnsupported, "modules_to_save"},
		{`{"r":8,"target_modules":["q_proj"],"fan_in_fan_out":true}`, ErrUnsupported, "fan_in_fan_out"},
		{`{"r":8,"target_modules":["q_proj"],"peft_type":"IA3"}`, ErrUnsupported, "peft_type"},
		{`{"r":0,"target_modules":["q_proj"]}`, ErrConfig, "r = 0"},
		{`{"r":8}`, ErrConfig, "target_modules"},
		{`{"r":8,"target_modules":"(?<=x)q"}`, ErrConfig, "regular expression"},
		{`{"r":8,"target_modules":5}`, ErrConfig, "target_modules"},
		{`not json`, ErrConfig, ""},
	} {
		_, err := ParseConfig([]byte(tc.cfg))
		if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.msg) {
			t.Errorf("%s: err = %v, want %v mentioning %q", tc.cfg, err, tc.want, tc.msg)
		}
	}
}

// writeAdapter writes an adapter folder with one q_proj pair per layer.
func writeAdapter(t *testing.T, cfg string, tensors []safetensors.Tensor) string {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, ConfigFile), []byte(cfg), 0o644)
	b, err := safetensors.Encode(tensors, nil)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, WeightsFile), b, 0o644)
	return dir
}

func pair(layer int, mod string, r, in, out int) []safetensors.Tensor {
	p := "base_model.model.model.layers." + string(rune('0'+layer)) + ".self_attn." + mod
	a := make([]float32, r*in)
	for i := range a {
		a[i] = 0.01
	}
	return []safetensors.Tensor{
		safetensors.F32Tensor(p+".lora_A.weight", []int{r, in}, a),
		safetensors.F32Tensor(p+".lora_B.weight", []int{out, r}, make([]float32, out*r)),
	}
}

func TestBadAdapters(t *testing.T) {
	base := baseConfig(t) // hidden 128, q out 128, kv out 64, 2 layers
	ok := append(pair(0, "q_proj", 4, 128, 128), pair(1, "q_proj", 4, 128, 128)...)
	cfg := `{"r":4,"lora_alpha":8,"target_modules":["q_proj"]}`
	if _, err := Load(writeAdapter(t, cfg, ok), base); err != nil {
		t.Fatalf("valid adapter refused: %v", err)
	}
	for _, tc := range []struct {
		name    string
		cfg     string
		tensors []safetensors.Tensor
		want    error
		msg     string
	}{
		{"shape", cfg, append(pair(0, "q_proj", 4, 96, 128), pair(1, "q_proj", 4, 128, 128)...), ErrMismatch, "[r, 128]"},
		{"B shape", cfg, append(pair(0, "q_proj", 4, 128, 64), pair(1, "q_proj", 4, 128, 128)...), ErrMismatch, "want [128, 4]"},
		{"rank", `{"r":8,"target_modules":["q_proj"]}`, ok, ErrMismatch, "rank 4"},
		{"unknown module", `{"r":4,"target_modules":["q_proj","wq"]}`, ok, ErrMismatch, `unknown target module "wq"`},
		{"missing layer", cfg, pair(0, "q_proj", 4, 128, 128), ErrMismatch, "no weights"},
		{"layer past end", cfg, append(ok, pair(7, "q_proj", 4, 128, 128)...), ErrMismatch, "layer 7"},
		{"untargeted", cfg, append(ok, pair(0, "k_proj", 4, 128, 64)...), ErrMismatch, "does not select"},
		{"extra tensor", cfg, append(ok, safetensors.F32Tensor("base_model.model.lm_head.weight", []int{1}, []float32{1})), ErrUnsupported, "lm_head"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Load(writeAdapter(t, tc.cfg, tc.tensors), base)
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("err = %v, want %v mentioning %q", err, tc.want, tc.msg)
			}
		})
	}
	t.Run("missing files", func(t *testing.T) {
		if _, err := Load(t.TempDir(), base); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("err = %v", err)
		}
	})
	t.Run("truncated", func(t *testing.T) {
		dir := writeAdapter(t, cfg, ok)
		p := filepath.Join(dir, WeightsFile)
		b, _ := os.ReadFile(p)
		os.WriteFile(p, b[:len(b)-10], 0o644)
		if _, err := Load(dir, base); !errors.Is(err, safetensors.ErrFormat) {
			t.Fatalf("err = %v", err)
		}
	})
	t.Run("dtype", func(t *testing.T) {
		bad := append([]safetensors.Tensor{}, ok...)
		bad[0] = safetensors.Tensor{Name: bad[0].Name, DType: safetensors.I32, Shape: []int{4, 128}, Data: make([]byte, 4*4*128)}
		if _, err := Load(writeAdapter(t, cfg, bad), base); !errors.Is(err, safetensors.ErrDType) {
			t.Fatalf("err = %v", err)
		}
	})
}

func FuzzParseConfig(f *testing.F) {
	for _, s := range []string{
		`{"r":8,"lora_alpha":16,"target_modules":["q_proj","v_proj"]}`,
		`{"r":8,"target_modules":".*q_proj","rank_pattern":{"q":4},"alpha_pattern":{"x":2}}`,
		`{"r":8,"target_modules":["q_proj"],"layers_to_transform":[0,1],"layers_pattern":["layers"]}`,
		`{"r":1e300,"target_modules":[]}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := ParseConfig(b)
		if err != nil {
			return
		}
		if c.R <= 0 || c.R > 4096 {
			t.Fatalf("accepted r = %d", c.R)
		}
		c.Targets("model.layers.0.self_attn.q_proj", 0)
		c.RankAlpha("model.layers.0.mlp.down_proj")
	})
}
