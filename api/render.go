// Rendering: results and deltas in each route's wire format.

package api

import (
	"fmt"
	"math"
	"strings"
	"unicode/utf8"

	"github.com/peftd/peftd/runtime/sample"
)

type usage struct {
	PromptTokens     int `json:"prompt_tokens"`
	CompletionTokens int `json:"completion_tokens"`
	TotalTokens      int `json:"total_tokens"`
}

func usageOf(r result) usage {
	return usage{r.prompt, r.complete, r.prompt + r.complete}
}

func (s *Server) tokenText(id int32) string {
	if s.cfg.Tokenizer == nil {
		return fmt.Sprintf("token_id:%d", id)
	}
	return s.cfg.Tokenizer.Decode([]int32{id}, false)
}

// Logprobs' token strings are decoded in context, after the prompt and the
// tokens before them, never alone (a SentencePiece "▁upon" alone loses its
// space):
//   - a sampled token's string is its piece, what it adds to the text, so
//     that the strings concatenate to the text and text_offset lines up.
//     A token that is an incomplete character on its own (a byte-fallback
//     byte, part of a byte-level character) adds nothing until the token
//     that completes the character, whose string holds all of it: as with
//     the text, incomplete UTF-8 is never shown. Its own bytes are in chat's
//     "bytes" (OpenAI's practice; concatenated over the tokens they give the
//     text's bytes). A special token, such as the stop token, is not part of
//     the text (skip_special_tokens, as vLLM), so its string is empty (vLLM
//     shows "<s>" only with skip_special_tokens false).
//   - an alternative's string is the text it would have added in place of
//     the sampled token, had it ended the text (Peek: a character it leaves
//     incomplete reads U+FFFD); a special token reads as itself ("</s>"),
//     since nothing has to join there.

// tokInfo is a sampled token's own bytes and its alternatives, decoded
// where the token was sampled.
type tokInfo struct {
	bytes []byte
	top   []altInfo // as sample.Choice.Top
}

type altInfo struct {
	text  string
	bytes []byte
}

func (s *Server) tokInfo(dec textDecoder, c sample.Choice) tokInfo {
	ti := tokInfo{bytes: dec.PeekBytes(c.ID), top: make([]altInfo, len(c.Top))}
	tok := s.cfg.Tokenizer
	for a, x := range c.Top {
		switch t, ok := tok.Token(x.ID); {
		case !ok: // an id the model has and the tokenizer not
			t = fmt.Sprintf("token_id:%d", x.ID)
			ti.top[a] = altInfo{t, []byte(t)}
		case tok.IsSpecial(x.ID):
			ti.top[a] = altInfo{t, []byte(t)}
		default:
			ti.top[a] = altInfo{dec.Peek(x.ID), dec.PeekBytes(x.ID)}
		}
	}
	return ti
}

// sampled is the string and bytes of token k of cs (see above).
func (s *Server) sampled(k int, cs []sample.Choice, pieces []string, info []tokInfo) (string, []byte) {
	if s.cfg.Tokenizer == nil || k >= len(pieces) {
		t := s.tokenText(cs[k].ID)
		return t, []byte(t)
	}
	var b []byte
	if k < len(info) {
		b = info[k].bytes
	}
	return pieces[k], b
}

// alternative is the string and bytes of alternative a of token k of cs.
func (s *Server) alternative(k, a int, cs []sample.Choice, info []tokInfo) (string, []byte) {
	if s.cfg.Tokenizer == nil || k >= len(info) || a >= len(info[k].top) {
		t := s.tokenText(cs[k].Top[a].ID)
		return t, []byte(t)
	}
	return info[k].top[a].text, info[k].top[a].bytes
}

// topMap is a token's alternatives as the legacy completions logprobs give
// them, keyed by their strings (key(a): alternative a's); alternatives
// that read alike keep the likeliest.
func topMap(c sample.Choice, key func(a int) string) map[string]float64 {
	top := map[string]float64{}
	for a, x := range c.Top {
		k := key(a)
		if _, dup := top[k]; !dup {
			top[k] = finite(x.Logprob)
		}
	}
	return top
}

// completionLogprobs is OpenAI's legacy completions logprobs object.
type completionLogprobs struct {
	Tokens        []string             `json:"tokens"`
	TokenLogprobs []*float64           `json:"token_logprobs"` // null: an echoed prompt's first token
	TopLogprobs   []map[string]float64 `json:"top_logprobs"`   // null likewise
	TextOffset    []int                `json:"text_offset"`
}

// completionLP is the logprobs of cs, whose text starts offset characters
// into the completion's text. text_offset[i] is where token i's string
// starts in the completion's text (not the prompt's: echo is not
// supported), counted in characters (Unicode code points, as vLLM's Python
// len() and OpenAI); streamed chunks continue the count.
func (s *Server) completionLP(cs []sample.Choice, pieces []string, info []tokInfo, offset int) *completionLogprobs {
	lp := &completionLogprobs{Tokens: []string{}, TokenLogprobs: []*float64{}, TopLogprobs: []map[string]float64{}, TextOffset: []int{}}
	for k, c := range cs {
		t, _ := s.sampled(k, cs, pieces, info)
		lp.Tokens = append(lp.Tokens, t)
		v := finite(c.Logprob)
		lp.TokenLogprobs = append(lp.TokenLogprobs, &v)
		lp.TopLogprobs = append(lp.TopLogprobs, topMap(c, func(a int) string { key, _ := s.alternative(k, a, cs, info); return key }))
		lp.TextOffset = append(lp.TextOffset, offset)
		offset += utf8.RuneCountInString(t)
	}
	return lp
}

type chatTop struct {
	Token   string  `json:"token"`
	Logprob float64 `json:"logprob"`
	Bytes   []int   `json:"bytes"`
}

type chatLP struct {
	chatTop
	TopLogprobs []chatTop `json:"top_logprobs"`
}

func chatTopOf(t string, bs []byte, lp float64) chatTop {
	b := make([]int, len(bs))
	for i, c := range bs {
		b[i] = int(c)
	}
	return chatTop{t, finite(lp), b}
}

func (s *Server) chatLogprobs(cs []sample.Choice, pieces []string, info []tokInfo) map[string]any {
	out := []chatLP{}
	for k, c := range cs {
		t, b := s.sampled(k, cs, pieces, info)
		e := chatLP{chatTop: chatTopOf(t, b, c.Logprob), TopLogprobs: []chatTop{}}
		for a, x := range c.Top {
			t, b := s.alternative(k, a, cs, info)
			e.TopLogprobs = append(e.TopLogprobs, chatTopOf(t, b, x.Logprob))
		}
		out = append(out, e)
	}
	return map[string]any{"content": out}
}

type invokeLP struct {
	TokenID     int32        `json:"token_id"`
	Token       string       `json:"token"`
	Logprob     float64      `json:"logprob"`
	TopLogprobs []invokeLPel `json:"top_logprobs"`
}

type invokeLPel struct {
	TokenID int32   `json:"token_id"`
	Token   string  `json:"token"`
	Logprob float64 `json:"logprob"`
}

func (s *Server) invokeLogprobs(cs []sample.Choice, pieces []string, info []tokInfo) []invokeLP {
	out := []invokeLP{}
	for k, c := range cs {
		t, _ := s.sampled(k, cs, pieces, info)
		e := invokeLP{TokenID: c.ID, Token: t, Logprob: finite(c.Logprob), TopLogprobs: []invokeLPel{}}
		for a, x := range c.Top {
			t, _ := s.alternative(k, a, cs, info)
			e.TopLogprobs = append(e.TopLogprobs, invokeLPel{x.ID, t, finite(x.Logprob)})
		}
		out = append(out, e)
	}
	return out
}

// finite keeps JSON encodable: -Inf becomes a very negative number.
func finite(v float64) float64 {
	if math.IsInf(v, -1) || math.IsNaN(v) {
		return -9999
	}
	return v
}

func ids(ts []int32) []int32 {
	if ts == nil {
		return []int32{}
	}
	return ts
}

// final is the non-streamed response.
func (s *Server) final(j *job, r result) any {
	switch j.kind {
	case kindInvoke:
		out := invokeResponse{ID: j.id, Object: "invocation", Created: j.created, Adapter: j.model,
			Text: r.text, TokenIDs: ids(r.tokens), PromptTokenIDs: ids(j.req.Prompt), FinishReason: r.finish, Usage: usageOf(r)}
		if j.logprobs {
			out.Logprobs = s.invokeLogprobs(r.choices, r.pieces, r.info)
		}
		return out
	case kindCompletion:
		u := usageOf(r)
		out := completionResponse{ID: j.id, Object: "text_completion", Created: j.created, Model: j.model,
			Choices: []completionChoiceJSON{s.completionChoice(j, 0, j.req.Prompt, r)}, Usage: &u, SystemFingerprint: true}
		if j.returnIDs {
			out.PromptTokenIDs = ids(j.req.Prompt)
		}
		return out
	default:
		return s.chatAnswer(j, []chatChoice{s.chatChoiceOf(j, 0, r)}, r)
	}
}

// chatChoiceOf is choice index of a chat answer.
func (s *Server) chatChoiceOf(j *job, index int, r result) chatChoice {
	ch := chatChoice{Index: index, Message: &chatMessage{Role: "assistant", Content: r.text, ToolCalls: []any{}}, FinishReason: r.finish}
	if j.logprobs {
		ch.Logprobs = s.chatLogprobs(r.choices, r.pieces, r.info)
	}
	if j.returnIDs {
		ch.TokenIDs = ids(r.tokens)
	}
	return ch
}

// chatAnswer is a chat answer with these choices; total is the usage.
func (s *Server) chatAnswer(j *job, choices []chatChoice, total result) chatResponse {
	u := usageOf(total)
	out := chatResponse{ID: j.id, Object: "chat.completion", Created: j.created, Model: j.model,
		Choices: choices, Usage: &u, SystemFingerprint: true}
	if j.returnIDs {
		out.PromptTokenIDs = ids(j.req.Prompt)
	}
	return out
}

// completionChoice is choice index of a completions answer.
func (s *Server) completionChoice(j *job, index int, prompt []int32, r result) completionChoiceJSON {
	ch := completionChoiceJSON{Index: index, Text: r.text, FinishReason: r.finish}
	if j.echo {
		text, lp := s.echoPrompt(prompt, r.promptScores, j.logprobs)
		ch.Text = text + r.text
		if j.logprobs {
			gen := s.completionLP(r.choices, r.pieces, r.info, utf8.RuneCountInString(text))
			lp.Tokens = append(lp.Tokens, gen.Tokens...)
			lp.TokenLogprobs = append(lp.TokenLogprobs, gen.TokenLogprobs...)
			lp.TopLogprobs = append(lp.TopLogprobs, gen.TopLogprobs...)
			lp.TextOffset = append(lp.TextOffset, gen.TextOffset...)
			ch.Logprobs = lp
		}
		if j.returnIDs {
			ch.TokenIDs, ch.PromptTokenIDs = ids(r.tokens), ids(prompt)
		}
		return ch
	}
	if j.logprobs {
		ch.Logprobs = s.completionLP(r.choices, r.pieces, r.info, 0)
	}
	if j.returnIDs {
		ch.TokenIDs, ch.PromptTokenIDs = ids(r.tokens), ids(prompt)
	}
	return ch
}

// echoPrompt is the text echo puts before a completion: the prompt
// decoded token by token (each token's piece is what it adds to the text, a
// special token's is empty), and with logprobs the prompt's part of the
// logprobs: its tokens, their scores (the first token has none: null) and
// their alternatives, decoded in context as a generated token's are.
func (s *Server) echoPrompt(prompt []int32, scores []sample.Choice, logprobs bool) (string, *completionLogprobs) {
	lp := &completionLogprobs{Tokens: []string{}, TokenLogprobs: []*float64{}, TopLogprobs: []map[string]float64{}, TextOffset: []int{}}
	tok := s.cfg.Tokenizer
	var text strings.Builder
	var dec textDecoder
	if tok != nil {
		dec = tok.NewDecoder(true)
	}
	chars := 0
	for i, id := range prompt {
		var info tokInfo
		if i > 0 && i-1 < len(scores) && dec != nil && logprobs {
			info = s.tokInfo(dec, scores[i-1]) // before id joins the decoder
		}
		// piece: what the token adds to the text; without a tokenizer
		// nothing (as a completion's text is then empty), its logprobs
		// string then "token_id:N"
		piece, name := "", s.tokenText(id)
		if dec != nil {
			piece = dec.Add(id)
			if i == len(prompt)-1 {
				piece += dec.Flush()
			}
			name = piece
		}
		text.WriteString(piece)
		if !logprobs {
			continue
		}
		lp.Tokens = append(lp.Tokens, name)
		lp.TextOffset = append(lp.TextOffset, chars)
		chars += utf8.RuneCountInString(piece)
		if i == 0 || i-1 >= len(scores) {
			lp.TokenLogprobs = append(lp.TokenLogprobs, nil)
			lp.TopLogprobs = append(lp.TopLogprobs, nil)
			continue
		}
		c := scores[i-1]
		v := finite(c.Logprob)
		lp.TokenLogprobs = append(lp.TokenLogprobs, &v)
		lp.TopLogprobs = append(lp.TopLogprobs, topMap(c, func(a int) string {
			if a < len(info.top) {
				return info.top[a].text
			}
			return s.tokenText(c.Top[a].ID)
		}))
	}
	return text.String(), lp
}

func tokenIDs(cs []sample.Choice) []int32 {
	tok := make([]int32, 0, len(cs))
	for _, c := range cs {
		tok = append(tok, c.ID)
	}
	return tok
}

// completionChunk is a streamed delta of choice index of a completion.
func (s *Server) completionChunk(j *job, index int, prompt []int32, d delta, first bool) completionResponse {
	ch := completionChoiceJSON{Index: index, Text: d.text}
	switch {
	case d.echo != nil && j.logprobs:
		ch.Logprobs = d.echo
	case j.logprobs:
		ch.Logprobs = s.completionLP(d.choices, d.pieces, d.info, d.offset)
	}
	if j.returnIDs {
		ch.TokenIDs = tokenIDs(d.choices)
		if first {
			ch.PromptTokenIDs = ids(prompt)
		}
	}
	return completionResponse{ID: j.id, Object: "text_completion", Created: j.created, Model: j.model, Choices: []completionChoiceJSON{ch}}
}

// completionFinish is the chunk that ends choice index of a stream.
func completionFinish(j *job, index int, finish string) completionResponse {
	return completionResponse{ID: j.id, Object: "text_completion", Created: j.created, Model: j.model,
		Choices: []completionChoiceJSON{{Index: index, FinishReason: finish}}}
}

// chunk is one streamed delta.
func (s *Server) chunk(j *job, d delta, first bool) any {
	switch j.kind {
	case kindInvoke:
		out := invokeChunk{ID: j.id, Object: "invocation.chunk", Created: j.created, Adapter: j.model,
			Text: d.text, TokenIDs: tokenIDs(d.choices)}
		if first {
			out.PromptTokenIDs = ids(j.req.Prompt)
		}
		if j.logprobs {
			out.Logprobs = s.invokeLogprobs(d.choices, d.pieces, d.info)
		}
		return out
	case kindCompletion:
		return s.completionChunk(j, 0, j.req.Prompt, d, first)
	default:
		return s.chatChunk(j, 0, d, first)
	}
}

// chatChunk is a streamed delta of choice index of a chat answer.
func (s *Server) chatChunk(j *job, index int, d delta, first bool) chatResponse {
	text := d.text
	dl := &chatDelta{Content: &text}
	if first {
		dl.Role = "assistant"
	}
	ch := chatChoice{Index: index, Delta: dl}
	if j.logprobs {
		ch.Logprobs = s.chatLogprobs(d.choices, d.pieces, d.info)
	}
	if j.returnIDs {
		ch.TokenIDs = tokenIDs(d.choices)
	}
	out := chatResponse{ID: j.id, Object: "chat.completion.chunk", Created: j.created, Model: j.model, Choices: []chatChoice{ch}}
	if first && j.returnIDs {
		out.PromptTokenIDs = ids(j.req.Prompt)
	}
	return out
}

// chatFinish is the chunk that ends choice index of a chat stream; first:
// nothing of it was sent before (it still says the role).
func chatFinish(j *job, index int, finish string, first bool) chatResponse {
	dl := &chatDelta{}
	if first {
		empty := ""
		dl = &chatDelta{Role: "assistant", Content: &empty}
	}
	return chatResponse{ID: j.id, Object: "chat.completion.chunk", Created: j.created, Model: j.model,
		Choices: []chatChoice{{Index: index, Delta: dl, FinishReason: finish}}}
}

// tail are the chunks after the content: the finish reason, then usage.
func (s *Server) tail(j *job, r result, first bool) []any {
	u := usageOf(r)
	switch j.kind {
	case kindInvoke:
		return []any{invokeChunk{ID: j.id, Object: "invocation.chunk", Created: j.created, Adapter: j.model,
			TokenIDs: []int32{}, FinishReason: r.finish, Usage: &u}}
	case kindCompletion:
		out := []any{completionFinish(j, 0, r.finish)}
		if j.usageChunk {
			out = append(out, completionResponse{ID: j.id, Object: "text_completion", Created: j.created, Model: j.model,
				Choices: []completionChoiceJSON{}, Usage: &u})
		}
		return out
	default:
		out := []any{chatFinish(j, 0, r.finish, first)}
		if j.usageChunk {
			out = append(out, chatResponse{ID: j.id, Object: "chat.completion.chunk", Created: j.created, Model: j.model,
				Choices: []chatChoice{}, Usage: &u})
		}
		return out
	}
}
