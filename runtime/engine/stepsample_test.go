package engine_test

import (
	"context"
	"errors"
	"testing"

	"github.com/peftd/peftd/runtime/cpu"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/sample"
)

// TestStepSampleHostPath: on a backend without DeviceSampler, StepSample
// draws on the host: greedy equals the argmax of Step's logits, skipped
// inputs get no token, seeded draws repeat, and mismatched specs are refused.
func TestStepSampleHostPath(t *testing.T) {
	_, newEngine := storiesEngines(t)
	prompt := []int32{1, 403, 407, 261, 378}
	ctx := context.Background()

	ref := newEngine()
	var rs engine.Sequence
	logits, err := ref.Step(ctx, []engine.Input{{Seq: &rs, Tokens: prompt, Slot: -1}})
	if err != nil {
		t.Fatal(err)
	}
	want := sample.Argmax(logits[0])

	e := newEngine()
	if e.DeviceSampling() {
		t.Fatal("the CPU backend should not sample on a device")
	}
	var s1, s2 engine.Sequence
	in := []engine.Input{{Seq: &s1, Tokens: prompt, Slot: -1}, {Seq: &s2, Tokens: prompt[:3], Slot: -1}}
	if _, err := e.StepSample(ctx, in, []engine.Sampling{{}}); !errors.Is(err, engine.ErrBadInput) {
		t.Fatalf("one spec for two inputs: %v, want ErrBadInput", err)
	}
	got, err := e.StepSample(ctx, in, []engine.Sampling{{Params: sample.Params{Logprobs: 2}}, {Skip: true}})
	if err != nil {
		t.Fatal(err)
	}
	if got[0].ID != want || len(got[0].Top) != 2 || got[0].Top[0].ID != want {
		t.Errorf("greedy StepSample %+v, want id %d", got[0], want)
	}
	if got[1].ID != 0 || got[1].Top != nil {
		t.Errorf("skipped input got %+v", got[1])
	}
	if s1.Len() != len(prompt) || s2.Len() != 3 {
		t.Errorf("sequences at %d and %d tokens", s1.Len(), s2.Len())
	}
	// seeded: the same (seed, index) draw twice
	draw := func() int32 {
		e := newEngine()
		var s engine.Sequence
		c, err := e.StepSample(ctx, []engine.Input{{Seq: &s, Tokens: prompt, Slot: -1}},
			[]engine.Sampling{{Params: sample.Params{Temperature: 1.5, TopK: 40}, Seed: 42, Index: uint64(len(prompt))}})
		if err != nil {
			t.Fatal(err)
		}
		return c[0].ID
	}
	if a, b := draw(), draw(); a != b {
		t.Errorf("seeded draws differ: %d, %d", a, b)
	}
}

// storiesEngines opens the stories260K model (closed with the test) and
// returns a maker of CPU engines on it.
func storiesEngines(t *testing.T) (*llama.Model, func() *engine.Engine) {
	t.Helper()
	m, err := llama.Open(stories)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m, func() *engine.Engine {
		e, err := engine.New(m, cpu.New(0), engine.DefaultOptions())
		if err != nil {
			t.Fatal(err)
		}
		return e
	}
}
