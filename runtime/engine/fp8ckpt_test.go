package engine_test

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
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
	ck := fixture.NewFP8Checkpoint(t)
	fp8, ref, quant := ck.FP8, ck.Deq, ck.Quant
	write := func(ts []safetensors.Tensor, q any) string { return ck.Write(t, ts, q) }
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

// fp8Keeper is the CPU backend with engine.FP8Uploader: it records the FP8
// weights the engine hands it and computes with them dequantized (q *
// scale rounded to bf16), as the engine's own dequantization does.
type fp8Keeper struct {
	*cpu.Backend
	got map[string]fp8Kept
}

type fp8Kept struct {
	rows, cols int
	q          []byte
	scale      []float32
}

func (k *fp8Keeper) KeepsFP8(name string, rows, cols int) bool {
	return strings.HasSuffix(name, "_proj.weight")
}

func (k *fp8Keeper) UploadFP8(name string, rows, cols int, parts [][]byte, scale []float32) (engine.Weight, error) {
	q := slices.Concat(parts...)
	k.got[name] = fp8Kept{rows, cols, q, slices.Clone(scale)}
	deq := make([]byte, 2*len(q))
	for i, b := range q {
		binary.LittleEndian.PutUint16(deq[2*i:], safetensors.Float32ToBF16(safetensors.E4M3ToFloat32(b)*scale[i/cols]))
	}
	return k.Backend.Upload(name, safetensors.BF16, []int{rows, cols}, deq)
}

// TestFP8CheckpointKeptFP8: a backend that computes in FP8 gets an FP8
// checkpoint's projections as stored (q, k, v and gate, up stacked, one
// scale per row, layer 1's per-tensor q_proj scale repeated), and the
// logits are those of the dequantized checkpoint. A stack with a bf16
// part (layer 0's k_proj) is uploaded dequantized instead. A NaN e4m3 byte
// or a scale that is not finite is refused, naming the tensor.
func TestFP8CheckpointKeptFP8(t *testing.T) {
	ck := fixture.NewFP8Checkpoint(t)
	fp8, ref, quant := ck.FP8, ck.Deq, ck.Quant
	write := func(ts []safetensors.Tensor, q any) string { return ck.Write(t, ts, q) }
	tensor := func(ts []safetensors.Tensor, name string) safetensors.Tensor {
		i := slices.IndexFunc(ts, func(x safetensors.Tensor) bool { return x.Name == name })
		if i < 0 {
			t.Fatalf("no tensor %s", name)
		}
		return ts[i]
	}
	run := func(dir string) ([]float32, *fp8Keeper, error) {
		m, err := llama.Open(dir)
		if err != nil {
			return nil, nil, err
		}
		defer m.Close()
		k := &fp8Keeper{Backend: cpu.New(1), got: map[string]fp8Kept{}}
		e, err := engine.New(m, k, engine.Options{MaxTokens: 64, KVBlocks: 16, BlockSize: 16})
		if err != nil {
			return nil, nil, err
		}
		defer e.Close()
		out, err := e.Step(context.Background(), []engine.Input{{Seq: &engine.Sequence{}, Tokens: []int32{1, 17, 42, 99, 7}, Slot: -1, AllLogits: true}})
		if err != nil {
			return nil, nil, err
		}
		return out[0], k, nil
	}
	want, _, err := run(write(ref, nil))
	if err != nil {
		t.Fatal(err)
	}
	got, k, err := run(write(fp8, quant))
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(got, want) {
		t.Errorf("logits differ from the dequantized checkpoint's (relative %.3g)", fixture.RelErr(got, want))
	}
	layers := 0
	for _, x := range fp8 {
		if strings.HasSuffix(x.Name, "o_proj.weight") {
			layers++
		}
	}
	if len(k.got) != 4*layers {
		t.Errorf("%d weights kept in FP8, want %d (qkv, o, gate_up, down per layer)", len(k.got), 4*layers)
	}
	// what a stacked weight must be: the parts' bytes in order, one scale per row
	expect := func(names ...string) fp8Kept {
		var e fp8Kept
		for _, n := range names {
			w, s := tensor(fp8, n), tensor(fp8, llama.ScaleName(n))
			rows := w.Shape[0]
			sc := make([]float32, len(s.Data)/4)
			for i := range sc {
				sc[i] = math.Float32frombits(binary.LittleEndian.Uint32(s.Data[4*i:]))
			}
			for r := range rows {
				e.scale = append(e.scale, sc[min(r, len(sc)-1)])
			}
			e.rows, e.cols, e.q = e.rows+rows, w.Shape[1], append(e.q, w.Data...)
		}
		return e
	}
	for l := range layers {
		p := fmt.Sprintf("model.layers.%d.", l)
		for stacked, parts := range map[string][]string{
			p + "self_attn.qkv_proj.weight": {p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight", p + "self_attn.v_proj.weight"},
			p + "self_attn.o_proj.weight":   {p + "self_attn.o_proj.weight"},
			p + "mlp.gate_up_proj.weight":   {p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"},
			p + "mlp.down_proj.weight":      {p + "mlp.down_proj.weight"},
		} {
			g, ok := k.got[stacked]
			e := expect(parts...)
			if !ok || g.rows != e.rows || g.cols != e.cols || !slices.Equal(g.q, e.q) || !slices.Equal(g.scale, e.scale) {
				t.Errorf("%s: kept [%d,%d] (%v), want [%d,%d] with the stored bytes and per-row scales", stacked, g.rows, g.cols, ok, e.rows, e.cols)
			}
		}
	}

	// layer 0's k_proj in bf16: that stack goes through Upload, dequantized
	mixed := slices.Clone(fp8)
	k0 := "model.layers.0.self_attn.k_proj.weight"
	mixed[slices.IndexFunc(mixed, func(x safetensors.Tensor) bool { return x.Name == k0 })] = tensor(ref, k0)
	got, k, err = run(write(mixed, quant))
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := k.got["model.layers.0.self_attn.qkv_proj.weight"]; ok || len(k.got) != 4*layers-1 {
		t.Errorf("a stack with a bf16 part was kept in FP8 (%d kept)", len(k.got))
	}
	if !slices.Equal(got, want) {
		t.Errorf("with a bf16 part: logits differ from the dequantized checkpoint's (relative %.3g)", fixture.RelErr(got, want))
	}

	// bad values
	down := "model.layers.1.mlp.down_proj.weight"
	for _, c := range []struct {
		what, name string
		edit       func(*safetensors.Tensor)
		message    string
	}{
		{"a NaN e4m3 byte", down, func(x *safetensors.Tensor) { x.Data = slices.Clone(x.Data); x.Data[5] = 0x7f }, down + " holds a NaN e4m3 byte (0x7f) at element 5"},
		{"a negative NaN byte", down, func(x *safetensors.Tensor) { x.Data = slices.Clone(x.Data); x.Data[len(x.Data)-1] = 0xff }, "holds a NaN e4m3 byte (0xff)"},
		{"an infinite scale", llama.ScaleName(down), func(x *safetensors.Tensor) {
			x.Data = slices.Clone(x.Data)
			binary.LittleEndian.PutUint32(x.Data[4:], math.Float32bits(float32(math.Inf(1))))
		}, llama.ScaleName(down) + "[1] is +Inf"},
	} {
		bad := slices.Clone(fp8)
		i := slices.IndexFunc(bad, func(x safetensors.Tensor) bool { return x.Name == c.name })
		c.edit(&bad[i])
		_, _, err := run(write(bad, quant))
		if !errors.Is(err, llama.ErrWeights) || !strings.Contains(fmtErr(err), c.message) {
			t.Errorf("%s: %v, want llama.ErrWeights saying %q", c.what, err, c.message)
		}
		// the dequantizing path refuses it too
		m, err := llama.Open(write(bad, quant))
		if err != nil {
			t.Fatal(err)
		}
		e, err := engine.New(m, cpu.New(1), engine.Options{MaxTokens: 64, KVBlocks: 16, BlockSize: 16})
		if err == nil {
			e.Close()
		}
		m.Close()
		if !errors.Is(err, llama.ErrWeights) {
			t.Errorf("%s, dequantized: %v, want llama.ErrWeights", c.what, err)
		}
	}
}
