// Request decoding: the invoke, completions and chat bodies become a
// validated job.

package api

import (
	"bytes"
	"compress/gzip"
	"compress/zlib"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"strconv"
	"strings"
	"time"

	"github.com/gofiber/fiber/v2"
	"github.com/peftd/peftd/loader/store"
	"github.com/peftd/peftd/runtime/sample"
	"github.com/peftd/peftd/scheduler"
	"github.com/peftd/peftd/text/chat"
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
	// Penalties and logit bias (OpenAI's, and vLLM's repetition_penalty):
	// sample.Penalties.
	PresencePenalty   *float64        `json:"presence_penalty"`
	FrequencyPenalty  *float64        `json:"frequency_penalty"`
	RepetitionPenalty *float64        `json:"repetition_penalty"`
	LogitBias         json.RawMessage `json:"logit_bias"`

	// OpenAI fields peftd does not implement: accepted at their neutral
	// values (clients send them so), refused otherwise (checkUnsupported)
	// rather than ignored.
	Suffix         *string         `json:"suffix"`
	Tools          json.RawMessage `json:"tools"`
	ToolChoice     json.RawMessage `json:"tool_choice"`
	Functions      json.RawMessage `json:"functions"`
	ResponseFormat *struct {
		Type string `json:"type"`
	} `json:"response_format"`
}

// checkUnsupported refuses what peftd would otherwise silently ignore: a
// suffix, tools or functions, a response format other than text.
func (r *genRequest) checkUnsupported() error {
	for _, f := range []struct {
		name string
		raw  json.RawMessage
	}{{"tools", r.Tools}, {"tool_choice", r.ToolChoice}, {"functions", r.Functions}} {
		switch strings.TrimSpace(string(f.raw)) {
		case "", "null", "{}", "[]", `"none"`:
		default:
			return badRequest(f.name, "%s is not supported", f.name)
		}
	}
	if r.Suffix != nil && *r.Suffix != "" {
		return badRequest("suffix", "suffix is not supported")
	}
	if rf := r.ResponseFormat; rf != nil && rf.Type != "" && rf.Type != "text" {
		return badRequest("response_format", "response_format %q is not supported (only text)", rf.Type)
	}
	return nil
}

// penalties reads the penalties and the logit bias: presence and
// frequency in [-2, 2], repetition in (0, 100] (1: none), logit_bias an
// object of token ids (as strings, OpenAI's form) to biases in [-100,
// 100]. The token ids are checked against the vocabulary by the scheduler.
func (r *genRequest) penalties() (sample.Penalties, error) {
	var p sample.Penalties
	for _, f := range []struct {
		name   string
		v      *float64
		dst    *float64
		lo, hi float64
	}{{"presence_penalty", r.PresencePenalty, &p.Presence, -2, 2}, {"frequency_penalty", r.FrequencyPenalty, &p.Frequency, -2, 2}} {
		if f.v == nil {
			continue
		}
		if !(*f.v >= f.lo && *f.v <= f.hi) {
			return p, badRequest(f.name, "%s must be in [%g, %g], got %v", f.name, f.lo, f.hi, *f.v)
		}
		*f.dst = *f.v
	}
	if v := r.RepetitionPenalty; v != nil {
		if !(*v >= 1e-3 && *v <= 100) {
			return p, badRequest("repetition_penalty", "repetition_penalty must be in (0, 100] (1: none), got %v", *v)
		}
		p.Repetition = *v
	}
	switch raw := strings.TrimSpace(string(r.LogitBias)); raw {
	case "", "null", "{}":
	default:
		var m map[string]json.Number
		d := json.NewDecoder(strings.NewReader(raw))
		d.UseNumber()
		if err := d.Decode(&m); err != nil {
			return p, badRequest("logit_bias", "logit_bias must be an object of token ids to numbers: %v", err)
		}
		p.LogitBias = make(map[int32]float64, len(m))
		for k, v := range m {
			id, err := strconv.ParseInt(strings.TrimSpace(k), 10, 32)
			if err != nil || id < 0 {
				return p, badRequest("logit_bias", "logit_bias key %.40q is not a token id", k)
			}
			b, err := v.Float64()
			if err != nil || !(b >= -sample.MaxBias && b <= sample.MaxBias) {
				return p, badRequest("logit_bias", "logit_bias of token %d must be a number in [-%d, %d], got %.40s", id, sample.MaxBias, sample.MaxBias, v)
			}
			p.LogitBias[int32(id)] = b
		}
	}
	return p, nil
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
	echo       bool // completions: the prompt before the text (and its tokens' logprobs)
	stream     bool
	usageChunk bool
	returnIDs  bool
	created    int64
	start      time.Time
	// prompts are the batch's prompts (completions may have several);
	// req.Prompt is prompts[0].
	prompts [][]int32
	n       int // choices per prompt ("n")
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

// MaxBatchPrompts bounds the generations of one request: its prompts
// (completions may have several) times n.
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
	j.n = 1
	if r.N != nil {
		switch {
		case *r.N < 1:
			return nil, badRequest("n", "n must be a positive integer, got %d", *r.N)
		case *r.N > 1 && k == kindInvoke:
			return nil, badRequest("n", "invoke returns one generation: n > 1 is for /v1/completions and /v1/chat/completions")
		case *r.N > MaxBatchPrompts:
			return nil, badRequest("n", "n must be at most %d, got %d", MaxBatchPrompts, *r.N)
		}
		j.n = *r.N
	}
	if err := r.checkUnsupported(); err != nil {
		return nil, err
	}
	if r.BestOf != nil && *r.BestOf != 1 {
		return nil, badRequest("best_of", "only best_of=1 is supported, got %d", *r.BestOf)
	}
	if r.Echo {
		if k != kindCompletion {
			return nil, badRequest("echo", "echo is for /v1/completions")
		}
		j.echo = true
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
	if len(prompts)*j.n > MaxBatchPrompts {
		return nil, badRequest("n", "%d prompts x n=%d is %d generations: at most %d per request", len(prompts), j.n, len(prompts)*j.n, MaxBatchPrompts)
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
	if sp.Penalties, err = r.penalties(); err != nil {
		return nil, err
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
		if n < 0 || (n == 0 && !j.echo) {
			return nil, badRequest(param, "%s must be positive (0 only with echo, to score the prompt), got %d", param, n)
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
	j.req = scheduler.Request{Adapter: j.adapter, Prompt: prompt, MaxTokens: n, Sampling: sp, Stop: ids,
		PromptLogprobs: j.echo && (j.logprobs || n == 0)}
	j.prompts = prompts
	return j, nil
}
