package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/peftd/peftd/server"
)

// repoRoot is the repository root (two levels above this file).
func repoRoot(t testing.TB) string {
	t.Helper()
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		t.Fatal("no caller")
	}
	return filepath.Join(filepath.Dir(file), "..", "..")
}

// testWriter sends the server's logs to the test log.
type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func testLogger(t testing.TB, name string) *slog.Logger {
	level := slog.LevelWarn
	if os.Getenv("PEFTD_TEST_LOGS") != "" {
		level = slog.LevelDebug
	}
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: level})).With("replica", name)
}

// startServer runs server.New(cfg) (CPU unless set) on a loopback port until
// the test ends and returns its base URL.
func startServer(t testing.TB, name string, cfg server.Config) (*server.Server, string) {
	t.Helper()
	if cfg.Device == "" {
		cfg.Device = server.DeviceCPU
	}
	if cfg.CacheDir == "" {
		cfg.CacheDir = t.TempDir()
	}
	if cfg.Logger == nil {
		cfg.Logger = testLogger(t, name)
	}
	s, err := server.New(context.Background(), cfg)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve(ln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := s.Shutdown(ctx); err != nil {
			t.Errorf("%s: shutdown: %v", name, err)
		}
		if err := <-done; err != nil {
			t.Errorf("%s: serve: %v", name, err)
		}
	})
	return s, "http://" + ln.Addr().String()
}

var client = &http.Client{Timeout: 3 * time.Minute}

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

// do sends body (JSON-encoded unless nil) with header pairs hdr.
func do(t testing.TB, method, url string, body any, hdr ...string) reply {
	t.Helper()
	var rd io.Reader
	if body != nil {
		j, err := json.Marshal(body)
		if err != nil {
			t.Fatal(err)
		}
		rd = bytes.NewReader(j)
	}
	req, err := http.NewRequest(method, url, rd)
	if err != nil {
		t.Fatal(err)
	}
	if body != nil {
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

// stream posts a streamed completion and calls onEvent with each SSE data
// payload until [DONE]; it returns the HTTP status and the events read.
func stream(t testing.TB, url string, body map[string]any, onEvent func(n int, data string), hdr ...string) (int, int) {
	t.Helper()
	body["stream"] = true
	j, _ := json.Marshal(body)
	req, err := http.NewRequest("POST", url+"/v1/completions", bytes.NewReader(j))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Errorf("stream: %v", err)
		return 0, 0
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		b, _ := io.ReadAll(resp.Body)
		t.Errorf("stream: %d %s", resp.StatusCode, b)
		return resp.StatusCode, 0
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(nil, 1<<20)
	n := 0
	for sc.Scan() {
		data, ok := strings.CutPrefix(sc.Text(), "data: ")
		if !ok {
			continue
		}
		if data == "[DONE]" {
			break
		}
		n++
		if onEvent != nil {
			onEvent(n, data)
		}
	}
	return resp.StatusCode, n
}

// sample is one sample of a /metrics scrape.
type sample struct {
	name   string
	labels map[string]string
	value  float64
}

var labelRE = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"`)

// parseMetrics parses the Prometheus text format (samples only).
func parseMetrics(t testing.TB, body []byte) []sample {
	t.Helper()
	var out []sample
	sc := bufio.NewScanner(bytes.NewReader(body))
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
		s := sample{name: line[:i], labels: map[string]string{}, value: v}
		if j := strings.IndexByte(s.name, '{'); j >= 0 {
			for _, m := range labelRE.FindAllStringSubmatch(s.name[j:], -1) {
				uq, err := strconv.Unquote(`"` + m[2] + `"`)
				if err != nil {
					t.Fatalf("metric line %q: label %s: %v", line, m[1], err)
				}
				s.labels[m[1]] = uq
			}
			s.name = s.name[:j]
		}
		out = append(out, s)
	}
	return out
}

func scrape(t testing.TB, url string) []sample {
	t.Helper()
	r := do(t, "GET", url+"/metrics", nil)
	if r.status != 200 {
		t.Fatalf("GET %s/metrics: %d %s", url, r.status, r.body)
	}
	return parseMetrics(t, r.body)
}

// find returns the samples named name.
func find(ms []sample, name string) []sample {
	var out []sample
	for _, m := range ms {
		if m.name == name {
			out = append(out, m)
		}
	}
	return out
}

// value is the one sample of name whose labels include want (k, v pairs);
// ok is false when there is none.
func value(ms []sample, name string, want ...string) (float64, bool) {
next:
	for _, m := range find(ms, name) {
		for i := 0; i+1 < len(want); i += 2 {
			if m.labels[want[i]] != want[i+1] {
				continue next
			}
		}
		return m.value, true
	}
	return 0, false
}

// tier is GET /v1/adapters/{id}'s tier ("" when not 200).
func tier(t testing.TB, url, id string) string {
	t.Helper()
	r := do(t, "GET", url+"/v1/adapters/"+id, nil)
	if r.status != 200 {
		return ""
	}
	s, _ := r.json(t)["tier"].(string)
	return s
}

// eventually polls cond every 50ms until it holds, failing after within.
func eventually(t testing.TB, within time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > within {
			t.Fatalf("%s: not within %v", what, within)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return time.Since(start)
}

// syncBuffer is a bytes.Buffer safe for a subprocess's output and the test.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// freePort returns a loopback address nothing listens on (now).
func freePort(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}
