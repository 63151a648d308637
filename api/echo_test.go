package api_test

import (
	"math"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/peftd/peftd/api"
)

// TestEcho: /v1/completions with echo puts the prompt before the text;
// with logprobs, the prompt's tokens come first, the first with null, each
// other with the log-probability the model gives it after the tokens before
// it (the same the model gives it when it is generated there); max_tokens 0
// scores the prompt alone (how lm-evaluation-harness asks for
// log-likelihoods); the tokens concatenate to the text and text_offset
// follows them; a batch echoes each prompt; chat and invoke refuse echo.
func TestEcho(t *testing.T) {
	url, _ := storiesServer(t, false, nil)
	choice := func(r reply) map[string]any {
		t.Helper()
		if r.Status != 200 {
			t.Fatalf("%d %s", r.Status, r.Body)
		}
		return r.JSON(t)["choices"].([]any)[0].(map[string]any)
	}
	// The logprob of " time" when the model generates it after "Once upon a".
	gen := choice(do(t, "POST", url+"/v1/completions", map[string]any{"model": "stories260K", "prompt": "Once upon a", "max_tokens": 1, "temperature": 0, "logprobs": 1}))
	glp := gen["logprobs"].(map[string]any)
	if tok := glp["tokens"].([]any)[0]; tok != " time" {
		t.Fatalf("the greedy token after %q is %q: the test needs \" time\"", "Once upon a", tok)
	}
	timeLP := glp["token_logprobs"].([]any)[0].(float64)

	r := do(t, "POST", url+"/v1/completions", map[string]any{"model": "stories260K", "prompt": storyPrompt, "max_tokens": 0, "echo": true, "logprobs": 2})
	ch := choice(r)
	if ch["text"] != storyPrompt || ch["finish_reason"] != "length" {
		t.Errorf("echo, max_tokens 0: %s", r.Body)
	}
	if u := r.JSON(t)["usage"].(map[string]any); u["completion_tokens"].(float64) != 0 || u["prompt_tokens"].(float64) != 5 {
		t.Errorf("usage %v", u)
	}
	lp := ch["logprobs"].(map[string]any)
	toks, lps, tops, offs := lp["tokens"].([]any), lp["token_logprobs"].([]any), lp["top_logprobs"].([]any), lp["text_offset"].([]any)
	if len(toks) != 5 || len(lps) != 5 || len(tops) != 5 || len(offs) != 5 {
		t.Fatalf("logprobs of a 5-token prompt: %v", lp)
	}
	if lps[0] != nil || tops[0] != nil {
		t.Errorf("the first prompt token has logprob %v, top %v; want null", lps[0], tops[0])
	}
	if got := lps[4].(float64); toks[4] != " time" || math.Abs(got-timeLP) > 1e-4 {
		t.Errorf("echoed %q has logprob %v; generated there it has %v", toks[4], got, timeLP)
	}
	for i := 1; i < 5; i++ {
		if v := lps[i].(float64); v > 0 || math.IsNaN(v) {
			t.Errorf("token %d logprob %v", i, v)
		}
		if m := tops[i].(map[string]any); len(m) == 0 || len(m) > 2 {
			t.Errorf("token %d top_logprobs %v", i, m)
		}
	}
	checkPieces := func(text string, toks, offs []any) {
		t.Helper()
		var b strings.Builder
		for i, tk := range toks {
			if int(offs[i].(float64)) != utf8.RuneCountInString(b.String()) {
				t.Errorf("text_offset[%d] = %v, want %d", i, offs[i], utf8.RuneCountInString(b.String()))
			}
			b.WriteString(tk.(string))
		}
		if b.String() != text {
			t.Errorf("tokens concatenate to %q, text is %q", b.String(), text)
		}
	}
	checkPieces(ch["text"].(string), toks, offs)

	// echo with generation: the prompt, then the greedy story.
	ch = choice(do(t, "POST", url+"/v1/completions", map[string]any{"model": "pirate", "prompt": storyPrompt, "max_tokens": 80, "temperature": 0, "echo": true, "logprobs": 1}))
	if ch["text"] != pirateText {
		t.Errorf("echo: %q, want %q", ch["text"], pirateText)
	}
	lp = ch["logprobs"].(map[string]any)
	toks, lps, offs = lp["tokens"].([]any), lp["token_logprobs"].([]any), lp["text_offset"].([]any)
	checkPieces(ch["text"].(string), toks, offs)
	if lps[0] != nil || lps[5] == nil {
		t.Errorf("token_logprobs %v", lps[:6])
	}
	// streamed: the prompt comes first, then the story; the chunks'
	// texts and logprobs join to the answer above, text_offset running on
	for _, maxTok := range []int{80, 0} {
		r := do(t, "POST", url+"/v1/completions", map[string]any{"model": "pirate", "prompt": storyPrompt, "max_tokens": maxTok, "temperature": 0,
			"echo": true, "logprobs": 1, "stream": true})
		if r.Status != 200 {
			t.Fatalf("%d %s", r.Status, r.Body)
		}
		events, done := sse(t, r.Body)
		if !done {
			t.Fatal("no [DONE]")
		}
		var text strings.Builder
		var stoks, soffs []any
		for i, ev := range events {
			chs, _ := ev["choices"].([]any)
			if len(chs) == 0 {
				continue
			}
			c := chs[0].(map[string]any)
			if i == 0 && c["text"] != storyPrompt {
				t.Errorf("max_tokens %d: first chunk %q, want the prompt", maxTok, c["text"])
			}
			text.WriteString(c["text"].(string))
			if lp, ok := c["logprobs"].(map[string]any); ok {
				stoks = append(stoks, lp["tokens"].([]any)...)
				soffs = append(soffs, lp["text_offset"].([]any)...)
			}
		}
		want := pirateText
		if maxTok == 0 {
			want = storyPrompt
		}
		if text.String() != want {
			t.Errorf("max_tokens %d: streamed text %q, want %q", maxTok, text.String(), want)
		}
		checkPieces(text.String(), stoks, soffs)
	}

	// without logprobs, a batch: each choice echoes its own prompt
	r = do(t, "POST", url+"/v1/completions", map[string]any{"model": "stories260K", "prompt": []string{"Once upon a time", "One day"}, "max_tokens": 4, "temperature": 0, "echo": true})
	if r.Status != 200 {
		t.Fatalf("%d %s", r.Status, r.Body)
	}
	for _, c := range r.JSON(t)["choices"].([]any) {
		m := c.(map[string]any)
		want := []string{"Once upon a time", "One day"}[int(m["index"].(float64))]
		if !strings.HasPrefix(m["text"].(string), want) || len(m["text"].(string)) <= len(want) || m["logprobs"] != nil {
			t.Errorf("batch choice %v: want the text after %q, no logprobs", m, want)
		}
	}
	// a model without a tokenizer: token-id prompts, no text; the echoed
	// tokens read token_id:N and add nothing to the (empty) text
	raw, _ := storiesServer(t, false, func(c *api.Config) { c.Tokenizer = nil })
	ch = choice(do(t, "POST", raw+"/v1/completions", map[string]any{"model": "stories260K", "prompt": []int{1, 403, 407}, "max_tokens": 2, "temperature": 0, "echo": true, "logprobs": 1}))
	lp = ch["logprobs"].(map[string]any)
	toks, offs = lp["tokens"].([]any), lp["text_offset"].([]any)
	if ch["text"] != "" || len(toks) != 5 || toks[0] != "token_id:1" || toks[2] != "token_id:407" {
		t.Errorf("no tokenizer: text %q, tokens %v", ch["text"], toks)
	}
	for i := range 3 {
		if offs[i].(float64) != 0 {
			t.Errorf("no tokenizer: prompt token %d at offset %v, want 0 (the text is empty)", i, offs[i])
		}
	}
	for _, tc := range []struct {
		path string
		body map[string]any
		want string
	}{
		{"/v1/chat/completions", map[string]any{"model": "pirate", "messages": []map[string]any{{"role": "user", "content": "x"}}, "echo": true}, "echo is for /v1/completions"},
		{"/v1/adapters/pirate/invoke", map[string]any{"prompt": "x", "echo": true}, "echo is for /v1/completions"},
		{"/v1/completions", map[string]any{"model": "pirate", "prompt": "x", "max_tokens": 0}, "0 only with echo"},
	} {
		e := wantErr(t, do(t, "POST", url+tc.path, tc.body), 400, "")
		if !strings.Contains(e["message"].(string), tc.want) {
			t.Errorf("%s %v: %v, want a message saying %q", tc.path, tc.body, e["message"], tc.want)
		}
	}
}
