package api

import (
	"bufio"
	"context"
	"errors"
	"math"
	"time"

	"github.com/gofiber/fiber/v2"
)

// disconnectProbe is how often a non-streaming request checks that its
// client is still connected (a client that leaves frees its KV pages).
const disconnectProbe = 200 * time.Millisecond

// generate runs a job: a JSON answer, or an SSE stream.
func (s *Server) generate(c *fiber.Ctx, j *job) error {
	if len(j.prompts) > 1 || j.n > 1 {
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
		return s.refused(j, err)
	}
	s.metrics.Begin()
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

// refused turns a Submit error into the API error to answer and counts
// the request as refused in the metrics.
func (s *Server) refused(j *job, err error) error {
	err = submitErr(err)
	status := fiber.StatusInternalServerError
	var e *Error
	if errors.As(err, &e) {
		status = e.Status
	}
	s.metrics.Refused(j.adapter, status)
	return err
}

// finished records a generation in the metrics and the log (one line per
// request: who, what, how it ended, how long).
func (s *Server) finished(j *job, status int, res result, err error) {
	dur := time.Since(j.start)
	s.metrics.End(j.adapter, status, res.prompt, res.complete, dur)
	attrs := []any{"id", j.id, "model", j.model, "status", status, "stream", j.stream,
		"prompt_tokens", res.prompt, "completion_tokens", res.complete, "finish", res.finish,
		"ms", dur.Milliseconds()}
	if res.ttft > 0 {
		attrs = append(attrs, "ttft_ms", math.Round(float64(res.ttft.Microseconds())/100)/10)
	}
	if res.loadedFrom != "" {
		attrs = append(attrs, "adapter_from", res.loadedFrom)
	}
	if err != nil {
		attrs = append(attrs, "err", err.Error())
	}
	s.log.Info("request", attrs...)
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
