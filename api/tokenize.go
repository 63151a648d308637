// vLLM's tokenize and detokenize routes.

package api

import (
	"github.com/gofiber/fiber/v2"
	"github.com/peftd/peftd/text/chat"
	"github.com/peftd/peftd/text/tokenizer"
)

type tokenizeRequest struct {
	Model               string         `json:"model"`
	Prompt              *string        `json:"prompt"`
	Messages            []chat.Message `json:"messages"`
	AddSpecialTokens    *bool          `json:"add_special_tokens"`
	AddGenerationPrompt *bool          `json:"add_generation_prompt"`
}

func (s *Server) tokenize(c *fiber.Ctx) error {
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
	if err := s.readJSON(c, req); err != nil {
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
