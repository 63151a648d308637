package quality

import (
	"context"
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"testing"

	"github.com/peftd/peftd/runtime/cpu"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/lora"
)

// TestTrainedModel checks a model made by tools/train_tiny_llama.py (set
// PEFTD_TRAINED_MODEL to its output folder): peftd's CPU engine gives the
// logits the script's own torch forward gave (reference.json), with and
// without the adapter, so that the model peftd eval measures is the model
// that was trained.
func TestTrainedModel(t *testing.T) {
	dir := os.Getenv("PEFTD_TRAINED_MODEL")
	if dir == "" {
		t.Skip("PEFTD_TRAINED_MODEL is not set (a folder made by tools/train_tiny_llama.py)")
	}
	var ref struct {
		IDs           []int32     `json:"ids"`
		Logits        [][]float64 `json:"logits"`
		AdapterLogits [][]float64 `json:"adapter_logits"`
	}
	b, err := os.ReadFile(filepath.Join(dir, "reference.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &ref); err != nil {
		t.Fatal(err)
	}
	m, err := llama.Open(filepath.Join(dir, "base"))
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	e, err := engine.New(m, cpu.New(0), engine.DefaultOptions())
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	a, err := lora.Load(filepath.Join(dir, "adapter"), m.Config)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.LoadAdapter(0, a); err != nil {
		t.Fatal(err)
	}
	V := m.Config.VocabSize
	// The adapter must matter, or its row below would not show it applied.
	var d, n float64
	for r, row := range ref.Logits {
		for v, w := range row {
			x := ref.AdapterLogits[r][v] - w
			d += x * x
			n += w * w
		}
	}
	if effect := math.Sqrt(d / n); effect < 1e-2 {
		t.Fatalf("the adapter moves the reference logits by %.3g only: train it longer", effect)
	} else {
		t.Logf("the adapter moves the logits by %.3g (relative)", effect)
	}
	for _, tc := range []struct {
		name string
		slot int
		want [][]float64
	}{{"base", -1, ref.Logits}, {"adapter", 0, ref.AdapterLogits}} {
		seq := &engine.Sequence{}
		out, err := e.Step(context.Background(), []engine.Input{{Seq: seq, Tokens: ref.IDs, Slot: tc.slot, AllLogits: true}})
		e.Release(seq)
		if err != nil {
			t.Fatal(err)
		}
		var d, n float64
		for r, row := range tc.want {
			for v, w := range row {
				x := float64(out[0][r*V+v]) - w
				d += x * x
				n += w * w
			}
		}
		rel := math.Sqrt(d / n)
		t.Logf("%s: relative error %.3g over %d rows", tc.name, rel, len(tc.want))
		if rel > 1e-3 {
			t.Errorf("%s: peftd's logits differ from the training script's by %.3g (relative)", tc.name, rel)
		}
	}
}
