// The output processor: scheduler events become text, stop-string cuts,
// streamed deltas and logprob pieces.

package api

import (
	"context"
	"errors"
	"time"
	"unicode/utf8"

	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/sample"
	"github.com/peftd/peftd/scheduler"
)

// result is a finished (or partial) generation.
type result struct {
	text             string
	tokens           []int32
	choices          []sample.Choice
	finish           string
	prompt, complete int
	promptScores     []sample.Choice // with echo and logprobs: prompt tokens 1..n-1
	pieces           []string        // what each token adds to the text: they concatenate to text
	info             []tokInfo       // with logprobs
	// ttft is the time from the request's start to its first token (0: no
	// token), loadedFrom the tier its adapter was loaded from for it
	// (store, disk or host; "" when it was resident)
	ttft       time.Duration
	loadedFrom string
}

// delta is a streamed piece: text safe to show and the tokens behind it.
type delta struct {
	text    string
	choices []sample.Choice
	pieces  []string  // what each token adds to the text: they concatenate to text
	info    []tokInfo // with logprobs
	offset  int       // where text starts in the whole text, in characters
	// echo: the echoed prompt (completions with echo: the stream's first
	// delta; text is the prompt's), with logprobs its tokens' part
	echo *completionLogprobs
}

// drive consumes the scheduler's events: the text (Output: decoded after
// the prompt, cut at a stop string), TTFT and inter-token metrics, and
// emit with streamable deltas (nil: not streaming).
//
// Each token's piece is what it adds to the text; the pieces concatenate to
// the text (cut at a stop string, and the last one takes what the
// decoder's flush adds), streamed deltas end on token boundaries so that
// their pieces concatenate to their text, and with logprobs each token's
// bytes and alternatives are decoded in the same context (tokInfo).
func (s *Server) drive(ctx context.Context, cancel context.CancelFunc, j *job, ch <-chan scheduler.Event, emit func(delta) error, heartbeat func() error, every time.Duration) (result, error) {
	res := result{prompt: len(j.req.Prompt)}
	out := NewOutput(s.cfg.Tokenizer, j.req.Prompt, j.stopStrs)
	// Bytes and characters of text sent; first token not yet sent.
	emitted, emittedChars, pendingFrom := 0, 0, 0
	// echoPrompt streams the echoed prompt before anything else, once: the
	// completion's text_offset then counts from the prompt's start.
	echoed := emit == nil || !j.echo
	echoPrompt := func(scores []sample.Choice) error {
		if echoed {
			return nil
		}
		echoed = true
		text, lp := s.echoPrompt(j.req.Prompt, scores, j.logprobs)
		emittedChars = utf8.RuneCountInString(text)
		return emit(delta{text: text, echo: lp})
	}
	last := time.Time{}
	// flushDelta sends the text up to upto, cut back to the end of a token,
	// with the tokens behind it; final sends all the rest.
	flushDelta := func(upto int, final bool) error {
		if emit == nil {
			return nil
		}
		t := out.Text()
		n := len(res.choices)
		if final {
			upto = len(t)
		} else {
			for n > pendingFrom && out.ends[n-1] > upto {
				n--
			}
			if n == pendingFrom {
				return nil
			}
			upto = out.ends[n-1]
		}
		upto = max(upto, emitted)
		d := delta{text: t[emitted:upto], offset: emittedChars, choices: res.choices[pendingFrom:n],
			pieces: out.Pieces(pendingFrom, n, emitted, upto)}
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
		if ev.Prompt != nil && res.promptScores == nil {
			res.promptScores = ev.Prompt
		}
		if ev.Err == nil {
			if err := echoPrompt(ev.Prompt); err != nil {
				cancel()
				return res, err
			}
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
			res.ttft, res.loadedFrom = now.Sub(j.start), ev.Loaded
			s.metrics.FirstToken(j.adapter, res.ttft)
			if ev.Loaded != "" {
				s.metrics.ColdFirstToken(ev.Loaded, res.ttft)
			}
		} else {
			s.metrics.NextToken(j.adapter, now.Sub(last))
		}
		last = now
		res.tokens = append(res.tokens, ev.Token.ID)
		res.choices = append(res.choices, ev.Token)
		res.complete++
		if dec := out.decoder(); dec != nil && j.logprobs {
			res.info = append(res.info, s.tokInfo(dec, ev.Token))
		}
		if out.Add(ev.Token.ID) {
			cancel() // the scheduler drops the sequence at its next step
			res.text, res.finish = out.Text(), engine.FinishStop
			res.pieces = out.Pieces(0, len(res.choices), 0, len(res.text))
			if err := flushDelta(0, true); err != nil {
				return res, err
			}
			return res, nil
		}
		if err := flushDelta(out.Shown(), false); err != nil {
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
	if out.Finish() {
		res.finish = engine.FinishStop
	}
	res.text = out.Text()
	res.pieces = out.Pieces(0, len(res.choices), 0, len(res.text))
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
