package engine_test

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/peftd/peftd/internal/fixture"
	"github.com/peftd/peftd/runtime/cpu"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/safetensors"
)

// TestFP8Checkpoint loads an FP8 checkpoint in the compressed-tensors
// "FP8 dynamic" layout (F8_E4M3 projection weights, a float32 weight_scale
// per output row; one layer's q_proj with a single scale for the whole
// tensor) made from the tiny fixture model, and checks that the engine
// computes exactly what it computes from a bf16 checkpoint holding the
// dequantized weights (Q * scale rounded to bf16); then that a
// checkpoint missing a scale, FP8 without a quantization_config and an
// unsupported quant_method are refused with errors that say so.
func TestFP8Checkpoint(t *testing.T) {
	src, err := llama.Open(filepath.Join(fixture.Dir(), "base"))
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	var cfgJSON map[string]any
	b, err := os.ReadFile(filepath.Join(fixture.Dir(), "base", "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &cfgJSON); err != nil {
		t.Fatal(err)
	}
	var fp8, ref []safetensors.Tensor
	for _, name := range src.Tensors.Names() {
		raw, info, err := src.Tensors.Bytes(name)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.HasSuffix(name, "_proj.weight") {
			fp8 = append(fp8, safetensors.Tensor{Name: name, DType: info.DType, Shape: info.Shape, Data: raw})
			ref = append(ref, safetensors.Tensor{Name: name, DType: info.DType, Shape: info.Shape, Data: raw})
			continue
		}
		w, _, err := src.Tensors.Float32(name)
		if err != nil {
			t.Fatal(err)
		}
		rows, cols := info.Shape[0], info.Shape[1]
		perTensor := name == "model.layers.1.self_attn.q_proj.weight"
		scales := make([]float32, rows)
		for r := range rows {
			amax := 0.0
			lo, hi := r*cols, (r+1)*cols
			if perTensor {
				lo, hi = 0, len(w)
			}
			for _, v := range w[lo:hi] {
				amax = math.Max(amax, math.Abs(float64(v)))
			}
			scales[r] = float32(max(amax, 1e-12) / 448)
		}
		q := make([]byte, len(w))
		deq := make([]byte, 2*len(w))
		for i, v := range w {
			s := scales[i/cols]
			q[i] = safetensors.Float32ToE4M3(v / s)
			binary.LittleEndian.PutUint16(deq[2*i:], safetensors.Float32ToBF16(safetensors.E4M3ToFloat32(q[i])*s))
		}
		scaleShape, scaleVals := []int{rows, 1}, scales
		if perTensor {
			scaleShape, scaleVals = []int{1}, scales[:1]
		}
		fp8 = append(fp8, safetensors.Tensor{Name: name, DType: safetensors.F8E4, Shape: info.Shape, Data: q},
			safetensors.F32Tensor(llama.ScaleName(name), scaleShape, scaleVals))
		ref = append(ref, safetensors.Tensor{Name: name, DType: safetensors.BF16, Shape: info.Shape, Data: deq})
	}
	quant := map[string]any{"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": []string{"lm_head"},
		"config_groups": map[string]any{"group_0": map[string]any{"targets": []string{"Linear"},
			"weights":           map[string]any{"num_bits": 8, "type": "float", "strategy": "channel", "dynamic": false, "symmetric": true},
			"input_activations": map[string]any{"num_bits": 8, "type": "float", "strategy": "token", "dynamic": true}}}}
	write := func(tensors []safetensors.Tensor, q any) string {
		dir := t.TempDir()
		c := map[string]any{}
		for k, v := range cfgJSON {
			c[k] = v
		}
		if q != nil {
			c["quantization_config"] = q
		}
		cb, _ := json.Marshal(c)
		data, err := safetensors.Encode(tensors, nil)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "config.json"), cb, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "model.safetensors"), data, 0o644); err != nil {
			t.Fatal(err)
		}
		return dir
	}
	logits := func(dir string) [][]float32 {
		m, err := llama.Open(dir)
		if err != nil {
			t.Fatal(err)
		}
		defer m.Close()
		e, err := engine.New(m, cpu.New(1), engine.Options{MaxTokens: 64, KVBlocks: 16, BlockSize: 16})
		if err != nil {
			t.Fatal(err)
		}
		defer e.Close()
		out, err := e.Step(context.Background(), []engine.Input{{Seq: &engine.Sequence{}, Tokens: []int32{1, 17, 42, 99, 7}, Slot: -1, AllLogits: true}})
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
	got, want := logits(write(fp8, quant)), logits(write(ref, nil))
	if !slices.Equal(got[0], want[0]) {
		t.Errorf("FP8 checkpoint: logits differ from the dequantized bf16 checkpoint's (relative %.3g)", fixture.RelErr(got[0], want[0]))
	}
	orig := logits(filepath.Join(fixture.Dir(), "base"))
	t.Logf("FP8 weights vs the original model: logits relative error %.3g", fixture.RelErr(got[0], orig[0]))

	// Refusals.
	noScale := slices.DeleteFunc(slices.Clone(fp8), func(x safetensors.Tensor) bool {
		return x.Name == llama.ScaleName("model.layers.0.mlp.down_proj.weight")
	})
	for _, c := range []struct {
		what    string
		dir     string
		is      error
		message string
	}{
		{"a missing scale", write(noScale, quant), llama.ErrShape, "lacks model.layers.0.mlp.down_proj.weight_scale"},
		{"FP8 weights without quantization_config", write(fp8, nil), safetensors.ErrDType, "no quantization_config"},
		{"GPTQ", write(fp8, map[string]any{"quant_method": "gptq", "bits": 4}), llama.ErrConfig, `quant_method "gptq"`},
	} {
		_, err := llama.Open(c.dir)
		if !errors.Is(err, c.is) || !strings.Contains(fmtErr(err), c.message) {
			t.Errorf("%s: %v, want %v saying %q", c.what, err, c.is, c.message)
		}
	}
}

func fmtErr(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}
