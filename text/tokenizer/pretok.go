package tokenizer

import (
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
	"unicode"
	"unicode/utf8"

	"golang.org/x/text/unicode/norm"
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
