package api

import (
	"archive/tar"
	"archive/zip"
	"bytes"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"path"
	"slices"
	"strings"

	"github.com/gofiber/fiber/v2"

	"github.com/peftd/peftd/runtime/chat"
	"github.com/peftd/peftd/runtime/lora"
	"github.com/peftd/peftd/runtime/tokenizer"
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
			if !k.CanInvoke(a.ID) {
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
	if !ValidID(id) {
		return badRequest("id", "bad adapter ID %q: use letters, digits, '.', '_' and '-' (at most 128)", id)
	}
	if id == s.cfg.ModelName {
		return badRequest("id", "adapter ID %q is the base model's name", id)
	}
	if !keyOf(c).CanManage(id) {
		return forbidden(id)
	}
	if int64(len(c.Body())) > s.cfg.MaxUploadBytes {
		return apiErr(fiber.StatusRequestEntityTooLarge, "invalid_request_error", "", fmt.Sprintf("upload larger than %d bytes", s.cfg.MaxUploadBytes))
	}
	var cfg, weights []byte
	if strings.HasPrefix(c.Get(fiber.HeaderContentType), fiber.MIMEMultipartForm) {
		cfg, weights, err = s.fromMultipart(c)
	} else {
		cfg, weights, err = s.fromArchive(c.Body())
	}
	if err != nil {
		return err
	}
	_, existed := cat.Get(c.UserContext(), id)
	if err := cat.Put(c.UserContext(), id, cfg, weights); err != nil {
		if errors.Is(err, ErrInvalidAdapter) || errors.Is(err, lora.ErrConfig) || errors.Is(err, lora.ErrMismatch) || errors.Is(err, lora.ErrUnsupported) {
			s.log.Warn("adapter upload refused", "id", id, "err", err)
			return badRequest("body", "the adapter does not fit the base model %q: %v", s.cfg.ModelName, err)
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

func (s *Server) fromMultipart(c *fiber.Ctx) (cfg, weights []byte, err error) {
	form, err := c.MultipartForm()
	if err != nil {
		return nil, nil, badRequest("body", "bad multipart form: %v", err)
	}
	read := func(name string) ([]byte, error) {
		fhs := form.File[name]
		if len(fhs) == 0 {
			for _, v := range form.File { // any field, by file name
				for _, fh := range v {
					if path.Base(fh.Filename) == name {
						fhs = append(fhs, fh)
					}
				}
			}
		}
		if len(fhs) == 0 {
			return nil, badRequest(name, "the form has no %s file", name)
		}
		f, err := fhs[0].Open()
		if err != nil {
			return nil, err
		}
		defer f.Close()
		return io.ReadAll(f)
	}
	if cfg, err = read(lora.ConfigFile); err != nil {
		return nil, nil, err
	}
	if weights, err = read(lora.WeightsFile); err != nil {
		return nil, nil, err
	}
	return cfg, weights, nil
}

// fromArchive finds the adapter files in a tar, tar.gz or zip, at the top
// level or one folder down.
func (s *Server) fromArchive(body []byte) (cfg, weights []byte, err error) {
	if len(body) == 0 {
		return nil, nil, badRequest("body", "empty upload: send a tar, tar.gz or zip of the adapter folder, or a multipart form")
	}
	files := map[string][]byte{}
	want := func(name string) bool {
		name = strings.TrimPrefix(path.Clean("/"+name), "/")
		base := path.Base(name)
		if base != lora.ConfigFile && base != lora.WeightsFile {
			return false
		}
		return strings.Count(name, "/") <= 1
	}
	// Entries that climb out of the archive (../x) or are absolute are
	// refused: nothing is written from them, but such an archive is not an
	// adapter folder.
	unsafe := func(name string) error {
		n := strings.ReplaceAll(name, "\\", "/")
		if strings.HasPrefix(n, "/") || slices.Contains(strings.Split(n, "/"), "..") {
			return badRequest("body", "archive entry %q leaves the adapter folder (absolute path or '..'): "+
				"archive the adapter folder's files with relative paths", name)
		}
		return nil
	}
	limit := s.cfg.MaxUploadBytes
	keep := func(name string, r io.Reader) error {
		b, err := io.ReadAll(io.LimitReader(r, limit+1))
		if err != nil {
			return badRequest("body", "reading %s from the archive: %v", name, err)
		}
		if int64(len(b)) > limit {
			return apiErr(fiber.StatusRequestEntityTooLarge, "invalid_request_error", "", fmt.Sprintf("%s in the archive is larger than %d bytes", name, limit))
		}
		name = strings.TrimPrefix(path.Clean("/"+name), "/")
		if _, dup := files[path.Base(name)]; dup && strings.Contains(name, "/") {
			return nil // a top-level file wins
		}
		files[path.Base(name)] = b
		return nil
	}
	switch {
	case bytes.HasPrefix(body, []byte("PK\x03\x04")):
		zr, err := zip.NewReader(bytes.NewReader(body), int64(len(body)))
		if err != nil {
			return nil, nil, badRequest("body", "bad zip archive: %v", err)
		}
		for _, f := range zr.File {
			if err := unsafe(f.Name); err != nil {
				return nil, nil, err
			}
			if f.FileInfo().IsDir() || !want(f.Name) {
				continue
			}
			rc, err := f.Open()
			if err != nil {
				return nil, nil, badRequest("body", "bad zip entry %s: %v", f.Name, err)
			}
			err = keep(f.Name, rc)
			rc.Close()
			if err != nil {
				return nil, nil, err
			}
		}
	default:
		var r io.Reader = bytes.NewReader(body)
		if bytes.HasPrefix(body, []byte{0x1f, 0x8b}) {
			gz, err := gzip.NewReader(r)
			if err != nil {
				return nil, nil, badRequest("body", "bad gzip stream: %v", err)
			}
			r = gz
		}
		tr := tar.NewReader(r)
		n := 0
		for {
			h, err := tr.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				if n == 0 {
					return nil, nil, badRequest("body", "the upload is not a tar, tar.gz or zip archive (or a multipart form): %v", err)
				}
				return nil, nil, badRequest("body", "bad tar archive: %v", err)
			}
			n++
			if err := unsafe(h.Name); err != nil {
				return nil, nil, err
			}
			if h.Typeflag != tar.TypeReg || !want(h.Name) {
				continue
			}
			if err := keep(h.Name, tr); err != nil {
				return nil, nil, err
			}
		}
	}
	cfg, weights = files[lora.ConfigFile], files[lora.WeightsFile]
	if cfg == nil || weights == nil {
		return nil, nil, badRequest("body", "the archive must hold %s and %s at the top level or one folder down", lora.ConfigFile, lora.WeightsFile)
	}
	return cfg, weights, nil
}

type tokenizeRequest struct {
	Model               string         `json:"model"`
	Prompt              *string        `json:"prompt"`
	Messages            []chat.Message `json:"messages"`
	AddSpecialTokens    *bool          `json:"add_special_tokens"`
	AddGenerationPrompt *bool          `json:"add_generation_prompt"`
}

func (s *Server) tokenize(c *fiber.Ctx) error {
	if err := s.bodyOK(c); err != nil {
		return err
	}
	var r tokenizeRequest
	tok, err := s.tokenizerFor(c, &r, &r.Model)
	if err != nil {
		return err
	}
	var ids []int32
	switch {
	case r.Messages != nil:
		if s.cfg.Template == nil {
			return badRequest("messages", "the model %q has no chat template", s.cfg.ModelName)
		}
		gen := r.AddGenerationPrompt == nil || *r.AddGenerationPrompt
		text, err := s.cfg.Template.Render(r.Messages, gen)
		if err != nil {
			return badRequest("messages", "rendering the chat template: %v", err)
		}
		add := r.AddSpecialTokens != nil && *r.AddSpecialTokens
		ids = tok.Encode(text, add)
	case r.Prompt != nil:
		add := r.AddSpecialTokens == nil || *r.AddSpecialTokens
		ids = tok.Encode(*r.Prompt, add)
	default:
		return badRequest("prompt", "give prompt or messages")
	}
	return c.JSON(fiber.Map{"tokens": ids32(ids), "count": len(ids), "max_model_len": s.cfg.MaxModelLen})
}

// tokenizerFor decodes the body into req, checks its model names this
// server's model (or an adapter of it) and returns the model's tokenizer.
func (s *Server) tokenizerFor(c *fiber.Ctx, req any, model *string) (*tokenizer.Tokenizer, error) {
	if err := decodeJSON(c.Body(), req); err != nil {
		return nil, err
	}
	if _, err := s.resolveModel(c, *model, "model"); err != nil {
		return nil, err
	}
	if s.cfg.Tokenizer == nil {
		return nil, badRequest("model", "the model %q has no tokenizer", s.cfg.ModelName)
	}
	return s.cfg.Tokenizer, nil
}

func ids32(v []int32) []int32 {
	if v == nil {
		return []int32{}
	}
	return v
}

func (s *Server) detokenize(c *fiber.Ctx) error {
	if err := s.bodyOK(c); err != nil {
		return err
	}
	var r struct {
		Model  string  `json:"model"`
		Tokens []int32 `json:"tokens"`
	}
	tok, err := s.tokenizerFor(c, &r, &r.Model)
	if err != nil {
		return err
	}
	if r.Tokens == nil {
		return badRequest("tokens", "tokens is required")
	}
	for _, t := range r.Tokens {
		if t < 0 || int(t) >= tok.VocabSize() {
			return badRequest("tokens", "token id %d outside the vocabulary [0, %d)", t, tok.VocabSize())
		}
	}
	return c.JSON(fiber.Map{"prompt": tok.Decode(r.Tokens, false)})
}
