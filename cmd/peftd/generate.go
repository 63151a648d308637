package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/peftd/peftd/api"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/lora"
	"github.com/peftd/peftd/runtime/sample"
	"github.com/peftd/peftd/scheduler"
	"github.com/peftd/peftd/server"
	"github.com/peftd/peftd/text/tokenizer"
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
	setUsage(ctx, fs, stdout, stderr)
	modelDir := fs.String("model", "", "model: a folder, s3://bucket/prefix, or a Hugging Face Hub ID ORG/NAME[@REVISION] (default: the embedded stories260K)")
	adapterArg := fs.String("adapter", "", "PEFT LoRA adapter folder, or an embedded demo adapter name (pirate, space)")
	prompt := fs.String("prompt", "", "prompt text")
	promptIDs := fs.String("prompt-ids", "", "prompt as token ids: 1,2,3")
	maxTokens := fs.Int("max-tokens", 128, "tokens to generate at most")
	temp := fs.Float64("temperature", 0, "sampling temperature (0: greedy)")
	topP := fs.Float64("top-p", 1, "nucleus sampling mass")
	topK := fs.Int("top-k", 0, "sample from the k most likely tokens (0: all)")
	seed := fs.Int64("seed", -1, "random seed (-1: random)")
	logprobs := fs.Int("logprobs", 0, "top alternatives to report per token (with --json)")
	presence := fs.Float64("presence-penalty", 0, "lower the logit of every token generated so far by this, once ([-2, 2], as OpenAI's presence_penalty)")
	frequency := fs.Float64("frequency-penalty", 0, "lower the logit of every token generated so far by this times its count ([-2, 2], as OpenAI's frequency_penalty)")
	repetition := fs.Float64("repetition-penalty", 1, "divide the positive logits and multiply the negative ones of the prompt's and the output's tokens by this ((0, 100], 1: none; as vLLM's repetition_penalty)")
	logitBias := fs.String("logit-bias", "", "add biases to tokens' logits: comma-separated ID:BIAS pairs, biases in [-100, 100] (as OpenAI's logit_bias)")
	asJSON := fs.Bool("json", false, "print one JSON object")
	device := fs.String("device", server.DeviceAuto, "compute device: auto (cuda when a usable GPU is present, else cpu), cpu or cuda")
	eager := fs.Bool("eager", false, "GPU: run every step op by op, without CUDA graphs (see peftd serve --help)")
	weights := fs.String("weights", server.WeightsBF16, "base model projection weights on the GPU: bf16 or fp8 (see peftd serve --help)")
	kvCache := fs.String("kv-cache", server.KVCacheBF16, "KV cache on the GPU: bf16 or fp8 (see peftd serve --help)")
	var stops stopList
	fs.Var(&stops, "stop", "end the text before this string (repeat for several; the text is cut there, as the API's stop does)")
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
	switch *device {
	case server.DeviceAuto, server.DeviceCPU, server.DeviceCUDA:
	default:
		return fmt.Errorf("generate: --device %q: want auto, cpu or cuda", *device)
	}
	switch *weights {
	case server.WeightsBF16, server.WeightsFP8:
	default:
		return fmt.Errorf("generate: --weights %q: want bf16 or fp8", *weights)
	}
	switch *kvCache {
	case server.KVCacheBF16, server.KVCacheFP8:
	default:
		return fmt.Errorf("generate: --kv-cache %q: want bf16 or fp8", *kvCache)
	}
	if !(*repetition > 0 && *repetition <= 100) { // 0 is the sampler's "none": say 1
		return fmt.Errorf("generate: --repetition-penalty must be in (0, 100] (1: none), got %v", *repetition)
	}
	bias, err := parseLogitBias(*logitBias)
	if err != nil {
		return fmt.Errorf("generate: --logit-bias: %w", err)
	}
	sp := sample.Params{Temperature: *temp, TopP: *topP, TopK: *topK, Logprobs: *logprobs,
		Penalties: sample.Penalties{Presence: *presence, Frequency: *frequency, Repetition: *repetition, LogitBias: bias}}
	if *seed >= 0 {
		s := uint64(*seed)
		sp.Seed = &s
	}
	if err := sp.Validate(); err != nil {
		return fmt.Errorf("generate: %w", err)
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	// The engine is built as peftd serve builds it (backend, model, weights),
	// its KV cache sized for this one request once the prompt is encoded.
	var ids []int32
	e, info, err := server.OpenEngine(ctx, server.EngineConfig{Model: *modelDir, Device: *device, Weights: *weights, KVCache: *kvCache, Eager: *eager, Slots: 1, Logger: log,
		KVTokens: func(m *llama.Model, tok *tokenizer.Tokenizer) (int, error) {
			var err error
			ids, err = promptTokens(m, tok, *prompt, *promptIDs)
			return len(ids) + *maxTokens, err
		}})
	if err != nil {
		return err
	}
	model, tok := info.Model, info.Tokenizer
	defer model.Close()
	defer e.Close()
	cfg := model.Config
	// Generation ends at the model's context (finish reason "length").
	if n := e.Options().MaxContext - len(ids); n > 0 && *maxTokens > n {
		*maxTokens = n
	}
	adapter := ""
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
		adapter = *adapterArg
	}
	sched := scheduler.New(e, scheduler.Static{adapter: 0}, scheduler.Config{MaxQueue: 1, Logger: log})
	defer sched.Close()
	var stop []int32
	for _, id := range cfg.EOS {
		stop = append(stop, int32(id))
	}
	if tok != nil {
		stop = append(stop, tok.EOS()...)
	}
	gctx, cancel := context.WithCancel(ctx)
	defer cancel()
	events, err := sched.Submit(gctx, scheduler.Request{Adapter: adapter, Prompt: ids, MaxTokens: *maxTokens, Sampling: sp, Stop: stop})
	if err != nil {
		return err
	}
	// The text as the API makes it (api.Output): decoded after the prompt,
	// so that its first token reads as it does there (" upon" after
	// "Once"), and cut at the first --stop string.
	text := api.NewOutput(tok, ids, stops)
	shown := 0
	show := func(upto int) {
		if *asJSON || tok == nil {
			return
		}
		t := text.Text()
		for upto > shown && upto < len(t) && !utf8.RuneStart(t[upto]) {
			upto--
		}
		if upto > shown {
			fmt.Fprint(stdout, t[shown:upto])
			shown = upto
		}
	}
	if !*asJSON && tok != nil {
		fmt.Fprint(stdout, tok.Decode(ids, true))
	}
	out := genOutput{PromptTokenIDs: ids, TokenIDs: []int32{}, Logprobs: []float64{}, TopLogprobs: [][]sample.TokenLogprob{}}
	for ev := range events { // closed after the Done event
		if ev.Done {
			if ev.Err != nil {
				return ev.Err
			}
			out.FinishReason = ev.FinishReason
			if text.Finish() {
				out.FinishReason = engine.FinishStop
			}
			break
		}
		c := ev.Token
		out.TokenIDs = append(out.TokenIDs, c.ID)
		out.Logprobs = append(out.Logprobs, c.Logprob)
		top := c.Top
		if top == nil {
			top = []sample.TokenLogprob{}
		}
		out.TopLogprobs = append(out.TopLogprobs, top)
		if text.Add(c.ID) {
			cancel() // the scheduler drops the sequence at its next step
			out.FinishReason = engine.FinishStop
			break
		}
		show(text.Shown())
	}
	if tok != nil {
		out.Text = text.Text()
		show(len(out.Text))
		if !*asJSON {
			fmt.Fprintln(stdout)
		}
	}
	switch {
	case *asJSON:
		enc := json.NewEncoder(stdout)
		enc.SetEscapeHTML(false)
		return enc.Encode(out)
	case tok == nil:
		fmt.Fprintln(stdout, formatIDs(out.TokenIDs))
	}
	return nil
}

// promptTokens is the prompt as token ids: --prompt-ids parsed, or --prompt
// encoded with the model's tokenizer.
func promptTokens(m *llama.Model, tok *tokenizer.Tokenizer, prompt, promptIDs string) ([]int32, error) {
	if promptIDs != "" {
		ids, err := parseIDs(promptIDs)
		if err != nil {
			return nil, fmt.Errorf("generate: --prompt-ids: %w", err)
		}
		return ids, nil
	}
	if tok == nil {
		return nil, fmt.Errorf("generate: model %s has no tokenizer.json: use --prompt-ids", m.Dir)
	}
	ids := tok.Encode(prompt, true)
	if len(ids) == 0 {
		return nil, fmt.Errorf("generate: the prompt encodes to no tokens")
	}
	return ids, nil
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

// stopList is --stop, given once per string.
type stopList []string

func (s *stopList) String() string { return strings.Join(*s, ",") }

func (s *stopList) Set(v string) error {
	if v == "" {
		return fmt.Errorf("an empty stop string")
	}
	*s = append(*s, v)
	return nil
}

// parseLogitBias reads comma-separated ID:BIAS pairs (empty: none).
func parseLogitBias(s string) (map[int32]float64, error) {
	if strings.TrimSpace(s) == "" {
		return nil, nil
	}
	out := map[int32]float64{}
	for _, p := range strings.Split(s, ",") {
		id, b, ok := strings.Cut(strings.TrimSpace(p), ":")
		if !ok {
			return nil, fmt.Errorf("%q is not ID:BIAS", p)
		}
		n, err := strconv.ParseInt(strings.TrimSpace(id), 10, 32)
		if err != nil || n < 0 {
			return nil, fmt.Errorf("%q is not a token id", id)
		}
		v, err := strconv.ParseFloat(strings.TrimSpace(b), 64)
		if err != nil {
			return nil, fmt.Errorf("%q is not a number", b)
		}
		out[int32(n)] = v
	}
	return out, nil
}
