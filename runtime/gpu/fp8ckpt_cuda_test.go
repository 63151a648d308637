//go:build cuda

package gpu

import (
	"context"
	"encoding/binary"
	"math"
	"slices"
	"testing"

	fx "github.com/peftd/peftd/internal/fixture"
	"github.com/peftd/peftd/runtime/cuda"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/safetensors"
)

// TestFP8CheckpointDirect: with FP8 weights, an FP8 checkpoint's
// projections reach the device as stored (engine.FP8Uploader): the e4m3
// bytes and row scales read back equal the checkpoint's, stacked (qkv) and
// with a per-tensor scale repeated per row. Its logits stay within 0.05
// (relative) of the dequantized bf16 checkpoint's run with FP8 weights,
// which quantizes each weight again on the device (a few e4m3 roundings
// move).
func TestFP8CheckpointDirect(t *testing.T) {
	if err := Available(); err != nil {
		t.Skipf("no GPU: %v", err)
	}
	ck := fx.NewFP8Checkpoint(t)
	run := func(dir string) ([]float32, *Backend) {
		m, err := llama.Open(dir)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { m.Close() })
		e := newEngineWith(t, m, engine.Options{MaxTokens: 64, KVBlocks: 16, BlockSize: 16}, Options{WeightFormat: WeightsFP8})
		out, err := e.Step(context.Background(), []engine.Input{{Seq: &engine.Sequence{}, Tokens: []int32{1, 17, 42, 99, 7}, Slot: -1, AllLogits: true}})
		if err != nil {
			t.Fatal(err)
		}
		return out[0], e.Backend().(*Backend)
	}
	direct, b := run(ck.Write(t, ck.FP8, ck.Quant))
	requant, _ := run(ck.Write(t, ck.Deq, nil))
	rel := fx.RelErr(direct, requant)
	t.Logf("FP8 checkpoint loaded as stored vs dequantized and quantized again: logits relative %.3g", rel)
	if !(rel <= 0.05) {
		t.Errorf("logits relative error %.3g > 0.05", rel)
	}

	tensor := func(name string) safetensors.Tensor {
		i := slices.IndexFunc(ck.FP8, func(x safetensors.Tensor) bool { return x.Name == name })
		if i < 0 {
			t.Fatalf("no tensor %s", name)
		}
		return ck.FP8[i]
	}
	// what the device must hold: the parts' bytes in order and a scale per row
	stored := func(names ...string) ([]byte, []float32) {
		var q []byte
		var sc []float32
		for _, n := range names {
			w, s := tensor(n), tensor(llama.ScaleName(n))
			q = append(q, w.Data...)
			for r := range w.Shape[0] {
				i := min(r, len(s.Data)/4-1)
				sc = append(sc, math.Float32frombits(binary.LittleEndian.Uint32(s.Data[4*i:])))
			}
		}
		return q, sc
	}
	layers := b.cfg.Layers
	if len(b.f8.weights) != 4*layers {
		t.Fatalf("%d FP8 weights on the device, want %d", len(b.f8.weights), 4*layers)
	}
	// engine.New uploads qkv, o, gate_up, down per layer, in that order
	for _, c := range []struct {
		index int
		names []string
	}{
		{3, []string{"model.layers.0.mlp.down_proj.weight"}},
		{4, []string{"model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight", "model.layers.1.self_attn.v_proj.weight"}},
	} {
		w := b.f8.weights[c.index]
		wantQ, wantS := stored(c.names...)
		gotQ, gotS := make([]byte, w.rows*w.cols), make([]float32, w.rows)
		if err := cuda.CopyDtoH(b.s, gotQ, w.q.Ptr()); err != nil {
			t.Fatal(err)
		}
		if err := cuda.CopyDtoH(b.s, gotS, w.scale.Ptr()); err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(gotQ, wantQ) || !slices.Equal(gotS, wantS) {
			t.Errorf("%v: the device's e4m3 bytes or row scales differ from the checkpoint's", c.names)
		}
	}
}
