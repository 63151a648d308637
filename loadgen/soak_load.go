package loadgen

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"math/rand/v2"
	"net/http"
	"slices"
	"strings"
	"time"
)

// pick chooses the next adapter: first any adapter refused during the
// outage once it is over, else a hot one (HotShare), else a cold one; the
// reserve opens when the outage starts and gets half of the cold requests
// while it lasts.
func (k *soaker) pick(rng *rand.Rand) string {
	if k.afterGrace.Load() {
		k.mu.Lock()
		if n := len(k.retry); n > 0 {
			a := k.retry[n-1]
			k.retry = k.retry[:n-1]
			k.mu.Unlock()
			return a
		}
		k.mu.Unlock()
	}
	if len(k.cfg.Hot) > 0 && (rng.Float64() < k.cfg.HotShare || len(k.cold)+len(k.resv) == 0) {
		return k.cfg.Hot[rng.IntN(len(k.cfg.Hot))]
	}
	if k.reserveOpen.Load() && len(k.resv) > 0 {
		if len(k.cold) == 0 || (k.inOutage.Load() && rng.IntN(2) == 0) {
			return k.resv[rng.IntN(len(k.resv))]
		}
		if i := rng.IntN(len(k.cold) + len(k.resv)); i >= len(k.cold) {
			return k.resv[i-len(k.cold)]
		}
	}
	if len(k.cold) == 0 {
		return k.cfg.Adapters[rng.IntN(len(k.cfg.Adapters))]
	}
	return k.cold[rng.IntN(len(k.cold))]
}

func (k *soaker) record(s SoakSample) {
	k.sent.Add(1)
	k.mu.Lock()
	defer k.mu.Unlock()
	k.samples = append(k.samples, s)
	if s.Status == http.StatusOK && s.Message == "" {
		return
	}
	// A 503 naming the store for a cold adapter: ask it again once the
	// outage is over (whether the 503 was allowed is judged at the end).
	if s.Status == http.StatusServiceUnavailable && !s.Hot && !k.queued[s.Adapter] {
		k.queued[s.Adapter] = true
		k.retry = append(k.retry, s.Adapter)
	}
	if Classify(s, k.outageLocked()) == VerdictFailed {
		k.failedLive.Add(1)
	}
}

// outageLocked is the outage window with its grace; while the outage
// lasts its end is open.
func (k *soaker) outageLocked() Window {
	w := k.outage
	if w.Start.IsZero() {
		return w
	}
	if w.End.IsZero() {
		w.End = time.Now().Add(time.Hour)
	} else {
		w.End = w.End.Add(k.cfg.OutageGrace)
	}
	return w
}

// refusedLocked are the cold adapters refused during the outage, sorted.
func (k *soaker) refusedLocked() []string {
	w := k.outageLocked()
	set := map[string]bool{}
	for _, s := range k.samples {
		if Classify(s, w) == VerdictAllowed {
			set[s.Adapter] = true
		}
	}
	out := make([]string, 0, len(set))
	for a := range set {
		out = append(out, a)
	}
	slices.Sort(out)
	return out
}

// servedAfter reports whether adapter a was served by a request started after t.
func (k *soaker) servedAfter(a string, t time.Time) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	for _, s := range k.samples {
		if s.Adapter == a && s.Start.After(t) && s.Status == http.StatusOK && s.Message == "" {
			return true
		}
	}
	return false
}

// simple sends a request and returns the status and the body (or the
// transport error's text with status 0).
func (k *soaker) simple(ctx context.Context, method, path string, body []byte, ctype string) (int, string) {
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, strings.TrimRight(k.cfg.URL, "/")+path, rd)
	if err != nil {
		return 0, err.Error()
	}
	if ctype != "" {
		req.Header.Set("Content-Type", ctype)
	}
	if k.cfg.APIKey != "" {
		req.Header.Set("Authorization", "Bearer "+k.cfg.APIKey)
	}
	resp, err := k.cfg.Client.Do(req)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	return resp.StatusCode, string(bytes.TrimSpace(b))
}

// one sends a request for adapter a, alternating the native route and
// /v1/completions, some streamed.
func (k *soaker) one(ctx context.Context, rng *rand.Rand, phase, a string) (s SoakSample) {
	cfg := k.cfg
	s = SoakSample{Phase: phase, Adapter: a, Hot: k.hot[a], Reserve: k.isRes[a], Route: RouteInvoke}
	if rng.IntN(2) == 1 {
		s.Route = RouteCompletions
	}
	s.Stream = rng.Float64() < cfg.StreamShare
	body := map[string]any{"max_tokens": cfg.MinTokens + rng.IntN(cfg.MaxTokens-cfg.MinTokens+1), "temperature": 0,
		"ignore_eos": true, "stream": s.Stream}
	var prompt any
	if cfg.TokenPrompts {
		ids := make([]int32, cfg.PromptWords)
		for i := range ids {
			ids[i] = int32(10 + rng.IntN(240))
		}
		prompt = ids
	} else {
		var p strings.Builder
		for w := range cfg.PromptWords {
			if w > 0 {
				p.WriteByte(' ')
			}
			p.WriteString(k.words[rng.IntN(len(k.words))])
		}
		prompt = p.String()
	}
	path := "/v1/completions"
	if s.Route == RouteInvoke {
		path = "/v1/adapters/" + a + "/invoke"
		if cfg.TokenPrompts {
			body["prompt_ids"] = prompt
		} else {
			body["prompt"] = prompt
		}
	} else {
		body["model"] = a
		body["prompt"] = prompt
		if s.Stream {
			body["stream_options"] = map[string]any{"include_usage": true}
		}
	}
	b, _ := json.Marshal(body)
	s.Start = time.Now()
	defer func() { s.End = time.Now() }()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, strings.TrimRight(cfg.URL, "/")+path, bytes.NewReader(b))
	if err != nil {
		s.Message = err.Error()
		return s
	}
	req.Header.Set("Content-Type", "application/json")
	if cfg.APIKey != "" {
		req.Header.Set("Authorization", "Bearer "+cfg.APIKey)
	}
	resp, err := cfg.Client.Do(req)
	if err != nil {
		s.Message = err.Error()
		return s
	}
	defer resp.Body.Close()
	s.Status = resp.StatusCode
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<10))
		s.Message = errorMessage(msg)
		return s
	}
	if !s.Stream {
		var r struct {
			Usage struct {
				CompletionTokens int `json:"completion_tokens"`
			} `json:"usage"`
		}
		if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
			s.Message = "reading the answer: " + err.Error()
			return s
		}
		s.Tokens = r.Usage.CompletionTokens
		return s
	}
	failed := false
	done, err := readSSE(resp.Body, func(ev *sseChunk) bool {
		if ev.Error != nil {
			s.Status = statusOfCode(ev.Error.Code)
			s.Message = "(in the stream) " + ev.Error.Message
			failed = true
			return false
		}
		if ev.Usage != nil {
			s.Tokens = ev.Usage.CompletionTokens
		}
		return true
	})
	switch {
	case failed:
	case err != nil:
		s.Message = "reading the stream: " + err.Error()
	case !done:
		s.Message = "the stream ended without [DONE]"
	}
	return s
}

// errorMessage is an OpenAI-shaped error body's message, else the body.
func errorMessage(body []byte) string {
	var e struct {
		Error struct {
			Message string `json:"message"`
		} `json:"error"`
	}
	if json.Unmarshal(body, &e) == nil && e.Error.Message != "" {
		return e.Error.Message
	}
	if m := strings.TrimSpace(string(body)); m != "" {
		return m
	}
	return "(empty body)"
}

// statusOfCode maps an error event's code (peftd's: a specific code or the
// status's name in snake case) to a status; 500 when unknown.
func statusOfCode(code string) int {
	switch code {
	case "service_unavailable":
		return http.StatusServiceUnavailable
	case "model_not_found", "adapter_not_found":
		return http.StatusNotFound
	case "cancelled":
		return 499
	case "internal_error", "non_finite_logits":
		return http.StatusInternalServerError
	}
	for st := 400; st < 600; st++ {
		t := http.StatusText(st)
		if t != "" && strings.NewReplacer(" ", "_", "-", "_", "'", "").Replace(strings.ToLower(t)) == code {
			return st
		}
	}
	return http.StatusInternalServerError
}
