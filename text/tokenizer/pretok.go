package tokenizer

import (
	"encoding/json"
	"errors"
	"fmt"
	"golang.org/x/text/unicode/norm"
	"sort"
	"strings"
	"unicode"
	"unicode/utf8"
)

// ---- normalizers ----

type normalizer struct {
	prepend  string    // Prepend: prepended when the string is non-empty
	from, to string    // Replace (string pattern)
	form     norm.Form // NFC, NFD, NFKC, NFKD (with unicode set)
	unicode  bool
}

func parseNormalizer(raw json.RawMessage) ([]normalizer, error) {
	if isNull(raw) {
		return nil, nil
	}
	var n jsonNode
	if err := json.Unmarshal(raw, &n); err != nil {
		return nil, err
	}
	switch n.Type {
	case "Sequence":
		var out []normalizer
		for _, c := range n.Normalizers {
			s, err := parseNormalizer(c)
			if err != nil {
				return nil, err
			}
			out = append(out, s...)
		}
		return out, nil
	case "Prepend":
		return []normalizer{{prepend: n.Prepend}}, nil
	case "NFC":
		return []normalizer{{form: norm.NFC, unicode: true}}, nil
	case "NFD":
		return []normalizer{{form: norm.NFD, unicode: true}}, nil
	case "NFKC":
		return []normalizer{{form: norm.NFKC, unicode: true}}, nil
	case "NFKD":
		return []normalizer{{form: norm.NFKD, unicode: true}}, nil
	case "Replace":
		if n.Pattern == nil || n.Pattern.String == nil {
			return nil, errors.New("unsupported Replace normalizer: only string patterns are supported")
		}
		if *n.Pattern.String == "" {
			return nil, errors.New("tokenizer: a Replace normalizer has an empty pattern")
		}
		return []normalizer{{from: *n.Pattern.String, to: n.Content}}, nil
	}
	return nil, fmt.Errorf("unsupported normalizer type %q", n.Type)
}

func (t *Tokenizer) normalize(s string) string {
	for _, n := range t.normalizers {
		if n.unicode {
			s = n.form.String(s)
		} else if n.from != "" {
			s = strings.ReplaceAll(s, n.from, n.to)
		} else if s != "" {
			s = n.prepend + s
		}
	}
	return s
}

// ---- added tokens ----

type addedMatcher struct {
	toks   []addedToken
	first  [256]bool          // some token starts with this byte
	single [256][]int32       // one-byte tokens
	multi  map[uint16][]int32 // tokens of 2+ bytes by their first two bytes, longest first
}

func newAddedMatcher(toks []addedToken) *addedMatcher {
	if len(toks) == 0 {
		return nil
	}
	m := &addedMatcher{toks: toks, multi: map[uint16][]int32{}}
	for i, tk := range toks {
		c := tk.content
		m.first[c[0]] = true
		if len(c) == 1 {
			m.single[c[0]] = append(m.single[c[0]], int32(i))
		} else {
			k := uint16(c[0])<<8 | uint16(c[1])
			m.multi[k] = append(m.multi[k], int32(i))
		}
	}
	for _, l := range m.multi {
		sort.SliceStable(l, func(i, j int) bool { return len(toks[l[i]].content) > len(toks[l[j]].content) })
	}
	return m
}

// longest returns the index of the longest token that is a prefix of s, or -1.
func (m *addedMatcher) longest(s string) int32 {
	if !m.first[s[0]] {
		return -1
	}
	if len(s) >= 2 {
		for _, ci := range m.multi[uint16(s[0])<<8|uint16(s[1])] {
			if strings.HasPrefix(s, m.toks[ci].content) {
				return ci
			}
		}
	}
	if l := m.single[s[0]]; len(l) > 0 {
		return l[0]
	}
	return -1
}

// isWordChar matches Rust regex's Unicode \w (Alphabetic, Mark,
// Decimal_Number, Connector_Punctuation, Join_Control), used by tokenizers for
// single_word added tokens.
func isWordChar(r rune) bool {
	return unicode.IsLetter(r) || unicode.IsMark(r) || unicode.Is(unicode.Nd, r) || unicode.Is(unicode.Pc, r) ||
		unicode.Is(unicode.Nl, r) || unicode.Is(unicode.Other_Alphabetic, r) || r == 0x200C || r == 0x200D
}

// split calls fn for each segment of s in order: plain text segments with
// id -1, and matched added tokens with their id (seg is then the matched
// text, including stripped whitespace). Matching is leftmost-longest like the
// Aho-Corasick automaton in tokenizers' AddedVocabulary.
func (m *addedMatcher) split(s string, fn func(seg string, id int32)) {
	if m == nil {
		if s != "" {
			fn(s, -1)
		}
		return
	}
	start := 0
	for i := 0; i < len(s); {
		found := m.longest(s[i:])
		if found < 0 {
			i++
			continue
		}
		tk := &m.toks[found]
		ms, me := i, i+len(tk.content)
		if tk.singleWord {
			startOK := ms == 0
			if !startOK {
				r, _ := utf8.DecodeLastRuneInString(s[:ms])
				startOK = !isWordChar(r)
			}
			stopOK := me == len(s)
			if !stopOK {
				r, _ := utf8.DecodeRuneInString(s[me:])
				stopOK = !isWordChar(r)
			}
			if !startOK || !stopOK {
				i = me
				continue
			}
		}
		if tk.lstrip {
			ns := len(strings.TrimRightFunc(s[:ms], unicode.IsSpace))
			ms = max(ns, start)
		}
		if tk.rstrip {
			me = len(s) - len(strings.TrimLeftFunc(s[me:], unicode.IsSpace))
		}
		if start < ms {
			fn(s[start:ms], -1)
		}
		fn(s[ms:me], tk.id)
		start, i = me, me
	}
	if start < len(s) {
		fn(s[start:], -1)
	}
}

// ---- pre-tokenizers ----

type scanKind uint8

const (
	scanLlama3 scanKind = iota // Llama 3 / Qwen 2 style
	scanGPT2
	scanTekken // Mistral's Tekken (Mistral NeMo and later): case-aware words
)

// scanner is a hand-written matcher for one of the known pre-tokenizer
// regexes; it reproduces the leftmost-first backtracking semantics of the
// regex (including the \s+(?!\S) lookahead).
type scanner struct {
	kind      scanKind
	maxDigits int // \p{N}{1,maxDigits}
}

const (
	patLlama3 = `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
	patQwen2  = `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
	patGPT2   = `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
	patTekken = `[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+`
)

func scannerFor(pattern string) (*scanner, error) {
	switch pattern {
	case patLlama3:
		return &scanner{kind: scanLlama3, maxDigits: 3}, nil
	case patQwen2:
		return &scanner{kind: scanLlama3, maxDigits: 1}, nil
	case patGPT2:
		return &scanner{kind: scanGPT2}, nil
	case patTekken:
		return &scanner{kind: scanTekken, maxDigits: 1}, nil
	}
	return nil, fmt.Errorf("unsupported pre-tokenizer pattern %q (supported: the Llama 3, Qwen 2, Tekken and GPT-2 patterns)", pattern)
}

// preStep is one pre-tokenization step: a regex split (Isolated) or ByteLevel.
type preStep struct {
	split          *scanner
	byteLevel      bool
	addPrefixSpace bool
}

func parsePreTokenizer(raw json.RawMessage) (steps []preStep, byteLevel bool, err error) {
	if isNull(raw) {
		return nil, false, nil
	}
	var n jsonNode
	if err := json.Unmarshal(raw, &n); err != nil {
		return nil, false, err
	}
	switch n.Type {
	case "Sequence":
		for _, c := range n.Pretokenizers {
			s, bl, err := parsePreTokenizer(c)
			if err != nil {
				return nil, false, err
			}
			if byteLevel && len(s) > 0 {
				return nil, false, errors.New("unsupported pre-tokenizer after ByteLevel")
			}
			steps = append(steps, s...)
			byteLevel = byteLevel || bl
		}
		return steps, byteLevel, nil
	case "Split":
		if n.Pattern == nil || n.Pattern.Regex == nil {
			return nil, false, errors.New("unsupported Split pre-tokenizer: only regex patterns are supported")
		}
		if n.Behavior != "Isolated" || n.Invert {
			return nil, false, fmt.Errorf("unsupported Split behavior %q (invert %v): only Isolated, not inverted", n.Behavior, n.Invert)
		}
		sc, err := scannerFor(*n.Pattern.Regex)
		if err != nil {
			return nil, false, err
		}
		return []preStep{{split: sc}}, false, nil
	case "ByteLevel":
		aps := n.AddPrefixSpace == nil || *n.AddPrefixSpace
		useRegex := n.UseRegex == nil || *n.UseRegex
		st := preStep{byteLevel: true, addPrefixSpace: aps}
		if useRegex {
			st.split = &scanner{kind: scanGPT2}
		}
		return []preStep{st}, true, nil
	}
	return nil, false, fmt.Errorf("unsupported pre_tokenizer type %q", n.Type)
}

// pretokenize runs steps[i:] on s and calls fn for each resulting piece.
func (t *Tokenizer) pretokenize(i int, s string, fn func(string)) {
	if s == "" {
		return
	}
	if i == len(t.preSteps) {
		fn(s)
		return
	}
	st := &t.preSteps[i]
	if st.byteLevel && st.addPrefixSpace && !strings.HasPrefix(s, " ") {
		s = " " + s
	}
	if st.split == nil {
		t.pretokenize(i+1, s, fn)
		return
	}
	for p := 0; p < len(s); {
		e := st.split.match(s, p)
		t.pretokenize(i+1, s[p:e], fn)
		p = e
	}
}

// Character classes (Unicode general categories as used by Oniguruma).
func isL(r rune) bool {
	if r < utf8.RuneSelf {
		return 'a' <= r && r <= 'z' || 'A' <= r && r <= 'Z'
	}
	return unicode.IsLetter(r)
}

func isN(r rune) bool {
	if r < utf8.RuneSelf {
		return '0' <= r && r <= '9'
	}
	return unicode.IsNumber(r)
}

func isS(r rune) bool {
	if r < utf8.RuneSelf {
		return r == ' ' || '\t' <= r && r <= '\r'
	}
	return unicode.IsSpace(r)
}

func isP(r rune) bool { return !isS(r) && !isL(r) && !isN(r) }

func decodeAt(s string, i int) (rune, int) {
	if c := s[i]; c < utf8.RuneSelf {
		return rune(c), 1
	}
	return utf8.DecodeRuneInString(s[i:])
}

func scanWhile(s string, i int, class func(rune) bool) int {
	for i < len(s) {
		r, w := decodeAt(s, i)
		if !class(r) {
			break
		}
		i += w
	}
	return i
}

func foldCI(r rune) rune {
	switch {
	case 'A' <= r && r <= 'Z':
		return r + 'a' - 'A'
	case r == 0x017F: // LATIN SMALL LETTER LONG S case-folds to 's'
		return 's'
	case r == 0x212A: // KELVIN SIGN case-folds to 'k'
		return 'k'
	}
	return r
}

// contraction matches 's|'t|'re|'ve|'m|'ll|'d after the apostrophe at i-1.
func contraction(s string, i int, ci bool) int {
	if i >= len(s) {
		return 0
	}
	r1, w1 := decodeAt(s, i)
	if ci {
		r1 = foldCI(r1)
	}
	var want rune
	switch r1 {
	case 's', 't', 'm', 'd':
		return i + w1
	case 'r', 'v':
		want = 'e'
	case 'l':
		want = 'l'
	default:
		return 0
	}
	j := i + w1
	if j >= len(s) {
		return 0
	}
	r2, w2 := decodeAt(s, j)
	if ci {
		r2 = foldCI(r2)
	}
	if r2 == want {
		return j + w2
	}
	return 0
}

// match returns the end of the regex match starting at p (p < len(s)). The
// supported patterns match every non-empty input at every position.
func (sc *scanner) match(s string, p int) int {
	r0, w0 := decodeAt(s, p)
	if sc.kind == scanTekken {
		if e := tekkenWord(s, p, r0, w0); e > 0 {
			return e
		}
		if isN(r0) { // \p{N}
			return p + w0
		}
		//  ?[^\s\p{L}\p{N}]+[\r\n/]*
		if e := punctuation(s, p, r0, "\r\n/"); e > 0 {
			return e
		}
		return sc.spaces(s, p, r0, w0)
	}
	if r0 == '\'' {
		if e := contraction(s, p+w0, sc.kind == scanLlama3); e > 0 {
			return e
		}
	}
	if sc.kind == scanLlama3 {
		// [^\r\n\p{L}\p{N}]?\p{L}+
		if isL(r0) {
			return scanWhile(s, p+w0, isL)
		}
		if r0 != '\r' && r0 != '\n' && !isN(r0) && p+w0 < len(s) {
			if r1, w1 := decodeAt(s, p+w0); isL(r1) {
				return scanWhile(s, p+w0+w1, isL)
			}
		}
		// \p{N}{1,n}
		if isN(r0) {
			e, n := p+w0, 1
			for n < sc.maxDigits && e < len(s) {
				r, w := decodeAt(s, e)
				if !isN(r) {
					break
				}
				e += w
				n++
			}
			return e
		}
		//  ?[^\s\p{L}\p{N}]+[\r\n]*
		if e := punctuation(s, p, r0, "\r\n"); e > 0 {
			return e
		}
	} else {
		//  ?\p{L}+ |  ?\p{N}+ |  ?[^\s\p{L}\p{N}]+
		q := p
		if r0 == ' ' {
			q = p + 1
		}
		if q < len(s) {
			r, _ := decodeAt(s, q)
			switch {
			case isL(r):
				return scanWhile(s, q, isL)
			case isN(r):
				return scanWhile(s, q, isN)
			case isP(r):
				return scanWhile(s, q, isP)
			}
		}
	}
	return sc.spaces(s, p, r0, w0)
}

// punctuation matches " ?[^\s\p{L}\p{N}]+[trail]*" at p (trail: ASCII
// bytes), or returns 0.
func punctuation(s string, p int, r0 rune, trail string) int {
	q := p
	if r0 == ' ' {
		q = p + 1
	}
	if q >= len(s) {
		return 0
	}
	if r, _ := decodeAt(s, q); !isP(r) {
		return 0
	}
	e := scanWhile(s, q, isP)
	for e < len(s) && strings.IndexByte(trail, s[e]) >= 0 {
		e++
	}
	return e
}

// spaces matches the whitespace alternatives: \s*[\r\n]+ (Llama 3, Qwen 2,
// Tekken), \s+(?!\S), \s+.
func (sc *scanner) spaces(s string, p int, r0 rune, w0 int) int {
	if isS(r0) {
		e, last, lastNL := p, p, -1
		for e < len(s) {
			r, w := decodeAt(s, e)
			if !isS(r) {
				break
			}
			if r == '\r' || r == '\n' {
				lastNL = e
			}
			last = e
			e += w
		}
		// \s*[\r\n]+ : backtracks to the last CR/LF of the whitespace run.
		if sc.kind != scanGPT2 && lastNL >= 0 {
			return lastNL + 1
		}
		// \s+(?!\S) : whole run at end of input, else the run minus its last char.
		if e == len(s) {
			return e
		}
		if last > p {
			return last
		}
		// \s+
		return e
	}
	return p + w0 // not reachable: every rune is \s, \p{L}, \p{N} or the complement
}

// Tekken's letter classes: "upper-ish" [\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}] and
// "lower-ish" [\p{Ll}\p{Lm}\p{Lo}\p{M}] (they share Lm, Lo and marks).
func isUpperish(r rune) bool {
	if r < utf8.RuneSelf {
		return 'A' <= r && r <= 'Z'
	}
	return unicode.In(r, unicode.Lu, unicode.Lt, unicode.Lm, unicode.Lo, unicode.M)
}

func isLowerish(r rune) bool {
	if r < utf8.RuneSelf {
		return 'a' <= r && r <= 'z'
	}
	return unicode.In(r, unicode.Ll, unicode.Lm, unicode.Lo, unicode.M)
}

// tekkenWord matches Tekken's two word alternatives at p, in the regex's
// order with its backtracking:
//
//	X?U*L+ | X?U+L*   (X = [^\r\n\p{L}\p{N}], U upper-ish, L lower-ish)
//
// and returns the match's end, or 0 when neither matches.
func tekkenWord(s string, p int, r0 rune, w0 int) int {
	prefixed := r0 != '\r' && r0 != '\n' && !isL(r0) && !isN(r0)
	starts := []int{p}
	if prefixed && p+w0 < len(s) {
		starts = []int{p + w0, p} // X? is greedy: with the prefix first
	}
	for _, j := range starts { // U*L+
		if e := upperThenLower(s, j); e > 0 {
			return e
		}
	}
	for _, j := range starts { // U+L*
		if j < len(s) {
			if r, _ := decodeAt(s, j); isUpperish(r) {
				return scanWhile(s, scanWhile(s, j, isUpperish), isLowerish)
			}
		}
	}
	return 0
}

// upperThenLower matches U*L+ at j: U* takes all it can and gives back
// one rune at a time until L+ matches.
func upperThenLower(s string, j int) int {
	var bounds []int // rune starts of the U run, to give back from the end
	u := j
	for u < len(s) {
		r, w := decodeAt(s, u)
		if !isUpperish(r) {
			break
		}
		bounds = append(bounds, u)
		u += w
	}
	if e := scanWhile(s, u, isLowerish); e > u {
		return e
	}
	for k := len(bounds) - 1; k >= 0; k-- {
		if r, _ := decodeAt(s, bounds[k]); isLowerish(r) {
			return scanWhile(s, bounds[k], isLowerish)
		}
	}
	return 0
}

// ---- byte-level mapping (GPT-2 bytes_to_unicode) ----

var byteToRune, runeToByte = func() ([256]rune, [324]int16) {
	var b2r [256]rune
	var r2b [324]int16
	for i := range r2b {
		r2b[i] = -1
	}
	n := 0
	for b := 0; b < 256; b++ {
		if ('!' <= b && b <= '~') || (0xA1 <= b && b <= 0xAC) || (0xAE <= b && b <= 0xFF) {
			b2r[b] = rune(b)
		} else {
			b2r[b] = rune(256 + n)
			n++
		}
		r2b[b2r[b]] = int16(b)
	}
	return b2r, r2b
}()

func appendByteLevel(dst []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		dst = utf8.AppendRune(dst, byteToRune[s[i]])
	}
	return dst
}
