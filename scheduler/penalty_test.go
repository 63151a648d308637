package scheduler

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"

	"github.com/peftd/peftd/internal/fixture"
	"github.com/peftd/peftd/internal/sampletest"
	"github.com/peftd/peftd/runtime/cpu"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/sample"
)

// greedyPenalized is the reference: the case's greedy tokens with the
// penalties applied from scratch at every step (sampletest.Penalized), on
// an engine of its own.
func greedyPenalized(t *testing.T, f *fixture.Fixture, c fixture.Case, p sample.Penalties, n int) []int32 {
	t.Helper()
	e, err := engine.New(f.Model, cpu.New(0), engine.DefaultOptions())
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	slot := -1
	if a := c.AdapterName(); a != "" {
		slot = 0
		if err := e.LoadAdapter(0, f.Adapters[a]); err != nil {
			t.Fatal(err)
		}
	}
	var seq engine.Sequence
	defer e.Release(&seq)
	feed := c.Prompt
	var out []int32
	for len(out) < n {
		logits, err := e.Step(context.Background(), []engine.Input{{Seq: &seq, Tokens: feed, Slot: slot}})
		if err != nil {
			t.Fatal(err)
		}
		row := sampletest.Penalized(logits[0], p, c.Prompt, out)
		next := sample.Argmax(row)
		out = append(out, next)
		feed = []int32{next}
	}
	return out
}

// TestPenaltiesMatchReference serves greedy requests with penalties and
// logit biases, several at once (co-batched with unpenalized requests and
// each other); each must give exactly the tokens of the from-scratch
// reference, and the penalties must change the output (else the test
// proves nothing).
func TestPenaltiesMatchReference(t *testing.T) {
	s, f := setup(t, engine.Options{MaxTokens: 64, KVBlocks: 256, BlockSize: 16, AdapterSlots: 4}, Config{})
	cases := f.Cases[:min(3, len(f.Cases))]
	pens := []sample.Penalties{
		{Presence: 1.5},
		{Frequency: 1},
		{Repetition: 1.8},
		{Repetition: 0.7, Presence: -0.5},
		{Presence: 0.5, Frequency: 0.5, Repetition: 1.3, LogitBias: map[int32]float64{5: 3, 17: -100}},
	}
	var wg sync.WaitGroup
	changed := make([]bool, len(pens))
	for _, c := range cases {
		for pi, p := range pens {
			want := greedyPenalized(t, f, c, p, c.Decode)
			wg.Add(2)
			go func() { // the same case without penalties, alongside
				defer wg.Done()
				ch, err := s.Submit(context.Background(), Request{Adapter: c.AdapterName(), Prompt: c.Prompt, MaxTokens: c.Decode})
				if err != nil {
					t.Error(err)
					return
				}
				if toks, _ := collect(t, ch); !slices.Equal(toks, c.Greedy) {
					t.Errorf("case %d without penalties: %v, want %v", c.ID, toks, c.Greedy)
				}
			}()
			go func() {
				defer wg.Done()
				ch, err := s.Submit(context.Background(), Request{Adapter: c.AdapterName(), Prompt: c.Prompt, MaxTokens: c.Decode,
					Sampling: sample.Params{Penalties: p}})
				if err != nil {
					t.Error(err)
					return
				}
				toks, end := collect(t, ch)
				if end.Err != nil {
					t.Error(end.Err)
				}
				if !slices.Equal(toks, want) {
					t.Errorf("case %d penalties %d %+v: %v, want %v", c.ID, pi, p, toks, want)
				}
			}()
			if !slices.Equal(want, c.Greedy) {
				changed[pi] = true
			}
		}
	}
	wg.Wait()
	for pi, p := range pens {
		if !changed[pi] {
			t.Errorf("penalties %d %+v change no case's greedy output: the test proves nothing; pick stronger ones", pi, p)
		}
	}
	// A bias of +100 makes the token every pick; one outside the vocabulary is refused.
	c := cases[0]
	ch, err := s.Submit(context.Background(), Request{Prompt: c.Prompt, MaxTokens: 5,
		Sampling: sample.Params{Penalties: sample.Penalties{LogitBias: map[int32]float64{42: 100}}}})
	if err != nil {
		t.Fatal(err)
	}
	if toks, _ := collect(t, ch); !slices.Equal(toks, []int32{42, 42, 42, 42, 42}) {
		t.Errorf("logit_bias +100 on token 42: %v", toks)
	}
	V := int32(f.Model.Config.VocabSize)
	_, err = s.Submit(context.Background(), Request{Prompt: c.Prompt, MaxTokens: 5,
		Sampling: sample.Params{Penalties: sample.Penalties{LogitBias: map[int32]float64{V: 1}}}})
	var fe *FieldError
	if !errors.As(err, &fe) || fe.Field != "logit_bias" {
		t.Errorf("logit_bias on token %d (vocabulary %d): %v, want a logit_bias field error", V, V, err)
	}
}
