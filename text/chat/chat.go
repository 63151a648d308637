// Package chat renders Hugging Face chat templates (the Jinja2 "chat_template"
// of tokenizer_config.json) into prompt text, the way transformers'
// tokenizer.apply_chat_template(..., tokenize=False) does.
//
// Templates are compiled once with github.com/ardanlabs/jinja, a pure-Go Jinja
// engine that applies the trim_blocks/lstrip_blocks defaults HF uses.
package chat

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/ardanlabs/jinja"
)

// ErrNoTemplate is returned (wrapped) by LoadTemplate when the model ships no
// chat template.
var ErrNoTemplate = errors.New("chat: model has no chat template")

// Message is one chat turn. Content is plain text; when decoded from JSON it
// may also be given as an array of OpenAI-style {"type":"text","text":...}
// content parts, which are concatenated.
type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

// UnmarshalJSON accepts "content" as a string, null (empty), or an array of
// text content parts. Any other part type is rejected.
func (m *Message) UnmarshalJSON(data []byte) error {
	var raw struct {
		Role    string          `json:"role"`
		Content json.RawMessage `json:"content"`
	}
	if err := json.Unmarshal(data, &raw); err != nil {
		return fmt.Errorf("chat: decoding message: %w", err)
	}
	content, err := decodeContent(raw.Content)
	if err != nil {
		return err
	}
	m.Role = raw.Role
	m.Content = content
	return nil
}

func decodeContent(raw json.RawMessage) (string, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || bytes.Equal(raw, []byte("null")) {
		return "", nil
	}
	switch raw[0] {
	case '"':
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return "", fmt.Errorf("chat: decoding message content: %w", err)
		}
		return s, nil
	case '[':
		var parts []struct {
			Type string  `json:"type"`
			Text *string `json:"text"`
		}
		if err := json.Unmarshal(raw, &parts); err != nil {
			return "", fmt.Errorf("chat: decoding message content parts: %w", err)
		}
		var b strings.Builder
		for i, p := range parts {
			if p.Type != "text" {
				return "", fmt.Errorf("chat: message content part %d has unsupported type %q (only \"text\" is supported)", i, p.Type)
			}
			if p.Text == nil {
				return "", fmt.Errorf("chat: message content part %d of type \"text\" has no \"text\" field", i)
			}
			b.WriteString(*p.Text)
		}
		return b.String(), nil
	default:
		return "", fmt.Errorf("chat: message content must be a string or an array of content parts, got %s", truncate(string(raw), 40))
	}
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}

// TemplateError is the error returned by Render when the template itself calls
// raise_exception(msg), e.g. to reject an unsupported role or message order.
// It is a client error (the conversation is not acceptable to the model).
type TemplateError struct {
	Msg string
}

func (e *TemplateError) Error() string { return "chat: template raised exception: " + e.Msg }

// Template is a compiled chat template. It is safe for concurrent use as long
// as Now is not modified concurrently with Render.
type Template struct {
	// Now supplies the time for strftime_now(); nil means time.Now.
	Now func() time.Time

	src      string
	bosToken string
	eosToken string
	tmpl     *jinja.Template
}

// NewTemplate compiles the Jinja2 chat template src. bosToken and eosToken are
// exposed to the template as bos_token and eos_token.
func NewTemplate(src, bosToken, eosToken string) (*Template, error) {
	if strings.TrimSpace(src) == "" {
		return nil, fmt.Errorf("chat: empty chat template: %w", ErrNoTemplate)
	}
	tmpl, err := jinja.Compile(src)
	if err != nil {
		return nil, fmt.Errorf("chat: compiling chat template: %w", err)
	}
	return &Template{src: src, bosToken: bosToken, eosToken: eosToken, tmpl: tmpl}, nil
}

// Source returns the template source.
func (t *Template) Source() string { return t.src }

// BOSToken returns the bos_token given to the template.
func (t *Template) BOSToken() string { return t.bosToken }

// EOSToken returns the eos_token given to the template.
func (t *Template) EOSToken() string { return t.eosToken }

// Render applies the template to msgs. The template sees messages,
// add_generation_prompt, bos_token, eos_token, tools = none, documents = none,
// raise_exception(msg) (surfaced as a *TemplateError) and strftime_now(fmt).
// date_string is left undefined, as transformers does, so templates such as
// Llama 3.1's fall back to their own default.
func (t *Template) Render(msgs []Message, addGenerationPrompt bool) (string, error) {
	if len(msgs) == 0 {
		return "", errors.New("chat: no messages to render")
	}
	list := make([]jinja.Value, len(msgs))
	for i, m := range msgs {
		if strings.TrimSpace(m.Role) == "" {
			return "", fmt.Errorf("chat: message %d has an empty role", i)
		}
		d := jinja.NewDict()
		d.AsDict().Set("role", jinja.NewString(m.Role))
		d.AsDict().Set("content", jinja.NewString(m.Content))
		list[i] = d
	}
	now := t.Now
	if now == nil {
		now = time.Now
	}
	data := map[string]jinja.Value{
		"messages":              jinja.NewList(list),
		"add_generation_prompt": jinja.NewBool(addGenerationPrompt),
		"bos_token":             jinja.NewString(t.bosToken),
		"eos_token":             jinja.NewString(t.eosToken),
		"tools":                 jinja.None(),
		"documents":             jinja.None(),
		"raise_exception": jinja.NewCallable("raise_exception", func(args []jinja.Value, _ map[string]jinja.Value) (jinja.Value, error) {
			msg := "raise_exception called"
			if len(args) > 0 {
				if args[0].IsString() {
					msg = args[0].AsString()
				} else {
					msg = args[0].String()
				}
			}
			return jinja.Undefined(), &TemplateError{Msg: msg}
		}),
		"strftime_now": jinja.NewCallable("strftime_now", func(args []jinja.Value, _ map[string]jinja.Value) (jinja.Value, error) {
			if len(args) != 1 || !args[0].IsString() {
				return jinja.Undefined(), errors.New("strftime_now: expected one string argument (the format)")
			}
			return jinja.NewString(strftime(now(), args[0].AsString())), nil
		}),
	}
	out, err := t.tmpl.RenderValues(data)
	if err != nil {
		var te *TemplateError
		if errors.As(err, &te) {
			return "", err
		}
		return "", fmt.Errorf("chat: rendering chat template: %w", err)
	}
	return out, nil
}

// LoadTemplate loads the chat template of the Hugging Face model folder dir:
// "chat_template" of dir/tokenizer_config.json (a string, or a list of
// {name, template} of which "default" is used), falling back to
// dir/chat_template.jinja or dir/chat_template.json as newer transformers
// versions save them. bos_token and eos_token come from tokenizer_config.json
// (a string or an {"content": ...} object). It returns an error wrapping
// ErrNoTemplate when the model has no (default) chat template.
func LoadTemplate(dir string) (*Template, error) {
	cfgPath := filepath.Join(dir, "tokenizer_config.json")
	data, err := os.ReadFile(cfgPath)
	if err != nil {
		return nil, fmt.Errorf("chat: reading tokenizer config: %w", err)
	}
	var cfg struct {
		ChatTemplate json.RawMessage `json:"chat_template"`
		BOSToken     json.RawMessage `json:"bos_token"`
		EOSToken     json.RawMessage `json:"eos_token"`
	}
	if err := json.Unmarshal(data, &cfg); err != nil {
		return nil, fmt.Errorf("chat: parsing %s: %w", cfgPath, err)
	}
	bos, err := decodeToken(cfg.BOSToken)
	if err != nil {
		return nil, fmt.Errorf("chat: %s: bos_token: %w", cfgPath, err)
	}
	eos, err := decodeToken(cfg.EOSToken)
	if err != nil {
		return nil, fmt.Errorf("chat: %s: eos_token: %w", cfgPath, err)
	}

	src, err := decodeChatTemplate(cfg.ChatTemplate)
	if err != nil {
		return nil, fmt.Errorf("chat: %s: %w", cfgPath, err)
	}
	if src == "" {
		src, err = loadSideTemplate(dir)
		if err != nil {
			return nil, err
		}
	}
	if src == "" {
		return nil, fmt.Errorf("%w (no chat_template in %s)", ErrNoTemplate, cfgPath)
	}
	t, err := NewTemplate(src, bos, eos)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", cfgPath, err)
	}
	return t, nil
}

// loadSideTemplate reads chat_template.jinja or chat_template.json from dir;
// it returns "" when neither exists.
func loadSideTemplate(dir string) (string, error) {
	p := filepath.Join(dir, "chat_template.jinja")
	b, err := os.ReadFile(p)
	if err == nil {
		return string(b), nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("chat: reading %s: %w", p, err)
	}
	p = filepath.Join(dir, "chat_template.json")
	b, err = os.ReadFile(p)
	if errors.Is(err, os.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("chat: reading %s: %w", p, err)
	}
	var side struct {
		ChatTemplate json.RawMessage `json:"chat_template"`
	}
	if err := json.Unmarshal(b, &side); err != nil {
		return "", fmt.Errorf("chat: parsing %s: %w", p, err)
	}
	src, err := decodeChatTemplate(side.ChatTemplate)
	if err != nil {
		return "", fmt.Errorf("chat: %s: %w", p, err)
	}
	return src, nil
}

// decodeChatTemplate returns the template source of a chat_template value: a
// string, or a list of {name, template} from which "default" is taken. It
// returns "" for an absent or null value.
func decodeChatTemplate(raw json.RawMessage) (string, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || bytes.Equal(raw, []byte("null")) {
		return "", nil
	}
	switch raw[0] {
	case '"':
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return "", fmt.Errorf("chat_template: %w", err)
		}
		return s, nil
	case '[':
		var list []struct {
			Name     string `json:"name"`
			Template string `json:"template"`
		}
		if err := json.Unmarshal(raw, &list); err != nil {
			return "", fmt.Errorf("chat_template list: %w", err)
		}
		names := make([]string, 0, len(list))
		for _, e := range list {
			if e.Name == "default" {
				return e.Template, nil
			}
			names = append(names, e.Name)
		}
		return "", fmt.Errorf("%w: chat_template lists templates %q but none named \"default\"", ErrNoTemplate, names)
	default:
		return "", fmt.Errorf("chat_template must be a string or a list of {name, template}, got %s", truncate(string(raw), 40))
	}
}

// decodeToken decodes a special token given as a string, an object with a
// "content" field, or null/absent ("").
func decodeToken(raw json.RawMessage) (string, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || bytes.Equal(raw, []byte("null")) {
		return "", nil
	}
	switch raw[0] {
	case '"':
		var s string
		err := json.Unmarshal(raw, &s)
		return s, err
	case '{':
		var obj struct {
			Content string `json:"content"`
		}
		err := json.Unmarshal(raw, &obj)
		return obj.Content, err
	default:
		return "", fmt.Errorf("expected a string or {\"content\": ...}, got %s", truncate(string(raw), 40))
	}
}
