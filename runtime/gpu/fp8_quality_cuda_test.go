//go:build cuda

package gpu

import (
	"testing"

	"github.com/peftd/peftd/runtime/cpu"
	"github.com/peftd/peftd/runtime/engine"
)

// TestFP8QualityStories measures FP8 weights against bf16 on a trained
// model (issue 14): stories260K and its pirate and space adapters, with
// a CPU float32 engine as the reference. Two parts:
//   - generated text: from every opening, under the base model and each
//     adapter, the bf16 engine's greedy continuation of 120 tokens
//     (2,880 tokens in all); then each whole sequence teacher-forced
//     through the bf16 and fp8 engines: per position KL(bf16 || fp8) in
//     nats and whether the two argmaxes agree;
//   - held-out text: the perplexity of each passage under the float32, bf16
//     and fp8 engines.
//
// These are measurements for the decision the issue leaves open (FP8 as
// the default): the test fails only on gross error (KL over 0.5 nats a
// token, agreement under 50%, or perplexities more than 1.5x apart).
func TestFP8QualityStories(t *testing.T) {
	if err := Available(); err != nil {
		t.Skipf("no GPU: %v", err)
	}
	m, tok, ads := storyModel(t)
	gpuEngine := func(wf string) *engine.Engine {
		b, err := New(Options{WeightFormat: wf})
		if err != nil {
			t.Fatal(err)
		}
		return storyEngine(t, m, ads, b)
	}
	f8 := gpuEngine(WeightsFP8)
	// stories260K's MLP width (172) is not FP8-able (rows % 8, cols % 16):
	// gate, up and down stay bf16, q, k, v and o go FP8.
	t.Logf("fp8 engine: %d of %d projection weights in e4m3", len(f8.Backend().(*Backend).f8.weights), 7*m.Config.Layers)
	r := storyQuality(t, m, tok, storyEngine(t, m, ads, cpu.New(0)), gpuEngine(WeightsBF16), f8)
	if !(r.kl <= 0.5) || float64(r.agree) < 0.5*float64(r.n) || !(r.worstRatio <= 1.5) {
		t.Errorf("fp8 grossly off bf16: KL %.3g nats/token, agreement %d/%d, perplexity ratio %.3g", r.kl, r.agree, r.n, r.worstRatio)
	}
}
