package api_test

import (
	"log/slog"
	"strings"
	"testing"

	"github.com/peftd/peftd/internal/testlog"
)

// TestRequestLog: each request's log line has its time to first token and,
// for the request that brought its adapter in, the tier it came from; a
// resident adapter's request has no adapter_from.
func TestRequestLog(t *testing.T) {
	st, f := fixtureStack(t, 2, 16)
	var logs testlog.Buffer
	cfg := st.config("base")
	cfg.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	url := start(t, cfg)
	c := f.Case(t, "all-r16")
	for range 2 {
		if r := do(t, "POST", url+"/v1/adapters/all-r16/invoke", map[string]any{"prompt_ids": c.Prompt, "max_tokens": 2}); r.Status != 200 {
			t.Fatalf("%d %s", r.Status, r.Body)
		}
	}
	var lines []string
	for _, l := range strings.Split(logs.String(), "\n") {
		if strings.Contains(l, "msg=request") {
			lines = append(lines, l)
		}
	}
	if len(lines) != 2 {
		t.Fatalf("%d request lines, want 2:\n%s", len(lines), logs.String())
	}
	for i, l := range lines {
		if !strings.Contains(l, " ttft_ms=") {
			t.Errorf("line %d has no ttft_ms: %s", i, l)
		}
	}
	if !strings.Contains(lines[0], " adapter_from=") {
		t.Errorf("the first request loaded the adapter, its line does not say from where: %s", lines[0])
	}
	if strings.Contains(lines[1], "adapter_from") {
		t.Errorf("the second request found the adapter resident, its line says it was loaded: %s", lines[1])
	}
}
