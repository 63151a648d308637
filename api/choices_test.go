package api_test

import (
	"fmt"
	"slices"
	"strings"
	"testing"
)

// TestChoicesN: "n" choices per prompt on the OpenAI routes, as OpenAI
// orders and counts them: index prompt * n + k, the prompt's tokens counted
// once in the usage; choice k of a seeded request samples with seed + k
// (the choices differ and repeat); streamed chunks carry their choice's
// index, each choice its own role chunk and finish chunk; bad values of n
// are refused naming the field.
func TestChoicesN(t *testing.T) {
	url, _ := storiesServer(t, true, nil)
	texts := func(r map[string]any, field string) []string {
		var out []string
		for i, c := range r["choices"].([]any) {
			ch := c.(map[string]any)
			if got := int(ch["index"].(float64)); got != i {
				t.Errorf("choice %d has index %d", i, got)
			}
			if field == "message" {
				out = append(out, ch["message"].(map[string]any)["content"].(string))
			} else {
				out = append(out, ch["text"].(string))
			}
		}
		return out
	}
	usage := func(r map[string]any) (int, int) {
		u := r["usage"].(map[string]any)
		return int(u["prompt_tokens"].(float64)), int(u["completion_tokens"].(float64))
	}
	post := func(path string, body map[string]any) map[string]any {
		t.Helper()
		r := do(t, "POST", url+path, body)
		if r.Status != 200 {
			t.Fatalf("%s %v: %d %s", path, body, r.Status, r.Body)
		}
		return r.JSON(t)
	}

	// seeded sampling: three different choices, the same again, choice 0 = n=1's
	req := map[string]any{"model": "pirate", "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0.9, "seed": 7, "n": 3}
	a := texts(post("/v1/completions", req), "text")
	b := texts(post("/v1/completions", req), "text")
	if len(a) != 3 || !slices.Equal(a, b) {
		t.Fatalf("seeded n=3: %q then %q, want the same 3 choices", a, b)
	}
	if a[0] == a[1] && a[1] == a[2] {
		t.Errorf("seeded n=3 at temperature 0.9: three equal choices %q (choice k samples with seed + k)", a[0])
	}
	req["n"] = 1
	if one := texts(post("/v1/completions", req), "text"); one[0] != a[0] {
		t.Errorf("choice 0 %q differs from n=1 with the same seed %q", a[0], one[0])
	}

	// two prompts x n=2, greedy: prompt-major order, each prompt counted once
	single := func(p string) (string, int) {
		r := post("/v1/completions", map[string]any{"model": "pirate", "prompt": p, "max_tokens": 5, "temperature": 0})
		pt, _ := usage(r)
		return texts(r, "text")[0], pt
	}
	t0, p0 := single("Once")
	t1, p1 := single("One day")
	r := post("/v1/completions", map[string]any{"model": "pirate", "prompt": []string{"Once", "One day"}, "max_tokens": 5, "temperature": 0, "n": 2})
	if got, want := texts(r, "text"), []string{t0, t0, t1, t1}; !slices.Equal(got, want) {
		t.Errorf("2 prompts x n=2: %q, want %q", got, want)
	}
	if pt, ct := usage(r); pt != p0+p1 || ct != 20 {
		t.Errorf("usage prompt %d completion %d, want %d and 20", pt, ct, p0+p1)
	}

	// chat, greedy: n equal messages; streamed, each index rebuilds its message
	chatReq := map[string]any{"model": "pirate", "messages": []map[string]any{{"role": "user", "content": "hi"}}, "max_tokens": 6, "temperature": 0, "n": 3}
	cr := post("/v1/chat/completions", chatReq)
	msgs := texts(cr, "message")
	if len(msgs) != 3 || msgs[0] != msgs[1] || msgs[1] != msgs[2] {
		t.Fatalf("greedy chat n=3: %q", msgs)
	}
	cpt, cct := usage(cr)
	if cct != 18 {
		t.Errorf("chat n=3 completion tokens %d, want 18", cct)
	}
	chatReq["stream"] = true
	chatReq["stream_options"] = map[string]any{"include_usage": true}
	sr := do(t, "POST", url+"/v1/chat/completions", chatReq)
	if sr.Status != 200 {
		t.Fatalf("%d %s", sr.Status, sr.Body)
	}
	evs, done := sse(t, sr.Body)
	if !done {
		t.Error("stream without [DONE]")
	}
	content := make([]strings.Builder, 3)
	roles, finishes := make([]int, 3), make([]int, 3)
	var sawUsage bool
	for _, ev := range evs {
		chs := ev["choices"].([]any)
		if len(chs) == 0 {
			if u, ok := ev["usage"].(map[string]any); ok {
				sawUsage = true
				if int(u["prompt_tokens"].(float64)) != cpt || int(u["completion_tokens"].(float64)) != cct {
					t.Errorf("stream usage %v, want prompt %d completion %d", u, cpt, cct)
				}
			}
			continue
		}
		ch := chs[0].(map[string]any)
		i := int(ch["index"].(float64))
		if i < 0 || i >= 3 {
			t.Fatalf("chunk for choice %d", i)
		}
		d := ch["delta"].(map[string]any)
		if d["role"] == "assistant" {
			roles[i]++
		}
		if c, ok := d["content"].(string); ok {
			content[i].WriteString(c)
		}
		if ch["finish_reason"] != nil {
			finishes[i]++
		}
	}
	for i := range 3 {
		if content[i].String() != msgs[i] || roles[i] != 1 || finishes[i] != 1 {
			t.Errorf("streamed choice %d: %q with %d role and %d finish chunks, want %q, 1, 1", i, content[i].String(), roles[i], finishes[i], msgs[i])
		}
	}
	if !sawUsage {
		t.Error("no usage chunk")
	}

	// refusals
	many := make([]string, 40)
	for i := range many {
		many[i] = fmt.Sprint("prompt ", i)
	}
	for _, c := range []struct {
		path string
		body map[string]any
		msg  string
	}{
		{"/v1/completions", map[string]any{"model": "pirate", "prompt": "x", "n": 0}, "positive"},
		{"/v1/completions", map[string]any{"model": "pirate", "prompt": "x", "n": 65}, "at most 64"},
		{"/v1/completions", map[string]any{"model": "pirate", "prompt": many, "n": 2}, "40 prompts x n=2"},
		{"/v1/adapters/pirate/invoke", map[string]any{"prompt": "x", "n": 2}, "invoke returns one generation"},
	} {
		e := wantErr(t, do(t, "POST", url+c.path, c.body), 400, "n")
		if !strings.Contains(e["message"].(string), c.msg) {
			t.Errorf("%v: %q, want it to say %q", c.body, e["message"], c.msg)
		}
	}
}
