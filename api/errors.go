package api

import (
	"context"
	"errors"

	"github.com/gofiber/fiber/v2"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/sample"
	"github.com/peftd/peftd/scheduler"
)

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
