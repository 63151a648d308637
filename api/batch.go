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

// member is one prompt of a batched completions request: its own sequence
// in the scheduler (they co-batch there), with its own context so a stop
// string ends it alone.
type member struct {
	j      *job // the request's job with req.Prompt set to this prompt
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
		t.prompt += m.res.prompt
		t.complete += m.res.complete
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

// generateBatch runs a completions request with several prompts: one
// choice per prompt, index its position; streamed chunks of all prompts
// interleave as they are produced. It counts as one request.
func (s *Server) generateBatch(c *fiber.Ctx, j *job) error {
	var ctx context.Context
	var cancel context.CancelFunc
	if s.cfg.RequestTimeout > 0 {
		ctx, cancel = context.WithTimeout(s.ctx, s.cfg.RequestTimeout)
	} else {
		ctx, cancel = context.WithCancel(s.ctx)
	}
	ms := make([]*member, len(j.prompts))
	for i, p := range j.prompts {
		mj := *j
		mj.req.Prompt = p
		mctx, mcancel := context.WithCancel(ctx)
		ch, err := s.cfg.Generator.Submit(mctx, mj.req)
		if err != nil {
			mcancel()
			cancel() // the ones already submitted
			err = submitErr(fmt.Errorf("prompt[%d]: %w", i, err))
			status := fiber.StatusInternalServerError
			var e *Error
			if errors.As(err, &e) {
				status = e.Status
			}
			s.metrics.Refused(j.adapter, status)
			return err
		}
		ms[i] = &member{j: &mj, ch: ch, cancel: mcancel}
	}
	s.metrics.Begin()
	b := &batchRun{cancel: cancel}
	// run drives every member; emit (nil: not streaming) sends member i's
	// deltas, done its end. It returns when all have ended.
	run := func(emit func(i int, d delta, first bool) error, done func(i int, r result) error, wait func(<-chan struct{})) {
		var wg sync.WaitGroup
		for i, m := range ms {
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer m.cancel()
				var em func(delta) error
				if emit != nil {
					first := true
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
					m.err = done(i, m.res)
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
			tk := time.NewTicker(disconnectProbe)
			defer tk.Stop()
			for {
				select {
				case <-all:
					return
				case <-tk.C:
					if peerClosed(conn) {
						b.fail(context.Canceled) // answered 499: the client went away
					}
				}
			}
		})
		t := total(ms)
		if err := b.failed(); err != nil {
			e := runErr(err)
			s.finished(j, e.Status, t, err)
			return e
		}
		s.finished(j, fiber.StatusOK, t, nil)
		choices := make([]completionChoiceJSON, len(ms))
		for i, m := range ms {
			choices[i] = s.completionChoice(j, i, m.j.req.Prompt, m.res)
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
			return send(s.completionChunk(j, i, ms[i].j.req.Prompt, d, first))
		}
		done := func(i int, r result) error { return send(completionFinish(j, i, r.finish)) }
		run(emit, done, func(all <-chan struct{}) {
			tk := time.NewTicker(s.cfg.Heartbeat)
			defer tk.Stop()
			for {
				select {
				case <-all:
					return
				case <-tk.C:
					// A comment line (SSE) keeps proxies from timing out; it
					// finds a client that went away.
					if err := write(func() error {
						if _, err := w.WriteString(": keep-alive\n\n"); err != nil {
							return err
						}
						return w.Flush()
					}); err != nil {
						b.fail(err)
					}
				}
			}
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
			if send(completionResponse{ID: j.id, Object: "text_completion", Created: j.created, Model: j.model,
				Choices: []completionChoiceJSON{}, Usage: &u}) != nil {
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
