//go:build cuda

package gpu

import (
	"context"
	"math"
	"testing"

	"github.com/peftd/peftd/internal/sampletest"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/sample"
)

// TestDeviceScores: prompt scoring (engine Sampling.Targets, echo's
// logprobs) on the CUDA backend's device-sampling path, the prompt fed in
// two chunks under an adapter, equals sample.Score of the logits one
// whole-prompt Step returns, and the last chunk still samples its token.
func TestDeviceScores(t *testing.T) {
	m, adapters, cases := loadFixture(t)
	e := newEngine(t, m, engine.DefaultOptions())
	if !e.DeviceSampling() {
		t.Fatal("the CUDA backend should sample on the device")
	}
	if err := e.LoadAdapter(0, adapters["all-r16"]); err != nil {
		t.Fatal(err)
	}
	V := m.Config.VocabSize
	prompt := cases[0].Prompt
	ctx := context.Background()
	var rs engine.Sequence
	all, err := e.Step(ctx, []engine.Input{{Seq: &rs, Tokens: prompt, Slot: 0, AllLogits: true}})
	if err != nil {
		t.Fatal(err)
	}
	ref := append([]float32(nil), all[0]...)
	e.Release(&rs)
	got, last, err := sampletest.ScorePrompt(ctx, e, prompt, []int{len(prompt) / 2, len(prompt)}, 0, 3)
	if err != nil {
		t.Fatal(err)
	}
	if want := sample.Argmax(ref[(len(prompt)-1)*V:]); last.ID != want {
		t.Errorf("sampled %d after the prompt, want %d", last.ID, want)
	}
	if len(got) != len(prompt)-1 {
		t.Fatalf("%d scores, want %d", len(got), len(prompt)-1)
	}
	worst := 0.0
	for p := 1; p < len(prompt); p++ {
		want := sample.Score(ref[(p-1)*V:p*V], prompt[p], 3)
		worst = max(worst, math.Abs(got[p-1].Logprob-want.Logprob))
		if got[p-1].ID != want.ID || len(got[p-1].Top) != 3 {
			t.Errorf("token %d: %+v, want %+v", p, got[p-1], want)
		}
	}
	// chunked prefill reorders nothing a row computes, but the bf16
	// activations of two chunks may round apart from one step's
	if worst > 0.02 {
		t.Errorf("scores differ from one whole-prompt step by up to %.3g nats", worst)
	}
	t.Logf("%d prompt tokens scored; largest difference from one step %.3g nats", len(got), worst)
}
