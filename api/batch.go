package api

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/gofiber/fiber/v2"

	"github.com/peftd/peftd/scheduler"
)

// member is one generation of a request with several: one of the prompts
// of a batched completions request, or one of the n choices for a prompt.
// It is its own sequence in the scheduler (they co-batch there), with its
// own context so a stop string ends it alone.
type member struct {
	j      *job // the request's job with req.Prompt (and the seed) set to this member's
	index  int  // its choice index: prompt * n + k
	first  bool // k == 0: the usage counts its prompt tokens (once per prompt, however many choices)
	ch     <-chan scheduler.Event
	cancel context.CancelFunc
	res    result
	err    error
}

// batchRun collects the members' outcome: the first error ends them all.
type batchRun struct {
	mu     sync.Mutex
	err    error
	cancel context.CancelFunc
}

func (b *batchRun) fail(err error) {
	b.mu.Lock()
	if b.err == nil {
		b.err = err
	}
	b.mu.Unlock()
	b.cancel()
}

func (b *batchRun) failed() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.err
}

// total sums the members' results for the usage, the metrics and the log.
func total(ms []*member) result {
	var t result
	var order []string
	count := map[string]int{}
	for _, m := range ms {
		if m.first {
			t.prompt += m.res.prompt
		}
		t.complete += m.res.complete
		if r := m.res.ttft; r > 0 && (t.ttft == 0 || r < t.ttft) { // the batch's first token
			t.ttft = r
		}
		if t.loadedFrom == "" {
			t.loadedFrom = m.res.loadedFrom
		}
		f := m.res.finish
		if f == "" {
			f = "none"
		}
		if count[f] == 0 {
			order = append(order, f)
		}
		count[f]++
	}
	fin := make([]string, len(order))
	for i, f := range order {
		fin[i] = fmt.Sprintf("%s:%d", f, count[f])
	}
	t.finish = strings.Join(fin, ",") // e.g. stop:3,length:1
	return t
}

// every calls f every period until done is closed.
func every(done <-chan struct{}, period time.Duration, f func()) {
	tk := time.NewTicker(period)
	defer tk.Stop()
	for {
		select {
		case <-done:
			return
		case <-tk.C:
			f()
		}
	}
}

// generateBatch runs a request with several generations: n choices for
// each prompt (completions may have several prompts), index prompt * n + k
// as OpenAI orders them; streamed chunks of all of them interleave as they
// are produced. Choice k > 0 of a request with a seed samples with seed +
// k: the choices differ, and repeat. It counts as one request.
func (s *Server) generateBatch(c *fiber.Ctx, j *job) error {
	var ctx context.Context
	var cancel context.CancelFunc
	if s.cfg.RequestTimeout > 0 {
		ctx, cancel = context.WithTimeout(s.ctx, s.cfg.RequestTimeout)
	} else {
		ctx, cancel = context.WithCancel(s.ctx)
	}
	ms := make([]*member, 0, len(j.prompts)*j.n)
	for p, prompt := range j.prompts {
		for k := range j.n {
			mj := *j
			mj.req.Prompt = prompt
			if sd := j.req.Sampling.Seed; sd != nil && k > 0 {
				v := *sd + uint64(k)
				mj.req.Sampling.Seed = &v
			}
			mctx, mcancel := context.WithCancel(ctx)
			ch, err := s.cfg.Generator.Submit(mctx, mj.req)
			if err != nil {
				mcancel()
				cancel() // the ones already submitted
				what := fmt.Sprintf("prompt[%d]", p)
				if j.n > 1 {
					what = fmt.Sprintf("choice %d", p*j.n+k)
				}
				return s.refused(j, fmt.Errorf("%s: %w", what, err))
			}
			ms = append(ms, &member{j: &mj, index: p*j.n + k, first: k == 0, ch: ch, cancel: mcancel})
		}
	}
	s.metrics.Begin()
	b := &batchRun{cancel: cancel}
	// run drives every member; emit (nil: not streaming) sends member i's
	// deltas, done its end (first: no delta of it was sent). It returns
	// when all have ended.
	run := func(emit func(i int, d delta, first bool) error, done func(i int, r result, first bool) error, wait func(<-chan struct{})) {
		var wg sync.WaitGroup
		for i, m := range ms {
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer m.cancel()
				var em func(delta) error
				first := true
				if emit != nil {
					em = func(d delta) error {
						err := emit(i, d, first)
						first = false
						return err
					}
				}
				m.res, m.err = s.drive(ctx, m.cancel, m.j, m.ch, em, nil, 0)
				if m.err == nil && m.res.finish == "" {
					m.err = errors.New("the generation ended without a result")
				}
				if m.err == nil && done != nil {
					m.err = done(i, m.res, first)
				}
				if m.err != nil {
					b.fail(m.err)
				}
			}()
		}
		all := make(chan struct{})
		go func() { wg.Wait(); close(all) }()
		wait(all)
	}
	if !j.stream {
		defer cancel()
		conn := c.Context().Conn()
		run(nil, nil, func(all <-chan struct{}) {
			every(all, disconnectProbe, func() {
				if peerClosed(conn) {
					b.fail(context.Canceled) // answered 499: the client went away
				}
			})
		})
		t := total(ms)
		if err := b.failed(); err != nil {
			e := runErr(err)
			s.finished(j, e.Status, t, err)
			return e
		}
		s.finished(j, fiber.StatusOK, t, nil)
		if j.kind == kindChat {
			choices := make([]chatChoice, len(ms))
			for i, m := range ms {
				choices[i] = s.chatChoiceOf(j, m.index, m.res)
			}
			return c.JSON(s.chatAnswer(j, choices, t))
		}
		choices := make([]completionChoiceJSON, len(ms))
		for i, m := range ms {
			choices[i] = s.completionChoice(j, m.index, m.j.req.Prompt, m.res)
		}
		u := usageOf(t)
		return c.JSON(completionResponse{ID: j.id, Object: "text_completion", Created: j.created, Model: j.model,
			Choices: choices, Usage: &u, SystemFingerprint: true})
	}
	startSSE(c)
	s.streamBody(c, func(w *bufio.Writer) {
		defer cancel()
		var mu sync.Mutex // the writer, sendErr
		var sendErr error
		write := func(f func() error) error {
			mu.Lock()
			defer mu.Unlock()
			if sendErr != nil {
				return sendErr
			}
			if err := f(); err != nil {
				sendErr = err
				return err
			}
			return nil
		}
		send := func(v any) error { return write(func() error { return sseEvent(w, v) }) }
		emit := func(i int, d delta, first bool) error {
			if j.kind == kindChat {
				return send(s.chatChunk(j, ms[i].index, d, first))
			}
			return send(s.completionChunk(j, ms[i].index, ms[i].j.req.Prompt, d, first))
		}
		done := func(i int, r result, first bool) error {
			if j.kind == kindChat {
				return send(chatFinish(j, ms[i].index, r.finish, first))
			}
			return send(completionFinish(j, ms[i].index, r.finish))
		}
		run(emit, done, func(all <-chan struct{}) {
			// A comment line (SSE) keeps proxies from timing out; it finds a
			// client that went away.
			every(all, s.cfg.Heartbeat, func() {
				if err := write(func() error {
					if _, err := w.WriteString(": keep-alive\n\n"); err != nil {
						return err
					}
					return w.Flush()
				}); err != nil {
					b.fail(err)
				}
			})
		})
		t := total(ms)
		status := fiber.StatusOK
		mu.Lock()
		gone := sendErr != nil
		mu.Unlock()
		switch err := b.failed(); {
		case gone:
			status = 499 // the client went away
		case err != nil:
			var ev fiber.Map
			status, ev = streamErr(err)
			_ = send(ev)
		case j.usageChunk:
			u := usageOf(t)
			var last any = completionResponse{ID: j.id, Object: "text_completion", Created: j.created, Model: j.model,
				Choices: []completionChoiceJSON{}, Usage: &u}
			if j.kind == kindChat {
				last = chatResponse{ID: j.id, Object: "chat.completion.chunk", Created: j.created, Model: j.model,
					Choices: []chatChoice{}, Usage: &u}
			}
			if send(last) != nil {
				status = 499
			}
		}
		if status != 499 {
			sseDone(w)
		}
		s.finished(j, status, t, nil)
	})
	return nil
}
