package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strings"

	"github.com/peftd/peftd/loadgen"
)

func cmdBench(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet(ctx, "bench", stdout, stderr)
	cfg := loadgen.Config{}
	fs.StringVar(&cfg.URL, "url", "http://127.0.0.1:8080", "base URL of an OpenAI-compatible server (peftd, vLLM, ...)")
	fs.StringVar(&cfg.APIKey, "api-key", "", "Bearer token")
	models := fs.String("models", "pirate,space", "comma-separated adapter IDs (or model names), used round-robin")
	fs.IntVar(&cfg.Requests, "requests", 64, "requests to send")
	fs.IntVar(&cfg.Concurrency, "concurrency", 8, "requests in flight at most")
	fs.Float64Var(&cfg.Rate, "rate", 0, "arrival rate in requests/s (Poisson); 0: closed loop")
	fs.IntVar(&cfg.PromptWords, "prompt-words", 8, "prompt length in words")
	fs.IntVar(&cfg.PromptTokens, "prompt-tokens", 0, "prompts of this many random token ids instead of words (models without a tokenizer; needs --vocab)")
	fs.IntVar(&cfg.Vocab, "vocab", 0, "the model's vocabulary size, for --prompt-tokens (ids drawn from [3, vocab))")
	fs.IntVar(&cfg.MaxTokens, "max-tokens", 64, "tokens to generate per request")
	fs.BoolVar(&cfg.IgnoreEOS, "ignore-eos", true, "ask the server to ignore EOS so every output has max-tokens tokens")
	fs.Uint64Var(&cfg.Seed, "seed", 1, "seed for prompts and arrivals")
	asJSON := fs.Bool("json", false, "print the report as JSON")
	quiet := fs.Bool("quiet", false, "no progress bar")
	if err := fs.Parse(args); err != nil {
		return errUsage
	}
	for _, m := range strings.Split(*models, ",") {
		if m = strings.TrimSpace(m); m != "" {
			cfg.Models = append(cfg.Models, m)
		}
	}
	if !*quiet {
		cfg.Progress = stderr
	}
	rep, err := loadgen.Run(ctx, cfg)
	if err != nil {
		return fmt.Errorf("bench: %w", err)
	}
	if *asJSON {
		return json.NewEncoder(stdout).Encode(rep)
	}
	rep.Print(stdout)
	if rep.Failed > 0 {
		return fmt.Errorf("bench: %d of %d requests failed", rep.Failed, rep.Failed+rep.Completed)
	}
	return nil
}
