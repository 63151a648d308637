package lora

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/peftd/peftd/runtime/safetensors"
)

// TestScaleAndRankRefused: a config whose scale (alpha/r, alpha/sqrt(r)) is
// not finite in float32 or past MaxScale, or whose rank is past what the
// base model serves, is refused by Check, naming the field, before any
// weight is read; Build refuses it too.
func TestScaleAndRankRefused(t *testing.T) {
	base := baseConfig(t) // hidden 128: MaxRank 128
	if got := MaxRank(base); got != 128 {
		t.Fatalf("MaxRank = %d, want 128 (hidden_size)", got)
	}
	for _, tc := range []struct {
		name string
		cfg  string
		want error
		msg  []string
	}{
		{"alpha 1e300", `{"r":8,"lora_alpha":1e300,"target_modules":["q_proj"]}`, ErrConfig,
			[]string{"lora_alpha 1e+300 gives scale alpha/r = 1e+300/8 = +Inf in float32", "model.layers.0.self_attn.q_proj"}},
		{"alpha -1e300", `{"r":8,"lora_alpha":-1e300,"target_modules":["q_proj"]}`, ErrConfig, []string{"lora_alpha", "-Inf"}},
		{"alpha 1e38", `{"r":8,"lora_alpha":1e38,"target_modules":["q_proj"]}`, ErrConfig, []string{"lora_alpha 1e+38", "|scale| <= 10000"}},
		{"alpha past MaxScale", `{"r":1,"lora_alpha":10001,"target_modules":["q_proj"]}`, ErrConfig, []string{"lora_alpha 10001", "= 10001 in float32"}},
		{"rslora", `{"r":4,"lora_alpha":1e5,"use_rslora":true,"target_modules":["v_proj"]}`, ErrConfig,
			[]string{"alpha/sqrt(r) = 100000/sqrt(4) = 50000", "v_proj"}},
		{"alpha_pattern", `{"r":8,"lora_alpha":16,"alpha_pattern":{"k_proj":1e300},"target_modules":["q_proj","k_proj"]}`, ErrConfig,
			[]string{`alpha_pattern["k_proj"] 1e+300`, "+Inf", "k_proj"}},
		{"rank_pattern 0", `{"r":8,"rank_pattern":{"q_proj":0},"target_modules":["q_proj"]}`, ErrConfig, []string{`rank_pattern["q_proj"] = 0`}},
		{"rank_pattern -0", `{"r":8,"rank_pattern":{"q_proj":-0.0},"target_modules":["q_proj"]}`, ErrConfig, []string{`rank_pattern["q_proj"] = -0`}},
		{"rank_pattern fraction", `{"r":8,"rank_pattern":{"q_proj":2.5},"target_modules":["q_proj"]}`, ErrConfig, []string{`rank_pattern["q_proj"] = 2.5`}},
		{"rank_pattern huge", `{"r":8,"rank_pattern":{"q_proj":1e300},"target_modules":["q_proj"]}`, ErrConfig, []string{`rank_pattern["q_proj"] = 1e+300`}},
		{"r -0", `{"r":-0,"target_modules":["q_proj"]}`, ErrConfig, []string{"r = 0"}},
		{"r past hidden", `{"r":256,"target_modules":["q_proj"]}`, ErrMismatch, []string{"r = 256", "above 128", "hidden_size 128"}},
		{"rank_pattern past hidden", `{"r":8,"rank_pattern":{"o_proj":512},"target_modules":["q_proj","o_proj"]}`, ErrMismatch,
			[]string{`rank_pattern["o_proj"] = 512`, "above 128"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := ParseConfig([]byte(tc.cfg))
			if err == nil {
				err = c.Check(base)
			}
			checkErr(t, err, tc.want, tc.msg...)
			// Build refuses it the same way, whatever the weights.
			_, err = Load(writeAdapter(t, tc.cfg, pair(0, "q_proj", 8, 128, 128)), base)
			checkErr(t, err, tc.want, tc.msg...)
		})
	}
	// At the bounds: accepted.
	for _, cfg := range []string{
		`{"r":1,"lora_alpha":10000,"target_modules":["q_proj"]}`,
		`{"r":128,"lora_alpha":-1280000,"target_modules":["q_proj"]}`,
		`{"r":8,"lora_alpha":16,"alpha_pattern":{"k_proj":1e300},"target_modules":["q_proj"]}`, // k_proj is not targeted
	} {
		c, err := ParseConfig([]byte(cfg))
		if err == nil {
			err = c.Check(base)
		}
		if err != nil {
			t.Errorf("%s refused: %v", cfg, err)
		}
	}
}

// checkErr: err is want, its message says each of msg, and no sentinel
// prefix comes twice (nor the package's "lora:").
func checkErr(t *testing.T, err, want error, msg ...string) {
	t.Helper()
	if !errors.Is(err, want) {
		t.Fatalf("err = %v, want %v", err, want)
	}
	s := err.Error()
	for _, m := range msg {
		if !strings.Contains(s, m) {
			t.Errorf("error %q does not say %q", s, m)
		}
	}
	if strings.Contains(s, "lora:") {
		t.Errorf("error %q carries the package prefix", s)
	}
	var le *Error
	if errors.As(err, &le) && strings.Count(s, strings.TrimPrefix(le.Kind.Error(), "lora: ")) > 1 {
		t.Errorf("error %q repeats its kind", s)
	}
}

// TestNonFiniteWeights: a NaN or an infinity in lora_A or lora_B is refused,
// naming the tensor.
func TestNonFiniteWeights(t *testing.T) {
	base := baseConfig(t)
	cfg := `{"r":4,"lora_alpha":8,"target_modules":["q_proj"]}`
	for _, tc := range []struct {
		name   string
		tensor int // 0: layer 0's lora_A, 1: its lora_B
		value  float32
		say    string
	}{
		{"NaN in A", 0, float32(math.NaN()), "NaN"},
		{"+Inf in B", 1, float32(math.Inf(1)), "+Inf"},
		{"-Inf in A", 0, float32(math.Inf(-1)), "-Inf"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ts := append(pair(0, "q_proj", 4, 128, 128), pair(1, "q_proj", 4, 128, 128)...)
			v := make([]float32, ts[tc.tensor].Shape[0]*ts[tc.tensor].Shape[1])
			v[3] = tc.value
			ts[tc.tensor] = safetensors.F32Tensor(ts[tc.tensor].Name, ts[tc.tensor].Shape, v)
			_, err := Load(writeAdapter(t, cfg, ts), base)
			checkErr(t, err, ErrWeights, ts[tc.tensor].Name, tc.say, "element 3")
		})
	}
}

// TestWeightsHeader: the header of adapter_model.safetensors is checked
// against the base model from a stream, before any data: wrong shapes,
// ranks past MaxRank, duplicate tensors and gaps are refused after reading
// the header alone; a fixture adapter's header passes and its file fits
// MaxWeightsBytes.
func TestWeightsHeader(t *testing.T) {
	base := baseConfig(t)
	for _, name := range []string{"qv-r8", "all-r16", "attn-r32-rslora", "mlp-r64"} {
		b, err := os.ReadFile(filepath.Join(fixture, "adapters", name, WeightsFile))
		if err != nil {
			t.Fatal(err)
		}
		if int64(len(b)) > MaxWeightsBytes(base) {
			t.Errorf("%s: %d bytes, past MaxWeightsBytes %d", name, len(b), MaxWeightsBytes(base))
		}
		f, prefix, err := ReadWeightsHeader(bytes.NewReader(b), base)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if int64(len(prefix))+f.DataSize() != int64(len(b)) {
			t.Errorf("%s: header describes %d bytes, the file has %d", name, int64(len(prefix))+f.DataSize(), len(b))
		}
	}
	// every projection of both layers at rank 128 in F32: 2*(4*... ) per layer, plus the header bound
	if got, want := MaxWeightsBytes(base), int64(2*128*4*(256+192+192+256+3*480)+8+MaxHeaderBytes(base)); got != want {
		t.Errorf("MaxWeightsBytes = %d, want %d", got, want)
	}

	// header builds a header (no data: the reader must not need it).
	header := func(json string) []byte {
		b := make([]byte, 8+len(json))
		binary.LittleEndian.PutUint64(b, uint64(len(json)))
		copy(b[8:], json)
		return b
	}
	const q = "base_model.model.model.layers.0.self_attn.q_proj"
	for _, tc := range []struct {
		name string
		buf  []byte
		want error
		msg  []string
	}{
		{"huge rank", header(`{"` + q + `.lora_A.weight":{"dtype":"F32","shape":[100000000,128],"data_offsets":[0,51200000000]},` +
			`"` + q + `.lora_B.weight":{"dtype":"F32","shape":[128,100000000],"data_offsets":[51200000000,102400000000]}}`),
			ErrMismatch, []string{"rank 100000000", "want 1..128"}},
		{"wrong width", header(`{"` + q + `.lora_A.weight":{"dtype":"F32","shape":[8,4096],"data_offsets":[0,131072]},` +
			`"` + q + `.lora_B.weight":{"dtype":"F32","shape":[128,8],"data_offsets":[131072,135168]}}`),
			ErrMismatch, []string{"[r, 128]"}},
		{"rank 0", header(`{"` + q + `.lora_A.weight":{"dtype":"F32","shape":[0,128],"data_offsets":[0,0]},` +
			`"` + q + `.lora_B.weight":{"dtype":"F32","shape":[128,0],"data_offsets":[0,0]}}`),
			ErrMismatch, []string{"rank 0"}},
		{"two adapters", header(`{"` + q + `.lora_A.weight":{"dtype":"F32","shape":[1,128],"data_offsets":[0,512]},` +
			`"` + q + `.lora_A.other.weight":{"dtype":"F32","shape":[1,128],"data_offsets":[512,1024]}}`),
			ErrUnsupported, []string{"two lora_A"}},
		{"gap", header(`{"` + q + `.lora_A.weight":{"dtype":"F32","shape":[1,128],"data_offsets":[0,512]},` +
			`"` + q + `.lora_B.weight":{"dtype":"F32","shape":[128,1],"data_offsets":[4096,4608]}}`),
			ErrCorrupt, []string{"adapter_model.safetensors is corrupt", "belong to no tensor"}},
		{"int dtype", header(`{"` + q + `.lora_A.weight":{"dtype":"I32","shape":[1,128],"data_offsets":[0,512]},` +
			`"` + q + `.lora_B.weight":{"dtype":"F32","shape":[128,1],"data_offsets":[512,1024]}}`),
			ErrUnsupported, []string{"dtype I32"}},
		{"header past its bound", func() []byte {
			b := make([]byte, 8)
			binary.LittleEndian.PutUint64(b, uint64(MaxHeaderBytes(base)+1))
			return b
		}(), ErrCorrupt, []string{"adapter_model.safetensors is corrupt", "exceeds"}},
		{"zeros", make([]byte, 4096), ErrCorrupt, []string{"adapter_model.safetensors is corrupt", "header JSON"}},
		{"short", []byte{1, 0, 0}, ErrCorrupt, []string{"adapter_model.safetensors is truncated"}},
		{"header cut", header(`{"a":1}`)[:10], ErrCorrupt, []string{"adapter_model.safetensors is truncated", "header length 7"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := ReadWeightsHeader(bytes.NewReader(tc.buf), base)
			checkErr(t, err, tc.want, tc.msg...)
		})
	}
}

// TestTruncatedWording: a truncated or garbled weights file says so, once,
// instead of "does not fit the base model".
func TestTruncatedWording(t *testing.T) {
	base := baseConfig(t)
	cfg, err := os.ReadFile(filepath.Join(fixture, "adapters", "qv-r8", ConfigFile))
	if err != nil {
		t.Fatal(err)
	}
	w, err := os.ReadFile(filepath.Join(fixture, "adapters", "qv-r8", WeightsFile))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name    string
		weights []byte
		msg     string
	}{
		{"half", w[:len(w)/2], "adapter_model.safetensors is truncated: the header describes"},
		{"short", w[:5], "adapter_model.safetensors is truncated"},
		{"garbage", bytes.Repeat([]byte{0xff}, 4096), "adapter_model.safetensors is corrupt: header length"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse("x", cfg, tc.weights, base)
			checkErr(t, err, ErrCorrupt, tc.msg)
			if !errors.Is(err, safetensors.ErrFormat) || errors.Is(err, ErrMismatch) || strings.Contains(err.Error(), "does not fit") {
				t.Errorf("err = %v: want ErrCorrupt and safetensors.ErrFormat only", err)
			}
		})
	}
}
