package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/peftd/peftd/internal/apitest"
	"github.com/peftd/peftd/internal/testlog"
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
		cfg.Logger = testlog.Logger(t).With("replica", name)
	}
	s, err := server.New(context.Background(), cfg)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return s, apitest.Serve(t, name, s, 30*time.Second)
}

var client = &http.Client{Timeout: 3 * time.Minute}

// httpc reports a failed request with t.Errorf and a zero reply.
var httpc = apitest.Client{HTTP: client}

type reply = apitest.Reply

// do sends body (JSON-encoded unless nil, []byte or a string) with header pairs hdr.
func do(t testing.TB, method, url string, body any, hdr ...string) reply {
	t.Helper()
	return httpc.Do(t, method, url, body, hdr...)
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

// tier is GET /v1/adapters/{id}'s tier ("" when not 200).
func tier(t testing.TB, url, id string) string {
	t.Helper()
	r := do(t, "GET", url+"/v1/adapters/"+id, nil)
	if r.Status != 200 {
		return ""
	}
	s, _ := r.JSON(t)["tier"].(string)
	return s
}

// eventually polls cond every 50ms until it holds, failing after within.
func eventually(t testing.TB, within time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	return apitest.Eventually(t, within, 50*time.Millisecond, what, cond)
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
