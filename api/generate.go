package api

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"compress/zlib"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/gofiber/fiber/v2"

	"github.com/peftd/peftd/loader/store"
	"github.com/peftd/peftd/runtime/chat"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/sample"
	"github.com/peftd/peftd/scheduler"
)

type kind int

const (
	kindInvoke kind = iota
	kindCompletion
	kindChat
)

// genRequest is the union of the invoke, completions and chat bodies.
type genRequest struct {
	Model               string          `json:"model"`
	Prompt              json.RawMessage `json:"prompt"`
	PromptIDs           []int32         `json:"prompt_ids"`
	Messages            []chat.Message  `json:"messages"`
	MaxTokens           *int            `json:"max_tokens"`
	MaxCompletionTokens *int            `json:"max_completion_tokens"`
	Temperature         *float64        `json:"temperature"`
	TopP                *float64        `json:"top_p"`
	TopK                *int            `json:"top_k"`
	Seed                *int64          `json:"seed"`
	Stop                json.RawMessage `json:"stop"`
	StopTokenIDs        []int32         `json:"stop_token_ids"`
	Stream              bool            `json:"stream"`
	StreamOptions       *struct {
		IncludeUsage bool `json:"include_usage"`
	} `json:"stream_options"`
	Logprobs       json.RawMessage `json:"logprobs"`
	TopLogprobs    *int            `json:"top_logprobs"`
	N              *int            `json:"n"`
	BestOf         *int            `json:"best_of"`
	Echo           bool            `json:"echo"`
	IgnoreEOS      bool            `json:"ignore_eos"`
	ReturnTokenIDs bool            `json:"return_token_ids"`
}

// job is a validated generation.
type job struct {
	kind       kind
	id         string
	model      string // echoed "model"
	adapter    string
	req        scheduler.Request
	stopStrs   []string
	logprobs   bool // report logprobs
	stream     bool
	usageChunk bool
	returnIDs  bool
	created    int64
	start      time.Time
	// prompts are the batch's prompts (completions may have several);
	// req.Prompt is prompts[0].
	prompts [][]int32
}

func newID(prefix string) string {
	var b [12]byte
	rand.Read(b[:])
	return prefix + hex.EncodeToString(b[:])
}

// decodeJSON decodes the body, naming the field on a type error.
func decodeJSON(body []byte, v any) error {
	if len(body) == 0 {
		return badRequest("", "empty request body: expected a JSON object")
	}
	if err := json.Unmarshal(body, v); err != nil {
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) && te.Field != "" {
			return badRequest(te.Field, "field %q: expected %s, got JSON %s", te.Field, te.Type, te.Value)
		}
		var se *json.SyntaxError
		if errors.As(err, &se) {
			return badRequest("", "invalid JSON at byte %d: %v", se.Offset, err)
		}
		return badRequest("", "invalid JSON: %v", err)
	}
	return nil
}

// readJSON decodes the request body into v. The body is bounded by
// MaxJSONBytes after any gzip or deflate Content-Encoding is undone, while
// it is undone (c.Body() would inflate a compressed bomb whole first).
func (s *Server) readJSON(c *fiber.Ctx, v any) error {
	body, err := s.jsonBody(c)
	if err != nil {
		return err
	}
	return decodeJSON(body, v)
}

func (s *Server) jsonBody(c *fiber.Ctx) ([]byte, error) {
	limit := s.cfg.MaxJSONBytes
	tooBig := func() error {
		return apiErr(fiber.StatusRequestEntityTooLarge, "invalid_request_error", "",
			fmt.Sprintf("request body larger than %d bytes (decompressed)", limit))
	}
	raw := c.Request().Body()
	enc := strings.ToLower(strings.TrimSpace(c.Get(fiber.HeaderContentEncoding)))
	var r io.Reader
	switch enc {
	case "", "identity":
		if len(raw) > limit {
			return nil, tooBig()
		}
		return raw, nil
	case "gzip", "x-gzip":
		gz, err := gzip.NewReader(bytes.NewReader(raw))
		if err != nil {
			return nil, badRequest("", "bad gzip Content-Encoding: %v", err)
		}
		r = gz
	case "deflate":
		zr, err := zlib.NewReader(bytes.NewReader(raw))
		if err != nil {
			return nil, badRequest("", "bad deflate Content-Encoding: %v", err)
		}
		r = zr
	default:
		return nil, apiErr(fiber.StatusUnsupportedMediaType, "invalid_request_error", "",
			fmt.Sprintf("unsupported Content-Encoding %.40q: send JSON as is, or gzip or deflate it", enc))
	}
	b, err := io.ReadAll(io.LimitReader(r, int64(limit)+1))
	if err != nil {
		return nil, badRequest("", "bad %s Content-Encoding: %v", enc, err)
	}
	if len(b) > limit {
		return nil, tooBig()
	}
	return b, nil
}

// resolveModel maps "model" (or the invoke path's ID) to an adapter ID, ""
// for the base model.
func (s *Server) resolveModel(c *fiber.Ctx, name, param string) (string, error) {
	if name == "" || name == s.cfg.ModelName {
		return "", nil
	}
	// The key's scope first: an ID outside it answers 403 whether or not
	// it exists, so a tenant cannot enumerate the others' adapters.
	if !keyOf(c).CanInvoke(name) {
		return "", forbidden(name)
	}
	if err := store.ValidateID(name); err != nil {
		return "", badRequest(param, "%q is neither the base model %q nor a valid adapter ID: %v", name, s.cfg.ModelName, err)
	}
	if s.cfg.Catalog == nil {
		return "", s.notFound(name, param)
	}
	if _, err := s.cfg.Catalog.Get(c.UserContext(), name); err != nil {
		if errors.Is(err, ErrNotFound) {
			return "", s.notFound(name, param)
		}
		return "", err
	}
	return name, nil
}

func (s *Server) notFound(name, param string) *Error {
	e := apiErr(fiber.StatusNotFound, "not_found_error", param,
		fmt.Sprintf("the model %q does not exist: use the base model %q or a deployed adapter ID (GET /v1/models)", name, s.cfg.ModelName))
	e.Code = "model_not_found"
	return e
}

// parsePrompt builds the prompts' tokens: one, or (completions) a batch of
// up to MaxBatchPrompts from an array of strings or of token-id arrays.
func (s *Server) parsePrompt(k kind, r *genRequest) ([][]int32, error) {
	tok := s.cfg.Tokenizer
	switch {
	case k == kindChat || (k == kindInvoke && r.Messages != nil):
		if len(r.Messages) == 0 {
			return nil, badRequest("messages", "messages must be a non-empty array")
		}
		if s.cfg.Template == nil {
			return nil, badRequest("messages", "the model %q has no chat template: use /v1/completions with a prompt", s.cfg.ModelName)
		}
		if tok == nil {
			return nil, badRequest("messages", "the model %q has no tokenizer: chat needs one", s.cfg.ModelName)
		}
		text, err := s.cfg.Template.Render(r.Messages, true)
		if err != nil {
			var te *chat.TemplateError
			if errors.As(err, &te) {
				return nil, badRequest("messages", "the chat template rejected the conversation: %s", te.Msg)
			}
			return nil, badRequest("messages", "rendering the chat template: %v", err)
		}
		bos := s.cfg.Template.BOSToken()
		return [][]int32{tok.Encode(text, !(bos != "" && strings.HasPrefix(text, bos)))}, nil
	case r.PromptIDs != nil:
		if len(r.PromptIDs) == 0 {
			return nil, badRequest("prompt_ids", "prompt_ids is empty")
		}
		return [][]int32{r.PromptIDs}, nil
	}
	raw := strings.TrimSpace(string(r.Prompt))
	if raw == "" || raw == "null" {
		if k == kindInvoke {
			return nil, badRequest("prompt", "give one of prompt, prompt_ids or messages")
		}
		return nil, badRequest("prompt", "prompt is required")
	}
	var text string
	if json.Unmarshal(r.Prompt, &text) == nil {
		p, err := s.encode(text, "prompt")
		return one(p, err)
	}
	var ids []int32
	if json.Unmarshal(r.Prompt, &ids) == nil {
		if len(ids) == 0 {
			return nil, badRequest("prompt", "prompt is an empty array")
		}
		return [][]int32{ids}, nil
	}
	var texts []string
	if json.Unmarshal(r.Prompt, &texts) == nil {
		if err := s.batchSize(k, len(texts)); err != nil {
			return nil, err
		}
		out := make([][]int32, len(texts))
		for i, t := range texts {
			if t == "" && len(texts) > 1 {
				return nil, badRequest("prompt", "prompt[%d] is an empty string", i)
			}
			p, err := s.encode(t, "prompt")
			if err != nil {
				if len(texts) > 1 {
					return nil, badRequest("prompt", "prompt[%d]: %v", i, err)
				}
				return nil, err
			}
			out[i] = p
		}
		return out, nil
	}
	var batch [][]int32
	if json.Unmarshal(r.Prompt, &batch) == nil {
		if err := s.batchSize(k, len(batch)); err != nil {
			return nil, err
		}
		for i, p := range batch {
			if len(p) == 0 {
				return nil, badRequest("prompt", "prompt[%d] is an empty array", i)
			}
		}
		return batch, nil
	}
	return nil, badRequest("prompt", "prompt must be a string, an array of token ids, or (completions) an array of either")
}

// MaxBatchPrompts bounds the prompts of one completions request.
const MaxBatchPrompts = 64

// batchSize checks the number of prompts in a prompt array: several only
// for completions, at most MaxBatchPrompts.
func (s *Server) batchSize(k kind, n int) error {
	switch {
	case n == 0:
		return badRequest("prompt", "prompt is an empty array")
	case n > 1 && k != kindCompletion:
		return badRequest("prompt", "one prompt per request is supported, got %d", n)
	case n > MaxBatchPrompts:
		return badRequest("prompt", "at most %d prompts per request are supported, got %d", MaxBatchPrompts, n)
	}
	return nil
}

func one(p []int32, err error) ([][]int32, error) {
	if err != nil {
		return nil, err
	}
	return [][]int32{p}, nil
}

func (s *Server) encode(text, param string) ([]int32, error) {
	if s.cfg.Tokenizer == nil {
		return nil, badRequest(param, "the model %q has no tokenizer: send the prompt as an array of token ids", s.cfg.ModelName)
	}
	ids := s.cfg.Tokenizer.Encode(text, true)
	if len(ids) == 0 {
		return nil, badRequest(param, "the prompt encodes to no tokens")
	}
	return ids, nil
}

// parseStop reads "stop": a string, or an array of strings and token ids.
func parseStop(raw json.RawMessage) (strs []string, ids []int32, err error) {
	t := strings.TrimSpace(string(raw))
	if t == "" || t == "null" {
		return nil, nil, nil
	}
	var one string
	if json.Unmarshal(raw, &one) == nil {
		if one == "" {
			return nil, nil, badRequest("stop", "stop strings must not be empty")
		}
		return []string{one}, nil, nil
	}
	var arr []any
	if json.Unmarshal(raw, &arr) != nil {
		return nil, nil, badRequest("stop", "stop must be a string or an array of strings and token ids")
	}
	for _, x := range arr {
		switch v := x.(type) {
		case string:
			if v == "" {
				return nil, nil, badRequest("stop", "stop strings must not be empty")
			}
			strs = append(strs, v)
		case float64:
			if v != math.Trunc(v) || v < 0 || v > math.MaxInt32 {
				return nil, nil, badRequest("stop", "stop token id %v is not a non-negative integer", v)
			}
			ids = append(ids, int32(v))
		default:
			return nil, nil, badRequest("stop", "stop must be a string or an array of strings and token ids")
		}
	}
	return strs, ids, nil
}

// buildJob validates a request.
func (s *Server) buildJob(c *fiber.Ctx, k kind, adapterParam string) (*job, error) {
	var r genRequest
	if err := s.readJSON(c, &r); err != nil {
		return nil, err
	}
	j := &job{kind: k, created: time.Now().Unix(), start: time.Now(), stream: r.Stream, returnIDs: r.ReturnTokenIDs}
	var err error
	switch k {
	case kindInvoke:
		j.id, j.model = newID("inv-"), adapterParam
		j.adapter, err = s.resolveModel(c, adapterParam, "id")
	case kindCompletion:
		j.id, j.model = newID("cmpl-"), r.Model
		j.adapter, err = s.resolveModel(c, r.Model, "model")
	case kindChat:
		j.id, j.model = newID("chatcmpl-"), r.Model
		j.adapter, err = s.resolveModel(c, r.Model, "model")
	}
	if err != nil {
		return nil, err
	}
	if j.model == "" {
		j.model = s.cfg.ModelName
	}
	if r.N != nil && *r.N != 1 {
		return nil, badRequest("n", "only n=1 is supported, got %d", *r.N)
	}
	if r.BestOf != nil && *r.BestOf != 1 {
		return nil, badRequest("best_of", "only best_of=1 is supported, got %d", *r.BestOf)
	}
	if r.Echo {
		return nil, badRequest("echo", "echo is not supported")
	}
	if r.StreamOptions != nil {
		if !r.Stream {
			return nil, badRequest("stream_options", "stream_options is only allowed with stream: true")
		}
		j.usageChunk = r.StreamOptions.IncludeUsage
	}
	prompts, err := s.parsePrompt(k, &r)
	if err != nil {
		return nil, err
	}
	prompt := prompts[0]
	sp := sample.Params{Temperature: 1, TopP: 1}
	if k == kindInvoke {
		sp.Temperature = 0 // invoke defaults to greedy
	}
	if r.Temperature != nil {
		if *r.Temperature < 0 || *r.Temperature > 100 || math.IsNaN(*r.Temperature) {
			return nil, badRequest("temperature", "temperature must be in [0, 100], got %v", *r.Temperature)
		}
		sp.Temperature = *r.Temperature
	}
	if r.TopP != nil {
		if !(*r.TopP > 0 && *r.TopP <= 1) {
			return nil, badRequest("top_p", "top_p must be in (0, 1], got %v", *r.TopP)
		}
		sp.TopP = *r.TopP
	}
	if r.TopK != nil {
		switch {
		case *r.TopK == -1:
		case *r.TopK < 0:
			return nil, badRequest("top_k", "top_k must be -1, 0 (no limit) or positive, got %d", *r.TopK)
		default:
			sp.TopK = *r.TopK
		}
	}
	if r.Seed != nil {
		v := uint64(*r.Seed)
		sp.Seed = &v
	}
	// logprobs: an int (invoke, completions) or a bool (chat).
	if lp := strings.TrimSpace(string(r.Logprobs)); lp != "" && lp != "null" {
		if k == kindChat {
			var b bool
			if json.Unmarshal(r.Logprobs, &b) != nil {
				return nil, badRequest("logprobs", "logprobs must be a boolean")
			}
			j.logprobs = b
		} else {
			var n int
			if json.Unmarshal(r.Logprobs, &n) != nil || n < 0 || n > sample.MaxLogprobs {
				return nil, badRequest("logprobs", "logprobs must be an integer in [0, %d]", sample.MaxLogprobs)
			}
			j.logprobs, sp.Logprobs = true, n
		}
	}
	if r.TopLogprobs != nil {
		if *r.TopLogprobs < 0 || *r.TopLogprobs > sample.MaxLogprobs {
			return nil, badRequest("top_logprobs", "top_logprobs must be in [0, %d], got %d", sample.MaxLogprobs, *r.TopLogprobs)
		}
		if k == kindChat && !j.logprobs && *r.TopLogprobs > 0 {
			return nil, badRequest("top_logprobs", "top_logprobs needs logprobs: true")
		}
		if k == kindChat {
			sp.Logprobs = *r.TopLogprobs
		}
	}
	if err := sp.Validate(); err != nil {
		return nil, badRequest("", "%v", err)
	}
	maxTok := r.MaxTokens
	param := "max_tokens"
	if maxTok == nil && r.MaxCompletionTokens != nil {
		maxTok, param = r.MaxCompletionTokens, "max_completion_tokens"
	}
	var n int
	switch {
	case maxTok != nil:
		n = *maxTok
		if n <= 0 {
			return nil, badRequest(param, "%s must be positive, got %d", param, n)
		}
	case k == kindCompletion:
		n = 16
	default:
		n = s.cfg.DefaultMaxTokens
		if s.cfg.MaxModelLen > 0 {
			n = max(1, min(n, s.cfg.MaxModelLen-len(prompt)))
		}
	}
	strs, ids, err := parseStop(r.Stop)
	if err != nil {
		return nil, err
	}
	if len(strs) > 0 && s.cfg.Tokenizer == nil {
		return nil, badRequest("stop", "the model %q has no tokenizer: stop strings need one, use token ids", s.cfg.ModelName)
	}
	ids = append(ids, r.StopTokenIDs...)
	if !r.IgnoreEOS {
		ids = append(ids, s.cfg.EOS...)
	}
	j.stopStrs = strs
	j.req = scheduler.Request{Adapter: j.adapter, Prompt: prompt, MaxTokens: n, Sampling: sp, Stop: ids}
	j.prompts = prompts
	return j, nil
}

// submitErr maps a Submit error to an API error.
func submitErr(err error) error {
	switch {
	case errors.Is(err, scheduler.ErrQueueFull):
		e := apiErr(fiber.StatusTooManyRequests, "rate_limit_error", "", "the server is at capacity: retry later ("+err.Error()+")")
		e.RetryAfter = 1
		return e
	case errors.Is(err, scheduler.ErrTooLong):
		return badRequest("max_tokens", "%v", err)
	case errors.Is(err, engine.ErrBadInput):
		param := "prompt"
		var fe *scheduler.FieldError
		if errors.As(err, &fe) {
			param = fe.Field
		}
		return badRequest(param, "%v", err)
	case errors.Is(err, sample.ErrParams):
		return badRequest("", "%v", err)
	case errors.Is(err, scheduler.ErrClosed):
		return apiErr(fiber.StatusServiceUnavailable, "server_error", "", "the server is shutting down")
	}
	return err
}

// runErr maps an error ending a running request.
func runErr(err error) *Error {
	var e *Error
	switch {
	case errors.As(err, &e):
		return e
	case errors.Is(err, context.DeadlineExceeded):
		return apiErr(fiber.StatusGatewayTimeout, "timeout_error", "", "the request did not finish within the request timeout")
	case errors.Is(err, context.Canceled):
		return apiErr(499, "cancelled", "", "the request was cancelled")
	case errors.Is(err, scheduler.ErrUnknownAdapter), errors.Is(err, ErrNotFound):
		return apiErr(fiber.StatusNotFound, "not_found_error", "model", err.Error())
	case errors.Is(err, ErrUnavailable):
		return unavailableErr(err)
	case errors.Is(err, ErrInvalidAdapter):
		return badRequest("model", "%v", err)
	case errors.Is(err, scheduler.ErrClosed):
		return apiErr(fiber.StatusServiceUnavailable, "server_error", "", "the server is shutting down")
	case errors.Is(err, scheduler.ErrNonFinite):
		e := apiErr(fiber.StatusInternalServerError, "server_error", "model", err.Error())
		e.Code = "non_finite_logits"
		return e
	case errors.Is(err, scheduler.ErrInternal):
		e := apiErr(fiber.StatusInternalServerError, "server_error", "", err.Error())
		e.Code = "internal_error"
		return e
	}
	return apiErr(fiber.StatusInternalServerError, "server_error", "", err.Error())
}

// result is a finished (or partial) generation.
type result struct {
	text             string
	tokens           []int32
	choices          []sample.Choice
	finish           string
	prompt, complete int
	pieces           []string  // what each token adds to the text: they concatenate to text
	info             []tokInfo // with logprobs
}

// delta is a streamed piece: text safe to show and the tokens behind it.
type delta struct {
	text    string
	choices []sample.Choice
	pieces  []string  // what each token adds to the text: they concatenate to text
	info    []tokInfo // with logprobs
	offset  int       // where text starts in the whole text, in characters
}

// drive consumes the scheduler's events: decodes text, applies stop
// strings, calls emit with streamable deltas (nil: not streaming).
//
// The text is decoded incrementally after the prompt (the decoder keeps a
// few of the prompt's last tokens as context, like vLLM's
// detokenize_incrementally), so the first token reads as it does after the
// prompt: " upon" after "Once", not "upon". Each token's piece is what it
// adds to the text; the pieces concatenate to the text (cut at a stop
// string, and the last one takes what Flush adds), streamed deltas end on
// token boundaries so that their pieces concatenate to their text, and with
// logprobs each token's bytes and alternatives are decoded in the same
// context (tokInfo).
func (s *Server) drive(ctx context.Context, cancel context.CancelFunc, j *job, ch <-chan scheduler.Event, emit func(delta) error, heartbeat func() error, every time.Duration) (result, error) {
	res := result{prompt: len(j.req.Prompt)}
	var dec textDecoder
	if s.cfg.Tokenizer != nil {
		dec = s.cfg.Tokenizer.NewDecoderAfter(j.req.Prompt, true)
	}
	hold := 0
	for _, st := range j.stopStrs {
		hold = max(hold, len(st)-1)
	}
	var text strings.Builder
	var ends []int // ends[k]: where token k's piece ends in text (non-decreasing)
	// Bytes and characters of text sent; first token not yet sent.
	emitted, emittedChars, pendingFrom := 0, 0, 0
	last := time.Time{}
	label := adapterLabel(j.adapter)
	stopAt := func(from int) int {
		t := text.String()
		idx := -1
		for _, st := range j.stopStrs {
			if i := strings.Index(t[max(0, from-len(st)+1):], st); i >= 0 {
				i += max(0, from-len(st)+1)
				if idx < 0 || i < idx {
					idx = i
				}
			}
		}
		return idx
	}
	// flushDelta sends the text up to upto, cut back to the end of a token,
	// with the tokens behind it; final sends all the rest.
	flushDelta := func(upto int, final bool) error {
		if emit == nil {
			return nil
		}
		t := text.String()
		n := len(res.choices)
		if final {
			upto = len(t)
		} else {
			for n > pendingFrom && ends[n-1] > upto {
				n--
			}
			if n == pendingFrom {
				return nil
			}
			upto = ends[n-1]
		}
		upto = max(upto, emitted)
		d := delta{text: t[emitted:upto], offset: emittedChars, choices: res.choices[pendingFrom:n],
			pieces: pieces(t, ends[pendingFrom:n], emitted, upto)}
		if res.info != nil {
			d.info = res.info[pendingFrom:n]
		}
		if d.text == "" && len(d.choices) == 0 {
			return nil
		}
		emitted, emittedChars, pendingFrom = upto, emittedChars+utf8.RuneCountInString(d.text), n
		return emit(d)
	}
	var tick <-chan time.Time
	if heartbeat != nil && every > 0 {
		tk := time.NewTicker(every)
		defer tk.Stop()
		tick = tk.C
	}
loop:
	for {
		var ev scheduler.Event
		select {
		case e, ok := <-ch:
			if !ok {
				break loop
			}
			ev = e
		case <-tick:
			// A comment line (SSE) keeps proxies from timing out; it, or a
			// peek at the socket, finds a client that went away.
			if err := heartbeat(); err != nil {
				cancel()
				return res, err
			}
			continue
		}
		if ev.Done {
			if ev.Err != nil {
				return res, ev.Err
			}
			res.finish = ev.FinishReason
			break loop
		}
		now := time.Now()
		if last.IsZero() {
			s.metrics.ttft.WithLabelValues(label).Observe(now.Sub(j.start).Seconds())
		} else {
			s.metrics.itl.WithLabelValues(label).Observe(now.Sub(last).Seconds())
		}
		last = now
		res.tokens = append(res.tokens, ev.Token.ID)
		res.choices = append(res.choices, ev.Token)
		res.complete++
		before := text.Len()
		if dec != nil {
			if j.logprobs {
				res.info = append(res.info, s.tokInfo(dec, ev.Token))
			}
			text.WriteString(dec.Add(ev.Token.ID))
		}
		ends = append(ends, text.Len())
		if dec != nil && len(j.stopStrs) > 0 {
			if i := stopAt(before); i >= 0 {
				cancel() // the scheduler drops the sequence at its next step
				res.text, res.finish = text.String()[:i], engine.FinishStop
				text.Reset()
				text.WriteString(res.text)
				res.pieces = pieces(res.text, ends, 0, len(res.text))
				if err := flushDelta(0, true); err != nil {
					return res, err
				}
				return res, nil
			}
		}
		if err := flushDelta(text.Len()-hold, false); err != nil {
			cancel()
			return res, err
		}
	}
	if res.finish == "" {
		if err := ctx.Err(); err != nil {
			return res, err
		}
		return res, errors.New("the generation ended without a result")
	}
	if dec != nil {
		before := text.Len()
		text.WriteString(dec.Flush())
		if i := stopAt(before); i >= 0 && len(j.stopStrs) > 0 {
			t := text.String()[:i]
			text.Reset()
			text.WriteString(t)
			res.finish = engine.FinishStop
		}
	}
	res.text = text.String()
	res.pieces = pieces(res.text, ends, 0, len(res.text))
	if err := flushDelta(0, true); err != nil {
		return res, err
	}
	return res, nil
}

// textDecoder is a tokenizer.StreamDecoder.
type textDecoder interface {
	Add(id int32) string
	Flush() string
	Peek(id int32) string
	PeekBytes(id int32) []byte
}

// pieces cuts text[from:to] into the pieces of the tokens ending at ends
// (clipped to [from, to]; the last piece reaches to).
func pieces(text string, ends []int, from, to int) []string {
	out := make([]string, len(ends))
	at := from
	for k, e := range ends {
		e = min(max(e, at), to)
		if k == len(ends)-1 {
			e = to
		}
		out[k] = text[at:e]
		at = e
	}
	return out
}

// disconnectProbe is how often a non-streaming request checks that its
// client is still connected (a client that leaves frees its KV pages).
const disconnectProbe = 200 * time.Millisecond

// generate runs a job: a JSON answer, or an SSE stream.
func (s *Server) generate(c *fiber.Ctx, j *job) error {
	if len(j.prompts) > 1 {
		return s.generateBatch(c, j)
	}
	base := s.ctx
	var ctx context.Context
	var cancel context.CancelFunc
	if s.cfg.RequestTimeout > 0 {
		ctx, cancel = context.WithTimeout(base, s.cfg.RequestTimeout)
	} else {
		ctx, cancel = context.WithCancel(base)
	}
	ch, err := s.cfg.Generator.Submit(ctx, j.req)
	if err != nil {
		cancel()
		err = submitErr(err)
		status := fiber.StatusInternalServerError
		var e *Error
		if errors.As(err, &e) {
			status = e.Status
		}
		s.metrics.requests.WithLabelValues(adapterLabel(j.adapter), fmt.Sprint(status)).Inc()
		return err
	}
	s.metrics.begin()
	if !j.stream {
		defer cancel()
		conn := c.Context().Conn()
		probe := func() error {
			if peerClosed(conn) {
				return context.Canceled // answered 499: the client went away
			}
			return nil
		}
		res, err := s.drive(ctx, cancel, j, ch, nil, probe, disconnectProbe)
		if err != nil {
			e := runErr(err)
			s.finished(j, e.Status, res, err)
			return e
		}
		s.finished(j, fiber.StatusOK, res, nil)
		return c.JSON(s.final(j, res))
	}
	startSSE(c)
	s.streamBody(c, func(w *bufio.Writer) {
		defer cancel()
		send := func(v any) error { return sseEvent(w, v) }
		var sendErr error
		first := true
		emit := func(d delta) error {
			if err := send(s.chunk(j, d, first)); err != nil {
				sendErr = err
				return err
			}
			first = false
			return nil
		}
		heartbeat := func() error {
			if _, err := w.WriteString(": keep-alive\n\n"); err != nil {
				sendErr = err
				return err
			}
			if err := w.Flush(); err != nil {
				sendErr = err
				return err
			}
			return nil
		}
		res, err := s.drive(ctx, cancel, j, ch, emit, heartbeat, s.cfg.Heartbeat)
		status := fiber.StatusOK
		switch {
		case sendErr != nil:
			status = 499 // the client went away
		case err != nil:
			var ev fiber.Map
			status, ev = streamErr(err)
			_ = send(ev)
		default:
			for _, v := range s.tail(j, res, first) {
				if send(v) != nil {
					status = 499
					break
				}
			}
		}
		if status != 499 {
			sseDone(w)
		}
		s.finished(j, status, res, nil)
	})
	return nil
}

// finished records a generation in the metrics and the log (one line per
// request: who, what, how it ended, how long).
func (s *Server) finished(j *job, status int, res result, err error) {
	dur := time.Since(j.start)
	s.metrics.end(j.adapter, status, res.prompt, res.complete, dur)
	attrs := []any{"id", j.id, "model", j.model, "status", status, "stream", j.stream,
		"prompt_tokens", res.prompt, "completion_tokens", res.complete, "finish", res.finish,
		"ms", dur.Milliseconds()}
	if err != nil {
		attrs = append(attrs, "err", err.Error())
	}
	s.log.Info("request", attrs...)
}

type usage struct {
	PromptTokens     int `json:"prompt_tokens"`
	CompletionTokens int `json:"completion_tokens"`
	TotalTokens      int `json:"total_tokens"`
}

func usageOf(r result) usage {
	return usage{r.prompt, r.complete, r.prompt + r.complete}
}

func (s *Server) tokenText(id int32) string {
	if s.cfg.Tokenizer == nil {
		return fmt.Sprintf("token_id:%d", id)
	}
	return s.cfg.Tokenizer.Decode([]int32{id}, false)
}

// Logprobs' token strings are decoded in context, after the prompt and the
// tokens before them, never alone (a SentencePiece "▁upon" alone loses its
// space):
//   - a sampled token's string is its piece, what it adds to the text, so
//     that the strings concatenate to the text and text_offset lines up.
//     A token that is an incomplete character on its own (a byte-fallback
//     byte, part of a byte-level character) adds nothing until the token
//     that completes the character, whose string holds all of it: as with
//     the text, incomplete UTF-8 is never shown. Its own bytes are in chat's
//     "bytes" (OpenAI's practice; concatenated over the tokens they give the
//     text's bytes). A special token, such as the stop token, is not part of
//     the text (skip_special_tokens, as vLLM), so its string is empty (vLLM
//     shows "<s>" only with skip_special_tokens false).
//   - an alternative's string is the text it would have added in place of
//     the sampled token, had it ended the text (Peek: a character it leaves
//     incomplete reads U+FFFD); a special token reads as itself ("</s>"),
//     since nothing has to join there.

// tokInfo is a sampled token's own bytes and its alternatives, decoded
// where the token was sampled.
type tokInfo struct {
	bytes []byte
	top   []altInfo // as sample.Choice.Top
}

type altInfo struct {
	text  string
	bytes []byte
}

func (s *Server) tokInfo(dec textDecoder, c sample.Choice) tokInfo {
	ti := tokInfo{bytes: dec.PeekBytes(c.ID), top: make([]altInfo, len(c.Top))}
	tok := s.cfg.Tokenizer
	for a, x := range c.Top {
		switch t, ok := tok.Token(x.ID); {
		case !ok: // an id the model has and the tokenizer not
			t = fmt.Sprintf("token_id:%d", x.ID)
			ti.top[a] = altInfo{t, []byte(t)}
		case tok.IsSpecial(x.ID):
			ti.top[a] = altInfo{t, []byte(t)}
		default:
			ti.top[a] = altInfo{dec.Peek(x.ID), dec.PeekBytes(x.ID)}
		}
	}
	return ti
}

// sampled is the string and bytes of token k of cs (see above).
func (s *Server) sampled(k int, cs []sample.Choice, pieces []string, info []tokInfo) (string, []byte) {
	if s.cfg.Tokenizer == nil || k >= len(pieces) {
		t := s.tokenText(cs[k].ID)
		return t, []byte(t)
	}
	var b []byte
	if k < len(info) {
		b = info[k].bytes
	}
	return pieces[k], b
}

// alternative is the string and bytes of alternative a of token k of cs.
func (s *Server) alternative(k, a int, cs []sample.Choice, info []tokInfo) (string, []byte) {
	if s.cfg.Tokenizer == nil || k >= len(info) || a >= len(info[k].top) {
		t := s.tokenText(cs[k].Top[a].ID)
		return t, []byte(t)
	}
	return info[k].top[a].text, info[k].top[a].bytes
}

// completionLogprobs is OpenAI's legacy completions logprobs object.
type completionLogprobs struct {
	Tokens        []string             `json:"tokens"`
	TokenLogprobs []float64            `json:"token_logprobs"`
	TopLogprobs   []map[string]float64 `json:"top_logprobs"`
	TextOffset    []int                `json:"text_offset"`
}

// completionLP is the logprobs of cs, whose text starts offset characters
// into the completion's text. text_offset[i] is where token i's string
// starts in the completion's text (not the prompt's: echo is not
// supported), counted in characters (Unicode code points, as vLLM's Python
// len() and OpenAI); streamed chunks continue the count.
func (s *Server) completionLP(cs []sample.Choice, pieces []string, info []tokInfo, offset int) *completionLogprobs {
	lp := &completionLogprobs{Tokens: []string{}, TokenLogprobs: []float64{}, TopLogprobs: []map[string]float64{}, TextOffset: []int{}}
	for k, c := range cs {
		t, _ := s.sampled(k, cs, pieces, info)
		lp.Tokens = append(lp.Tokens, t)
		lp.TokenLogprobs = append(lp.TokenLogprobs, finite(c.Logprob))
		top := map[string]float64{}
		for a, x := range c.Top {
			key, _ := s.alternative(k, a, cs, info)
			if _, dup := top[key]; !dup { // alternatives that read alike: the likeliest
				top[key] = finite(x.Logprob)
			}
		}
		lp.TopLogprobs = append(lp.TopLogprobs, top)
		lp.TextOffset = append(lp.TextOffset, offset)
		offset += utf8.RuneCountInString(t)
	}
	return lp
}

type chatTop struct {
	Token   string  `json:"token"`
	Logprob float64 `json:"logprob"`
	Bytes   []int   `json:"bytes"`
}

type chatLP struct {
	chatTop
	TopLogprobs []chatTop `json:"top_logprobs"`
}

func chatTopOf(t string, bs []byte, lp float64) chatTop {
	b := make([]int, len(bs))
	for i, c := range bs {
		b[i] = int(c)
	}
	return chatTop{t, finite(lp), b}
}

func (s *Server) chatLogprobs(cs []sample.Choice, pieces []string, info []tokInfo) map[string]any {
	out := []chatLP{}
	for k, c := range cs {
		t, b := s.sampled(k, cs, pieces, info)
		e := chatLP{chatTop: chatTopOf(t, b, c.Logprob), TopLogprobs: []chatTop{}}
		for a, x := range c.Top {
			t, b := s.alternative(k, a, cs, info)
			e.TopLogprobs = append(e.TopLogprobs, chatTopOf(t, b, x.Logprob))
		}
		out = append(out, e)
	}
	return map[string]any{"content": out}
}

type invokeLP struct {
	TokenID     int32        `json:"token_id"`
	Token       string       `json:"token"`
	Logprob     float64      `json:"logprob"`
	TopLogprobs []invokeLPel `json:"top_logprobs"`
}

type invokeLPel struct {
	TokenID int32   `json:"token_id"`
	Token   string  `json:"token"`
	Logprob float64 `json:"logprob"`
}

func (s *Server) invokeLogprobs(cs []sample.Choice, pieces []string, info []tokInfo) []invokeLP {
	out := []invokeLP{}
	for k, c := range cs {
		t, _ := s.sampled(k, cs, pieces, info)
		e := invokeLP{TokenID: c.ID, Token: t, Logprob: finite(c.Logprob), TopLogprobs: []invokeLPel{}}
		for a, x := range c.Top {
			t, _ := s.alternative(k, a, cs, info)
			e.TopLogprobs = append(e.TopLogprobs, invokeLPel{x.ID, t, finite(x.Logprob)})
		}
		out = append(out, e)
	}
	return out
}

// finite keeps JSON encodable: -Inf becomes a very negative number.
func finite(v float64) float64 {
	if math.IsInf(v, -1) || math.IsNaN(v) {
		return -9999
	}
	return v
}

func ids(ts []int32) []int32 {
	if ts == nil {
		return []int32{}
	}
	return ts
}

// final is the non-streamed response.
func (s *Server) final(j *job, r result) any {
	switch j.kind {
	case kindInvoke:
		m := fiber.Map{"id": j.id, "object": "invocation", "created": j.created, "adapter": j.model,
			"text": r.text, "token_ids": ids(r.tokens), "prompt_token_ids": ids(j.req.Prompt),
			"finish_reason": r.finish, "usage": usageOf(r)}
		if j.logprobs {
			m["logprobs"] = s.invokeLogprobs(r.choices, r.pieces, r.info)
		}
		return m
	case kindCompletion:
		ch := s.completionChoice(j, 0, j.req.Prompt, r)
		m := fiber.Map{"id": j.id, "object": "text_completion", "created": j.created, "model": j.model,
			"choices": []any{ch}, "usage": usageOf(r), "system_fingerprint": nil}
		if j.returnIDs {
			m["prompt_token_ids"] = ids(j.req.Prompt)
		}
		return m
	default:
		ch := fiber.Map{"index": 0, "message": fiber.Map{"role": "assistant", "content": r.text, "refusal": nil, "tool_calls": []any{}},
			"logprobs": nil, "finish_reason": r.finish}
		if j.logprobs {
			ch["logprobs"] = s.chatLogprobs(r.choices, r.pieces, r.info)
		}
		if j.returnIDs {
			ch["token_ids"] = ids(r.tokens)
		}
		m := fiber.Map{"id": j.id, "object": "chat.completion", "created": j.created, "model": j.model,
			"choices": []any{ch}, "usage": usageOf(r), "system_fingerprint": nil}
		if j.returnIDs {
			m["prompt_token_ids"] = ids(j.req.Prompt)
		}
		return m
	}
}

// completionChoice is choice index of a completions answer.
func (s *Server) completionChoice(j *job, index int, prompt []int32, r result) fiber.Map {
	ch := fiber.Map{"index": index, "text": r.text, "logprobs": nil, "finish_reason": r.finish}
	if j.logprobs {
		ch["logprobs"] = s.completionLP(r.choices, r.pieces, r.info, 0)
	}
	if j.returnIDs {
		ch["token_ids"] = ids(r.tokens)
		ch["prompt_token_ids"] = ids(prompt)
	}
	return ch
}

// completionChunk is a streamed delta of choice index of a completion.
func (s *Server) completionChunk(j *job, index int, prompt []int32, d delta, first bool) fiber.Map {
	tok := make([]int32, 0, len(d.choices))
	for _, c := range d.choices {
		tok = append(tok, c.ID)
	}
	ch := fiber.Map{"index": index, "text": d.text, "logprobs": nil, "finish_reason": nil}
	if j.logprobs {
		ch["logprobs"] = s.completionLP(d.choices, d.pieces, d.info, d.offset)
	}
	if j.returnIDs {
		ch["token_ids"] = tok
		if first {
			ch["prompt_token_ids"] = ids(prompt)
		}
	}
	return fiber.Map{"id": j.id, "object": "text_completion", "created": j.created, "model": j.model, "choices": []any{ch}}
}

// completionFinish is the chunk that ends choice index of a stream.
func completionFinish(j *job, index int, finish string) fiber.Map {
	return fiber.Map{"id": j.id, "object": "text_completion", "created": j.created, "model": j.model,
		"choices": []any{fiber.Map{"index": index, "text": "", "logprobs": nil, "finish_reason": finish}}}
}

// chunk is one streamed delta.
func (s *Server) chunk(j *job, d delta, first bool) any {
	tok := make([]int32, 0, len(d.choices))
	for _, c := range d.choices {
		tok = append(tok, c.ID)
	}
	switch j.kind {
	case kindInvoke:
		m := fiber.Map{"id": j.id, "object": "invocation.chunk", "created": j.created, "adapter": j.model,
			"text": d.text, "token_ids": tok}
		if first {
			m["prompt_token_ids"] = ids(j.req.Prompt)
		}
		if j.logprobs {
			m["logprobs"] = s.invokeLogprobs(d.choices, d.pieces, d.info)
		}
		return m
	case kindCompletion:
		return s.completionChunk(j, 0, j.req.Prompt, d, first)
	default:
		dl := fiber.Map{"content": d.text}
		if first {
			dl["role"] = "assistant"
		}
		ch := fiber.Map{"index": 0, "delta": dl, "logprobs": nil, "finish_reason": nil}
		if j.logprobs {
			ch["logprobs"] = s.chatLogprobs(d.choices, d.pieces, d.info)
		}
		if j.returnIDs {
			ch["token_ids"] = tok
		}
		m := fiber.Map{"id": j.id, "object": "chat.completion.chunk", "created": j.created, "model": j.model, "choices": []any{ch}}
		if first && j.returnIDs {
			m["prompt_token_ids"] = ids(j.req.Prompt)
		}
		return m
	}
}

// tail are the chunks after the content: the finish reason, then usage.
func (s *Server) tail(j *job, r result, first bool) []any {
	switch j.kind {
	case kindInvoke:
		return []any{fiber.Map{"id": j.id, "object": "invocation.chunk", "created": j.created, "adapter": j.model,
			"text": "", "token_ids": []int32{}, "finish_reason": r.finish, "usage": usageOf(r)}}
	case kindCompletion:
		out := []any{completionFinish(j, 0, r.finish)}
		if j.usageChunk {
			out = append(out, fiber.Map{"id": j.id, "object": "text_completion", "created": j.created, "model": j.model,
				"choices": []any{}, "usage": usageOf(r)})
		}
		return out
	default:
		dl := fiber.Map{}
		if first {
			dl = fiber.Map{"role": "assistant", "content": ""}
		}
		out := []any{fiber.Map{"id": j.id, "object": "chat.completion.chunk", "created": j.created, "model": j.model,
			"choices": []any{fiber.Map{"index": 0, "delta": dl, "logprobs": nil, "finish_reason": r.finish}}}}
		if j.usageChunk {
			out = append(out, fiber.Map{"id": j.id, "object": "chat.completion.chunk", "created": j.created, "model": j.model,
				"choices": []any{}, "usage": usageOf(r)})
		}
		return out
	}
}

func (s *Server) invoke(c *fiber.Ctx) error {
	j, err := s.buildJob(c, kindInvoke, c.Params("id"))
	if err != nil {
		return err
	}
	return s.generate(c, j)
}

func (s *Server) completions(c *fiber.Ctx) error {
	j, err := s.buildJob(c, kindCompletion, "")
	if err != nil {
		return err
	}
	return s.generate(c, j)
}

func (s *Server) chatCompletions(c *fiber.Ctx) error {
	j, err := s.buildJob(c, kindChat, "")
	if err != nil {
		return err
	}
	return s.generate(c, j)
}
