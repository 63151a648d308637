package server_test

import (
	"archive/tar"
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/peftd/peftd/internal/fixture"
	"github.com/peftd/peftd/runtime/lora"
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

// readAdapter returns the fixture adapter's two files.
func readAdapter(t testing.TB, dir string) (cfg, weights []byte) {
	t.Helper()
	cfg, err := os.ReadFile(filepath.Join(dir, lora.ConfigFile))
	if err != nil {
		t.Fatal(err)
	}
	weights, err = os.ReadFile(filepath.Join(dir, lora.WeightsFile))
	if err != nil {
		t.Fatal(err)
	}
	return cfg, weights
}

// fixtureStore is a store folder holding the fixture's four adapters.
func fixtureStore(t testing.TB) string {
	t.Helper()
	dir := t.TempDir()
	for _, n := range fixture.AdapterNames {
		c, w := readAdapter(t, adapterDir(n))
		if err := os.MkdirAll(filepath.Join(dir, n), 0o755); err != nil {
			t.Fatal(err)
		}
		os.WriteFile(filepath.Join(dir, n, lora.ConfigFile), c, 0o644)
		os.WriteFile(filepath.Join(dir, n, lora.WeightsFile), w, 0o644)
	}
	return dir
}

// testLogger writes the server's logs to the test log.
type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
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
		level := slog.LevelWarn
		if os.Getenv("PEFTD_TEST_LOGS") != "" {
			level = slog.LevelDebug
		}
		cfg.Logger = slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: level}))
	}
	s, err := server.New(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve(ln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		if err := s.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
	})
	return s, "http://" + ln.Addr().String()
}

type reply struct {
	status int
	body   []byte
}

func (r reply) json(t testing.TB) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(r.body, &m); err != nil {
		t.Fatalf("status %d: body is not JSON: %v: %s", r.status, err, r.body)
	}
	return m
}

// errMessage is an OpenAI-shaped error's message.
func (r reply) errMessage(t testing.TB) string {
	t.Helper()
	e, _ := r.json(t)["error"].(map[string]any)
	msg, _ := e["message"].(string)
	if msg == "" {
		t.Errorf("no error message: %s", r.body)
	}
	return msg
}

var client = &http.Client{Timeout: 2 * time.Minute}

func do(t testing.TB, method, url string, body any, hdr ...string) reply {
	t.Helper()
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case []byte:
		rd = bytes.NewReader(b)
	case string:
		rd = strings.NewReader(b)
	default:
		j, err := json.Marshal(b)
		if err != nil {
			t.Fatal(err)
		}
		rd = bytes.NewReader(j)
	}
	req, err := http.NewRequest(method, url, rd)
	if err != nil {
		t.Fatal(err)
	}
	if _, raw := body.([]byte); !raw && body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Errorf("%s %s: %v", method, url, err)
		return reply{}
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return reply{resp.StatusCode, b}
}

// generate runs c's prompt greedily through /v1/completions on model
// (adapter ID, or "" for the base model) and returns the status, the token
// ids and the body.
func generate(t testing.TB, url, model string, c fixture.Case) (int, []int32, []byte) {
	t.Helper()
	r := do(t, "POST", url+"/v1/completions", map[string]any{"model": model, "prompt": c.Prompt,
		"max_tokens": len(c.Greedy), "temperature": 0, "ignore_eos": true, "return_token_ids": true})
	if r.status != 200 {
		return r.status, nil, r.body
	}
	var m struct {
		Choices []struct {
			TokenIDs []int32 `json:"token_ids"`
		} `json:"choices"`
	}
	if err := json.Unmarshal(r.body, &m); err != nil || len(m.Choices) != 1 {
		t.Errorf("bad completion: %v %s", err, r.body)
		return r.status, nil, r.body
	}
	return r.status, m.Choices[0].TokenIDs, r.body
}

// caseFor is the first fixture case of adapter ("" the base model).
func caseFor(t testing.TB, adapter string) fixture.Case {
	t.Helper()
	for _, c := range fix.Cases {
		if c.AdapterName() == adapter {
			return c
		}
	}
	t.Fatalf("no fixture case for %q", adapter)
	return fixture.Case{}
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
	if r.status != 200 {
		return "", r.status
	}
	s, _ := r.json(t)["tier"].(string)
	return s, 200
}

// metric is one sample of a scrape: name{labels} value.
type metric struct {
	name, labels string
	value        float64
}

func scrape(t testing.TB, url string) []metric {
	t.Helper()
	r := do(t, "GET", url+"/metrics", nil)
	if r.status != 200 {
		t.Fatalf("metrics: %d %s", r.status, r.body)
	}
	var out []metric
	sc := bufio.NewScanner(bytes.NewReader(r.body))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("metric line %q: %v", line, err)
		}
		name, labels := line[:i], ""
		if j := strings.IndexByte(name, '{'); j >= 0 {
			name, labels = name[:j], name[j:]
		}
		out = append(out, metric{name, labels, v})
	}
	return out
}

// value is the sample of name whose labels contain every label (`k="v"`);
// ok is false when there is none.
func value(ms []metric, name string, labels ...string) (float64, bool) {
	for _, m := range ms {
		if m.name != name {
			continue
		}
		all := true
		for _, l := range labels {
			all = all && strings.Contains(m.labels, l)
		}
		if all {
			return m.value, true
		}
	}
	return 0, false
}

func tarGz(t testing.TB, files map[string][]byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	gz := gzip.NewWriter(&buf)
	tw := tar.NewWriter(gz)
	for name, b := range files {
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(b)), Typeflag: tar.TypeReg}); err != nil {
			t.Fatal(err)
		}
		tw.Write(b)
	}
	tw.Close()
	gz.Close()
	return buf.Bytes()
}

// eventually polls cond every 20ms until it holds or within passes.
func eventually(t testing.TB, within time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > within {
			t.Fatalf("%s: not within %v", what, within)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return time.Since(start)
}
