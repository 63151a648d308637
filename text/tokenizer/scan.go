package tokenizer

import (
	"fmt"
	"strings"
	"unicode"
	"unicode/utf8"
)

// The pre-tokenizers' split patterns, matched by hand: Llama 3, Qwen 2,
// Tekken and GPT-2 (scannerFor), and the character classes they use.

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
