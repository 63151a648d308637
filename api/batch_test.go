package api_test

import (
	"fmt"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/peftd/peftd/api"
	"github.com/peftd/peftd/internal/apitest"
)

// metric is a sample's value (0 when absent).
func metric(t *testing.T, url, name string, labels ...string) float64 {
	t.Helper()
	v, _ := apitest.Value(httpc.Scrape(t, url), name, labels...)
	return v
}

func choicesOf(t *testing.T, r reply) []map[string]any {
	t.Helper()
	if r.Status != 200 {
		t.Fatalf("%d %s", r.Status, r.Body)
	}
	var out []map[string]any
	for _, c := range r.JSON(t)["choices"].([]any) {
		out = append(out, c.(map[string]any))
	}
	return out
}

// TestBatchFixture: a completions request with several token-id prompts
// answers one choice per prompt, in order, each with the reference greedy
// tokens of its fixture case (or, for a case of another adapter, what the
// prompt gives alone); usage and the metrics count one request, tokens
// summed.
func TestBatchFixture(t *testing.T) {
	st, f := fixtureStack(t, 2, 64)
	url := start(t, st.config("base"))
	const n = 12
	var prompts [][]int32
	promptTokens := 0
	for _, c := range f.Cases {
		if len(c.Greedy) < n {
			t.Fatalf("case %d: %d greedy tokens", c.ID, len(c.Greedy))
		}
		prompts = append(prompts, c.Prompt)
		promptTokens += len(c.Prompt)
	}
	for _, tc := range []struct{ model, adapter string }{{"base", ""}, {"all-r16", "all-r16"}} {
		t.Run(tc.model, func(t *testing.T) {
			want := make([][]int32, len(f.Cases))
			refs := 0
			for i, c := range f.Cases {
				if c.AdapterName() == tc.adapter {
					want[i], refs = c.Greedy[:n], refs+1
					continue
				}
				r := do(t, "POST", url+"/v1/completions", map[string]any{"model": tc.model, "prompt": c.Prompt,
					"max_tokens": n, "temperature": 0, "ignore_eos": true, "return_token_ids": true})
				want[i] = toInts(choicesOf(t, r)[0]["token_ids"])
			}
			if refs == 0 {
				t.Fatalf("no fixture case for %q", tc.adapter)
			}
			reqs := metric(t, url, "peftd_requests_total", "adapter", tc.model, "status", "200")
			gen := metric(t, url, "peftd_generated_tokens_total", "adapter", tc.model)
			r := do(t, "POST", url+"/v1/completions", map[string]any{"model": tc.model, "prompt": prompts,
				"max_tokens": n, "temperature": 0, "ignore_eos": true, "return_token_ids": true, "logprobs": 1})
			chs := choicesOf(t, r)
			if len(chs) != len(prompts) {
				t.Fatalf("%d choices for %d prompts: %s", len(chs), len(prompts), r.Body)
			}
			for i, ch := range chs {
				if int(ch["index"].(float64)) != i {
					t.Errorf("choice %d has index %v", i, ch["index"])
				}
				if got := toInts(ch["token_ids"]); !slices.Equal(got, want[i]) {
					t.Errorf("choice %d: token_ids %v, want %v", i, got, want[i])
				}
				if got := toInts(ch["prompt_token_ids"]); !slices.Equal(got, prompts[i]) {
					t.Errorf("choice %d: prompt_token_ids %v, want %v", i, got, prompts[i])
				}
				if ch["finish_reason"] != "length" {
					t.Errorf("choice %d: finish_reason %v", i, ch["finish_reason"])
				}
				if lp := ch["logprobs"].(map[string]any)["tokens"].([]any); len(lp) != n {
					t.Errorf("choice %d: %d logprobs", i, len(lp))
				}
			}
			m := r.JSON(t)
			u := m["usage"].(map[string]any)
			if int(u["prompt_tokens"].(float64)) != promptTokens || int(u["completion_tokens"].(float64)) != n*len(prompts) ||
				int(u["total_tokens"].(float64)) != promptTokens+n*len(prompts) {
				t.Errorf("usage %v, want %d prompt and %d completion tokens", u, promptTokens, n*len(prompts))
			}
			if m["object"] != "text_completion" || m["model"] != tc.model {
				t.Errorf("answer %s", r.Body)
			}
			if d := metric(t, url, "peftd_requests_total", "adapter", tc.model, "status", "200") - reqs; d != 1 {
				t.Errorf("the batch counted as %v requests", d)
			}
			if d := metric(t, url, "peftd_generated_tokens_total", "adapter", tc.model) - gen; d != float64(n*len(prompts)) {
				t.Errorf("generated tokens grew by %v, want %d", d, n*len(prompts))
			}

			// streamed: token ids reassembled per index
			r = do(t, "POST", url+"/v1/completions", map[string]any{"model": tc.model, "prompt": prompts,
				"max_tokens": n, "temperature": 0, "ignore_eos": true, "return_token_ids": true, "stream": true})
			evs, done := sse(t, r.Body)
			got := make([][]int32, len(prompts))
			fins := map[int]any{}
			for _, e := range evs {
				for _, c := range e["choices"].([]any) {
					ch := c.(map[string]any)
					i := int(ch["index"].(float64))
					got[i] = append(got[i], toInts(ch["token_ids"])...)
					if ch["finish_reason"] != nil {
						fins[i] = ch["finish_reason"]
					}
				}
			}
			for i := range prompts {
				if !slices.Equal(got[i], want[i]) || fins[i] != "length" {
					t.Errorf("stream choice %d: %v (%v), want %v", i, got[i], fins[i], want[i])
				}
			}
			if !done {
				t.Errorf("no [DONE]: %s", r.Body)
			}
		})
	}

	// Any invalid prompt fails the request with nothing left running.
	c := f.Cases[0]
	for _, tc := range []struct {
		name   string
		prompt any
	}{
		{"empty id array", []any{c.Prompt, []int32{}}},
		{"empty outer array", []any{}},
		{"token outside the vocabulary", []any{c.Prompt, c.Prompt, []int32{1, 1 << 30}}},
		{"text without a tokenizer", []string{"a", "b"}},
		{"mixed kinds", []any{"a", c.Prompt}},
		{"over the limit", slices.Repeat([][]int32{c.Prompt}, api.MaxBatchPrompts+1)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := wantErr(t, do(t, "POST", url+"/v1/completions", map[string]any{"model": "base", "prompt": tc.prompt, "max_tokens": 4}), 400, "prompt")
			t.Log(e["message"])
			apitest.Eventually(t, 5*time.Second, 10*time.Millisecond, "no sequence pending", func() bool { return st.sched.Pending() == 0 })
		})
	}
	// At the limit is fine.
	r := do(t, "POST", url+"/v1/completions", map[string]any{"model": "base", "max_tokens": 1, "ignore_eos": true,
		"prompt": slices.Repeat([][]int32{c.Prompt}, api.MaxBatchPrompts)})
	if chs := choicesOf(t, r); len(chs) != api.MaxBatchPrompts {
		t.Errorf("%d choices", len(chs))
	}
	// invoke and chat stay single-prompt; prompts x n beyond the limit is 400
	// (n itself: TestChoicesN)
	wantErr(t, do(t, "POST", url+"/v1/adapters/base/invoke", map[string]any{"prompt": prompts[:2]}), 400, "prompt")
	wantErr(t, do(t, "POST", url+"/v1/completions", map[string]any{"model": "base", "n": 2,
		"prompt": slices.Repeat([][]int32{c.Prompt}, api.MaxBatchPrompts/2+1)}), 400, "n")
}

// TestBatchQueueFull: a batch the queue cannot take answers 429 and leaves
// nothing pending.
func TestBatchQueueFull(t *testing.T) {
	st, f := fixtureStack(t, 2, 2)
	url := start(t, st.config("base"))
	c := f.Cases[0]
	r := do(t, "POST", url+"/v1/completions", map[string]any{"model": "base", "max_tokens": 200, "ignore_eos": true,
		"prompt": [][]int32{c.Prompt, c.Prompt, c.Prompt}})
	wantErr(t, r, 429, "")
	apitest.Eventually(t, 5*time.Second, 10*time.Millisecond, "no sequence pending", func() bool { return st.sched.Pending() == 0 })
	if v := metric(t, url, "peftd_requests_total", "adapter", "base", "status", "429"); v != 1 {
		t.Errorf("429 counted %v times", v)
	}
	r = do(t, "POST", url+"/v1/completions", map[string]any{"model": "base", "max_tokens": 4, "prompt": [][]int32{c.Prompt, c.Prompt}})
	if chs := choicesOf(t, r); len(chs) != 2 {
		t.Errorf("after a 429: %s", r.Body)
	}
}

// TestBatchStories: string prompts on a model with a tokenizer, stop
// strings applied per choice, streamed chunks reassembled per index.
func TestBatchStories(t *testing.T) {
	url, _ := storiesServer(t, false, nil)
	prompts := []string{storyPrompt, "The cat sat", "One day, Lily went", storyPrompt}
	pirate := strings.TrimPrefix(pirateText, storyPrompt)
	for _, tc := range []struct {
		name string
		stop any
		want map[int]string // choices with a known text
	}{
		{"plain", nil, map[int]string{0: pirate, 3: pirate}},
		{"stop", []string{"Sue", "zzz"}, map[int]string{0: ", a little pirate girl named ", 3: ", a little pirate girl named "}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			body := map[string]any{"model": "pirate", "max_tokens": 80, "temperature": 0, "stop": tc.stop}
			// alone, each prompt
			var alone []map[string]any
			for _, p := range prompts {
				body["prompt"] = p
				alone = append(alone, choicesOf(t, do(t, "POST", url+"/v1/completions", body))[0])
			}
			body["prompt"] = prompts
			r := do(t, "POST", url+"/v1/completions", body)
			chs := choicesOf(t, r)
			if len(chs) != len(prompts) {
				t.Fatalf("%d choices: %s", len(chs), r.Body)
			}
			var usage [2]int
			for i, ch := range chs {
				if int(ch["index"].(float64)) != i || ch["text"] != alone[i]["text"] || ch["finish_reason"] != alone[i]["finish_reason"] {
					t.Errorf("choice %d: %v, alone %v", i, ch, alone[i])
				}
				if w, ok := tc.want[i]; ok && (ch["text"] != w || ch["finish_reason"] != "stop") {
					t.Errorf("choice %d: %q %v, want %q stop", i, ch["text"], ch["finish_reason"], w)
				}
			}
			u := r.JSON(t)["usage"].(map[string]any)
			usage[0], usage[1] = int(u["prompt_tokens"].(float64)), int(u["completion_tokens"].(float64))
			if usage[0] < 4*len(prompts) || usage[1] == 0 || int(u["total_tokens"].(float64)) != usage[0]+usage[1] {
				t.Errorf("usage %v", u)
			}

			body["stream"] = true
			body["stream_options"] = map[string]any{"include_usage": true}
			r = do(t, "POST", url+"/v1/completions", body)
			evs, done := sse(t, r.Body)
			texts := make([]string, len(prompts))
			fins := make([]any, len(prompts))
			usageChunks := 0
			for k, e := range evs {
				cs := e["choices"].([]any)
				if e["usage"] != nil {
					usageChunks++
					u := e["usage"].(map[string]any)
					if k != len(evs)-1 || len(cs) != 0 || int(u["prompt_tokens"].(float64)) != usage[0] || int(u["completion_tokens"].(float64)) != usage[1] {
						t.Errorf("usage chunk %d of %d: %v, want %v", k, len(evs), e, usage)
					}
					continue
				}
				if len(cs) != 1 {
					t.Errorf("chunk with %d choices: %v", len(cs), e)
					continue
				}
				ch := cs[0].(map[string]any)
				i := int(ch["index"].(float64))
				if fins[i] != nil {
					t.Errorf("choice %d: a chunk after its finish_reason: %v", i, ch)
				}
				texts[i] += ch["text"].(string)
				fins[i] = ch["finish_reason"]
			}
			for i := range prompts {
				if texts[i] != chs[i]["text"] || fins[i] != chs[i]["finish_reason"] {
					t.Errorf("stream choice %d: %q %v, want %q %v", i, texts[i], fins[i], chs[i]["text"], chs[i]["finish_reason"])
				}
			}
			if !done || usageChunks != 1 {
				t.Errorf("done %v, %d usage chunks: %s", done, usageChunks, r.Body)
			}
		})
	}
	e := wantErr(t, do(t, "POST", url+"/v1/completions", map[string]any{"model": "pirate", "prompt": []string{storyPrompt, ""}}), 400, "prompt")
	if !strings.Contains(fmt.Sprint(e["message"]), "prompt[1]") {
		t.Errorf("message %v", e["message"])
	}
	wantErr(t, do(t, "POST", url+"/v1/chat/completions", map[string]any{"model": "pirate", "prompt": prompts}), 400, "messages")
}

// TestBatchDisconnect: a streamed batch whose client goes away while its
// sequences wait for a device slot cancels them all, counted as one 499.
func TestBatchDisconnect(t *testing.T) {
	url, st, _ := slotHeldServer(t, 8, func(c *api.Config) { c.Heartbeat = 20 * time.Millisecond })
	req, _ := http.NewRequest("POST", url+"/v1/completions",
		strings.NewReader(`{"model":"space","prompt":["Once upon a time","The cat","One day"],"max_tokens":50,"stream":true}`))
	req.Header.Set("Content-Type", "application/json")
	tr := &http.Transport{}
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := resp.Body.Read(make([]byte, 64)); err != nil { // a heartbeat
		t.Fatal(err)
	}
	if n := st.sched.Pending(); n != 3 {
		t.Fatalf("pending %d, want 3", n)
	}
	resp.Body.Close()
	tr.CloseIdleConnections()
	apitest.Eventually(t, 5*time.Second, 10*time.Millisecond, "no sequence pending", func() bool { return st.sched.Pending() == 0 })
	apitest.Eventually(t, 5*time.Second, 10*time.Millisecond, "one 499", func() bool {
		return metric(t, url, "peftd_requests_total", "adapter", "space", "status", "499") == 1
	})
	if v := metric(t, url, "peftd_requests_in_flight"); v != 0 {
		t.Errorf("%v requests in flight", v)
	}
}
