package api_test

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/peftd/peftd/api"
)

// hostileCase is one request an attacker or a confused client might send:
// it must be answered with a 4xx and a JSON error body, and the server
// must go on answering a known request with the known text.
type hostileCase struct {
	name         string
	method, path string
	body         string
	hdr          []string
	status       int // 0: any 4xx
}

// numericAbuse lists, per request field, values that must be refused.
var numericAbuse = map[string][]string{
	"max_tokens":            {"-1", "0", "-9223372036854775808", "9223372036854775807", "9223372036854775806", "1e400", "1.5", `"10"`, "true", "[]", "{}", "1e19", "-1e19"},
	"max_completion_tokens": {"-1", "0", "9223372036854775805", "2147483648", "1.25", `"x"`},
	"temperature":           {"-0.1", "100.1", "1e309", "-1e308", `"hot"`, "true", "[]", "1e100"},
	"top_p":                 {"0", "-1", "1.0001", "1e308", `"x"`, "-0", "2"},
	"top_k":                 {"-2", "-9223372036854775808", "1.5", `"x"`, "1e300"},
	"top_logprobs":          {"-1", "21", "9223372036854775807", "-9223372036854775808", `"x"`},
	"n":                     {"0", "65", "-1", "9223372036854775807", `"1x"`},
	"best_of":               {"2", "0", "-5", "9223372036854775807"},
	"seed":                  {`"x"`, "1.5", "1e30", "-1e30", "[]"},
	"stop":                  {`""`, `[""]`, "[-1]", "[1.5]", "[{}]", "5", "[2147483648]", "{}", "[[1]]", "true"},
	"stop_token_ids":        {"[-1]", "[1.5]", `["a"]`, "[2147483648]", "{}"},
	"stream":                {`"yes"`, "1", "[]"},
	"stream_options":        {`{"include_usage":true}`, `"x"`},
	"echo":                  {`"x"`, "1"},
	"ignore_eos":            {`"x"`, "2"},
	"return_token_ids":      {"3", `"y"`},
}

// echoAbuse: echo is for completions only.
var echoAbuse = map[string][]string{
	"invoke": {"true"},
	"chat":   {"true"},
}

// logprobsAbuse differs by route: an int in [0, 20] for invoke and
// completions, a boolean for chat.
var logprobsAbuse = map[string][]string{
	"invoke":      {"-1", "21", "1e9", "9223372036854775807", `"x"`, "2.5", "true"},
	"completions": {"-1", "21", "9223372036854775807", "-9223372036854775808", `"2"`, "[]"},
	"chat":        {"1", `"yes"`, "[]", "{}"},
}

func hostileCases() []hostileCase {
	var cs []hostileCase
	type route struct {
		name, path, base string // base: the JSON fields every body carries
	}
	routes := []route{
		{"invoke", "/v1/adapters/pirate/invoke", `"prompt":"Once upon a time"`},
		{"completions", "/v1/completions", `"model":"pirate","prompt":"Once upon a time"`},
		{"chat", "/v1/chat/completions", `"model":"pirate","messages":[{"role":"user","content":"Once"}]`},
	}
	for _, r := range routes {
		for field, vals := range numericAbuse {
			if field == "max_completion_tokens" && r.name == "invoke" {
				continue // not an invoke field
			}
			if field == "stop" && strings.HasPrefix(vals[0], "[") {
				continue
			}
			for _, v := range vals {
				cs = append(cs, hostileCase{name: r.name + "/" + field + "=" + v, method: "POST", path: r.path,
					body: "{" + r.base + `,"` + field + `":` + v + "}"})
			}
		}
		for _, v := range logprobsAbuse[r.name] {
			cs = append(cs, hostileCase{name: r.name + "/logprobs=" + v, method: "POST", path: r.path,
				body: "{" + r.base + `,"logprobs":` + v + "}"})
		}
		for _, v := range echoAbuse[r.name] {
			cs = append(cs, hostileCase{name: r.name + "/echo=" + v, method: "POST", path: r.path,
				body: "{" + r.base + `,"echo":` + v + "}"})
		}
		// Bodies that are not a request object.
		for _, b := range []string{"", "{", "}", "null", "[]", `"x"`, "1", "{}x", `{"prompt":`, "\x00\x01", "{\"a\":1,}", "[{}]"} {
			cs = append(cs, hostileCase{name: r.name + "/body=" + b, method: "POST", path: r.path, body: b})
		}
		cs = append(cs,
			hostileCase{name: r.name + "/deep nesting", method: "POST", path: r.path, body: "{" + r.base + `,"x":` + strings.Repeat("[", 100000) + strings.Repeat("]", 100000) + "}"},
			hostileCase{name: r.name + "/too big", method: "POST", path: r.path, body: "{" + r.base + `,"x":"` + strings.Repeat("a", 17<<20) + `"}`, status: 413},
		)
	}
	// Prompts.
	for _, p := range []string{"[]", "[[]]", "[-1]", "[999999]", "[2147483648]", "[1.5]", `[[1],[]]`, "{}", "true", "null",
		`[1,"a"]`, `[["a"]]`, `["a",""]`, "[" + strings.Repeat(`"a",`, 64) + `"a"]`, "[" + strings.Repeat("[1],", 64) + "[1]]",
		"[" + strings.Repeat("1,", 600) + "1]"} {
		cs = append(cs, hostileCase{name: "completions/prompt=" + trunc(p), method: "POST", path: "/v1/completions",
			body: `{"model":"pirate","prompt":` + p + `}`})
	}
	for _, p := range []string{"[]", "[-1]", "[2147483648]", `["a"]`, "{}", "[" + strings.Repeat("1,", 600) + "1]"} {
		cs = append(cs, hostileCase{name: "invoke/prompt_ids=" + trunc(p), method: "POST", path: "/v1/adapters/pirate/invoke",
			body: `{"prompt_ids":` + p + `}`})
	}
	for _, m := range []string{"[]", `"x"`, "null", `[{"role":1}]`, `[{"role":"user","content":5}]`, "[1]", "{}"} {
		cs = append(cs, hostileCase{name: "chat/messages=" + m, method: "POST", path: "/v1/chat/completions",
			body: `{"model":"pirate","messages":` + m + `}`})
	}
	// Model names and adapter IDs.
	for _, m := range []string{"123", "[]", `"zz-missing"`, `"../etc/passwd"`, `"pirate\u0000"`, `"` + strings.Repeat("a", 300) + `"`,
		`"-pirate"`, `".pirate"`, `"pirate/../space"`, `"PIRATE"`, `" pirate"`, `"pirate\n"`} {
		cs = append(cs, hostileCase{name: "completions/model=" + trunc(m), method: "POST", path: "/v1/completions",
			body: `{"model":` + m + `,"prompt":"Once"}`})
	}
	for _, id := range []string{"..", "%2e%2e", "a%2Fb", "zz-missing", "%00", "-x", "_x", ".x", strings.Repeat("b", 200), "pirate%0A", "pi%20rate"} {
		cs = append(cs,
			hostileCase{name: "invoke id " + trunc(id), method: "POST", path: "/v1/adapters/" + id + "/invoke", body: `{"prompt":"Once"}`},
			hostileCase{name: "get id " + trunc(id), method: "GET", path: "/v1/adapters/" + id},
			hostileCase{name: "delete id " + trunc(id), method: "DELETE", path: "/v1/adapters/" + id},
			hostileCase{name: "pin id " + trunc(id), method: "PUT", path: "/v1/adapters/" + id + "/pin"},
		)
	}
	// Routes, methods, tokenize.
	cs = append(cs,
		hostileCase{name: "method BREW", method: "BREW", path: "/v1/models", status: 405},
		hostileCase{name: "method PROPFIND", method: "PROPFIND", path: "/v1/completions", status: 405},
		hostileCase{name: "GET completions", method: "GET", path: "/v1/completions"},
		hostileCase{name: "no route", method: "GET", path: "/v2/everything"},
		hostileCase{name: "tokenize empty", method: "POST", path: "/tokenize", body: "{}"},
		hostileCase{name: "tokenize model", method: "POST", path: "/tokenize", body: `{"model":"zz-missing","prompt":"x"}`},
		hostileCase{name: "tokenize prompt type", method: "POST", path: "/tokenize", body: `{"prompt":5}`},
		hostileCase{name: "detokenize negative", method: "POST", path: "/detokenize", body: `{"tokens":[-1]}`},
		hostileCase{name: "detokenize huge", method: "POST", path: "/detokenize", body: `{"tokens":[2147483647]}`},
		hostileCase{name: "detokenize type", method: "POST", path: "/detokenize", body: `{"tokens":"x"}`},
		hostileCase{name: "detokenize overflow", method: "POST", path: "/detokenize", body: `{"tokens":[9223372036854775807]}`},
	)
	return cs
}

func trunc(s string) string {
	if len(s) > 24 {
		return s[:24] + "..."
	}
	return s
}

// TestHostileInputs sends every hostile case over HTTP; each gets a 4xx
// with an OpenAI-shaped JSON error, and the server keeps answering the
// known request with the known text.
func TestHostileInputs(t *testing.T) {
	url, _ := storiesServer(t, true, nil)
	cases := hostileCases()
	if len(cases) < 200 {
		t.Fatalf("only %d hostile cases", len(cases))
	}
	for i, c := range cases {
		r := httpc.Do(t, c.method, url+c.path, c.body, append([]string{"Content-Type", "application/json"}, c.hdr...)...)
		checkHostile(t, c.name, r.Status, r.Header, r.Body, c.status)
		if i%10 == 9 {
			knownAnswer(t, url)
		}
	}
	knownAnswer(t, url)
	t.Logf("%d hostile requests refused", len(cases))
}

func checkHostile(t *testing.T, name string, status int, h http.Header, body []byte, want int) {
	t.Helper()
	switch {
	case want != 0 && status != want:
		t.Errorf("%s: status %d, want %d: %.300s", name, status, want, body)
		return
	case status < 400 || status > 499:
		t.Errorf("%s: status %d, want 4xx: %.300s", name, status, body)
		return
	}
	if ct := h.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
		t.Errorf("%s: content type %q: %.300s", name, ct, body)
	}
	if !strings.Contains(string(body), `"error":{`) || !strings.Contains(string(body), `"code":"`) {
		t.Errorf("%s: not an error object with a string code: %.300s", name, body)
	}
}

// knownAnswer: the pirate adapter's greedy story, as transformers + PEFT
// tell it.
func knownAnswer(t *testing.T, url string, hdr ...string) {
	t.Helper()
	r := do(t, "POST", url+"/v1/adapters/pirate/invoke", map[string]any{"prompt": storyPrompt, "max_tokens": 80}, hdr...)
	if r.Status != 200 {
		t.Fatalf("known request: %d %s", r.Status, r.Body)
	}
	if got, want := r.JSON(t)["text"], strings.TrimPrefix(pirateText, storyPrompt); got != want {
		t.Fatalf("known request: text %q, want %q", got, want)
	}
}

// rawCase is a hostile exchange on a raw TCP connection.
type rawCase struct {
	name string
	send string
	// want: the status of the reply; 0: the server may also just close
	// the connection (after a framing error it cannot trust the stream).
	want int
}

// TestHostileFraming sends malformed HTTP; every reply is a 4xx JSON error
// (or the connection is closed), and the server keeps serving.
func TestHostileFraming(t *testing.T) {
	url, _ := storiesServer(t, false, nil)
	host := strings.TrimPrefix(url, "http://")
	body := `{"model":"pirate","prompt":"Once"}`
	cases := []rawCase{
		{"content-length too big for body then close", "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + body, 0},
		{"negative content-length", "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n" + body, 400},
		{"non-numeric content-length", "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n" + body, 400},
		{"two content-lengths", "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 34\r\n\r\n" + body, 400},
		{"bad chunk size", "POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n" + body + "\r\n0\r\n\r\n", 400},
		{"huge chunk size", "POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nab\r\n", 0},
		{"content-length over the body limit", "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n", 413},
		{"header too large", "GET /v1/models HTTP/1.1\r\nHost: x\r\nX-A: " + strings.Repeat("a", 16<<10) + "\r\n\r\n", 431},
		{"bad request line", "GARBAGE\r\n\r\n", 400},
		{"http/0.9 style", "GET /\r\n\r\n", 400},
		{"no host", "GET /v1/models HTTP/1.1\r\n\r\n", 0},
		{"space in header name", "GET /v1/models HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n", 400},
		{"binary request", "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400},
	}
	for _, c := range cases {
		conn, err := net.Dial("tcp", host)
		if err != nil {
			t.Fatal(err)
		}
		conn.SetDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(conn, c.send)
		if tc, ok := conn.(*net.TCPConn); ok {
			tc.CloseWrite()
		}
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		switch {
		case err != nil && c.want == 0:
		case err != nil:
			t.Errorf("%s: no reply: %v", c.name, err)
		default:
			b, _ := io.ReadAll(resp.Body)
			if c.want != 0 && resp.StatusCode != c.want && !(c.want == 400 && resp.StatusCode/100 == 4) {
				t.Errorf("%s: status %d, want %d: %s", c.name, resp.StatusCode, c.want, b)
			}
			if resp.StatusCode >= 200 && resp.StatusCode < 300 && c.want == 0 {
				break // the server read a valid request out of it (no host, say)
			}
			checkHostile(t, c.name, resp.StatusCode, resp.Header, b, 0)
		}
		conn.Close()
	}
	knownAnswer(t, url)
}

// TestSlowAndVanishingClients: a client that sends its headers slowly is
// cut off at the header timeout with a 408; clients that vanish at every
// point of a request leave the server serving.
func TestSlowAndVanishingClients(t *testing.T) {
	url, _ := storiesServer(t, false, func(c *api.Config) { c.ReadTimeout = 300 * time.Millisecond })
	host := strings.TrimPrefix(url, "http://")
	// Slowloris: one header byte every 100 ms.
	conn, err := net.Dial("tcp", host)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	start := time.Now()
	go func() {
		for _, b := range []byte("GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: " + strings.Repeat("a", 100)) {
			if _, err := conn.Write([]byte{b}); err != nil {
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
	}()
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	rest, _ := io.ReadAll(conn)
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("a slow client held its connection %v (read timeout 300ms)", d)
	}
	if len(rest) > 0 && !strings.Contains(string(rest), " 408 ") {
		t.Errorf("slow client got %q, want a 408 or a closed connection", trunc(string(rest)))
	}
	// Vanishing at each point of a generation request.
	req := "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 75\r\n\r\n" +
		`{"model":"space","prompt":"Once upon a time","max_tokens":300,"stream":true}`
	for _, cut := range []int{1, 10, 40, len(req) - 20, len(req)} {
		c, err := net.Dial("tcp", host)
		if err != nil {
			t.Fatal(err)
		}
		io.WriteString(c, req[:cut])
		c.Close()
	}
	knownAnswer(t, url)
}

// TestHostileKeys: authentication failures are 401/403 JSON errors that do
// not depend on whether the adapter exists.
func TestHostileKeys(t *testing.T) {
	url := keyedServer(t, "sk-admin * admin\nsk-pirate pirate\n")
	body := `{"model":"pirate","prompt":"Once"}`
	cases := []hostileCase{
		{name: "no key", hdr: nil, status: 401},
		{name: "empty bearer", hdr: []string{"Authorization", "Bearer "}, status: 401},
		{name: "wrong key", hdr: []string{"Authorization", "Bearer sk-nope"}, status: 401},
		{name: "basic auth", hdr: []string{"Authorization", "Basic c2stYWRtaW46"}, status: 401},
		{name: "long key", hdr: []string{"Authorization", "Bearer " + strings.Repeat("k", 1000)}, status: 401},
		{name: "key past the header limit", hdr: []string{"Authorization", "Bearer " + strings.Repeat("k", 5000)}, status: 431},
		{name: "key prefix", hdr: []string{"Authorization", "Bearer sk-admi"}, status: 401},
		{name: "key with suffix", hdr: []string{"Authorization", "Bearer sk-admin2"}, status: 401},
		{name: "lower-case scheme", hdr: []string{"Authorization", "bearer sk-admin"}, status: 401},
		{name: "x-api-key wrong", hdr: []string{"X-Api-Key", "nope"}, status: 401},
	}
	for _, c := range cases {
		r := httpc.Do(t, "POST", url+"/v1/completions", body, c.hdr...)
		checkHostile(t, c.name, r.Status, r.Header, r.Body, c.status)
	}
	pirate := []string{"Authorization", "Bearer sk-pirate"}
	for _, req := range []hostileCase{
		{name: "scoped: other adapter", method: "POST", path: "/v1/completions", body: `{"model":"space","prompt":"Once"}`, status: 403},
		{name: "scoped: missing adapter", method: "POST", path: "/v1/completions", body: `{"model":"zz","prompt":"Once"}`, status: 403},
		{name: "scoped: delete own", method: "DELETE", path: "/v1/adapters/pirate", status: 403},
		{name: "scoped: pin", method: "PUT", path: "/v1/adapters/pirate/pin", status: 403},
		{name: "scoped: deploy", method: "PUT", path: "/v1/adapters/mine", body: "x", status: 403},
	} {
		r := httpc.Do(t, req.method, url+req.path, req.body, pirate...)
		checkHostile(t, req.name, r.Status, r.Header, r.Body, req.status)
	}
	knownAnswer(t, url, pirate...)
	knownAnswer(t, url, "Authorization", "Bearer sk-admin")
	_ = fmt.Sprint()
}
