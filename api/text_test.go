package api_test

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/peftd/peftd/text/tokenizer"
)

// generation is what one choice of a route returned, streamed or not.
type generation struct {
	text    string
	ids     []int32
	tokens  []string // logprobs' token strings
	offsets []int    // completions' text_offset
	bytes   []byte   // chat logprobs' bytes, concatenated
}

// collect reads choice index of a JSON answer, or of every chunk of an SSE
// body, for route (invoke, completions, chat). Streamed, it checks that
// text_offset continues across chunks.
func collect(t *testing.T, route string, r reply, stream bool, index int) generation {
	t.Helper()
	if r.Status != 200 {
		t.Fatalf("%s: %d %s", route, r.Status, r.Body)
	}
	var g generation
	add := func(m map[string]any) {
		if route == "invoke" {
			g.text += m["text"].(string)
			g.ids = append(g.ids, toInts(m["token_ids"])...)
			lps, _ := m["logprobs"].([]any)
			for _, lp := range lps {
				g.tokens = append(g.tokens, lp.(map[string]any)["token"].(string))
			}
			return
		}
		var ch map[string]any
		for _, c := range m["choices"].([]any) {
			if c := c.(map[string]any); int(c["index"].(float64)) == index {
				ch = c
			}
		}
		if ch == nil {
			return
		}
		g.ids = append(g.ids, toInts(ch["token_ids"])...)
		if route == "chat" {
			if stream {
				s, _ := ch["delta"].(map[string]any)["content"].(string)
				g.text += s
			} else {
				g.text += ch["message"].(map[string]any)["content"].(string)
			}
			lp, _ := ch["logprobs"].(map[string]any)
			content, _ := lp["content"].([]any)
			for _, e := range content {
				e := e.(map[string]any)
				g.tokens = append(g.tokens, e["token"].(string))
				for _, b := range toInts(e["bytes"]) {
					g.bytes = append(g.bytes, byte(b))
				}
			}
			return
		}
		start := utf8.RuneCountInString(g.text)
		g.text += ch["text"].(string)
		if lp, ok := ch["logprobs"].(map[string]any); ok {
			toks := lp["tokens"].([]any)
			offs := toInts(lp["text_offset"])
			if len(toks) > 0 && offs[0] != int32(start) {
				t.Errorf("%s: a chunk's text_offset starts at %d, its text at character %d", route, offs[0], start)
			}
			for i, tk := range toks {
				g.tokens = append(g.tokens, tk.(string))
				g.offsets = append(g.offsets, int(offs[i]))
			}
		}
	}
	if !stream {
		add(r.JSON(t))
		return g
	}
	evs, done := sse(t, r.Body)
	if !done {
		t.Errorf("%s: no [DONE]: %s", route, r.Body)
	}
	for _, e := range evs {
		add(e)
	}
	return g
}

// Text decoded after the prompt, in every route, streamed or not: "Once"
// goes on with " upon" (not "upon"), prompt text + completion text is the
// decode of prompt + completion ids, streamed chunks concatenate to the
// non-streamed text, and logprobs' tokens join to the text with text_offset
// lined up (not "<s>" for the stop token, not "upon" for "▁upon").
func TestTextAfterPrompt(t *testing.T) {
	url, _ := storiesServer(t, true, nil)
	tok, err := tokenizer.Load(storiesDir)
	if err != nil {
		t.Fatal(err)
	}
	type tc struct {
		route, model, prompt string
		extra                map[string]any
	}
	greedy := map[string]any{"temperature": 0}
	// Sampling hot draws byte-fallback tokens (half of stories260K's
	// vocabulary): characters split over tokens, invalid bytes.
	hot := map[string]any{"temperature": 3, "seed": 7}
	var cases []tc
	for _, route := range []string{"invoke", "completions", "chat"} {
		for _, model := range []string{"stories260K", "pirate"} {
			cases = append(cases, tc{route, model, "Once", greedy}, tc{route, model, "Lily and 🦙", hot})
		}
	}
	cases = append(cases,
		tc{"completions", "space", "Once", map[string]any{"temperature": 0, "stop": []string{" time", "zzz"}}},
		tc{"completions", "space", "Once", map[string]any{"temperature": 0, "max_tokens": 200}}, // ends on the stop token
		tc{"invoke", "space", "One day", map[string]any{"temperature": 0, "stop": []string{"."}}})
	for _, c := range cases {
		t.Run(fmt.Sprintf("%s/%s/%s/%v", c.route, c.model, c.prompt, c.extra), func(t *testing.T) {
			body := map[string]any{"max_tokens": 40, "return_token_ids": true}
			path := url + "/v1/completions"
			switch c.route {
			case "invoke":
				path = url + "/v1/adapters/" + c.model + "/invoke"
				body["prompt"], body["logprobs"] = c.prompt, 2
			case "completions":
				body["model"], body["prompt"], body["logprobs"] = c.model, c.prompt, 2
			case "chat":
				path = url + "/v1/chat/completions"
				body["model"], body["logprobs"], body["top_logprobs"] = c.model, true, 2
				body["messages"] = []map[string]any{{"role": "user", "content": c.prompt}}
			}
			for k, v := range c.extra {
				body[k] = v
			}
			r := do(t, "POST", path, body)
			g := collect(t, c.route, r, false, 0)
			prompt := toInts(r.JSON(t)["prompt_token_ids"])
			checkGeneration(t, tok, c.route, prompt, g, c.extra["stop"] != nil)
			if c.prompt == "Once" && c.route != "chat" && !strings.HasPrefix(g.text, " ") {
				t.Errorf("the text after %q lost its leading space: %q", c.prompt, g.text)
			}
			if c.prompt == "Once" && c.model == "stories260K" && c.route != "chat" && !strings.HasPrefix(g.text, " upon a time") {
				t.Errorf("stories260K after %q: %q, want \" upon a time...\"", c.prompt, g.text)
			}

			body["stream"] = true
			s := collect(t, c.route, do(t, "POST", path, body), true, 0)
			if s.text != g.text || !slices.Equal(s.ids, g.ids) {
				t.Errorf("streamed %q %v, not streamed %q %v", s.text, s.ids, g.text, g.ids)
			}
			if !slices.Equal(s.tokens, g.tokens) {
				t.Errorf("streamed logprobs tokens %q, not streamed %q", s.tokens, g.tokens)
			}
			checkGeneration(t, tok, c.route, prompt, s, c.extra["stop"] != nil)
		})
	}

	// Batched completions: each choice as if alone.
	prompts := []string{"Once", "Lily and 🦙", "One day"}
	for _, extra := range []map[string]any{greedy, hot} {
		body := map[string]any{"model": "pirate", "prompt": prompts, "max_tokens": 30, "logprobs": 1, "return_token_ids": true}
		for k, v := range extra {
			body[k] = v
		}
		r := do(t, "POST", url+"/v1/completions", body)
		body["stream"] = true
		rs := do(t, "POST", url+"/v1/completions", body)
		for i, p := range prompts {
			g := collect(t, "completions", r, false, i)
			checkGeneration(t, tok, "batch", tok.Encode(p, true), g, false)
			if s := collect(t, "completions", rs, true, i); s.text != g.text || !slices.Equal(s.tokens, g.tokens) {
				t.Errorf("batch %q: streamed %q %q, not streamed %q %q", p, s.text, s.tokens, g.text, g.tokens)
			}
			if p == "Once" && !strings.HasPrefix(g.text, " ") {
				t.Errorf("batch: the text after %q lost its leading space: %q", p, g.text)
			}
		}
	}
}

// checkGeneration checks a generation's text against its ids and its
// logprobs against its text.
func checkGeneration(t *testing.T, tok *tokenizer.Tokenizer, route string, prompt []int32, g generation, cut bool) {
	t.Helper()
	all := tok.Decode(append(slices.Clone(prompt), g.ids...), true)
	promptText := tok.Decode(prompt, true)
	switch {
	case !strings.HasPrefix(all, promptText):
		t.Errorf("%s: Decode(prompt+completion) %q does not start with the prompt's text %q", route, all, promptText)
	case cut: // a stop string cut the text
		if !strings.HasPrefix(all, promptText+g.text) {
			t.Errorf("%s: prompt+text %q is not a prefix of Decode(prompt+completion) %q", route, promptText+g.text, all)
		}
	case promptText+g.text != all:
		t.Errorf("%s: prompt+text %q, Decode(prompt+completion) %q", route, promptText+g.text, all)
	}
	if len(g.tokens) != len(g.ids) {
		t.Fatalf("%s: %d logprobs tokens for %d ids", route, len(g.tokens), len(g.ids))
	}
	if j := strings.Join(g.tokens, ""); j != g.text {
		t.Errorf("%s: logprobs tokens %q join to %q, the text is %q", route, g.tokens, j, g.text)
	}
	for _, s := range g.tokens {
		if strings.Contains(s, "<s>") || strings.Contains(s, "</s>") {
			t.Errorf("%s: a special token in the tokens %q", route, g.tokens)
		}
	}
	if g.offsets != nil {
		text := []rune(g.text)
		at := 0
		for i, s := range g.tokens {
			n := utf8.RuneCountInString(s)
			if g.offsets[i] != at || string(text[at:at+n]) != s {
				t.Errorf("%s: token %d %q at text_offset %d, want %d in %q", route, i, s, g.offsets[i], at, g.text)
				break
			}
			at += n
		}
	}
	if route == "chat" && utf8.Valid(g.bytes) && !strings.ContainsRune(g.text, utf8.RuneError) && string(g.bytes) != g.text {
		t.Errorf("chat: logprobs bytes concatenate to %q, the text is %q", g.bytes, g.text)
	}
}
