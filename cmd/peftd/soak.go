package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/peftd/peftd/loadgen"
)

// cmdSoak runs loadgen.RunSoak against a server: mixed load over many
// adapters for a while, one store outage (commands the caller gives) and
// one adapter replaced mid-run, then a report; an error when the soak
// failed. scripts/soak.sh (make soak) sets up the server, the store and
// the outage commands.
func cmdSoak(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet(ctx, "soak", stdout, stderr)
	var c clientFlags
	c.register(fs)
	cfg := loadgen.SoakConfig{}
	adapters := fs.String("adapters", "", "comma-separated adapter IDs to load (default: every adapter GET /v1/adapters lists, filtered by --prefix)")
	prefix := fs.String("prefix", "", "with no --adapters: only the listed adapters whose ID starts with this")
	hot := fs.Int("hot", 6, "hot adapters: the first N of the adapters (sorted), getting --hot-share of the requests")
	hotIDs := fs.String("hot-ids", "", "comma-separated hot adapter IDs (instead of --hot)")
	fs.Float64Var(&cfg.HotShare, "hot-share", 0.7, "share of the requests for the hot adapters; the rest go uniformly to the cold ones")
	fs.BoolVar(&cfg.PinHot, "pin-hot", false, "pin the hot adapters on the device first (PUT /v1/adapters/{id}/pin)")
	reserve := fs.Int("reserve", -1, "cold adapters (the last ones) not asked before the outage, so that it finds adapters only the store has (-1: a tenth of the cold ones)")
	fs.DurationVar(&cfg.Duration, "duration", 5*time.Minute, "duration of the timed load (after the warm-up)")
	fs.IntVar(&cfg.Concurrency, "concurrency", 16, "requests in flight (closed loop)")
	fs.IntVar(&cfg.MinTokens, "min-tokens", 16, "fewest tokens asked per request")
	fs.IntVar(&cfg.MaxTokens, "max-tokens", 32, "most tokens asked per request")
	fs.Float64Var(&cfg.StreamShare, "stream-share", 0.3, "share of streamed (SSE) requests")
	prompts := fs.String("prompts", "auto", "text, ids (token-id prompts, for a model without tokenizer.json) or auto (ids when POST /tokenize fails)")
	fs.IntVar(&cfg.PromptWords, "prompt-words", 8, "prompt length in words (or token ids)")
	fs.Uint64Var(&cfg.Seed, "seed", 1, "seed of the adapter, route and prompt choices")
	fs.BoolVar(&cfg.Warmup, "warmup", true, "first send one request to every adapter but the reserve, so caches are full when the start memory is read")
	fs.DurationVar(&cfg.WarmupMax, "warmup-max", 3*time.Minute, "bound on the warm-up")
	outStart := fs.String("outage-start", "", "shell command that stops the adapter store (run at --outage-at); empty: no outage")
	outStop := fs.String("outage-stop", "", "shell command that brings the store back and returns once it serves")
	fs.Float64Var(&cfg.OutageAt, "outage-at", 1.0/3, "when the outage starts, as a fraction of --duration")
	fs.DurationVar(&cfg.OutageFor, "outage-for", 20*time.Second, "how long the store stays down")
	fs.DurationVar(&cfg.OutageGrace, "outage-grace", 5*time.Second, "after the store is back, how long a cold adapter may still get a 503 naming the store")
	fs.StringVar(&cfg.ReplaceID, "replace-id", "", "adapter to replace mid-run (default: the first hot one)")
	replaceWith := fs.String("replace-with", "", "adapter folder uploaded as --replace-id with PUT /v1/adapters/{id} mid-run; empty: no replacement")
	fs.Float64Var(&cfg.ReplaceAt, "replace-at", 0.5, "when the replacement happens, as a fraction of --duration (never before the outage and its grace are over)")
	pid := fs.Int("pid", 0, "the server's process ID, to read its RSS from /proc (0: memory not checked)")
	fs.Float64Var(&cfg.MaxRSSGrowth, "max-rss-growth", 0.3, "fail when the server's RSS grows from the start (after the warm-up) to the end by more than this fraction of the start ...")
	rssSlack := fs.String("rss-slack", "64MiB", "... and by more than this (the larger bound wins)")
	gpuSlack := fs.String("gpu-slack", "256MiB", "fail when peftd_gpu_memory_used_bytes grows by more than this")
	asJSON := fs.Bool("json", false, "print the report as JSON")
	quiet := fs.Bool("quiet", false, "no progress lines")
	if err := fs.Parse(args); err != nil {
		return errUsage
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("soak: unexpected argument %q", fs.Arg(0))
	}
	var err error
	if cfg.RSSSlack, err = parseBytes(*rssSlack); err != nil {
		return fmt.Errorf("soak: --rss-slack: %w", err)
	}
	if cfg.GPUSlack, err = parseBytes(*gpuSlack); err != nil {
		return fmt.Errorf("soak: --gpu-slack: %w", err)
	}
	cfg.URL, cfg.APIKey = c.url, c.apiKey
	cfg.Client = &http.Client{Timeout: c.timeout, Transport: &http.Transport{MaxIdleConnsPerHost: cfg.Concurrency + 4}}
	if !*quiet {
		cfg.Progress = stderr
	}

	cfg.Adapters = splitList(*adapters)
	if len(cfg.Adapters) == 0 {
		if cfg.Adapters, err = listAdapters(ctx, &c, *prefix); err != nil {
			return fmt.Errorf("soak: %w", err)
		}
		if len(cfg.Adapters) == 0 {
			return fmt.Errorf("soak: the server lists no adapters with prefix %q", *prefix)
		}
	}
	slices.Sort(cfg.Adapters)
	if cfg.Hot = splitList(*hotIDs); len(cfg.Hot) == 0 {
		cfg.Hot = cfg.Adapters[:min(max(*hot, 0), len(cfg.Adapters))]
	}
	cfg.Reserve = *reserve
	if cfg.Reserve < 0 {
		cfg.Reserve = 0
		if *outStart != "" {
			cfg.Reserve = max(1, (len(cfg.Adapters)-len(cfg.Hot))/10)
		}
	}
	switch *prompts {
	case "text":
	case "ids":
		cfg.TokenPrompts = true
	case "auto":
		resp, err := c.do(ctx, http.MethodPost, "/tokenize", "application/json", strings.NewReader(`{"prompt":"Once upon a time"}`))
		if err != nil {
			fmt.Fprintf(stderr, "soak: token-id prompts (%v)\n", err)
			cfg.TokenPrompts = true
		} else {
			resp.Body.Close()
		}
	default:
		return fmt.Errorf("soak: --prompts %q: want auto, text or ids", *prompts)
	}
	if (*outStart == "") != (*outStop == "") {
		return fmt.Errorf("soak: give both --outage-start and --outage-stop, or neither")
	}
	if *outStart != "" {
		cfg.OutageStart = shellHook(*outStart, stderr)
		cfg.OutageStop = shellHook(*outStop, stderr)
	}
	if *replaceWith != "" {
		if cfg.ReplaceBody, err = loadgen.TarGzAdapter(*replaceWith, true); err != nil {
			return fmt.Errorf("soak: --replace-with: %w", err)
		}
	}
	if *pid > 0 {
		p := *pid
		if _, err := loadgen.ProcMem(p); err != nil {
			return fmt.Errorf("soak: --pid: %w", err)
		}
		cfg.Mem = func() (loadgen.Mem, error) { return loadgen.ProcMem(p) }
	}
	if !*quiet {
		fmt.Fprintf(stderr, "soak: %d adapters (%d hot: %s; %d reserved for the outage), concurrency %d, %v of load\n",
			len(cfg.Adapters), len(cfg.Hot), strings.Join(cfg.Hot, ","), cfg.Reserve, cfg.Concurrency, cfg.Duration)
	}
	rep, err := loadgen.RunSoak(ctx, cfg)
	if err != nil {
		return err
	}
	if *asJSON {
		if err := json.NewEncoder(stdout).Encode(rep); err != nil {
			return err
		}
	} else {
		rep.Print(stdout)
	}
	if !rep.OK() {
		return fmt.Errorf("soak failed: %s", strings.Join(rep.Problems, "; "))
	}
	return nil
}

// listAdapters is GET /v1/adapters' IDs starting with prefix.
func listAdapters(ctx context.Context, c *clientFlags, prefix string) ([]string, error) {
	resp, err := c.do(ctx, http.MethodGet, "/v1/adapters", "", nil)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var l struct {
		Data []struct {
			ID string `json:"id"`
		} `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&l); err != nil {
		return nil, fmt.Errorf("GET /v1/adapters: %w", err)
	}
	var out []string
	for _, a := range l.Data {
		if strings.HasPrefix(a.ID, prefix) {
			out = append(out, a.ID)
		}
	}
	return out, nil
}

// shellHook runs cmd with sh -c (output to w), bounded by 2 minutes.
func shellHook(cmd string, w io.Writer) func(context.Context) error {
	return func(ctx context.Context) error {
		ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
		defer cancel()
		x := exec.CommandContext(ctx, "sh", "-c", cmd)
		x.Stdout, x.Stderr = w, w
		x.Env = os.Environ()
		if err := x.Run(); err != nil {
			return fmt.Errorf("%q: %w", cmd, err)
		}
		return nil
	}
}

// parseBytes reads a size: a number of bytes, or one with a KiB, MiB or
// GiB suffix.
func parseBytes(s string) (int64, error) {
	mult := int64(1)
	for suf, m := range map[string]int64{"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30} {
		if v, ok := strings.CutSuffix(s, suf); ok {
			s, mult = v, m
			break
		}
	}
	n, err := strconv.ParseInt(strings.TrimSpace(s), 10, 64)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("%q is not a size (bytes, or with KiB, MiB, GiB)", s)
	}
	return n * mult, nil
}
