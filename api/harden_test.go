package api_test

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"fmt"
	"math"
	"net"
	"net/http"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/peftd/peftd/api"
	"github.com/peftd/peftd/internal/apitest"
	"github.com/peftd/peftd/scheduler"
)

// aliveCheck asserts the server still answers a known request with the
// known text (pirate's greedy story start).
func aliveCheck(t *testing.T, url string, hdr ...string) {
	t.Helper()
	r := do(t, "POST", url+"/v1/adapters/pirate/invoke", map[string]any{"prompt": storyPrompt, "max_tokens": 8}, hdr...)
	if r.Status != 200 {
		t.Fatalf("known request after the attack: %d %s", r.Status, r.Body)
	}
	if txt, _ := r.JSON(t)["text"].(string); txt == "" {
		t.Fatalf("known request after the attack: empty text: %s", r.Body)
	}
}

// TestHugeMaxTokens: client numbers at the int limits never overflow the
// context check (one such request used to end the process).
func TestHugeMaxTokens(t *testing.T) {
	url, _ := storiesServer(t, false, nil)
	huge := []string{fmt.Sprint(math.MaxInt64), fmt.Sprint(math.MaxInt64 - 2), fmt.Sprint(math.MaxInt32), "1099511627776"}
	for _, n := range huge {
		for _, c := range []struct{ route, body string }{
			{"/v1/adapters/pirate/invoke", `{"prompt":"Once upon a time","max_tokens":` + n + `}`},
			{"/v1/completions", `{"model":"pirate","prompt":"Once upon a time","max_completion_tokens":` + n + `}`},
			{"/v1/completions", `{"model":"space","prompt":["Once upon a time","One day"],"max_tokens":` + n + `}`},
			{"/v1/completions", `{"model":"space","prompt":"Once","max_tokens":` + n + `,"stream":true}`},
		} {
			r := do(t, "POST", url+c.route, c.body)
			e := wantErr(t, r, 400, "max_tokens")
			if msg, _ := e["message"].(string); !strings.Contains(msg, "context length") {
				t.Errorf("%s %s: message %q does not name the context length", c.route, c.body, msg)
			}
		}
	}
	// Past int64 the JSON number does not fit the field at all.
	wantErr(t, do(t, "POST", url+"/v1/completions", `{"model":"pirate","prompt":"x","max_tokens":92233720368547758070}`), 400, "max_tokens")
	aliveCheck(t, url)
}

// panicGen is a Generator that panics: a bug below the handlers.
type panicGen struct{}

func (panicGen) Submit(context.Context, scheduler.Request) (<-chan scheduler.Event, error) {
	panic("injected fault in Submit")
}

// TestHandlerPanicRecovered: a panic in a handler answers a JSON 500, is
// counted, and the process goes on serving.
func TestHandlerPanicRecovered(t *testing.T) {
	st, tok := storiesStack(t, 2, 64)
	cfg := st.config("stories260K")
	cfg.Tokenizer = tok
	cfg.Generator = panicGen{}
	url := start(t, cfg)
	for _, stream := range []bool{false, true} {
		r := do(t, "POST", url+"/v1/completions", map[string]any{"model": "pirate", "prompt": storyPrompt, "stream": stream})
		e := wantErr(t, r, 500, "")
		if e["code"] != "internal_error" {
			t.Errorf("code %v, want internal_error", e["code"])
		}
		if strings.Contains(string(r.Body), "injected") {
			t.Errorf("the panic value leaks to the client: %s", r.Body)
		}
	}
	if v, _ := apitest.Value(httpc.Scrape(t, url), "peftd_panics_total", "where", "http"); v != 2 {
		t.Errorf("peftd_panics_total{where=http} = %v, want 2", v)
	}
	if r := do(t, "GET", url+"/healthz", nil); r.Status != 200 {
		t.Errorf("healthz after panics: %d", r.Status)
	}
}

// TestErrorShape: every error is JSON {"error":{message,type,param,code}}
// with a string code, including methods the framework does not know and
// framing errors.
func TestErrorShape(t *testing.T) {
	url, _ := storiesServer(t, false, nil)
	cases := []struct {
		method, path, body string
		status             int
		code               string
	}{
		{"BREW", "/v1/models", "", 405, "method_not_allowed"},
		{"PROPFIND", "/v1/completions", "", 405, "method_not_allowed"},
		{"GET", "/nope", "", 404, "not_found"},
		{"PATCH", "/v1/models", "", 404, "not_found"},
		{"POST", "/v1/completions", "{", 400, "bad_request"},
		{"POST", "/v1/completions", `{"model":"zz-missing","prompt":"x"}`, 404, "model_not_found"},
		{"GET", "/v1/adapters/zz-missing", "", 404, "adapter_not_found"},
		{"POST", "/v1/completions", `{"model":"pirate","prompt":"x","n":0}`, 400, "bad_request"},
	}
	for _, c := range cases {
		r := do(t, c.method, url+c.path, c.body)
		if ct := r.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
			t.Errorf("%s %s: content type %q: %s", c.method, c.path, ct, r.Body)
			continue
		}
		e := wantErr(t, r, c.status, "")
		if e["code"] != c.code {
			t.Errorf("%s %s: code %#v, want %q", c.method, c.path, e["code"], c.code)
		}
	}
	aliveCheck(t, url)
}

// TestNoAdapterEnumeration: with a key scoped to pirate, an out-of-scope
// ID answers 403 whether it exists or not, on every route that takes one.
func TestNoAdapterEnumeration(t *testing.T) {
	url := keyedServer(t, "sk-pirate pirate\n")
	auth := []string{"Authorization", "Bearer sk-pirate"}
	for _, id := range []string{"space", "zz-missing", "bad..id", "-lead"} {
		for _, req := range []struct{ method, path, body string }{
			{"POST", "/v1/adapters/" + id + "/invoke", `{"prompt":"Once"}`},
			{"POST", "/v1/completions", `{"model":"` + id + `","prompt":"Once"}`},
			{"POST", "/v1/chat/completions", `{"model":"` + id + `","messages":[{"role":"user","content":"hi"}]}`},
			{"GET", "/v1/adapters/" + id, ""},
		} {
			r := do(t, req.method, url+req.path, req.body, auth...)
			e := wantErr(t, r, 403, "")
			if msg, _ := e["message"].(string); !strings.Contains(msg, "may not use adapter") {
				t.Errorf("%s %s: %q", req.method, req.path, msg)
			}
		}
	}
	aliveCheck(t, url, auth...)
}

// TestGaugesIdleAfterDisconnects: clients that vanish mid-generation leave
// the load gauges at 0 once the server is idle (they used to keep the last
// busy step's numbers).
func TestGaugesIdleAfterDisconnects(t *testing.T) {
	url, _ := storiesServer(t, false, nil)
	host := strings.TrimPrefix(url, "http://")
	var conns []net.Conn
	for i := range 12 {
		model := []string{"pirate", "space", "stories260K"}[i%3]
		body := fmt.Sprintf(`{"model":%q,"prompt":"Once upon a time","max_tokens":400,"ignore_eos":true,"stream":%v}`, model, i%2 == 0)
		conn, err := net.Dial("tcp", host)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(conn, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
		conns = append(conns, conn)
	}
	// Wait until the server is busy with them, then vanish.
	apitest.Eventually(t, 10*time.Second, 10*time.Millisecond, "requests running", func() bool {
		v, _ := apitest.Value(httpc.Scrape(t, url), "peftd_running_requests")
		return v > 0
	})
	for _, c := range conns {
		c.Close()
	}
	apitest.Eventually(t, 10*time.Second, 20*time.Millisecond, "idle gauges", func() bool {
		ms := httpc.Scrape(t, url)
		for _, name := range []string{"peftd_running_requests", "vllm:num_requests_running", "peftd_queue_depth",
			"vllm:num_requests_waiting", "peftd_kv_cache_usage_ratio", "vllm:kv_cache_usage_perc", "peftd_requests_in_flight"} {
			if v, ok := apitest.Value(ms, name); !ok || v != 0 {
				return false
			}
		}
		info := apitest.Find(ms, "vllm:lora_requests_info")
		return len(info) == 1 && info[0].Labels["running_lora_adapters"] == "" && info[0].Labels["waiting_lora_adapters"] == ""
	})
	// And they stay 0: no late step report brings the busy numbers back.
	time.Sleep(300 * time.Millisecond)
	ms := httpc.Scrape(t, url)
	if v, _ := apitest.Value(ms, "peftd_running_requests"); v != 0 {
		t.Errorf("running %v after idle", v)
	}
	aliveCheck(t, url)
}

// TestStreamWriterStaysUp: a client reading a stream slowly and then
// leaving does not hold the engine: other requests are served meanwhile.
func TestStreamWriterStaysUp(t *testing.T) {
	url, _ := storiesServer(t, false, nil)
	host := strings.TrimPrefix(url, "http://")
	conn, err := net.Dial("tcp", host)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if tc, ok := conn.(*net.TCPConn); ok {
		tc.SetReadBuffer(4096)
	}
	body := `{"model":"pirate","prompt":"Once upon a time","max_tokens":450,"ignore_eos":true,"stream":true}`
	fmt.Fprintf(conn, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != 200 {
		t.Fatalf("stream: %d", resp.StatusCode)
	}
	// Never read the stream; others must still be served promptly.
	start := time.Now()
	aliveCheck(t, url)
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("a known request took %v while a client did not read its stream", d)
	}
}

// TestCompressedJSONBomb: a gzip Content-Encoding on a JSON route is
// inflated only up to the JSON body bound (it used to be inflated whole
// before the size check).
func TestCompressedJSONBomb(t *testing.T) {
	url, _ := storiesServer(t, false, func(c *api.Config) { c.MaxJSONBytes = 1 << 20 })
	var buf bytes.Buffer
	zw, _ := gzip.NewWriterLevel(&buf, gzip.BestCompression)
	zw.Write([]byte(`{"model":"pirate","prompt":"`))
	chunk := bytes.Repeat([]byte("a"), 1<<20)
	for range 32 { // 32 MiB of prompt, 32 times the bound
		zw.Write(chunk)
	}
	zw.Write([]byte(`"}`))
	zw.Close()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	start := time.Now()
	for _, route := range []string{"/v1/completions", "/tokenize"} {
		r := do(t, "POST", url+route, buf.Bytes(), "Content-Type", "application/json", "Content-Encoding", "gzip")
		wantErr(t, r, 413, "")
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("refusing two 32 MiB JSON bombs took %v", d)
	}
	runtime.ReadMemStats(&after)
	if grew := after.TotalAlloc - before.TotalAlloc; grew > 256<<20 {
		t.Errorf("refusing the bombs allocated %d MiB", grew>>20)
	}
	// A small gzipped request is served.
	buf.Reset()
	zw = gzip.NewWriter(&buf)
	zw.Write([]byte(`{"prompt":"Once upon a time","max_tokens":80}`))
	zw.Close()
	r := do(t, "POST", url+"/v1/adapters/pirate/invoke", buf.Bytes(), "Content-Type", "application/json", "Content-Encoding", "gzip")
	if got := r.JSON(t)["text"]; got != strings.TrimPrefix(pirateText, storyPrompt) {
		t.Errorf("gzipped invoke: %s", r.Body)
	}
	wantErr(t, do(t, "POST", url+"/v1/completions", `{"model":"pirate","prompt":"x"}`, "Content-Encoding", "br"), 415, "")
	wantErr(t, do(t, "POST", url+"/v1/completions", `{"model":"pirate","prompt":"x"}`, "Content-Encoding", "gzip"), 400, "")
}
