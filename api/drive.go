// The output processor: scheduler events become text, stop-string cuts,
// streamed deltas and logprob pieces.

package api

import (
	"context"
	"errors"
	"strings"
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
