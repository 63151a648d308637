package api_test

import (
	"context"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/peftd/peftd/api"
	"github.com/peftd/peftd/internal/adaptertest"
	"github.com/peftd/peftd/text/chat"
)

const (
	storyPrompt = "Once upon a time"
	pirateText  = "Once upon a time, a little pirate girl named Sue had a boat. She loved the sea and the waves."
)

var testTemplate = "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" +
	"{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"

func storiesServer(t *testing.T, withTemplate bool, mod func(*api.Config)) (string, *stack) {
	t.Helper()
	st, tok := storiesStack(t, 2, 64)
	cfg := st.config("stories260K")
	cfg.Tokenizer = tok
	if withTemplate {
		tmpl, err := chat.NewTemplate(testTemplate, "<s>", "</s>")
		if err != nil {
			t.Fatal(err)
		}
		cfg.Template = tmpl
	}
	if mod != nil {
		mod(&cfg)
	}
	return start(t, cfg), st
}

func TestStoriesInvoke(t *testing.T) {
	url, _ := storiesServer(t, false, nil)
	want := strings.TrimPrefix(pirateText, storyPrompt)

	r := do(t, "POST", url+"/v1/adapters/pirate/invoke", map[string]any{"prompt": storyPrompt, "max_tokens": 80})
	if r.Status != 200 {
		t.Fatalf("%d %s", r.Status, r.Body)
	}
	m := r.JSON(t)
	if m["text"] != want || m["finish_reason"] != "stop" || m["adapter"] != "pirate" {
		t.Errorf("invoke: %s\nwant text %q", r.Body, want)
	}
	if p := toInts(m["prompt_token_ids"]); len(p) != 5 || p[0] != 1 {
		t.Errorf("prompt ids %v", p)
	}

	r = do(t, "POST", url+"/v1/adapters/pirate/invoke", map[string]any{"prompt": storyPrompt, "max_tokens": 80, "stream": true})
	evs, done := sse(t, r.Body)
	var text strings.Builder
	for _, e := range evs {
		text.WriteString(e["text"].(string))
	}
	if !done || text.String() != want || evs[len(evs)-1]["finish_reason"] != "stop" {
		t.Errorf("stream: %q done=%v: %s", text.String(), done, r.Body)
	}

	// A stop string ends and trims the text, streamed or not.
	for _, stream := range []bool{false, true} {
		r = do(t, "POST", url+"/v1/completions", map[string]any{"model": "pirate", "prompt": storyPrompt,
			"max_tokens": 80, "temperature": 0, "stop": []string{"Sue", "zzz"}, "stream": stream})
		var got, fin string
		if stream {
			evs, _ := sse(t, r.Body)
			for _, e := range evs {
				ch := e["choices"].([]any)[0].(map[string]any)
				got += ch["text"].(string)
				if f, ok := ch["finish_reason"].(string); ok {
					fin = f
				}
			}
		} else {
			ch := r.JSON(t)["choices"].([]any)[0].(map[string]any)
			got, fin = ch["text"].(string), ch["finish_reason"].(string)
		}
		if w := ", a little pirate girl named "; got != w || fin != "stop" {
			t.Errorf("stream=%v stop string: %q %q, want %q stop", stream, got, fin, w)
		}
	}

	// The space adapter and the base model through the same server.
	r = do(t, "POST", url+"/v1/completions", map[string]any{"model": "space", "prompt": storyPrompt, "max_tokens": 80, "temperature": 0})
	if ch := r.JSON(t)["choices"].([]any)[0].(map[string]any); ch["text"] != strings.TrimPrefix("Once upon a time, a girl named Mia wanted to go to space. She built a rocket in her yard.", storyPrompt) {
		t.Errorf("space: %s", r.Body)
	}

	// logprobs in OpenAI's completions shape
	r = do(t, "POST", url+"/v1/completions", map[string]any{"model": "pirate", "prompt": storyPrompt, "max_tokens": 3, "temperature": 0, "logprobs": 2})
	lp := r.JSON(t)["choices"].([]any)[0].(map[string]any)["logprobs"].(map[string]any)
	for _, k := range []string{"tokens", "token_logprobs", "top_logprobs", "text_offset"} {
		if v, ok := lp[k].([]any); !ok || len(v) != 3 {
			t.Errorf("logprobs.%s: %v", k, lp[k])
		}
	}
}

func TestChat(t *testing.T) {
	url, _ := storiesServer(t, false, nil)
	msgs := []map[string]any{{"role": "user", "content": "Tell me a story"}}
	e := wantErr(t, do(t, "POST", url+"/v1/chat/completions", map[string]any{"model": "pirate", "messages": msgs}), 400, "messages")
	if !strings.Contains(e["message"].(string), "chat template") {
		t.Errorf("message %v", e["message"])
	}

	url, _ = storiesServer(t, true, nil)
	r := do(t, "POST", url+"/v1/chat/completions", map[string]any{"model": "pirate", "messages": msgs, "max_tokens": 8,
		"temperature": 0, "return_token_ids": true, "logprobs": true, "top_logprobs": 2})
	if r.Status != 200 {
		t.Fatalf("%d %s", r.Status, r.Body)
	}
	m := r.JSON(t)
	prompt := toInts(m["prompt_token_ids"])
	bos := 0
	for _, id := range prompt {
		if id == 1 {
			bos++
		}
	}
	if len(prompt) < 5 || prompt[0] != 1 || bos != 1 {
		t.Errorf("chat prompt ids %v: want exactly one BOS first", prompt)
	}
	ch := m["choices"].([]any)[0].(map[string]any)
	msg := ch["message"].(map[string]any)
	if m["object"] != "chat.completion" || msg["role"] != "assistant" || msg["content"] == "" {
		t.Errorf("chat: %s", r.Body)
	}
	content := ch["logprobs"].(map[string]any)["content"].([]any)
	if len(content) != len(toInts(ch["token_ids"])) || len(content[0].(map[string]any)["top_logprobs"].([]any)) != 2 {
		t.Errorf("chat logprobs: %s", r.Body)
	}

	r = do(t, "POST", url+"/v1/chat/completions", map[string]any{"model": "pirate", "messages": msgs, "max_tokens": 8,
		"temperature": 0, "stream": true, "stream_options": map[string]any{"include_usage": true}})
	evs, done := sse(t, r.Body)
	var text string
	for _, e := range evs {
		if e["object"] != "chat.completion.chunk" {
			t.Errorf("chunk object %v", e["object"])
		}
		if cs := e["choices"].([]any); len(cs) > 0 {
			c, _ := cs[0].(map[string]any)["delta"].(map[string]any)["content"].(string)
			text += c
		}
	}
	if !done || text != msg["content"] || evs[len(evs)-1]["usage"] == nil {
		t.Errorf("chat stream %q vs %q: %s", text, msg["content"], r.Body)
	}
	first := evs[0]["choices"].([]any)[0].(map[string]any)["delta"].(map[string]any)
	if first["role"] != "assistant" {
		t.Errorf("first delta %v", first)
	}

	// tokenize / detokenize
	r = do(t, "POST", url+"/tokenize", map[string]any{"prompt": storyPrompt})
	tm := r.JSON(t)
	toks := toInts(tm["tokens"])
	if len(toks) != 5 || int(tm["count"].(float64)) != 5 || tm["max_model_len"].(float64) != 512 {
		t.Errorf("tokenize: %s", r.Body)
	}
	r = do(t, "POST", url+"/detokenize", map[string]any{"tokens": toks[1:]})
	if p := r.JSON(t)["prompt"]; p != storyPrompt {
		t.Errorf("detokenize: %s", r.Body)
	}
	r = do(t, "POST", url+"/tokenize", map[string]any{"messages": msgs})
	if got := toInts(r.JSON(t)["tokens"]); !slices.Equal(got, prompt) {
		t.Errorf("tokenize messages %v, chat prompt %v", got, prompt)
	}
}

func TestErrors(t *testing.T) {
	url, _ := storiesServer(t, false, func(c *api.Config) { c.MaxJSONBytes = 1 << 16 })
	p := url + "/v1/completions"
	wantErr(t, do(t, "POST", p, "{not json"), 400, "")
	wantErr(t, do(t, "POST", p, map[string]any{"model": "pirate", "prompt": "x", "max_tokens": "ten"}), 400, "max_tokens")
	wantErr(t, do(t, "POST", p, map[string]any{"model": "pirate", "prompt": "x", "max_tokens": 0}), 400, "max_tokens")
	wantErr(t, do(t, "POST", p, map[string]any{"model": "pirate", "prompt": "x", "temperature": -1}), 400, "temperature")
	wantErr(t, do(t, "POST", p, map[string]any{"model": "pirate", "prompt": "x", "top_p": 0}), 400, "top_p")
	wantErr(t, do(t, "POST", p, map[string]any{"model": "pirate", "prompt": "x", "n": 0}), 400, "n")
	wantErr(t, do(t, "POST", p, map[string]any{"model": "pirate", "prompt": "x", "stop": 3.5}), 400, "stop")
	wantErr(t, do(t, "POST", p, map[string]any{"model": "pirate", "prompt": "x", "logprobs": 50}), 400, "logprobs")
	wantErr(t, do(t, "POST", p, map[string]any{"model": "pirate"}), 400, "prompt")
	wantErr(t, do(t, "POST", p, map[string]any{"model": "pirate", "prompt": []int{1, 99999}}), 400, "prompt")
	wantErr(t, do(t, "POST", p, map[string]any{"model": "pirate", "prompt": "x", "max_tokens": 100000}), 400, "max_tokens")
	e := wantErr(t, do(t, "POST", p, map[string]any{"model": "nope", "prompt": "x"}), 404, "model")
	if e["code"] != "model_not_found" {
		t.Errorf("code %v", e["code"])
	}
	wantErr(t, do(t, "POST", url+"/v1/adapters/nope/invoke", map[string]any{"prompt": "x"}), 404, "id")
	wantErr(t, do(t, "GET", url+"/v1/adapters/nope", nil), 404, "id")
	wantErr(t, do(t, "GET", url+"/nowhere", nil), 404, "")
	wantErr(t, do(t, "POST", p, `{"model":"pirate","prompt":"`+strings.Repeat("a", 1<<17)+`"}`), 413, "")
	wantErr(t, do(t, "POST", url+"/detokenize", map[string]any{"tokens": []int{-1}}), 400, "tokens")
}

// TestQueueFullAndTimeout: with one device slot held, a request for another
// adapter waits for residency; the queue (1) is then full -> 429 with
// Retry-After, and the waiting one hits the request timeout -> 504.
func TestQueueFullAndTimeout(t *testing.T) {
	url, st, lease := slotHeldServer(t, 1, func(c *api.Config) { c.RequestTimeout = 1500 * time.Millisecond })
	var wg sync.WaitGroup
	var slow reply
	wg.Add(1)
	go func() {
		defer wg.Done()
		slow = do(t, "POST", url+"/v1/completions", map[string]any{"model": "space", "prompt": storyPrompt, "max_tokens": 5})
	}()
	deadline := time.Now().Add(time.Second)
	for st.sched.Pending() == 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	r := do(t, "POST", url+"/v1/completions", map[string]any{"model": "pirate", "prompt": storyPrompt, "max_tokens": 5})
	wantErr(t, r, 429, "")
	if r.Header.Get("Retry-After") == "" {
		t.Error("429 without Retry-After")
	}
	wg.Wait()
	wantErr(t, slow, 504, "")
	lease.Release()
	r = do(t, "POST", url+"/v1/completions", map[string]any{"model": "space", "prompt": storyPrompt, "max_tokens": 5})
	if r.Status != 200 {
		t.Errorf("after release: %d %s", r.Status, r.Body)
	}
}

func TestAuthAndMetrics(t *testing.T) {
	keyFile := filepath.Join(t.TempDir(), "keys")
	os.WriteFile(keyFile, []byte("# keys\nsk-admin * admin\nsk-pirate pirate\nsk-acme acme-*\n"), 0o600)
	keys, err := api.LoadKeys(keyFile)
	if err != nil {
		t.Fatal(err)
	}
	url, _ := storiesServer(t, false, func(c *api.Config) { c.Keys = keys })
	body := map[string]any{"prompt": storyPrompt, "max_tokens": 4}
	wantErr(t, do(t, "POST", url+"/v1/adapters/pirate/invoke", body), 401, "")
	wantErr(t, do(t, "POST", url+"/v1/adapters/pirate/invoke", body, "Authorization", "Bearer wrong"), 401, "")
	if r := do(t, "POST", url+"/v1/adapters/pirate/invoke", body, "Authorization", "Bearer sk-pirate"); r.Status != 200 {
		t.Errorf("tenant on its adapter: %d %s", r.Status, r.Body)
	}
	wantErr(t, do(t, "POST", url+"/v1/adapters/space/invoke", body, "Authorization", "Bearer sk-pirate"), 403, "")
	up := adaptertest.TarGz(t, adaptertest.Files(t, "../models/adapters/space", ""))
	wantErr(t, do(t, "PUT", url+"/v1/adapters/pirate", up, "Authorization", "Bearer sk-pirate"), 403, "")
	wantErr(t, do(t, "PUT", url+"/v1/adapters/other", up, "Authorization", "Bearer sk-acme"), 403, "")
	if r := do(t, "PUT", url+"/v1/adapters/acme-space", up, "Authorization", "Bearer sk-acme"); r.Status != 201 {
		t.Errorf("tenant deploy under its prefix: %d %s", r.Status, r.Body)
	}
	r := do(t, "GET", url+"/v1/models", nil, "Authorization", "Bearer sk-acme")
	if n := len(r.JSON(t)["data"].([]any)); n != 2 {
		t.Errorf("acme sees %d models: %s", n, r.Body)
	}
	if r := do(t, "DELETE", url+"/v1/adapters/acme-space", nil, "Authorization", "Bearer sk-admin"); r.Status != 200 {
		t.Errorf("admin delete: %d %s", r.Status, r.Body)
	}
	if r := do(t, "GET", url+"/healthz", nil); r.Status != 200 {
		t.Errorf("healthz %d", r.Status)
	}
	if r := do(t, "GET", url+"/readyz", nil); r.Status != 200 {
		t.Errorf("readyz %d", r.Status)
	}
	r = do(t, "GET", url+"/metrics", nil)
	for _, name := range []string{"peftd_requests_total", "peftd_generated_tokens_total", "peftd_time_to_first_token_seconds",
		"peftd_inter_token_latency_seconds", "peftd_queue_depth", "peftd_batch_size", "peftd_batch_adapters",
		"peftd_kv_cache_usage_ratio", "vllm:lora_requests_info", `max_lora="2"`, `adapter="pirate",status="200"`,
		// the first pirate request loaded pirate from the store
		`peftd_adapter_cold_first_token_seconds_count{source="store"} 1`} {
		if !strings.Contains(string(r.Body), name) {
			t.Errorf("/metrics lacks %s:\n%s", name, r.Body)
		}
	}
}

// TestDisconnectCancels: a streaming client that goes away while its request
// waits for a device slot cancels the request (found by the SSE heartbeat).
func TestDisconnectCancels(t *testing.T) {
	url, st, _ := slotHeldServer(t, 4, func(c *api.Config) { c.Heartbeat = 20 * time.Millisecond })
	req, _ := http.NewRequest("POST", url+"/v1/completions",
		strings.NewReader(`{"model":"space","prompt":"Once upon a time","max_tokens":50,"stream":true}`))
	req.Header.Set("Content-Type", "application/json")
	tr := &http.Transport{}
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64)
	if _, err := resp.Body.Read(buf); err != nil { // a heartbeat
		t.Fatal(err)
	}
	if st.sched.Pending() != 1 {
		t.Fatalf("pending %d, want 1", st.sched.Pending())
	}
	resp.Body.Close()
	tr.CloseIdleConnections()
	deadline := time.Now().Add(5 * time.Second)
	for st.sched.Pending() != 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := st.sched.Pending(); n != 0 {
		t.Fatalf("the request still pends after the client left (%d)", n)
	}
	r := do(t, "GET", url+"/metrics", nil)
	if !strings.Contains(string(r.Body), `peftd_requests_total{adapter="space",status="499"} 1`) {
		t.Errorf("no 499 in metrics:\n%s", r.Body)
	}
}

// TestDisconnectCancelsNonStreaming: a plain JSON request whose client goes
// away while it waits is cancelled too (the socket is peeked for EOF).
func TestDisconnectCancelsNonStreaming(t *testing.T) {
	url, st, _ := slotHeldServer(t, 4, nil)
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, "POST", url+"/v1/completions",
		strings.NewReader(`{"model":"space","prompt":"Once upon a time","max_tokens":50}`))
	req.Header.Set("Content-Type", "application/json")
	errc := make(chan error, 1)
	go func() {
		_, err := http.DefaultClient.Do(req)
		errc <- err
	}()
	deadline := time.Now().Add(5 * time.Second)
	for st.sched.Pending() != 1 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if n := st.sched.Pending(); n != 1 {
		t.Fatalf("pending %d, want 1 (the request waits for the only slot)", n)
	}
	cancel() // the client gives up: its connection closes
	<-errc
	for st.sched.Pending() != 0 && time.Now().Before(deadline.Add(5*time.Second)) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := st.sched.Pending(); n != 0 {
		t.Fatalf("the request still pends after the client left (%d)", n)
	}
	r := do(t, "GET", url+"/metrics", nil)
	if !strings.Contains(string(r.Body), `peftd_requests_total{adapter="space",status="499"} 1`) {
		t.Errorf("no 499 in metrics:\n%s", r.Body)
	}
}
