package api

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"runtime/debug"
	"strings"

	"github.com/gofiber/fiber/v2"
	"github.com/valyala/fasthttp"
)

// The recover layer: no request may end the process. A panic in a handler,
// in a streamed body writer or in fiber itself is logged with its stack,
// counted in peftd_panics_total, and answered with a JSON 500 (or an error
// event on a stream that has started).

// recoverPanics is the first middleware: a handler's panic becomes a 500.
func (s *Server) recoverPanics(c *fiber.Ctx) (err error) {
	defer func() {
		if v := recover(); v != nil {
			err = s.panicked("http", c.Method()+" "+c.Path(), v)
		}
	}()
	return c.Next()
}

// panicked logs and counts a recovered panic and returns the error to
// answer with.
func (s *Server) panicked(where, what string, v any) *Error {
	s.log.Error("recovered from a panic", "in", where, "request", what, "panic", fmt.Sprint(v), "stack", string(debug.Stack()))
	s.metrics.Panic(where)
	e := apiErr(fiber.StatusInternalServerError, "server_error", "", "internal error while serving the request (logged by the server)")
	e.Code = "internal_error"
	return e
}

// streamBody sets fn as the response's body writer (an SSE stream), with a
// recover: a panic while streaming ends the stream with an error event.
func (s *Server) streamBody(c *fiber.Ctx, fn func(w *bufio.Writer)) {
	what := c.Method() + " " + c.Path()
	c.Status(fiber.StatusOK).Context().SetBodyStreamWriter(func(w *bufio.Writer) {
		defer func() {
			if v := recover(); v != nil {
				e := s.panicked("stream", what, v)
				_ = sseEvent(w, e.body())
				sseDone(w)
			}
		}()
		fn(w)
	})
}

// outerHandler wraps fiber's request handler: methods fiber does not know
// (it would answer a text/plain 400) get a JSON 405 naming the method, and
// a panic anywhere below becomes a JSON 500.
func (s *Server) outerHandler(next fasthttp.RequestHandler) fasthttp.RequestHandler {
	known := map[string]bool{}
	for _, m := range fiber.DefaultMethods {
		known[m] = true
	}
	return func(ctx *fasthttp.RequestCtx) {
		defer func() {
			if v := recover(); v != nil {
				e := s.panicked("http", string(ctx.Method())+" "+string(ctx.Path()), v)
				writeJSONError(ctx, e)
			}
		}()
		if m := string(ctx.Method()); !known[m] {
			e := apiErr(fiber.StatusMethodNotAllowed, "invalid_request_error", "",
				fmt.Sprintf("unknown HTTP method %.32q: use GET, POST, PUT or DELETE", m))
			ctx.Response.Header.Set(fiber.HeaderAllow, "GET, HEAD, POST, PUT, DELETE, OPTIONS")
			writeJSONError(ctx, e)
			return
		}
		if countHeader(ctx.Request.Header.RawHeaders(), "content-length") > 1 {
			// Two lengths: the body's end is ambiguous (request smuggling);
			// refuse and close, as RFC 9112 section 6.3 asks.
			e := apiErr(fiber.StatusBadRequest, "invalid_request_error", "", "the request has more than one Content-Length header")
			ctx.SetConnectionClose()
			writeJSONError(ctx, e)
			return
		}
		next(ctx)
	}
}

// writeJSONError answers with e outside fiber's context.
func writeJSONError(ctx *fasthttp.RequestCtx, e *Error) {
	b, err := json.Marshal(e.body())
	if err != nil {
		b = []byte(`{"error":{"message":"internal error","type":"server_error","param":null,"code":"internal_error"}}`)
	}
	ctx.Response.ResetBody()
	ctx.SetStatusCode(e.Status)
	ctx.SetContentType(fiber.MIMEApplicationJSON)
	ctx.SetBody(b)
}

// countHeader counts the lines of raw (an HTTP header block) named name
// (lower case), whatever their case.
func countHeader(raw []byte, name string) int {
	n := 0
	for len(raw) > 0 {
		line := raw
		if i := bytes.IndexByte(raw, '\n'); i >= 0 {
			line, raw = raw[:i], raw[i+1:]
		} else {
			raw = nil
		}
		if k, _, ok := bytes.Cut(line, []byte(":")); ok && strings.EqualFold(string(bytes.TrimSpace(k)), name) {
			n++
		}
	}
	return n
}
