package api_test

import (
	"archive/zip"
	"bytes"
	"mime/multipart"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/peftd/peftd/internal/adaptertest"
	"github.com/peftd/peftd/internal/fixture"
)

// TestFixtureCompletions: token-id prompts give the reference greedy tokens,
// for the base model and a deployed adapter, through completions and invoke.
func TestFixtureCompletions(t *testing.T) {
	st, f := fixtureStack(t, 2, 16)
	url := start(t, st.config("base"))

	for _, adapter := range []string{"", "all-r16"} {
		c := f.Case(t, adapter)
		model := adapter
		if model == "" {
			model = "base"
		}
		r := do(t, "POST", url+"/v1/completions", map[string]any{"model": model, "prompt": c.Prompt,
			"max_tokens": len(c.Greedy), "temperature": 0, "ignore_eos": true, "return_token_ids": true})
		if r.Status != 200 {
			t.Fatalf("%s: %d %s", model, r.Status, r.Body)
		}
		m := r.JSON(t)
		ch := m["choices"].([]any)[0].(map[string]any)
		if got := toInts(ch["token_ids"]); !slices.Equal(got, c.Greedy) {
			t.Errorf("%s: token_ids %v, want %v", model, got, c.Greedy)
		}
		if got := toInts(m["prompt_token_ids"]); !slices.Equal(got, c.Prompt) {
			t.Errorf("%s: prompt_token_ids %v, want %v", model, got, c.Prompt)
		}
		if ch["finish_reason"] != "length" || m["object"] != "text_completion" || m["model"] != model {
			t.Errorf("%s: %s", model, r.Body)
		}
		u := m["usage"].(map[string]any)
		if int(u["completion_tokens"].(float64)) != len(c.Greedy) || int(u["prompt_tokens"].(float64)) != len(c.Prompt) {
			t.Errorf("usage %v", u)
		}

		// invoke, JSON and SSE
		id := model
		r = do(t, "POST", url+"/v1/adapters/"+id+"/invoke", map[string]any{"prompt_ids": c.Prompt,
			"max_tokens": len(c.Greedy), "ignore_eos": true, "logprobs": 2})
		if r.Status != 200 {
			t.Fatalf("invoke %s: %d %s", id, r.Status, r.Body)
		}
		m = r.JSON(t)
		if got := toInts(m["token_ids"]); !slices.Equal(got, c.Greedy) {
			t.Errorf("invoke %s: %v, want %v", id, got, c.Greedy)
		}
		lps := m["logprobs"].([]any)
		if len(lps) != len(c.Greedy) || len(lps[0].(map[string]any)["top_logprobs"].([]any)) != 2 {
			t.Errorf("invoke logprobs: %s", r.Body)
		}
		r = do(t, "POST", url+"/v1/adapters/"+id+"/invoke", map[string]any{"prompt_ids": c.Prompt,
			"max_tokens": len(c.Greedy), "ignore_eos": true, "stream": true})
		if r.Status != 200 || !strings.HasPrefix(r.Header.Get("Content-Type"), "text/event-stream") {
			t.Fatalf("stream: %d %v %s", r.Status, r.Header, r.Body)
		}
		evs, done := sse(t, r.Body)
		var got []int32
		for _, e := range evs {
			got = append(got, toInts(e["token_ids"])...)
		}
		if !done || !slices.Equal(got, c.Greedy) || evs[len(evs)-1]["finish_reason"] != "length" {
			t.Errorf("stream invoke %s: done %v tokens %v, want %v: %s", id, done, got, c.Greedy, r.Body)
		}
	}

	// A stop token id (invoke's stop takes ids) ends at its first occurrence.
	c0 := f.Case(t, "")
	k := len(c0.Greedy) - 1
	for slices.Index(c0.Greedy, c0.Greedy[k]) != k {
		k--
	}
	r0 := do(t, "POST", url+"/v1/adapters/base/invoke", map[string]any{"prompt_ids": c0.Prompt,
		"max_tokens": len(c0.Greedy), "ignore_eos": true, "stop": []any{c0.Greedy[k]}})
	if m := r0.JSON(t); !slices.Equal(toInts(m["token_ids"]), c0.Greedy[:k+1]) || m["finish_reason"] != "stop" {
		t.Errorf("stop id %d: %s", c0.Greedy[k], r0.Body)
	}
	wantErr(t, do(t, "POST", url+"/v1/adapters/base/invoke", map[string]any{"prompt": "text"}), 400, "prompt")
	wantErr(t, do(t, "POST", url+"/v1/adapters/base/invoke", map[string]any{"prompt_ids": c0.Prompt, "stop": "x"}), 400, "stop")

	// Completions stream over token ids, with usage.
	c := f.Case(t, "all-r16")
	r := do(t, "POST", url+"/v1/completions", map[string]any{"model": "all-r16", "prompt": c.Prompt,
		"max_tokens": len(c.Greedy), "temperature": 0, "ignore_eos": true, "return_token_ids": true,
		"stream": true, "stream_options": map[string]any{"include_usage": true}, "logprobs": 1})
	evs, done := sse(t, r.Body)
	var got []int32
	for _, e := range evs[:len(evs)-1] {
		ch := e["choices"].([]any)[0].(map[string]any)
		got = append(got, toInts(ch["token_ids"])...)
	}
	last := evs[len(evs)-1]
	if !done || !slices.Equal(got, c.Greedy) || last["usage"] == nil || len(last["choices"].([]any)) != 0 {
		t.Errorf("completion stream: %v vs %v: %s", got, c.Greedy, r.Body)
	}
	fin := evs[len(evs)-2]["choices"].([]any)[0].(map[string]any)
	if fin["finish_reason"] != "length" {
		t.Errorf("finish chunk %v", fin)
	}
}

// TestUpload deploys adapters as tar.gz (one folder down) and multipart,
// serves them; a misfit adapter gets 400 and the others keep serving.
func TestUpload(t *testing.T) {
	st, f := fixtureStack(t, 2, 16)
	cfg := st.config("base")
	cfg.MaxUploadBytes = 1 << 20
	url := start(t, cfg)
	dir := filepath.Join(fixture.Dir(), "adapters", "qv-r8")

	r := do(t, "PUT", url+"/v1/adapters/qv-r8", adaptertest.TarGz(t, adaptertest.Files(t, dir, "qv-r8/")), "Content-Type", "application/gzip")
	if r.Status != 201 {
		t.Fatalf("upload: %d %s", r.Status, r.Body)
	}
	if m := r.JSON(t); m["id"] != "qv-r8" || m["rank"].(float64) != 8 {
		t.Errorf("upload info %s", r.Body)
	}
	c := f.Case(t, "qv-r8")
	check := func(model string, c fixture.Case) {
		t.Helper()
		r := do(t, "POST", url+"/v1/completions", map[string]any{"model": model, "prompt": c.Prompt,
			"max_tokens": len(c.Greedy), "temperature": 0, "ignore_eos": true, "return_token_ids": true})
		if r.Status != 200 {
			t.Fatalf("%s: %d %s", model, r.Status, r.Body)
		}
		ch := r.JSON(t)["choices"].([]any)[0].(map[string]any)
		if got := toInts(ch["token_ids"]); !slices.Equal(got, c.Greedy) {
			t.Errorf("%s: %v, want %v", model, got, c.Greedy)
		}
	}
	check("qv-r8", c)

	// multipart upload under another ID, replacing nothing
	var buf bytes.Buffer
	mw := multipart.NewWriter(&buf)
	for name, b := range adaptertest.Files(t, dir, "") {
		w, _ := mw.CreateFormFile(name, name)
		w.Write(b)
	}
	mw.Close()
	r = do(t, "PUT", url+"/v1/adapters/qv-copy", buf.Bytes(), "Content-Type", mw.FormDataContentType())
	if r.Status != 201 {
		t.Fatalf("multipart upload: %d %s", r.Status, r.Body)
	}
	check("qv-copy", c)

	// zip, files at the top level
	var zb bytes.Buffer
	zw := zip.NewWriter(&zb)
	for name, b := range adaptertest.Files(t, filepath.Join(fixture.Dir(), "adapters", "all-r16"), "") {
		w, _ := zw.Create(name)
		w.Write(b)
	}
	zw.Close()
	r = do(t, "PUT", url+"/v1/adapters/all-zip", zb.Bytes(), "Content-Type", "application/zip")
	if r.Status != 201 {
		t.Fatalf("zip upload: %d %s", r.Status, r.Body)
	}
	check("all-zip", f.Case(t, "all-r16"))
	if r := do(t, "DELETE", url+"/v1/adapters/all-zip", nil); r.Status != 200 {
		t.Errorf("delete: %d %s", r.Status, r.Body)
	}

	// stories260K's pirate does not fit the fixture's shapes
	bad := adaptertest.TarGz(t, adaptertest.Files(t, "../models/adapters/pirate", ""))
	wantErr(t, do(t, "PUT", url+"/v1/adapters/pirate", bad, "Content-Type", "application/gzip"), 400, "body")
	wantErr(t, do(t, "PUT", url+"/v1/adapters/junk", []byte("not an archive at all"), "Content-Type", "application/octet-stream"), 400, "body")
	wantErr(t, do(t, "PUT", url+"/v1/adapters/big", bytes.Repeat([]byte{'x'}, 1<<20+100<<10), "Content-Type", "application/octet-stream"), 413, "")
	check("qv-r8", c)
	check("all-r16", f.Case(t, "all-r16"))
	if r := do(t, "GET", url+"/v1/adapters/pirate", nil); r.Status != 404 {
		t.Errorf("the misfit adapter is listed: %d %s", r.Status, r.Body)
	}

	// list, models, delete
	r = do(t, "GET", url+"/v1/adapters", nil)
	if n := len(r.JSON(t)["data"].([]any)); n != 3 {
		t.Errorf("%d adapters listed: %s", n, r.Body)
	}
	r = do(t, "GET", url+"/v1/models", nil)
	data := r.JSON(t)["data"].([]any)
	if len(data) != 4 || data[0].(map[string]any)["id"] != "base" {
		t.Errorf("models: %s", r.Body)
	}
	if r := do(t, "DELETE", url+"/v1/adapters/qv-copy", nil); r.Status != 200 {
		t.Errorf("delete: %d %s", r.Status, r.Body)
	}
	wantErr(t, do(t, "DELETE", url+"/v1/adapters/qv-copy", nil), 404, "")
	wantErr(t, do(t, "POST", url+"/v1/completions", map[string]any{"model": "qv-copy", "prompt": c.Prompt}), 404, "model")
	r = do(t, "GET", url+"/v1/adapters/qv-r8", nil)
	if m := r.JSON(t); m["invocations"].(float64) < 1 || m["tier"] != "device" {
		t.Errorf("adapter info %s", r.Body)
	}
}
