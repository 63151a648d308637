package api_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/peftd/peftd/api"
	"github.com/peftd/peftd/internal/adaptertest"
	"github.com/peftd/peftd/internal/apitest"
	"github.com/peftd/peftd/internal/fixture"
	"github.com/peftd/peftd/loader"
	"github.com/peftd/peftd/loader/store"
	"github.com/peftd/peftd/metrics"
	"github.com/peftd/peftd/runtime/cpu"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/scheduler"
	"github.com/peftd/peftd/server"
	"github.com/peftd/peftd/text/tokenizer"
)

// stack is the real serving core (engine on cpu, scheduler, loader) over
// an fs store in a test folder, wired by server.NewCore as peftd serve does.
type stack struct {
	model   *llama.Model
	core    *server.Core
	cat     api.Catalog
	loader  *loader.Manager
	sched   *scheduler.Scheduler
	metrics *metrics.Metrics
	eos     []int32
}

func newStack(t *testing.T, m *llama.Model, dir string, slots, maxQueue int) *stack {
	t.Helper()
	st, err := store.NewFS(dir, store.FSOptions{PollInterval: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	core, err := server.NewCore(context.Background(), server.CoreConfig{Model: m, Backend: cpu.New(0), Store: st,
		Slots: slots, KVBlocks: 256, MaxQueue: maxQueue, CacheDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { core.Close() })
	var eos []int32
	for _, id := range m.Config.EOS {
		eos = append(eos, int32(id))
	}
	return &stack{model: m, core: core, cat: core.Catalog, loader: core.Loader, sched: core.Scheduler, metrics: core.Metrics, eos: eos}
}

func (st *stack) config(name string) api.Config {
	return api.Config{Generator: st.sched, Catalog: st.cat, ModelName: name, MaxModelLen: 512, EOS: st.eos, Metrics: st.metrics}
}

// start serves cfg on a loopback port and returns the base URL.
func start(t testing.TB, cfg api.Config) string {
	t.Helper()
	srv := api.New(cfg)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
	})
	return "http://" + ln.Addr().String()
}

// fixtureStack serves the tiny-llama-lora base with all-r16 deployed.
func fixtureStack(t *testing.T, slots, maxQueue int) (*stack, *fixture.Fixture) {
	return fixtureStackWith(t, slots, maxQueue, nil)
}

// fixtureStackWith is fixtureStack with prep run on the store folder
// before the server starts (nil: nothing more).
func fixtureStackWith(t *testing.T, slots, maxQueue int, prep func(store string)) (*stack, *fixture.Fixture) {
	t.Helper()
	f, err := fixture.Load()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	store := t.TempDir()
	adaptertest.Copy(t, filepath.Join(fixture.Dir(), "adapters", "all-r16"), filepath.Join(store, "all-r16"))
	if prep != nil {
		prep(store)
	}
	return newStack(t, f.Model, store, slots, maxQueue), f
}

// keyedServer serves stories260K with the API keys of a key file's lines.
func keyedServer(t *testing.T, lines string) string {
	t.Helper()
	keyFile := filepath.Join(t.TempDir(), "keys")
	if err := os.WriteFile(keyFile, []byte(lines), 0o600); err != nil {
		t.Fatal(err)
	}
	keys, err := api.LoadKeys(keyFile)
	if err != nil {
		t.Fatal(err)
	}
	url, _ := storiesServer(t, false, func(c *api.Config) { c.Keys = keys })
	return url
}

const storiesDir = "../models/stories260K"

// storiesStack serves stories260K with pirate and space deployed.
func storiesStack(t *testing.T, slots, maxQueue int) (*stack, *tokenizer.Tokenizer) {
	t.Helper()
	m, err := llama.Open(storiesDir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	tok, err := tokenizer.Load(storiesDir)
	if err != nil {
		t.Fatal(err)
	}
	store := t.TempDir()
	for _, n := range []string{"pirate", "space"} {
		adaptertest.Copy(t, filepath.Join("../models/adapters", n), filepath.Join(store, n))
	}
	st := newStack(t, m, store, slots, maxQueue)
	st.eos = append(st.eos, tok.EOS()...)
	return st, tok
}

type reply = apitest.Reply

// httpc's failed requests end the test.
var httpc = apitest.Client{Fatal: true}

func do(t *testing.T, method, url string, body any, hdr ...string) reply {
	t.Helper()
	return httpc.Do(t, method, url, body, hdr...)
}

// sse reads an SSE body into its data payloads (without [DONE], reported apart).
func sse(t *testing.T, body []byte) (events []map[string]any, done bool) {
	t.Helper()
	sc := bufio.NewScanner(bytes.NewReader(body))
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, ":") {
			continue
		}
		data, ok := strings.CutPrefix(line, "data: ")
		if !ok {
			t.Fatalf("bad SSE line %q", line)
		}
		if data == "[DONE]" {
			done = true
			continue
		}
		if done {
			t.Fatalf("data after [DONE]: %s", data)
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(data), &m); err != nil {
			t.Fatalf("SSE data is not JSON: %s", data)
		}
		events = append(events, m)
	}
	return events, done
}

// wantErr checks an OpenAI-shaped error.
func wantErr(t *testing.T, r reply, status int, param string) map[string]any {
	t.Helper()
	if r.Status != status {
		t.Fatalf("status %d, want %d: %s", r.Status, status, r.Body)
	}
	e, ok := r.JSON(t)["error"].(map[string]any)
	if !ok {
		t.Fatalf("no error object: %s", r.Body)
	}
	for _, k := range []string{"message", "type", "param", "code"} {
		if _, ok := e[k]; !ok {
			t.Errorf("error lacks %q: %s", k, r.Body)
		}
	}
	if param != "" && e["param"] != param {
		t.Errorf("error param %v, want %q: %s", e["param"], param, r.Body)
	}
	return e
}

func toInts(v any) []int32 {
	arr, _ := v.([]any)
	out := []int32{}
	for _, x := range arr {
		out = append(out, int32(x.(float64)))
	}
	return out
}

// slotHeldServer serves stories260K with one device slot, held by a lease on
// pirate, so requests for any other adapter wait for residency. mod adjusts
// the config; release the returned lease (Release is idempotent) to free
// the slot early — the test's end releases it otherwise.
func slotHeldServer(t *testing.T, maxQueue int, mod func(*api.Config)) (string, *stack, *loader.Lease) {
	t.Helper()
	st, tok := storiesStack(t, 1, maxQueue)
	cfg := st.config("stories260K")
	cfg.Tokenizer = tok
	if mod != nil {
		mod(&cfg)
	}
	url := start(t, cfg)
	lease, err := st.loader.Acquire(context.Background(), "pirate")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(lease.Release)
	return url, st, lease
}
