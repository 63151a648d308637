// Package loadgen drives any OpenAI-compatible server (peftd, vLLM, SGLang)
// with streamed completions over many adapters and reports throughput, TTFT
// and TPOT percentiles, and cold-start latency (an adapter's first request).
package loadgen

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"
)

// Config describes a run.
type Config struct {
	URL         string   // base URL, e.g. http://127.0.0.1:8080
	APIKey      string   // sent as a Bearer token when set
	Models      []string // adapter IDs (or the base model name), used round-robin
	Requests    int      // total requests
	Concurrency int      // requests in flight at most
	Rate        float64  // arrivals per second (Poisson); 0: as fast as concurrency allows
	PromptWords int      // prompt length in words
	// PromptTokens > 0: prompts of that many random token ids in [3, Vocab)
	// instead of words (models without a tokenizer; exact prompt lengths)
	PromptTokens, Vocab int
	MaxTokens           int  // tokens to generate per request
	IgnoreEOS           bool // ask the server to ignore EOS (vLLM extension) so outputs have MaxTokens
	Seed                uint64
	Client              *http.Client `json:"-"`
	Progress            io.Writer    `json:"-"` // progress bar (nil: none)
}

// Sample is one finished request.
type Sample struct {
	Model        string
	Cold         bool // the first request for its model in this run
	TTFT, Total  time.Duration
	End          time.Time // when it ended
	PromptTokens int       // as the server counted them (usage)
	OutputTokens int
	Err          error
}

// Stats are percentiles of a set of durations.
type Stats struct{ P50, P99, Mean time.Duration }

// Report is the outcome of a run.
type Report struct {
	Config            Config
	Duration          time.Duration
	Completed, Failed int
	PromptTokens      int
	OutputTokens      int
	Throughput        float64 // output tokens per second
	// SteadyThroughput counts the tokens of the requests that ended while
	// every request was still to be sent or in flight at full concurrency:
	// from a quarter of the time until the last request was sent, until
	// then (ramp-up and drain left out, so it does not depend on how many
	// requests the run has; scripts/serve_bench.py's steady_tok_s)
	SteadyThroughput     float64
	RequestRate          float64
	TTFT, TPOT, ColdTTFT Stats
	Errors               []string
}

// Run executes the benchmark.
func Run(ctx context.Context, cfg Config) (*Report, error) {
	if cfg.URL == "" || len(cfg.Models) == 0 || cfg.Requests <= 0 || cfg.MaxTokens <= 0 {
		return nil, errors.New("loadgen: need a URL, at least one model, requests > 0 and max tokens > 0")
	}
	if cfg.Concurrency <= 0 {
		cfg.Concurrency = 1
	}
	if cfg.PromptWords <= 0 {
		cfg.PromptWords = 8
	}
	if cfg.PromptTokens > 0 && cfg.Vocab <= 3 {
		return nil, fmt.Errorf("loadgen: token-id prompts need the vocabulary size (> 3), got %d", cfg.Vocab)
	}
	if cfg.Client == nil {
		cfg.Client = &http.Client{}
	}
	rng := rand.New(rand.NewPCG(cfg.Seed, 1))
	words := []string{"Once", "upon", "a", "time", "there", "was", "a", "little", "girl", "who", "loved", "the", "sea", "and", "the", "stars"}
	samples := make([]Sample, cfg.Requests)
	sem := make(chan struct{}, cfg.Concurrency)
	var wg sync.WaitGroup
	var mu sync.Mutex
	done, coldSeen := 0, map[string]bool{}
	start := time.Now()
	next, lastSent := start, start
	for i := 0; i < cfg.Requests; i++ {
		if cfg.Rate > 0 {
			next = next.Add(time.Duration(rng.ExpFloat64() / cfg.Rate * float64(time.Second)))
			if d := time.Until(next); d > 0 {
				select {
				case <-time.After(d):
				case <-ctx.Done():
				}
			}
		}
		if ctx.Err() != nil {
			break
		}
		sem <- struct{}{}
		lastSent = time.Now()
		model := cfg.Models[i%len(cfg.Models)]
		var prompt any
		if cfg.PromptTokens > 0 {
			ids := make([]int32, cfg.PromptTokens)
			for k := range ids {
				ids[k] = 3 + int32(rng.IntN(cfg.Vocab-3))
			}
			prompt = ids
		} else {
			var p strings.Builder
			for w := 0; w < cfg.PromptWords; w++ {
				if w > 0 {
					p.WriteByte(' ')
				}
				p.WriteString(words[rng.IntN(len(words))])
			}
			prompt = p.String()
		}
		mu.Lock()
		cold := !coldSeen[model]
		coldSeen[model] = true
		mu.Unlock()
		wg.Add(1)
		go func(i int, prompt any) {
			defer wg.Done()
			defer func() { <-sem }()
			s := one(ctx, cfg, model, prompt)
			s.Cold = cold
			mu.Lock()
			samples[i] = s
			done++
			if cfg.Progress != nil {
				bar(cfg.Progress, done, cfg.Requests, time.Since(start))
			}
			mu.Unlock()
		}(i, prompt)
	}
	wg.Wait()
	if cfg.Progress != nil {
		fmt.Fprintln(cfg.Progress)
	}
	r := summarize(cfg, samples, time.Since(start))
	r.SteadyThroughput = steady(samples, start, lastSent)
	return r, ctx.Err()
}

// steady is the output tokens per second of the samples that ended between
// a quarter of the way from start to lastSent and lastSent (0 when that
// window holds none).
func steady(samples []Sample, start, lastSent time.Time) float64 {
	from := start.Add(lastSent.Sub(start) / 4)
	span := lastSent.Sub(from).Seconds()
	if span <= 0 {
		return 0
	}
	toks := 0
	for _, s := range samples {
		if s.Err == nil && !s.End.IsZero() && !s.End.Before(from) && !s.End.After(lastSent) {
			toks += s.OutputTokens
		}
	}
	return float64(toks) / span
}

func bar(w io.Writer, done, total int, el time.Duration) {
	const width = 30
	n := done * width / total
	fmt.Fprintf(w, "\r[%s%s] %d/%d requests  %.1fs", strings.Repeat("=", n), strings.Repeat(" ", width-n), done, total, el.Seconds())
}

// one sends a streamed completion and times its chunks.
func one(ctx context.Context, cfg Config, model string, prompt any) Sample {
	s := Sample{Model: model}
	body := map[string]any{"model": model, "prompt": prompt, "max_tokens": cfg.MaxTokens, "temperature": 0,
		"stream": true, "stream_options": map[string]any{"include_usage": true}}
	if cfg.IgnoreEOS {
		body["ignore_eos"] = true
	}
	b, _ := json.Marshal(body)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, strings.TrimRight(cfg.URL, "/")+"/v1/completions", bytes.NewReader(b))
	if err != nil {
		s.Err = err
		return s
	}
	req.Header.Set("Content-Type", "application/json")
	if cfg.APIKey != "" {
		req.Header.Set("Authorization", "Bearer "+cfg.APIKey)
	}
	t0 := time.Now()
	resp, err := cfg.Client.Do(req)
	if err != nil {
		s.Err = err
		return s
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		s.Err = fmt.Errorf("HTTP %d: %s", resp.StatusCode, bytes.TrimSpace(msg))
		return s
	}
	chunks := 0
	_, err = readSSE(resp.Body, func(ch *sseChunk) bool {
		if ch.Error != nil {
			s.Err = errors.New(ch.Error.Message)
			return false
		}
		if len(ch.Choices) > 0 {
			if chunks == 0 {
				s.TTFT = time.Since(t0)
			}
			chunks++
		}
		if ch.Usage != nil {
			s.OutputTokens, s.PromptTokens = ch.Usage.CompletionTokens, ch.Usage.PromptTokens
		}
		return true
	})
	if err != nil {
		s.Err = err
		return s
	}
	if s.Err != nil {
		return s
	}
	if s.OutputTokens == 0 {
		s.OutputTokens = chunks
	}
	s.End = time.Now()
	s.Total = s.End.Sub(t0)
	return s
}

func stats(ds []time.Duration) Stats {
	if len(ds) == 0 {
		return Stats{}
	}
	slices.Sort(ds)
	var sum time.Duration
	for _, d := range ds {
		sum += d
	}
	pick := func(q float64) time.Duration { return ds[min(len(ds)-1, int(q*float64(len(ds))))] }
	return Stats{P50: pick(0.5), P99: pick(0.99), Mean: sum / time.Duration(len(ds))}
}

func summarize(cfg Config, samples []Sample, el time.Duration) *Report {
	r := &Report{Config: cfg, Duration: el}
	var ttft, tpot, cold []time.Duration
	for _, s := range samples {
		if s.Err != nil {
			r.Failed++
			if len(r.Errors) < 5 {
				r.Errors = append(r.Errors, s.Model+": "+s.Err.Error())
			}
			continue
		}
		if s.Total == 0 {
			continue // never sent (cancelled)
		}
		r.Completed++
		r.OutputTokens += s.OutputTokens
		r.PromptTokens += s.PromptTokens
		if s.Cold {
			cold = append(cold, s.TTFT)
		} else {
			ttft = append(ttft, s.TTFT)
		}
		if s.OutputTokens > 1 {
			tpot = append(tpot, (s.Total-s.TTFT)/time.Duration(s.OutputTokens-1))
		}
	}
	r.Throughput = float64(r.OutputTokens) / el.Seconds()
	r.RequestRate = float64(r.Completed) / el.Seconds()
	r.TTFT, r.TPOT, r.ColdTTFT = stats(ttft), stats(tpot), stats(cold)
	return r
}

// Print writes a human-readable table.
func (r *Report) Print(w io.Writer) {
	ms := func(d time.Duration) string { return fmt.Sprintf("%.1f ms", float64(d)/1e6) }
	fmt.Fprintf(w, "requests      %d ok, %d failed in %.2fs (%.2f req/s)\n", r.Completed, r.Failed, r.Duration.Seconds(), r.RequestRate)
	fmt.Fprintf(w, "throughput    %.1f output tokens/s (%d tokens); steady %.1f (ramp-up and drain left out)\n", r.Throughput, r.OutputTokens, r.SteadyThroughput)
	fmt.Fprintf(w, "TTFT (warm)   p50 %s  p99 %s\n", ms(r.TTFT.P50), ms(r.TTFT.P99))
	fmt.Fprintf(w, "TPOT          p50 %s  p99 %s\n", ms(r.TPOT.P50), ms(r.TPOT.P99))
	fmt.Fprintf(w, "cold start    p50 %s  p99 %s (first request per model: %d)\n", ms(r.ColdTTFT.P50), ms(r.ColdTTFT.P99), len(r.Config.Models))
	for _, e := range r.Errors {
		fmt.Fprintf(w, "error         %s\n", e)
	}
}

// sseChunk is one streamed completions event: a piece of text, the usage
// (with the last chunk), or an error the server met mid-stream.
type sseChunk struct {
	Choices []struct {
		Text string `json:"text"`
	} `json:"choices"`
	Usage *struct {
		PromptTokens     int `json:"prompt_tokens"`
		CompletionTokens int `json:"completion_tokens"`
	} `json:"usage"`
	Error *struct {
		Message string `json:"message"`
		Code    string `json:"code"`
	} `json:"error"`
}

// readSSE decodes the `data:` events of a completions stream into fn until
// [DONE] (done), fn returns false, or the stream ends; a line longer than
// 4 MiB or an event that is not JSON is an error.
func readSSE(r io.Reader, fn func(*sseChunk) bool) (done bool, err error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	for sc.Scan() {
		data, ok := strings.CutPrefix(sc.Text(), "data: ")
		if !ok {
			continue
		}
		if data == "[DONE]" {
			return true, nil
		}
		var ch sseChunk
		if err := json.Unmarshal([]byte(data), &ch); err != nil {
			return false, fmt.Errorf("bad SSE event %q: %w", data, err)
		}
		if !fn(&ch) {
			return false, nil
		}
	}
	return false, sc.Err()
}
