package api_test

import (
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

var updateWire = flag.Bool("update-wire", false, "rewrite testdata/wire.golden.json from the current server")

// TestWireGolden pins the JSON every route answers (bodies and SSE events,
// ids and timestamps masked) for a fixed set of greedy requests: a change of
// the wire format shows up here, whatever the code that renders it.
func TestWireGolden(t *testing.T) {
	url, _ := storiesServer(t, true, nil)
	reqs := []struct{ name, path, body string }{
		{"invoke", "/v1/adapters/pirate/invoke", `{"prompt":"Once upon a time","max_tokens":6}`},
		{"invoke-logprobs", "/v1/adapters/pirate/invoke", `{"prompt":"Once","max_tokens":3,"logprobs":2}`},
		{"invoke-stream", "/v1/adapters/space/invoke", `{"prompt":"Once upon a time","max_tokens":4,"stream":true}`},
		{"completions", "/v1/completions", `{"model":"pirate","prompt":"Once upon a time","max_tokens":5,"temperature":0}`},
		{"completions-ids-lp", "/v1/completions", `{"model":"space","prompt":[1,403],"max_tokens":3,"temperature":0,"logprobs":2,"return_token_ids":true}`},
		{"completions-stream-usage", "/v1/completions", `{"model":"pirate","prompt":"Once","max_tokens":4,"temperature":0,"stream":true,"stream_options":{"include_usage":true},"return_token_ids":true}`},
		{"completions-batch", "/v1/completions", `{"model":"pirate","prompt":["Once","One day"],"max_tokens":3,"temperature":0}`},
		{"completions-stop", "/v1/completions", `{"model":"pirate","prompt":"Once upon a time","max_tokens":40,"temperature":0,"stop":["Sue"]}`},
		{"chat", "/v1/chat/completions", `{"model":"pirate","messages":[{"role":"user","content":"hi"}],"max_tokens":4,"temperature":0,"logprobs":true,"top_logprobs":1,"return_token_ids":true}`},
		{"chat-stream", "/v1/chat/completions", `{"model":"space","messages":[{"role":"user","content":"hi"}],"max_tokens":3,"temperature":0,"stream":true,"stream_options":{"include_usage":true},"logprobs":true}`},
		{"chat-n", "/v1/chat/completions", `{"model":"pirate","messages":[{"role":"user","content":"hi"}],"max_tokens":3,"temperature":0,"n":2}`},
		{"error", "/v1/completions", `{"model":"pirate","prompt":"x","n":0}`},
	}
	got := map[string]any{}
	for _, r := range reqs {
		rep := do(t, "POST", url+r.path, r.body)
		var v any
		if strings.HasPrefix(rep.Header.Get("Content-Type"), "text/event-stream") {
			evs, done := sse(t, rep.Body)
			b, _ := json.Marshal(map[string]any{"events": evs, "done": done})
			json.Unmarshal(b, &v)
		} else if err := json.Unmarshal(rep.Body, &v); err != nil {
			t.Fatalf("%s: %v: %s", r.name, err, rep.Body)
		}
		got[r.name] = map[string]any{"status": rep.Status, "body": mask(v)}
	}
	path := filepath.Join("testdata", "wire.golden.json")
	if *updateWire {
		b, _ := json.MarshalIndent(got, "", " ")
		os.MkdirAll("testdata", 0o755)
		if err := os.WriteFile(path, b, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (make it with go test ./api -run WireGolden -update-wire)", err)
	}
	var want map[string]any
	if err := json.Unmarshal(b, &want); err != nil {
		t.Fatal(err)
	}
	// Round-trip got through JSON so both sides hold the same types.
	gb, _ := json.Marshal(got)
	var gotRT map[string]any
	json.Unmarshal(gb, &gotRT)
	for name, w := range want {
		wb, _ := json.Marshal(w)
		hb, _ := json.Marshal(gotRT[name])
		if string(wb) != string(hb) {
			t.Errorf("%s: wire format changed\n got: %s\nwant: %s", name, hb, wb)
		}
	}
}

// mask replaces request-specific values (ids, timestamps) in a JSON tree.
func mask(v any) any {
	switch x := v.(type) {
	case map[string]any:
		out := map[string]any{}
		for k, e := range x {
			if k == "id" || k == "created" {
				out[k] = "<masked>"
				continue
			}
			out[k] = mask(e)
		}
		return out
	case []any:
		out := make([]any, len(x))
		for i, e := range x {
			out[i] = mask(e)
		}
		return out
	}
	return v
}
