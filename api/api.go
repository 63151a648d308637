// Package api is peftd's HTTP API (gofiber): the adapter invoke endpoint,
// OpenAI-compatible completions and chat completions, vLLM's tokenize and
// detokenize, adapter deployment, health and Prometheus metrics.
package api

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/gofiber/fiber/v2"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/valyala/fasthttp"
	"github.com/valyala/fasthttp/fasthttpadaptor"

	"github.com/peftd/peftd/metrics"
	"github.com/peftd/peftd/text/chat"
	"github.com/peftd/peftd/text/tokenizer"
)

// Config holds the server's dependencies and limits.
type Config struct {
	Generator Generator
	Catalog   Catalog
	Tokenizer *tokenizer.Tokenizer // nil: prompts are token IDs
	Template  *chat.Template       // nil: chat completions answer 400
	ModelName string               // the base model's name for "model"
	// MaxModelLen is the context length reported by /tokenize and used to
	// default max_tokens.
	MaxModelLen int
	// EOS are the stop tokens added to every request unless ignore_eos.
	EOS  []int32
	Keys *Keys // nil or empty: no authentication
	// RequestTimeout bounds a generation (504 past it); 0: none.
	RequestTimeout time.Duration
	// MaxUploadBytes bounds request bodies, uploads included (413 past it);
	// default 2 GiB.
	MaxUploadBytes int64
	// MaxJSONBytes bounds generation and tokenize bodies; default 16 MiB.
	MaxJSONBytes int
	// DefaultMaxTokens is max_tokens for invoke and chat when not given
	// (capped by the context left); completions default to 16 as OpenAI's.
	DefaultMaxTokens int
	// ReadTimeout bounds reading a request (headers and body): a client
	// that sends slowly is cut off with a 408; default 60s. Adapter
	// uploads get UploadTimeout instead.
	ReadTimeout time.Duration
	// UploadTimeout bounds reading an adapter upload; default 10m.
	UploadTimeout time.Duration
	// Heartbeat is the interval of SSE comment lines while a stream waits
	// (they also detect clients that went away); default 5s.
	Heartbeat time.Duration
	Metrics   *metrics.Metrics // nil: a new one
	Logger    *slog.Logger
	// Ready reports readiness for /readyz; nil: always ready.
	Ready func() error
}

// Server is the HTTP server.
type Server struct {
	cfg     Config
	app     *fiber.App
	log     *slog.Logger
	metrics *metrics.Metrics
	created int64
	ctx     context.Context // cancelled by Shutdown: ends streams
	stop    context.CancelFunc

	mu        sync.Mutex
	listeners []*connTracker
}

// New builds the server and its routes.
func New(cfg Config) *Server {
	if cfg.MaxUploadBytes <= 0 {
		cfg.MaxUploadBytes = 2 << 30
	}
	if cfg.MaxJSONBytes <= 0 {
		cfg.MaxJSONBytes = 16 << 20
	}
	if cfg.DefaultMaxTokens <= 0 {
		cfg.DefaultMaxTokens = 256
	}
	if cfg.ReadTimeout <= 0 {
		cfg.ReadTimeout = time.Minute
	}
	if cfg.UploadTimeout <= 0 {
		cfg.UploadTimeout = 10 * time.Minute
	}
	if cfg.Heartbeat <= 0 {
		cfg.Heartbeat = 5 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Metrics == nil {
		cfg.Metrics = metrics.New(0)
	}
	if cfg.ModelName == "" {
		cfg.ModelName = "base"
	}
	s := &Server{cfg: cfg, log: cfg.Logger, metrics: cfg.Metrics, created: time.Now().Unix()}
	s.ctx, s.stop = context.WithCancel(context.Background())
	// Slack over the upload limit for multipart framing; the handlers check
	// the exact limits (a body past BodyLimit is refused before it is read).
	bodyLimit := int(min(cfg.MaxUploadBytes+1<<20, int64(^uint32(0)>>1)))
	s.app = fiber.New(fiber.Config{
		BodyLimit:             bodyLimit,
		DisableStartupMessage: true,
		Immutable:             true, // Params and headers outlive handlers (metrics labels, streams)
		ErrorHandler:          s.errorHandler,
		ReadTimeout:           cfg.ReadTimeout,
		IdleTimeout:           2 * time.Minute,
		AppName:               "peftd",
	})
	a := s.app
	a.Use(s.recoverPanics)
	a.Get("/healthz", func(c *fiber.Ctx) error { return c.JSON(fiber.Map{"status": "ok"}) })
	a.Get("/readyz", func(c *fiber.Ctx) error {
		if s.ctx.Err() != nil {
			return c.Status(fiber.StatusServiceUnavailable).JSON(fiber.Map{"status": "shutting down"})
		}
		if cfg.Ready != nil {
			if err := cfg.Ready(); err != nil {
				return c.Status(fiber.StatusServiceUnavailable).JSON(fiber.Map{"status": "not ready", "error": err.Error()})
			}
		}
		return c.JSON(fiber.Map{"status": "ready"})
	})
	metrics := fasthttpadaptor.NewFastHTTPHandler(promhttp.HandlerFor(s.metrics.Registry, promhttp.HandlerOpts{}))
	a.Get("/metrics", func(c *fiber.Ctx) error { metrics(c.Context()); return nil })

	a.Use(s.auth)
	a.Post("/v1/adapters/:id/invoke", s.invoke)
	a.Post("/v1/completions", s.completions)
	a.Post("/v1/chat/completions", s.chatCompletions)
	a.Post("/tokenize", s.tokenize)
	a.Post("/detokenize", s.detokenize)
	a.Get("/v1/models", s.models)
	a.Get("/v1/adapters", s.listAdapters)
	a.Get("/v1/adapters/:id", s.getAdapter)
	a.Put("/v1/adapters/:id", s.putAdapter)
	a.Delete("/v1/adapters/:id", s.deleteAdapter)
	a.Put("/v1/adapters/:id/pin", s.pinAdapter)
	a.Delete("/v1/adapters/:id/pin", s.pinAdapter)
	a.Use(func(c *fiber.Ctx) error {
		return apiErr(fiber.StatusNotFound, "not_found_error", "", fmt.Sprintf("no route %s %s", c.Method(), c.Path()))
	})
	srv := s.app.Server()
	srv.Handler = s.outerHandler(srv.Handler)
	srv.HeaderReceived = func(h *fasthttp.RequestHeader) fasthttp.RequestConfig {
		if string(h.Method()) == fiber.MethodPut && strings.HasPrefix(string(h.RequestURI()), "/v1/adapters/") {
			return fasthttp.RequestConfig{ReadTimeout: cfg.UploadTimeout}
		}
		return fasthttp.RequestConfig{}
	}
	return s
}

// App is the fiber application (for tests and embedding).
func (s *Server) App() *fiber.App { return s.app }

// Serve accepts connections on ln until Shutdown.
func (s *Server) Serve(ln net.Listener) error {
	t := newConnTracker(ln)
	s.mu.Lock()
	s.listeners = append(s.listeners, t)
	s.mu.Unlock()
	return s.app.Listener(t)
}

// Shutdown ends open streams and stops the server, waiting for requests
// until ctx ends.
func (s *Server) Shutdown(ctx context.Context) error {
	s.stop()
	done := make(chan struct{})
	defer close(done)
	s.mu.Lock()
	for _, t := range s.listeners {
		go t.reapUnused(done, 50*time.Millisecond)
	}
	s.mu.Unlock()
	return s.app.ShutdownWithContext(ctx)
}

// Error is an API error in OpenAI's shape.
type Error struct {
	Status  int    `json:"-"`
	Message string `json:"message"`
	Type    string `json:"type"`
	Param   any    `json:"param"`
	// Code is always a string: a specific one ("model_not_found") or the
	// status's name ("bad_request", "payload_too_large").
	Code string `json:"code"`
	// RetryAfter sets the Retry-After header (seconds) when positive.
	RetryAfter int `json:"-"`
}

func (e *Error) Error() string { return e.Message }

func apiErr(status int, typ, param, msg string) *Error {
	e := &Error{Status: status, Message: msg, Type: typ}
	if param != "" {
		e.Param = param
	}
	return e
}

// unavailableErr is a 503 naming the failure, with Retry-After.
func unavailableErr(err error) *Error {
	e := apiErr(fiber.StatusServiceUnavailable, "server_error", "", err.Error())
	e.Code = "service_unavailable"
	e.RetryAfter = 5
	return e
}

func badRequest(param, format string, args ...any) *Error {
	return apiErr(fiber.StatusBadRequest, "invalid_request_error", param, fmt.Sprintf(format, args...))
}

func (s *Server) errorHandler(c *fiber.Ctx, err error) error {
	var e *Error
	var fe *fiber.Error
	switch {
	case errors.As(err, &e):
	case errors.As(err, &fe):
		typ := "invalid_request_error"
		msg := fe.Message
		if fe.Code == fiber.StatusRequestEntityTooLarge {
			msg = fmt.Sprintf("request body larger than %d bytes", s.cfg.MaxUploadBytes)
		}
		if fe.Code >= 500 {
			typ = "server_error"
		}
		e = apiErr(fe.Code, typ, "", msg)
	case errors.Is(err, ErrUnavailable):
		s.log.Warn("request failed: unavailable", "method", c.Method(), "path", c.Path(), "err", err)
		e = unavailableErr(err)
	default:
		s.log.Error("request failed", "method", c.Method(), "path", c.Path(), "err", err)
		e = apiErr(fiber.StatusInternalServerError, "server_error", "", err.Error())
	}
	if e.RetryAfter > 0 {
		c.Set(fiber.HeaderRetryAfter, fmt.Sprint(e.RetryAfter))
	}
	return c.Status(e.Status).JSON(e.body())
}

// body is the JSON error object, with the code filled in from the status
// when none was set.
func (e *Error) body() fiber.Map {
	if e.Code == "" {
		e.Code = statusCode(e.Status)
	}
	return fiber.Map{"error": e}
}

// statusCode names a status for the error "code": "not_found",
// "too_many_requests", ...; 499 (not in the standard) is "cancelled".
func statusCode(status int) string {
	if status == 499 {
		return "cancelled"
	}
	t := http.StatusText(status)
	if t == "" {
		return fmt.Sprintf("status_%d", status)
	}
	t = strings.NewReplacer(" ", "_", "-", "_", "'", "").Replace(strings.ToLower(t))
	return t
}

type keyCtx struct{}

// auth checks the Bearer key (or x-api-key) when keys are configured.
func (s *Server) auth(c *fiber.Ctx) error {
	if s.cfg.Keys.Len() == 0 {
		return c.Next()
	}
	h := c.Get(fiber.HeaderAuthorization)
	tok, ok := strings.CutPrefix(h, "Bearer ")
	if !ok {
		tok = c.Get("X-Api-Key")
	}
	if tok == "" {
		return apiErr(fiber.StatusUnauthorized, "authentication_error", "", "missing API key: send Authorization: Bearer KEY")
	}
	k := s.cfg.Keys.lookup(strings.TrimSpace(tok))
	if k == nil {
		return apiErr(fiber.StatusUnauthorized, "authentication_error", "", "invalid API key")
	}
	c.Locals(keyCtx{}, k)
	return c.Next()
}

func keyOf(c *fiber.Ctx) *Key {
	k, _ := c.Locals(keyCtx{}).(*Key)
	return k
}

func forbidden(id string) *Error {
	return apiErr(fiber.StatusForbidden, "permission_error", "", fmt.Sprintf("this API key may not use adapter %q", id))
}
