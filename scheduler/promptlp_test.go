package scheduler

import (
	"context"
	"math"
	"slices"
	"sync/atomic"
	"testing"

	"github.com/peftd/peftd/internal/fixture"
	"github.com/peftd/peftd/runtime/cpu"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/sample"
)

// TestPromptLogprobs: every fixture case, co-batched, its prompt fed in
// chunks of at most 8 rows with the prefix cache on (a scored prompt must
// not take cached pages), scores each prompt token after the first as one
// whole-prompt step of the reference engine does; with max tokens 0 the
// scores come with Done and nothing is generated, else with the first
// token and the greedy tokens are the reference's.
func TestPromptLogprobs(t *testing.T) {
	f, err := fixture.Load()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	ref, res := fixtureEngine(t, f, engine.DefaultOptions())
	V := f.Model.Config.VocabSize
	want := make([][]sample.Choice, len(f.Cases))
	for i, c := range f.Cases {
		var s engine.Sequence
		slot := -1
		if n := c.AdapterName(); n != "" {
			slot = res[n]
		}
		out, err := ref.Step(context.Background(), []engine.Input{{Seq: &s, Tokens: c.Prompt, Slot: slot, AllLogits: true}})
		if err != nil {
			t.Fatal(err)
		}
		for p := 1; p < len(c.Prompt); p++ {
			want[i] = append(want[i], sample.Score(out[0][(p-1)*V:p*V], c.Prompt[p], 2))
		}
		ref.Release(&s)
	}
	e, res := fixtureEngine(t, f, engine.Options{MaxTokens: 8, KVBlocks: 256, BlockSize: 4, AdapterSlots: 4})
	s := New(e, res, Config{PrefixCache: true})
	t.Cleanup(s.Close)
	for _, maxTok := range []int{0, 3} {
		// twice: the second round finds every prompt in the prefix cache
		for round := range 2 {
			var chans []<-chan Event
			for _, c := range f.Cases {
				ch, err := s.Submit(context.Background(), Request{Adapter: c.AdapterName(), Prompt: c.Prompt, MaxTokens: maxTok,
					Sampling: sample.Params{Logprobs: 2}, PromptLogprobs: true})
				if err != nil {
					t.Fatal(err)
				}
				chans = append(chans, ch)
			}
			for i, ch := range chans {
				c := f.Cases[i]
				var first *Event
				var toks []int32
				for ev := range ch {
					if first == nil {
						first = &ev
					}
					if ev.Done {
						if ev.Err != nil {
							t.Fatalf("case %d: %v", c.ID, ev.Err)
						}
						break
					}
					toks = append(toks, ev.Token.ID)
				}
				if maxTok == 0 && (!first.Done || len(toks) != 0 || first.FinishReason != engine.FinishLength) {
					t.Errorf("max tokens 0, case %d: first event %+v, tokens %v; want Done (length) with the scores", c.ID, *first, toks)
				}
				if maxTok > 0 && !slices.Equal(toks, c.Greedy[:maxTok]) {
					t.Errorf("case %d round %d: tokens %v, want %v", c.ID, round, toks, c.Greedy[:maxTok])
				}
				got := first.Prompt
				if len(got) != len(want[i]) {
					t.Fatalf("max tokens %d case %d round %d: %d prompt scores, want %d", maxTok, c.ID, round, len(got), len(want[i]))
				}
				for p, w := range want[i] {
					g := got[p]
					if g.ID != w.ID || math.Abs(g.Logprob-w.Logprob) > 1e-5 || len(g.Top) != 2 || g.Top[0].ID != w.Top[0].ID {
						t.Fatalf("max tokens %d case %d round %d token %d: %+v, want %+v", maxTok, c.ID, round, p+1, g, w)
					}
				}
			}
		}
	}
	// max tokens 0 is refused without PromptLogprobs.
	if _, err := s.Submit(context.Background(), Request{Prompt: f.Cases[0].Prompt}); err == nil {
		t.Error("max tokens 0 without PromptLogprobs was accepted")
	}
}

// rowCounter is a CPU backend that records the most logits rows a step had.
type rowCounter struct {
	engine.Backend
	most atomic.Int64
}

func (r *rowCounter) Execute(meta *engine.StepMeta, prog engine.Program) error {
	if n := int64(len(meta.LogitRows)); n > r.most.Load() {
		r.most.Store(n)
	}
	return r.Backend.Execute(meta, prog)
}

// TestPromptLogprobsRowsPerStep: scoring prompts share one budget of scored
// rows per step (their logits come to the host), however many run at once.
func TestPromptLogprobsRowsPerStep(t *testing.T) {
	m, err := llama.Open("../models/stories260K")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	b := &rowCounter{Backend: cpu.New(0)}
	e, err := engine.New(m, b, engine.Options{MaxTokens: 2048, KVBlocks: 512, BlockSize: 16, AdapterSlots: 1})
	if err != nil {
		t.Fatal(err)
	}
	s := New(e, Static{}, Config{})
	t.Cleanup(s.Close)
	var chans []<-chan Event
	for k := range 6 {
		p := make([]int32, 400)
		for i := range p {
			p[i] = int32(3 + (k*131+i*7)%500)
		}
		ch, err := s.Submit(context.Background(), Request{Prompt: p, MaxTokens: 2, PromptLogprobs: true})
		if err != nil {
			t.Fatal(err)
		}
		chans = append(chans, ch)
	}
	for _, ch := range chans {
		var first *Event
		for ev := range ch {
			if first == nil {
				first = &ev
			}
			if ev.Done && ev.Err != nil {
				t.Fatal(ev.Err)
			}
		}
		if len(first.Prompt) != 399 {
			t.Errorf("%d prompt scores, want 399", len(first.Prompt))
		}
	}
	if most := b.most.Load(); most > scoreChunk+6 {
		t.Errorf("a step had %d logits rows: more than the %d scored rows a step (and one row per other sequence)", most, scoreChunk)
	}
}
