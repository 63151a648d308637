package api

import (
	"errors"
	"fmt"

	"github.com/gofiber/fiber/v2"

	"github.com/peftd/peftd/loader/store"
	"github.com/peftd/peftd/runtime/lora"
)

func (s *Server) models(c *fiber.Ctx) error {
	data := []fiber.Map{{"id": s.cfg.ModelName, "object": "model", "created": s.created, "owned_by": "peftd",
		"root": s.cfg.ModelName, "parent": nil, "max_model_len": s.cfg.MaxModelLen}}
	if s.cfg.Catalog != nil {
		list, err := s.cfg.Catalog.List(c.UserContext())
		if err != nil {
			return err
		}
		k := keyOf(c)
		for _, a := range list {
			if !k.CanInvoke(a.ID) || a.Status == StatusInvalid { // GET /v1/adapters lists those, with why
				continue
			}
			created := s.created
			if !a.Created.IsZero() {
				created = a.Created.Unix()
			}
			data = append(data, fiber.Map{"id": a.ID, "object": "model", "created": created, "owned_by": "peftd",
				"root": a.ID, "parent": s.cfg.ModelName, "max_model_len": s.cfg.MaxModelLen})
		}
	}
	return c.JSON(fiber.Map{"object": "list", "data": data})
}

func (s *Server) catalog() (Catalog, error) {
	if s.cfg.Catalog == nil {
		return nil, apiErr(fiber.StatusNotImplemented, "server_error", "", "this server has no adapter catalog")
	}
	return s.cfg.Catalog, nil
}

func (s *Server) listAdapters(c *fiber.Ctx) error {
	cat, err := s.catalog()
	if err != nil {
		return err
	}
	list, err := cat.List(c.UserContext())
	if err != nil {
		return err
	}
	k := keyOf(c)
	out := []AdapterInfo{}
	for _, a := range list {
		if k.CanInvoke(a.ID) {
			out = append(out, a)
		}
	}
	return c.JSON(fiber.Map{"object": "list", "data": out})
}

func (s *Server) adapterNotFound(id string) *Error {
	e := apiErr(fiber.StatusNotFound, "not_found_error", "id", fmt.Sprintf("adapter %q is not deployed", id))
	e.Code = "adapter_not_found"
	return e
}

func (s *Server) getAdapter(c *fiber.Ctx) error {
	cat, err := s.catalog()
	if err != nil {
		return err
	}
	id := c.Params("id")
	if !keyOf(c).CanInvoke(id) {
		return forbidden(id)
	}
	info, err := cat.Get(c.UserContext(), id)
	if errors.Is(err, ErrNotFound) {
		return s.adapterNotFound(id)
	}
	if err != nil {
		return err
	}
	return c.JSON(info)
}

func (s *Server) deleteAdapter(c *fiber.Ctx) error {
	cat, err := s.catalog()
	if err != nil {
		return err
	}
	id := c.Params("id")
	if !keyOf(c).CanManage(id) {
		return forbidden(id)
	}
	if err := cat.Delete(c.UserContext(), id); err != nil {
		if errors.Is(err, ErrNotFound) {
			return s.adapterNotFound(id)
		}
		return err
	}
	s.log.Info("adapter deleted", "id", id)
	return c.JSON(fiber.Map{"id": id, "object": "adapter", "deleted": true})
}

// pinAdapter keeps an adapter on the device (PUT .../pin) or lets it go
// again (DELETE .../pin).
func (s *Server) pinAdapter(c *fiber.Ctx) error {
	cat, err := s.catalog()
	if err != nil {
		return err
	}
	p, ok := cat.(Pinner)
	if !ok {
		return apiErr(fiber.StatusNotImplemented, "server_error", "", "this server's catalog cannot pin adapters")
	}
	id := c.Params("id")
	if !keyOf(c).CanManage(id) {
		return forbidden(id)
	}
	if _, err := cat.Get(c.UserContext(), id); err != nil {
		if errors.Is(err, ErrNotFound) {
			return s.adapterNotFound(id)
		}
		return err
	}
	pin := c.Method() == fiber.MethodPut
	if pin {
		err = p.Pin(c.UserContext(), id)
	} else {
		err = p.Unpin(c.UserContext(), id)
	}
	switch {
	case errors.Is(err, ErrTooManyPinned):
		return apiErr(fiber.StatusConflict, "invalid_request_error", "id", err.Error())
	case errors.Is(err, ErrInvalidAdapter):
		return badRequest("id", "%v", err)
	case err != nil:
		return err
	}
	info, err := cat.Get(c.UserContext(), id)
	if err != nil {
		return err
	}
	s.log.Info("adapter pin", "id", id, "pinned", pin)
	return c.JSON(info)
}

func (s *Server) putAdapter(c *fiber.Ctx) error {
	cat, err := s.catalog()
	if err != nil {
		return err
	}
	id := c.Params("id")
	if err := store.ValidateID(id); err != nil {
		return badRequest("id", "%v", err)
	}
	if id == s.cfg.ModelName {
		return badRequest("id", "adapter ID %q is the base model's name", id)
	}
	if !keyOf(c).CanManage(id) {
		return forbidden(id)
	}
	cfg, weights, err := s.readUpload(c, s.uploadLimits(cat))
	if err != nil {
		return s.refuseUpload(cat, id, err)
	}
	_, existed := cat.Get(c.UserContext(), id)
	if err := cat.Put(c.UserContext(), id, cfg, weights); err != nil {
		if errors.Is(err, ErrInvalidAdapter) || errors.Is(err, lora.ErrConfig) || errors.Is(err, lora.ErrMismatch) ||
			errors.Is(err, lora.ErrUnsupported) || errors.Is(err, lora.ErrCorrupt) || errors.Is(err, lora.ErrWeights) {
			return s.refuseUpload(cat, id, s.invalidAdapter(err))
		}
		return err
	}
	info, err := cat.Get(c.UserContext(), id)
	if err != nil {
		return err
	}
	status := fiber.StatusCreated
	if existed == nil {
		status = fiber.StatusOK
	}
	s.log.Info("adapter deployed", "id", id, "version", info.Version, "rank", info.Rank, "bytes", len(cfg)+len(weights), "replaced", existed == nil)
	return c.Status(status).JSON(info)
}

// invalidAdapter is the 400 for an adapter that failed validation: what is
// wrong, said once.
func (s *Server) invalidAdapter(err error) *Error {
	var le *lora.Error
	if errors.As(err, &le) {
		if le.Kind == lora.ErrMismatch {
			return badRequest("body", "adapter does not fit the base model %q: %s", s.cfg.ModelName, le.Detail)
		}
		return badRequest("body", "%s", le.Error())
	}
	return badRequest("body", "%v", err)
}

// refuseUpload logs and counts (peftd_adapter_invalid_uploads_total) an
// upload refused for its content, and returns err.
func (s *Server) refuseUpload(cat Catalog, id string, err error) error {
	var e *Error
	if errors.As(err, &e) && e.Status >= 400 && e.Status < 500 {
		s.log.Warn("adapter upload refused", "id", id, "status", e.Status, "err", e.Message)
		if n, ok := cat.(InvalidUploadCounter); ok {
			n.CountInvalidUpload()
		}
	}
	return err
}
