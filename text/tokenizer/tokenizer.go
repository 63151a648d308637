// Package tokenizer loads Hugging Face tokenizer.json files (BPE models) and
// encodes/decodes text exactly like the Hugging Face "tokenizers" library
// (the fast tokenizers used by transformers).
//
// Supported configurations (anything else is rejected with an error at load
// time instead of being approximated):
//   - model: BPE (merges as "a b" strings or [a, b] pairs, byte_fallback,
//     fuse_unk, ignore_merges, continuing_subword_prefix, end_of_word_suffix).
//   - normalizer: null, Sequence, Prepend, Replace (string pattern), NFC/NFD/NFKC/NFKD.
//   - pre_tokenizer: null, Sequence, Split (Isolated, not inverted) with the
//     Llama 3, Qwen 2 or GPT-2 regex, ByteLevel.
//   - post_processor: null, TemplateProcessing, ByteLevel, Sequence,
//     BertProcessing, RobertaProcessing.
//   - decoder: null, Sequence, Replace (string), ByteFallback, Fuse, Strip,
//     Metaspace, ByteLevel.
//
// A Tokenizer is immutable after loading and safe for concurrent use.
package tokenizer

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// ErrNoTokenizer is returned (wrapped) by Load when the directory has no tokenizer.json.
var ErrNoTokenizer = errors.New("tokenizer: no tokenizer.json")

type addedToken struct {
	id         int32
	content    string
	special    bool
	singleWord bool
	lstrip     bool
	rstrip     bool
	normalized bool
}

// Tokenizer is a loaded Hugging Face BPE tokenizer.
type Tokenizer struct {
	model *bpe

	added          []addedToken
	addedByContent map[string]int32
	rawMatcher     *addedMatcher // added tokens with normalized=false, matched on raw text
	normMatcher    *addedMatcher // added tokens with normalized=true, matched on normalized text

	normalizers []normalizer
	preSteps    []preStep
	byteLevel   bool // pre-tokenizer ends with ByteLevel: pieces are mapped bytes->unicode

	stages []stage // decoder pipeline

	idToToken []string
	special   []bool

	prefix, suffix []int32 // added around the sequence when addSpecial
	bos            int32
	hasBOS         bool
	eos            []int32
	vocabSize      int
	cleanUp        bool
}

// Load reads dir/tokenizer.json and, when present, dir/tokenizer_config.json.
// It returns an error wrapping ErrNoTokenizer when dir has no tokenizer.json.
func Load(dir string) (*Tokenizer, error) {
	tj, err := os.ReadFile(filepath.Join(dir, "tokenizer.json"))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("%w in %s", ErrNoTokenizer, dir)
		}
		return nil, fmt.Errorf("tokenizer: %w", err)
	}
	cj, err := os.ReadFile(filepath.Join(dir, "tokenizer_config.json"))
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("tokenizer: %w", err)
		}
		cj = nil
	}
	t, err := Parse(tj, cj)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(dir, "tokenizer.json"), err)
	}
	return t, nil
}

// ---- JSON schema ----

type jsonAddedToken struct {
	ID         int32  `json:"id"`
	Content    string `json:"content"`
	SingleWord bool   `json:"single_word"`
	LStrip     bool   `json:"lstrip"`
	RStrip     bool   `json:"rstrip"`
	Normalized bool   `json:"normalized"`
	Special    bool   `json:"special"`
}

type jsonModel struct {
	Type                    string   `json:"type"`
	Dropout                 *float64 `json:"dropout"`
	UnkToken                *string  `json:"unk_token"`
	ContinuingSubwordPrefix *string  `json:"continuing_subword_prefix"`
	EndOfWordSuffix         *string  `json:"end_of_word_suffix"`
	FuseUnk                 bool     `json:"fuse_unk"`
	ByteFallback            bool     `json:"byte_fallback"`
	IgnoreMerges            bool     `json:"ignore_merges"`
}

type jsonTokenizer struct {
	AddedTokens   []jsonAddedToken `json:"added_tokens"`
	Normalizer    json.RawMessage  `json:"normalizer"`
	PreTokenizer  json.RawMessage  `json:"pre_tokenizer"`
	PostProcessor json.RawMessage  `json:"post_processor"`
	Decoder       json.RawMessage  `json:"decoder"`
}

type jsonPattern struct {
	String *string `json:"String"`
	Regex  *string `json:"Regex"`
}

// jsonNode is the union of the fields used by normalizers, pre-tokenizers,
// post-processors and decoders.
type jsonNode struct {
	Type          string            `json:"type"`
	Normalizers   []json.RawMessage `json:"normalizers"`
	Pretokenizers []json.RawMessage `json:"pretokenizers"`
	Processors    []json.RawMessage `json:"processors"`
	Decoders      []json.RawMessage `json:"decoders"`

	Prepend        string       `json:"prepend"`
	Pattern        *jsonPattern `json:"pattern"`
	Content        string       `json:"content"`
	Behavior       string       `json:"behavior"`
	Invert         bool         `json:"invert"`
	AddPrefixSpace *bool        `json:"add_prefix_space"`
	UseRegex       *bool        `json:"use_regex"`
	Start          int          `json:"start"`
	Stop           int          `json:"stop"`
	Replacement    string       `json:"replacement"`
	PrependScheme  string       `json:"prepend_scheme"`

	Single []struct {
		SpecialToken *struct {
			ID string `json:"id"`
		} `json:"SpecialToken"`
		Sequence *struct {
			ID string `json:"id"`
		} `json:"Sequence"`
	} `json:"single"`
	SpecialTokens map[string]struct {
		IDs []int32 `json:"ids"`
	} `json:"special_tokens"`
	Cls []json.RawMessage `json:"cls"`
	Sep []json.RawMessage `json:"sep"`
}

type jsonConfig struct {
	AddBOS         *bool           `json:"add_bos_token"`
	AddEOS         *bool           `json:"add_eos_token"`
	BOS            json.RawMessage `json:"bos_token"`
	EOS            json.RawMessage `json:"eos_token"`
	TokenizerClass string          `json:"tokenizer_class"`
	CleanUp        *bool           `json:"clean_up_tokenization_spaces"`
}

func isNull(raw json.RawMessage) bool {
	s := strings.TrimSpace(string(raw))
	return s == "" || s == "null"
}

// tokenString decodes a tokenizer_config special token: a string, an
// AddedToken object {"content": ...}, or null.
func tokenString(raw json.RawMessage) (string, error) {
	if isNull(raw) {
		return "", nil
	}
	var s string
	if err := json.Unmarshal(raw, &s); err == nil {
		return s, nil
	}
	var obj struct {
		Content string `json:"content"`
	}
	if err := json.Unmarshal(raw, &obj); err != nil {
		return "", fmt.Errorf("bad special token %s", raw)
	}
	return obj.Content, nil
}

// Parse builds a Tokenizer from the contents of tokenizer.json and, optionally
// (nil allowed), tokenizer_config.json.
func Parse(tokenizerJSON []byte, tokenizerConfigJSON []byte) (*Tokenizer, error) {
	tj, rm, err := parseTokenizerJSON(string(tokenizerJSON))
	if err != nil {
		return nil, fmt.Errorf("tokenizer: parse tokenizer.json: %w", err)
	}
	t := &Tokenizer{}
	if t.model, err = newBPE(rm); err != nil {
		return nil, fmt.Errorf("tokenizer: model: %w", err)
	}

	// Vocabulary (model + added tokens).
	maxID := int32(-1)
	for _, id := range t.model.vocab {
		maxID = max(maxID, id)
	}
	t.addedByContent = make(map[string]int32, len(tj.AddedTokens))
	for _, a := range tj.AddedTokens {
		if a.ID < 0 {
			return nil, fmt.Errorf("tokenizer: added token %q has negative id", a.Content)
		}
		if a.Content == "" {
			return nil, fmt.Errorf("tokenizer: added token %d has empty content", a.ID)
		}
		maxID = max(maxID, a.ID)
		t.added = append(t.added, addedToken{id: a.ID, content: a.Content, special: a.Special,
			singleWord: a.SingleWord, lstrip: a.LStrip, rstrip: a.RStrip, normalized: a.Normalized})
		t.addedByContent[a.Content] = a.ID
	}
	t.vocabSize = int(maxID) + 1
	t.idToToken = make([]string, t.vocabSize)
	t.special = make([]bool, t.vocabSize)
	for s, id := range t.model.vocab {
		if id >= 0 {
			t.idToToken[id] = s
		}
	}
	for _, a := range t.added {
		t.idToToken[a.id] = a.content
		if a.special {
			t.special[a.id] = true
		}
	}

	if t.normalizers, err = parseNormalizer(tj.Normalizer); err != nil {
		return nil, fmt.Errorf("tokenizer: normalizer: %w", err)
	}
	if t.preSteps, t.byteLevel, err = parsePreTokenizer(tj.PreTokenizer); err != nil {
		return nil, fmt.Errorf("tokenizer: pre_tokenizer: %w", err)
	}
	if t.stages, err = parseDecoder(tj.Decoder); err != nil {
		return nil, fmt.Errorf("tokenizer: decoder: %w", err)
	}

	// Added-token matchers.
	var rawToks, normToks []addedToken
	for _, a := range t.added {
		if a.normalized {
			n := a
			n.content = t.normalize(a.content)
			if n.content != "" {
				normToks = append(normToks, n)
			}
		} else {
			rawToks = append(rawToks, a)
		}
	}
	t.rawMatcher = newAddedMatcher(rawToks)
	t.normMatcher = newAddedMatcher(normToks)

	// Post-processor and special tokens.
	prefix, suffix, err := t.parsePostProcessor(tj.PostProcessor)
	if err != nil {
		return nil, fmt.Errorf("tokenizer: post_processor: %w", err)
	}
	t.prefix, t.suffix = prefix, suffix
	if len(prefix) > 0 {
		t.bos, t.hasBOS = prefix[0], true
	}
	if len(tokenizerConfigJSON) > 0 {
		if err := t.applyConfig(tokenizerConfigJSON); err != nil {
			return nil, fmt.Errorf("tokenizer: tokenizer_config.json: %w", err)
		}
	}
	return t, nil
}

func (t *Tokenizer) applyConfig(data []byte) error {
	var c jsonConfig
	if err := json.Unmarshal(data, &c); err != nil {
		return err
	}
	bosStr, err := tokenString(c.BOS)
	if err != nil {
		return err
	}
	eosStr, err := tokenString(c.EOS)
	if err != nil {
		return err
	}
	hasBOS := false
	var bos int32
	if bosStr != "" {
		id, ok := t.TokenID(bosStr)
		if !ok {
			return fmt.Errorf("bos_token %q not in vocabulary", bosStr)
		}
		bos, hasBOS = id, true
		t.bos, t.hasBOS = id, true
	}
	var eos []int32
	if eosStr != "" {
		id, ok := t.TokenID(eosStr)
		if !ok {
			return fmt.Errorf("eos_token %q not in vocabulary", eosStr)
		}
		eos = []int32{id}
	}
	t.eos = eos
	t.cleanUp = c.CleanUp != nil && *c.CleanUp
	// Tokenizer classes whose fast implementation rebuilds the post-processor
	// from add_bos_token/add_eos_token (transformers update_post_processor).
	switch c.TokenizerClass {
	case "LlamaTokenizer", "LlamaTokenizerFast", "CodeLlamaTokenizer", "CodeLlamaTokenizerFast",
		"GemmaTokenizer", "GemmaTokenizerFast":
		addBOS := c.AddBOS == nil || *c.AddBOS
		addEOS := c.AddEOS != nil && *c.AddEOS
		t.prefix, t.suffix = nil, nil
		if addBOS {
			if !hasBOS {
				return errors.New("add_bos_token is set but bos_token is missing")
			}
			t.prefix = []int32{bos}
		}
		if addEOS {
			if len(eos) == 0 {
				return errors.New("add_eos_token is set but eos_token is missing")
			}
			t.suffix = []int32{eos[0]}
		}
	}
	return nil
}

func (t *Tokenizer) parsePostProcessor(raw json.RawMessage) (prefix, suffix []int32, err error) {
	if isNull(raw) {
		return nil, nil, nil
	}
	var n jsonNode
	if err := json.Unmarshal(raw, &n); err != nil {
		return nil, nil, err
	}
	switch n.Type {
	case "ByteLevel":
		return nil, nil, nil // only affects offsets
	case "Sequence":
		for _, p := range n.Processors {
			pre, suf, err := t.parsePostProcessor(p)
			if err != nil {
				return nil, nil, err
			}
			prefix = append(prefix, pre...)
			suffix = append(suffix, suf...)
		}
		return prefix, suffix, nil
	case "TemplateProcessing":
		seenSeq := false
		for _, it := range n.Single {
			switch {
			case it.Sequence != nil:
				if it.Sequence.ID != "A" || seenSeq {
					return nil, nil, fmt.Errorf("unsupported single template sequence %q", it.Sequence.ID)
				}
				seenSeq = true
			case it.SpecialToken != nil:
				st, ok := n.SpecialTokens[it.SpecialToken.ID]
				if !ok {
					return nil, nil, fmt.Errorf("template special token %q not declared", it.SpecialToken.ID)
				}
				if seenSeq {
					suffix = append(suffix, st.IDs...)
				} else {
					prefix = append(prefix, st.IDs...)
				}
			default:
				return nil, nil, errors.New("bad template item")
			}
		}
		return prefix, suffix, nil
	case "BertProcessing", "RobertaProcessing":
		cls, err := tupleID(n.Cls)
		if err != nil {
			return nil, nil, err
		}
		sep, err := tupleID(n.Sep)
		if err != nil {
			return nil, nil, err
		}
		return []int32{cls}, []int32{sep}, nil
	}
	return nil, nil, fmt.Errorf("unsupported post_processor type %q", n.Type)
}

func tupleID(raw []json.RawMessage) (int32, error) {
	if len(raw) != 2 {
		return 0, errors.New("bad [token, id] pair")
	}
	var id int32
	if err := json.Unmarshal(raw[1], &id); err != nil {
		return 0, err
	}
	return id, nil
}

// VocabSize returns the size of the id space (largest model or added token id + 1).
func (t *Tokenizer) VocabSize() int { return t.vocabSize }

// TokenID looks up the id of an exact token string (added tokens first, then the model vocabulary).
func (t *Tokenizer) TokenID(s string) (int32, bool) {
	if id, ok := t.addedByContent[s]; ok {
		return id, true
	}
	id, ok := t.model.vocab[s]
	return id, ok
}

// Token returns the token string of id ("" and false when id is unknown).
func (t *Tokenizer) Token(id int32) (string, bool) {
	if id < 0 || int(id) >= len(t.idToToken) || t.idToToken[id] == "" {
		return "", false
	}
	return t.idToToken[id], true
}

// IsSpecial reports whether id is an added token flagged special.
func (t *Tokenizer) IsSpecial(id int32) bool {
	return id >= 0 && int(id) < len(t.special) && t.special[id]
}

// BOS returns the beginning-of-sequence token (tokenizer_config bos_token, else
// the first special token of the post-processor template).
func (t *Tokenizer) BOS() (int32, bool) { return t.bos, t.hasBOS }

// EOS returns the end-of-sequence tokens from tokenizer_config eos_token (may be empty).
func (t *Tokenizer) EOS() []int32 { return append([]int32(nil), t.eos...) }

// CleanUpTokenizationSpaces reports tokenizer_config's
// clean_up_tokenization_spaces. Decode never applies it (it follows the
// tokenizers library, like streaming detokenizers do); callers that want
// transformers' decode() output can apply CleanUpSpaces to the result.
func (t *Tokenizer) CleanUpTokenizationSpaces() bool { return t.cleanUp }

// CleanUpSpaces applies transformers' clean_up_tokenization (" ." -> "." etc.).
func CleanUpSpaces(s string) string {
	for _, p := range [][2]string{{" .", "."}, {" ?", "?"}, {" !", "!"}, {" ,", ","}, {" ' ", "'"},
		{" n't", "n't"}, {" 'm", "'m"}, {" 's", "'s"}, {" 've", "'ve"}, {" 're", "'re"}} {
		s = strings.ReplaceAll(s, p[0], p[1])
	}
	return s
}

// Encode tokenizes text. Added tokens appearing literally in text are matched
// as single tokens. With addSpecial the post-processor's special tokens (e.g.
// BOS) are added.
func (t *Tokenizer) Encode(text string, addSpecial bool) []int32 {
	out := make([]int32, 0, len(text)/3+4)
	if addSpecial {
		out = append(out, t.prefix...)
	}
	var sc scratch
	t.rawMatcher.split(text, func(seg string, id int32) {
		if id >= 0 {
			out = append(out, id)
			return
		}
		norm := t.normalize(seg)
		t.normMatcher.split(norm, func(seg string, id int32) {
			if id >= 0 {
				out = append(out, id)
				return
			}
			out = t.encodeSegment(seg, out, &sc)
		})
	})
	if addSpecial {
		out = append(out, t.suffix...)
	}
	return out
}

// scratch holds per-Encode reusable buffers.
type scratch struct {
	syms   []symbol
	heap   []mergeItem
	mapped []byte
}

func (t *Tokenizer) encodeSegment(seg string, out []int32, sc *scratch) []int32 {
	if seg == "" {
		return out
	}
	t.pretokenize(0, seg, func(piece string) {
		if t.byteLevel {
			sc.mapped = appendByteLevel(sc.mapped[:0], piece)
			out = t.model.tokenize(sc.mapped, out, sc)
		} else {
			out = t.model.tokenize([]byte(piece), out, sc)
		}
	})
	return out
}

// Decode converts ids back to text like the Hugging Face decoder. Unknown ids
// are ignored; with skipSpecial, special added tokens are dropped.
func (t *Tokenizer) Decode(ids []int32, skipSpecial bool) string {
	d := t.NewDecoder(skipSpecial)
	for _, id := range ids {
		d.push(id)
	}
	d.finish(0)
	return d.out.String()
}
