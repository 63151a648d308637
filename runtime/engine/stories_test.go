package engine_test

import (
	"context"
	"encoding/json"
	"os"
	"slices"
	"testing"

	"github.com/peftd/peftd/runtime/cpu"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/lora"
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
	slots := map[string]int{"base40": -1, "base": -1}
	for i, n := range []string{"pirate", "space"} {
		a, err := lora.Load("../../models/adapters/"+n, m.Config)
		if err != nil {
			t.Fatal(err)
		}
		if err := e.LoadAdapter(i, a); err != nil {
			t.Fatal(err)
		}
		slots[n] = i
	}
	cases := storyCases(t)
	stop := []int32{}
	for _, id := range m.Config.EOS {
		stop = append(stop, int32(id))
	}
	req := func(c storyCase) engine.Request {
		return engine.Request{Prompt: c.prompt, Slot: slots[c.name], MaxTokens: len(c.want), Stop: stop}
	}
	check := func(t *testing.T, c storyCase, r engine.Result) {
		if !slices.Equal(r.Tokens, c.want) {
			t.Errorf("%s: got %v\nwant %v", c.name, r.Tokens, c.want)
		}
	}
	t.Run("alone", func(t *testing.T) {
		for _, c := range cases {
			res, err := e.Generate(context.Background(), []engine.Request{req(c)})
			if err != nil {
				t.Fatal(err)
			}
			check(t, c, res[0])
		}
	})
	t.Run("co-batched", func(t *testing.T) {
		var reqs []engine.Request
		for _, c := range cases {
			reqs = append(reqs, req(c))
		}
		res, err := e.Generate(context.Background(), reqs)
		if err != nil {
			t.Fatal(err)
		}
		for i, c := range cases {
			check(t, c, res[i])
		}
		if res[1].FinishReason != engine.FinishStop || res[0].FinishReason != engine.FinishLength {
			t.Errorf("finish reasons %q %q", res[1].FinishReason, res[0].FinishReason)
		}
	})
	if e.FreeBlocks() != e.Options().KVBlocks {
		t.Errorf("pages leaked: %d free of %d", e.FreeBlocks(), e.Options().KVBlocks)
	}
}
