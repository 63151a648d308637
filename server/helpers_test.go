package server_test

import (
	"context"
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/peftd/peftd/internal/adaptertest"
	"github.com/peftd/peftd/internal/apitest"
	"github.com/peftd/peftd/internal/fixture"
	"github.com/peftd/peftd/internal/testlog"
	"github.com/peftd/peftd/server"
)

var fix *fixture.Fixture

func TestMain(m *testing.M) {
	f, err := fixture.Load()
	if err != nil {
		panic(err)
	}
	fix = f
	code := m.Run()
	f.Close()
	os.Exit(code)
}

func baseDir() string { return filepath.Join(fixture.Dir(), "base") }

func adapterDir(name string) string { return filepath.Join(fixture.Dir(), "adapters", name) }

// fixtureStore is a store folder holding the fixture's four adapters.
func fixtureStore(t testing.TB) string {
	t.Helper()
	dir := t.TempDir()
	for _, n := range fixture.AdapterNames {
		adaptertest.Copy(t, adapterDir(n), filepath.Join(dir, n))
	}
	return dir
}

// start builds a server from cfg (fixture base model, cpu) and serves it
// on a loopback port until the test ends.
func start(t testing.TB, cfg server.Config) (*server.Server, string) {
	t.Helper()
	if cfg.Model == "" {
		cfg.Model = baseDir()
	}
	if cfg.Device == "" {
		cfg.Device = server.DeviceCPU
	}
	if cfg.CacheDir == "" {
		cfg.CacheDir = t.TempDir()
	}
	if cfg.Logger == nil {
		cfg.Logger = testlog.Logger(t)
	}
	s, err := server.New(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	return s, apitest.Serve(t, "", s, 20*time.Second)
}

type reply = apitest.Reply

// httpc reports a failed request with t.Errorf and a zero reply.
var httpc = apitest.Client{HTTP: &http.Client{Timeout: 2 * time.Minute}}

func do(t testing.TB, method, url string, body any, hdr ...string) reply {
	t.Helper()
	return httpc.Do(t, method, url, body, hdr...)
}

// generate runs c's prompt greedily through /v1/completions on model
// (adapter ID, or "" for the base model) and returns the status, the token
// ids and the body.
func generate(t testing.TB, url, model string, c fixture.Case) (int, []int32, []byte) {
	t.Helper()
	r := do(t, "POST", url+"/v1/completions", map[string]any{"model": model, "prompt": c.Prompt,
		"max_tokens": len(c.Greedy), "temperature": 0, "ignore_eos": true, "return_token_ids": true})
	if r.Status != 200 {
		return r.Status, nil, r.Body
	}
	var m struct {
		Choices []struct {
			TokenIDs []int32 `json:"token_ids"`
		} `json:"choices"`
	}
	if err := json.Unmarshal(r.Body, &m); err != nil || len(m.Choices) != 1 {
		t.Errorf("bad completion: %v %s", err, r.Body)
		return r.Status, nil, r.Body
	}
	return r.Status, m.Choices[0].TokenIDs, r.Body
}

// caseFor is the first fixture case of adapter ("" the base model).
func caseFor(t testing.TB, adapter string) fixture.Case {
	t.Helper()
	return fix.Case(t, adapter)
}

// wantServes checks that adapter still returns its reference tokens.
func wantServes(t testing.TB, url, adapter string) {
	t.Helper()
	c := caseFor(t, adapter)
	status, got, body := generate(t, url, adapter, c)
	if status != 200 || !slices.Equal(got, c.Greedy) {
		t.Errorf("%q: status %d tokens %v, want %v: %s", adapter, status, got, c.Greedy, body)
	}
}

// tier is GET /v1/adapters/{id}'s tier ("" with the status when not 200).
func tier(t testing.TB, url, id string) (string, int) {
	t.Helper()
	r := do(t, "GET", url+"/v1/adapters/"+id, nil)
	if r.Status != 200 {
		return "", r.Status
	}
	s, _ := r.JSON(t)["tier"].(string)
	return s, 200
}

// eventually polls cond every 20ms until it holds or within passes.
func eventually(t testing.TB, within time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	return apitest.Eventually(t, within, 20*time.Millisecond, what, cond)
}
