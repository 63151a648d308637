package engine_test

import (
	"context"
	"encoding/json"
	"os"
	"slices"
	"sync/atomic"
	"testing"

	"github.com/peftd/peftd/runtime/cpu"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/lora"
	"github.com/peftd/peftd/scheduler"
)

const stories = "../../models/stories260K"

type storyCase struct {
	name   string
	prompt []int32
	want   []int32
}

func storyCases(t testing.TB) []storyCase {
	var base struct {
		Prompt []int32 `json:"prompt_token_ids"`
		Gen    []int32 `json:"generated_token_ids"`
	}
	b, err := os.ReadFile(stories + "/expected.json")
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &base); err != nil {
		t.Fatal(err)
	}
	var ad struct {
		Adapters map[string]struct {
			Prompt []int32 `json:"prompt_token_ids"`
			Greedy []int32 `json:"greedy_token_ids"`
		}
	}
	b, err = os.ReadFile("../../testdata/stories260K_expected_adapters.json")
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &ad); err != nil {
		t.Fatal(err)
	}
	cases := []storyCase{{"base40", base.Prompt, base.Gen}}
	for _, n := range []string{"pirate", "space", "base"} {
		a := ad.Adapters[n]
		cases = append(cases, storyCase{n, a.Prompt, a.Greedy})
	}
	return cases
}

// TestStoriesGreedy generates the stories of expected.json and the demo
// adapters' greedy references through the scheduler (the path peftd serve
// and peftd generate take), one at a time and all at once, co-batched.
func TestStoriesGreedy(t *testing.T) {
	m, err := llama.Open(stories)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	e, err := engine.New(m, cpu.New(0), engine.DefaultOptions())
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	adapters := map[string]string{"base40": "", "base": ""}
	res := scheduler.Static{}
	for i, n := range []string{"pirate", "space"} {
		a, err := lora.Load("../../models/adapters/"+n, m.Config)
		if err != nil {
			t.Fatal(err)
		}
		if err := e.LoadAdapter(i, a); err != nil {
			t.Fatal(err)
		}
		adapters[n], res[n] = n, i
	}
	var maxAdapters atomic.Int64
	s := scheduler.New(e, res, scheduler.Config{OnStep: func(st scheduler.StepStats) {
		if n := int64(st.Adapters); n > maxAdapters.Load() {
			maxAdapters.Store(n)
		}
	}})
	defer s.Close()
	cases := storyCases(t)
	stop := []int32{}
	for _, id := range m.Config.EOS {
		stop = append(stop, int32(id))
	}
	submit := func(t *testing.T, c storyCase) <-chan scheduler.Event {
		ch, err := s.Submit(context.Background(), scheduler.Request{Adapter: adapters[c.name], Prompt: c.prompt, MaxTokens: len(c.want), Stop: stop})
		if err != nil {
			t.Fatal(err)
		}
		return ch
	}
	collect := func(t *testing.T, c storyCase, ch <-chan scheduler.Event) string {
		var got []int32
		reason := ""
		for ev := range ch {
			if ev.Done {
				if ev.Err != nil {
					t.Fatalf("%s: %v", c.name, ev.Err)
				}
				reason = ev.FinishReason
				continue
			}
			got = append(got, ev.Token.ID)
		}
		if !slices.Equal(got, c.want) {
			t.Errorf("%s: got %v\nwant %v", c.name, got, c.want)
		}
		return reason
	}
	t.Run("alone", func(t *testing.T) {
		for _, c := range cases {
			collect(t, c, submit(t, c))
		}
	})
	t.Run("co-batched", func(t *testing.T) {
		maxAdapters.Store(0)
		chs := make([]<-chan scheduler.Event, len(cases))
		for i, c := range cases {
			chs[i] = submit(t, c)
		}
		reasons := make([]string, len(cases))
		for i, c := range cases {
			reasons[i] = collect(t, c, chs[i])
		}
		if reasons[1] != engine.FinishStop || reasons[0] != engine.FinishLength {
			t.Errorf("finish reasons %q %q", reasons[1], reasons[0])
		}
		if maxAdapters.Load() < 2 {
			t.Errorf("no step mixed adapters (at most %d in one step)", maxAdapters.Load())
		}
	})
	s.Close() // the engine is the test's again
	if e.FreeBlocks() != e.Options().KVBlocks {
		t.Errorf("pages leaked: %d free of %d", e.FreeBlocks(), e.Options().KVBlocks)
	}
}
