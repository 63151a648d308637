// Package apitest sends HTTP requests to a server under test and reads its
// replies and its Prometheus /metrics.
package apitest

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Reply is a response, read whole.
type Reply struct {
	Status int
	Header http.Header
	Body   []byte
}

// JSON is the body as a JSON object; anything else fails the test.
func (r Reply) JSON(t testing.TB) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(r.Body, &m); err != nil {
		t.Fatalf("status %d: body is not JSON: %v: %s", r.Status, err, r.Body)
	}
	return m
}

// ErrMessage is an OpenAI-shaped error's message; an empty one is an error.
func (r Reply) ErrMessage(t testing.TB) string {
	t.Helper()
	e, _ := r.JSON(t)["error"].(map[string]any)
	msg, _ := e["message"].(string)
	if msg == "" {
		t.Errorf("no error message: %s", r.Body)
	}
	return msg
}

// Client sends requests for a test.
type Client struct {
	HTTP *http.Client // nil: http.DefaultClient
	// Fatal: a request that fails, or a body that cannot be read, ends the
	// test. Otherwise a failed request is a t.Errorf and a zero Reply, and
	// the body is what could be read.
	Fatal bool
}

// Do sends body with the header pairs hdr: nil sends none, []byte as is, a
// string as is with Content-Type application/json, anything else encoded as
// JSON.
func (c Client) Do(t testing.TB, method, url string, body any, hdr ...string) Reply {
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
	hc := c.HTTP
	if hc == nil {
		hc = http.DefaultClient
	}
	resp, err := hc.Do(req)
	if err != nil {
		if c.Fatal {
			t.Fatal(err)
		}
		t.Errorf("%s %s: %v", method, url, err)
		return Reply{}
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil && c.Fatal {
		t.Fatal(err)
	}
	return Reply{resp.StatusCode, resp.Header, b}
}

// Scrape is GET url/metrics, parsed; a status other than 200 fails the test.
func (c Client) Scrape(t testing.TB, url string) []Sample {
	t.Helper()
	r := c.Do(t, "GET", url+"/metrics", nil)
	if r.Status != 200 {
		t.Fatalf("GET %s/metrics: %d %s", url, r.Status, r.Body)
	}
	return ParseMetrics(t, r.Body)
}

// Sample is one sample of a /metrics scrape.
type Sample struct {
	Name   string
	Labels map[string]string
	Value  float64
}

var labelRE = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"`)

// ParseMetrics parses the Prometheus text format (samples only).
func ParseMetrics(t testing.TB, body []byte) []Sample {
	t.Helper()
	var out []Sample
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
		s := Sample{Name: line[:i], Labels: map[string]string{}, Value: v}
		if j := strings.IndexByte(s.Name, '{'); j >= 0 {
			for _, m := range labelRE.FindAllStringSubmatch(s.Name[j:], -1) {
				uq, err := strconv.Unquote(`"` + m[2] + `"`)
				if err != nil {
					t.Fatalf("metric line %q: label %s: %v", line, m[1], err)
				}
				s.Labels[m[1]] = uq
			}
			s.Name = s.Name[:j]
		}
		out = append(out, s)
	}
	return out
}

// Find returns the samples named name.
func Find(ms []Sample, name string) []Sample {
	var out []Sample
	for _, m := range ms {
		if m.Name == name {
			out = append(out, m)
		}
	}
	return out
}

// Value is the first sample of name whose labels include want (k, v
// pairs); ok is false when there is none.
func Value(ms []Sample, name string, want ...string) (float64, bool) {
next:
	for _, m := range Find(ms, name) {
		for i := 0; i+1 < len(want); i += 2 {
			if m.Labels[want[i]] != want[i+1] {
				continue next
			}
		}
		return m.Value, true
	}
	return 0, false
}

// Server is what Serve runs (a *server.Server).
type Server interface {
	Serve(net.Listener) error
	Shutdown(context.Context) error
}

// Serve runs s on a loopback port until the test ends and returns its base
// URL. Then it shuts s down, allowing within, and fails the test (errors
// prefixed with name unless "") when Shutdown or Serve return an error.
func Serve(t testing.TB, name string, s Server, within time.Duration) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if name != "" {
		name += ": "
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve(ln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), within)
		defer cancel()
		if err := s.Shutdown(ctx); err != nil {
			t.Errorf("%sshutdown: %v", name, err)
		}
		if err := <-done; err != nil {
			t.Errorf("%sserve: %v", name, err)
		}
	})
	return "http://" + ln.Addr().String()
}

// Eventually polls cond every interval until it holds, failing the test
// once within has passed; it returns how long that took.
func Eventually(t testing.TB, within, every time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > within {
			t.Fatalf("%s: not within %v", what, within)
		}
		time.Sleep(every)
	}
	return time.Since(start)
}
