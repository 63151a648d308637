package api

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"testing"

	"github.com/valyala/fasthttp"

	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/sample"
	"github.com/peftd/peftd/scheduler"
	"github.com/peftd/peftd/text/chat"
	"github.com/peftd/peftd/text/tokenizer"
)

// fuzzGen stands in for the scheduler so the fuzzer spends its time on
// request decoding: it checks what the scheduler checks (context length
// without overflow, token ids in the vocabulary) and answers up to three
// tokens drawn from the prompt.
type fuzzGen struct{ vocab, maxContext int }

func (g fuzzGen) Submit(ctx context.Context, r scheduler.Request) (<-chan scheduler.Event, error) {
	switch {
	case len(r.Prompt) == 0:
		return nil, fmt.Errorf("%w: empty prompt", engine.ErrBadInput)
	case r.MaxTokens <= 0:
		return nil, fmt.Errorf("%w: max tokens must be positive", engine.ErrBadInput)
	case len(r.Prompt) > g.maxContext || r.MaxTokens > g.maxContext-len(r.Prompt):
		return nil, fmt.Errorf("%w: prompt + max tokens exceeds the context length %d", scheduler.ErrTooLong, g.maxContext)
	}
	for _, t := range r.Prompt {
		if t < 0 || int(t) >= g.vocab {
			return nil, fmt.Errorf("%w: token id %d outside the vocabulary", engine.ErrBadInput, t)
		}
	}
	if err := r.Sampling.Validate(); err != nil {
		return nil, err
	}
	n := min(r.MaxTokens, 3)
	ch := make(chan scheduler.Event, n+1)
	for i := range n {
		id := r.Prompt[i%len(r.Prompt)]
		c := sample.Choice{ID: id, Logprob: -0.5}
		for k := range r.Sampling.Logprobs {
			c.Top = append(c.Top, sample.TokenLogprob{ID: int32(k), Logprob: -float64(k)})
		}
		ch <- scheduler.Event{Token: c}
	}
	ch <- scheduler.Event{Done: true, FinishReason: engine.FinishLength}
	close(ch)
	return ch, nil
}

// fuzzCatalog knows two adapters.
type fuzzCatalog struct{}

func (fuzzCatalog) List(context.Context) ([]AdapterInfo, error) {
	return []AdapterInfo{{ID: "pirate", Tier: "store"}, {ID: "space", Tier: "store"}}, nil
}

func (fuzzCatalog) Get(_ context.Context, id string) (AdapterInfo, error) {
	if id == "pirate" || id == "space" {
		return AdapterInfo{ID: id, Tier: "store"}, nil
	}
	return AdapterInfo{}, fmt.Errorf("%w: %s", ErrNotFound, id)
}

func (fuzzCatalog) Put(context.Context, string, []byte, []byte) error {
	return fmt.Errorf("%w: the fuzz catalog takes no uploads", ErrInvalidAdapter)
}

func (fuzzCatalog) Delete(context.Context, string) error { return nil }

var fuzzRoutes = []struct{ method, path string }{
	{"POST", "/v1/adapters/pirate/invoke"},
	{"POST", "/v1/completions"},
	{"POST", "/v1/chat/completions"},
	{"POST", "/tokenize"},
	{"POST", "/detokenize"},
	{"GET", "/v1/models"},
	{"GET", "/v1/adapters/pirate"},
	{"POST", "/v1/adapters/zz/invoke"},
}

// FuzzRequests sends arbitrary bodies to every JSON route through the full
// HTTP handler (recover layer included): no panic may be recovered, every
// error is an OpenAI-shaped JSON object with a string code, every success
// is JSON or an SSE stream of JSON events.
func FuzzRequests(f *testing.F) {
	run := setupFuzz(f)
	for _, seed := range fuzzSeeds {
		for r := range fuzzRoutes {
			f.Add(uint8(r), []byte(seed))
		}
	}
	f.Fuzz(func(t *testing.T, route uint8, body []byte) { run(t, route, body) })
}

var fuzzSeeds = []string{
	`{"prompt":"Once upon a time","max_tokens":3}`,
	`{"model":"pirate","prompt":["Once","Twice"],"max_tokens":2,"stream":true,"stream_options":{"include_usage":true}}`,
	`{"model":"space","prompt":[1,2,3],"logprobs":2,"stop":["a",5],"return_token_ids":true}`,
	`{"model":"pirate","messages":[{"role":"user","content":"hi"}],"logprobs":true,"top_logprobs":3,"stream":true}`,
	`{"prompt_ids":[1,2],"temperature":0.7,"top_p":0.9,"top_k":5,"seed":7}`,
	`{"tokens":[1,2,3]}`,
	`{"model":"stories260K","prompt":"x","max_completion_tokens":9223372036854775807}`,
}

// setupFuzz builds a server over fuzzGen and returns the check of one
// request.
func setupFuzz(tb testing.TB) func(t *testing.T, route uint8, body []byte) {
	tok, err := tokenizer.Load("../models/stories260K")
	if err != nil {
		tb.Fatal(err)
	}
	tmpl, err := chat.NewTemplate("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}", "<s>", "</s>")
	if err != nil {
		tb.Fatal(err)
	}
	s := New(Config{Generator: fuzzGen{vocab: tok.VocabSize(), maxContext: 512}, Catalog: fuzzCatalog{},
		Tokenizer: tok, Template: tmpl, ModelName: "stories260K", MaxModelLen: 512, EOS: tok.EOS(),
		Logger: slog.New(slog.DiscardHandler)})
	h := s.app.Server().Handler
	addr := &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 1}
	return func(t *testing.T, route uint8, body []byte) {
		rt := fuzzRoutes[int(route)%len(fuzzRoutes)]
		var req fasthttp.Request
		req.Header.SetMethod(rt.method)
		req.SetRequestURI(rt.path)
		req.Header.SetContentType("application/json")
		req.SetBody(body)
		var ctx fasthttp.RequestCtx
		ctx.Init(&req, addr, nil)
		h(&ctx)
		out := ctx.Response.Body() // reads a streamed body to its end
		if n := counterValue(s, "http") + counterValue(s, "stream"); n > 0 {
			t.Fatalf("%s %s %q: a panic was recovered", rt.method, rt.path, body)
		}
		status := ctx.Response.StatusCode()
		if strings.HasPrefix(string(ctx.Response.Header.ContentType()), "text/event-stream") {
			for _, ev := range strings.Split(strings.TrimSpace(string(out)), "\n\n") {
				d, ok := strings.CutPrefix(ev, "data: ")
				if !ok || d == "[DONE]" {
					continue
				}
				if !json.Valid([]byte(d)) {
					t.Fatalf("%s %q: stream event is not JSON: %q", rt.path, body, d)
				}
			}
			return
		}
		var v struct {
			Error *struct {
				Message string `json:"message"`
				Type    string `json:"type"`
				Code    string `json:"code"`
			} `json:"error"`
		}
		if err := json.Unmarshal(out, &v); err != nil {
			t.Fatalf("%s %q: status %d, body is not JSON of the expected shape: %v: %q", rt.path, body, status, err, out)
		}
		if status >= 400 && (v.Error == nil || v.Error.Message == "" || v.Error.Code == "") {
			t.Fatalf("%s %q: status %d without an error object: %q", rt.path, body, status, out)
		}
		if status >= 500 {
			t.Fatalf("%s %q: status %d: %q", rt.path, body, status, out)
		}
	}
}

func counterValue(s *Server, where string) float64 { return s.metrics.Panics(where) }
