package loadgen_test

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/peftd/peftd/loadgen"
	"github.com/peftd/peftd/server"
)

// TestRunAgainstPeftd drives a real peftd (embedded stories260K, demo
// adapters) and checks the report adds up.
func TestRunAgainstPeftd(t *testing.T) {
	t.Setenv("PEFTD_CACHE", t.TempDir())
	ctx := context.Background()
	srv, err := server.New(ctx, server.Config{Device: server.DeviceCPU, Slots: 2, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	defer func() {
		sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}()
	var progress bytes.Buffer
	rep, err := loadgen.Run(ctx, loadgen.Config{URL: "http://" + ln.Addr().String(), Models: []string{"pirate", "space", "stories260K"},
		Requests: 24, Concurrency: 6, MaxTokens: 16, IgnoreEOS: true, PromptWords: 4, Progress: &progress})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Completed != 24 || rep.Failed != 0 {
		t.Fatalf("completed %d, failed %d: %v", rep.Completed, rep.Failed, rep.Errors)
	}
	if rep.OutputTokens != 24*16 {
		t.Errorf("output tokens %d, want %d (ignore_eos)", rep.OutputTokens, 24*16)
	}
	if rep.Throughput <= 0 || rep.TTFT.P50 <= 0 || rep.TPOT.P50 <= 0 || rep.ColdTTFT.P50 <= 0 || rep.TTFT.P99 < rep.TTFT.P50 {
		t.Errorf("report %+v", rep)
	}
	if !strings.Contains(progress.String(), "24/24 requests") {
		t.Errorf("progress bar: %q", progress.String())
	}
	var out bytes.Buffer
	rep.Print(&out)
	for _, s := range []string{"throughput", "TTFT", "TPOT", "cold start"} {
		if !strings.Contains(out.String(), s) {
			t.Errorf("report lacks %q:\n%s", s, out.String())
		}
	}
	// Token-id prompts (models without a tokenizer): every request has
	// exactly PromptTokens prompt tokens, and the steady rate is measured.
	tok, err := loadgen.Run(ctx, loadgen.Config{URL: "http://" + ln.Addr().String(), Models: []string{"stories260K"},
		Requests: 40, Concurrency: 4, MaxTokens: 8, IgnoreEOS: true, PromptTokens: 20, Vocab: 512})
	if err != nil || tok.Completed != 40 || tok.OutputTokens != 40*8 || tok.PromptTokens != 40*20 {
		t.Fatalf("token-id prompts: %v %+v", err, tok)
	}
	if tok.SteadyThroughput <= 0 {
		t.Errorf("steady throughput %v: the window held no request", tok.SteadyThroughput)
	}
	if _, err := loadgen.Run(ctx, loadgen.Config{URL: "http://x", Models: []string{"m"}, Requests: 1, MaxTokens: 1, PromptTokens: 5}); err == nil {
		t.Error("token-id prompts without a vocabulary size were accepted")
	}
	// A failing target is reported, not hidden.
	bad, err := loadgen.Run(ctx, loadgen.Config{URL: "http://" + ln.Addr().String(), Models: []string{"nope"}, Requests: 2, MaxTokens: 4})
	if err != nil || bad.Failed != 2 || !strings.Contains(bad.Errors[0], "HTTP 404") {
		t.Errorf("unknown model: %v %+v", err, bad)
	}
}
