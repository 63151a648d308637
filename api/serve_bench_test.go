package api_test

import (
	"bufio"
	"context"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/peftd/peftd/internal/enginetest"
	"github.com/peftd/peftd/loader/store"
	"github.com/peftd/peftd/loadgen"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/server"
)

// scrape reads the sums and counts of peftd_batch_size (sequences a step)
// from /metrics.
func scrape(b *testing.B, url string) (sum, count float64) {
	b.Helper()
	resp, err := http.Get(url + "/metrics")
	if err != nil {
		b.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		name, v, ok := strings.Cut(sc.Text(), " ")
		if !ok {
			continue
		}
		switch name {
		case "peftd_batch_size_sum":
			sum, _ = strconv.ParseFloat(v, 64)
		case "peftd_batch_size_count":
			count, _ = strconv.ParseFloat(v, 64)
		}
	}
	return sum, count
}

// BenchmarkServeModeled is BenchmarkSchedulerModeled (scheduler package)
// through the HTTP API: serve8b's load (64 clients in a closed loop,
// streamed completions with 128-token token-id prompts, 64 new tokens,
// 384 requests an iteration) from peftd bench's Go client against the real
// API, scheduler and loader over a backend whose every step takes 6 ms.
// seqs/step against the in-process benchmark's 60 says what the HTTP path
// and the client cost the batch; steady_tok/s what the load reaches.
func BenchmarkServeModeled(b *testing.B) {
	m, err := llama.Open(storiesDir)
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	st, err := store.NewFS(b.TempDir(), store.FSOptions{PollInterval: time.Second})
	if err != nil {
		b.Fatal(err)
	}
	core, err := server.NewCore(context.Background(), server.CoreConfig{Model: m, Backend: &enginetest.Null{Step: 6 * time.Millisecond}, Store: st,
		Slots: 1, KVBlocks: 4096, MaxQueue: 1024, CacheDir: b.TempDir(), Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		b.Fatal(err)
	}
	defer core.Close()
	srv := (&stack{model: m, core: core, cat: core.Catalog, loader: core.Loader, sched: core.Scheduler, metrics: core.Metrics}).config("stories260K")
	srv.Logger = slog.New(slog.DiscardHandler) // no access log lines
	url := start(b, srv)
	cfg := loadgen.Config{URL: url, Models: []string{"stories260K"}, Requests: 384, Concurrency: 64, PromptTokens: 128, Vocab: m.Config.VocabSize,
		MaxTokens: 64, IgnoreEOS: true}
	var steady, ttft float64
	s0, c0 := scrape(b, url)
	b.ResetTimer()
	for range b.N {
		rep, err := loadgen.Run(context.Background(), cfg)
		if err != nil || rep.Failed > 0 {
			b.Fatalf("%v %v", err, rep.Errors)
		}
		steady += rep.SteadyThroughput
		ttft += float64(rep.TTFT.P50.Microseconds()) / 1000
	}
	b.StopTimer()
	s1, c1 := scrape(b, url)
	if c1 > c0 {
		b.ReportMetric((s1-s0)/(c1-c0), "seqs/step")
	}
	b.ReportMetric(steady/float64(b.N), "steady_tok/s")
	b.ReportMetric(ttft/float64(b.N), "ttft_p50_ms")
}
