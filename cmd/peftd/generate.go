package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"

	"github.com/peftd/peftd/runtime/cpu"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/lora"
	"github.com/peftd/peftd/runtime/sample"
	"github.com/peftd/peftd/server"
)

type genOutput struct {
	PromptTokenIDs []int32                 `json:"prompt_token_ids"`
	TokenIDs       []int32                 `json:"token_ids"`
	Text           string                  `json:"text"`
	Logprobs       []float64               `json:"logprobs"`
	TopLogprobs    [][]sample.TokenLogprob `json:"top_logprobs"`
	FinishReason   string                  `json:"finish_reason"`
}

func cmdGenerate(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("generate", flag.ContinueOnError)
	fs.SetOutput(stderr)
	modelDir := fs.String("model", "", "model folder (default: the embedded stories260K)")
	adapterArg := fs.String("adapter", "", "PEFT LoRA adapter folder, or an embedded demo adapter name (pirate, space)")
	prompt := fs.String("prompt", "", "prompt text")
	promptIDs := fs.String("prompt-ids", "", "prompt as token ids: 1,2,3")
	maxTokens := fs.Int("max-tokens", 128, "tokens to generate at most")
	temp := fs.Float64("temperature", 0, "sampling temperature (0: greedy)")
	topP := fs.Float64("top-p", 1, "nucleus sampling mass")
	topK := fs.Int("top-k", 0, "sample from the k most likely tokens (0: all)")
	seed := fs.Int64("seed", -1, "random seed (-1: random)")
	logprobs := fs.Int("logprobs", 0, "top alternatives to report per token (with --json)")
	asJSON := fs.Bool("json", false, "print one JSON object")
	if err := fs.Parse(args); err != nil {
		return errUsage
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("generate: unexpected argument %q", fs.Arg(0))
	}
	if (*prompt == "") == (*promptIDs == "") {
		return fmt.Errorf("generate: give exactly one of --prompt and --prompt-ids")
	}
	if *maxTokens <= 0 {
		return fmt.Errorf("generate: --max-tokens must be positive, got %d", *maxTokens)
	}
	sp := sample.Params{Temperature: *temp, TopP: *topP, TopK: *topK, Logprobs: *logprobs}
	if *seed >= 0 {
		s := uint64(*seed)
		sp.Seed = &s
	}
	if err := sp.Validate(); err != nil {
		return fmt.Errorf("generate: %w", err)
	}
	model, tok, err := server.OpenModel(ctx, *modelDir, slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
	if err != nil {
		return err
	}
	defer model.Close()
	cfg := model.Config

	var ids []int32
	if *promptIDs != "" {
		if ids, err = parseIDs(*promptIDs); err != nil {
			return fmt.Errorf("generate: --prompt-ids: %w", err)
		}
	} else {
		if tok == nil {
			return fmt.Errorf("generate: model %s has no tokenizer.json: use --prompt-ids", model.Dir)
		}
		ids = tok.Encode(*prompt, true)
		if len(ids) == 0 {
			return fmt.Errorf("generate: the prompt encodes to no tokens")
		}
	}
	opts := engine.DefaultOptions()
	opts.KVBlocks = (len(ids)+*maxTokens)/opts.BlockSize + 2
	e, err := engine.New(model, cpu.New(0), opts)
	if err != nil {
		return err
	}
	defer e.Close()
	slot := -1
	if *adapterArg != "" {
		dir, err := resolveAdapter(*adapterArg)
		if err != nil {
			return err
		}
		a, err := lora.Load(dir, cfg)
		if err != nil {
			return err
		}
		if err := e.LoadAdapter(0, a); err != nil {
			return err
		}
		slot = 0
	}
	var stop []int32
	for _, id := range cfg.EOS {
		stop = append(stop, int32(id))
	}
	if tok != nil {
		stop = append(stop, tok.EOS()...)
	}
	req := engine.Request{Prompt: ids, Slot: slot, MaxTokens: *maxTokens, Sampling: sp, Stop: stop}
	if !*asJSON && tok != nil {
		// The completion is decoded after the prompt, so that its first
		// token reads as it does there (" upon" after "Once").
		dec := tok.NewDecoderAfter(ids, true)
		fmt.Fprint(stdout, tok.Decode(ids, true))
		req.OnToken = func(c sample.Choice) { fmt.Fprint(stdout, dec.Add(c.ID)) }
		defer func() { fmt.Fprintln(stdout, dec.Flush()) }()
	}
	res, err := e.Generate(ctx, []engine.Request{req})
	if err != nil {
		return err
	}
	r := res[0]
	out := genOutput{PromptTokenIDs: ids, TokenIDs: r.Tokens, FinishReason: r.FinishReason,
		Logprobs: []float64{}, TopLogprobs: [][]sample.TokenLogprob{}}
	if tok != nil {
		out.Text = tok.DecodeAfter(ids, r.Tokens, true)
	}
	for _, c := range r.Choices {
		out.Logprobs = append(out.Logprobs, c.Logprob)
		top := c.Top
		if top == nil {
			top = []sample.TokenLogprob{}
		}
		out.TopLogprobs = append(out.TopLogprobs, top)
	}
	switch {
	case *asJSON:
		enc := json.NewEncoder(stdout)
		enc.SetEscapeHTML(false)
		return enc.Encode(out)
	case tok == nil:
		fmt.Fprintln(stdout, formatIDs(r.Tokens))
	}
	return nil
}

func formatIDs(ids []int32) string {
	b := make([]byte, 0, 6*len(ids))
	for i, id := range ids {
		if i > 0 {
			b = append(b, ',')
		}
		b = fmt.Appendf(b, "%d", id)
	}
	return string(b)
}
