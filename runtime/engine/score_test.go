package engine_test

import (
	"context"
	"errors"
	"math"
	"testing"

	"github.com/peftd/peftd/internal/sampletest"
	"github.com/peftd/peftd/runtime/cpu"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/sample"
)

// hostSampler is the CPU backend posing as a DeviceSampler (greedy only):
// StepSample takes its device path, reading scored rows with Read.
type hostSampler struct {
	*cpu.Backend
	vocab int
}

func (h hostSampler) SampleRows(logits engine.Buffer, rows []engine.RowSample, out []sample.Choice) error {
	n := 0
	for _, r := range rows {
		n = max(n, r.Row+1)
	}
	buf := make([]float32, n*h.vocab)
	if err := h.Read(logits, n, buf); err != nil {
		return err
	}
	for i, r := range rows {
		row := buf[r.Row*h.vocab : (r.Row+1)*h.vocab]
		sample.Apply(row, r.Adjust)
		out[i] = sample.Score(row, sample.Argmax(row), r.Params.Logprobs)
	}
	return nil
}

// TestStepSampleScores: a prompt fed in two chunks with Targets gets, for
// every token after the first, the Choice sample.Score gives it under the
// logits of one whole-prompt step, on the host path and on the device
// path; the last chunk still samples its token; bad Targets are refused.
func TestStepSampleScores(t *testing.T) {
	m, err := llama.Open(stories)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	V := m.Config.VocabSize
	prompt := []int32{1, 403, 407, 261, 378, 432, 383}
	ctx := context.Background()
	ref, err := engine.New(m, cpu.New(0), engine.DefaultOptions())
	if err != nil {
		t.Fatal(err)
	}
	var rs engine.Sequence
	all, err := ref.Step(ctx, []engine.Input{{Seq: &rs, Tokens: prompt, Slot: -1, AllLogits: true}})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		b    engine.Backend
	}{{"host path", cpu.New(0)}, {"device path", hostSampler{cpu.New(0), V}}} {
		t.Run(tc.name, func(t *testing.T) {
			e, err := engine.New(m, tc.b, engine.DefaultOptions())
			if err != nil {
				t.Fatal(err)
			}
			if e.DeviceSampling() != (tc.name == "device path") {
				t.Fatal("wrong path")
			}
			got, last, err := sampletest.ScorePrompt(ctx, e, prompt, []int{4, len(prompt)}, -1, 3)
			if err != nil {
				t.Fatal(err)
			}
			if want := sample.Argmax(all[0][(len(prompt)-1)*V:]); last.ID != want {
				t.Errorf("sampled %d after the prompt, want %d", last.ID, want)
			}
			if len(got) != len(prompt)-1 {
				t.Fatalf("%d scores, want %d", len(got), len(prompt)-1)
			}
			for p := 1; p < len(prompt); p++ {
				want := sample.Score(all[0][(p-1)*V:p*V], prompt[p], 3)
				g := got[p-1]
				if g.ID != want.ID || math.Abs(g.Logprob-want.Logprob) > 1e-6 || len(g.Top) != 3 || g.Top[0].ID != want.Top[0].ID {
					t.Errorf("token %d: %+v, want %+v", p, g, want)
				}
			}
			// Targets must match the tokens, and need AllLogits.
			var s2 engine.Sequence
			for _, bad := range []struct {
				in engine.Input
				sp engine.Sampling
			}{
				{engine.Input{Seq: &s2, Tokens: prompt[:2], Slot: -1}, engine.Sampling{Skip: true, Targets: []int32{5, -1}, Scores: make([]sample.Choice, 2)}},
				{engine.Input{Seq: &s2, Tokens: prompt[:2], Slot: -1, AllLogits: true}, engine.Sampling{Skip: true, Targets: []int32{5}, Scores: make([]sample.Choice, 1)}},
				{engine.Input{Seq: &s2, Tokens: prompt[:2], Slot: -1, AllLogits: true}, engine.Sampling{Skip: true, Targets: []int32{int32(V), -1}, Scores: make([]sample.Choice, 2)}},
			} {
				if _, err := e.StepSample(ctx, []engine.Input{bad.in}, []engine.Sampling{bad.sp}); !errors.Is(err, engine.ErrBadInput) {
					t.Errorf("targets %v (AllLogits %v): %v, want ErrBadInput", bad.sp.Targets, bad.in.AllLogits, err)
				}
			}
		})
	}
}
