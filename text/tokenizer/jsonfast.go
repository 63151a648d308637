package tokenizer

import (
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"unicode/utf16"
	"unicode/utf8"
)

// A small hand-written JSON reader for the two big members of tokenizer.json
// (model.vocab and model.merges: ~400k strings for Llama 3). encoding/json is
// used for everything else, on a document rebuilt without those members.

type lexer struct {
	s   string
	i   int
	err error
}

func (l *lexer) fail(format string, args ...any) {
	if l.err == nil {
		l.err = fmt.Errorf("json offset %d: %s", l.i, fmt.Sprintf(format, args...))
	}
	l.i = len(l.s)
}

func (l *lexer) ws() {
	for l.i < len(l.s) {
		switch l.s[l.i] {
		case ' ', '\t', '\n', '\r':
			l.i++
		default:
			return
		}
	}
}

// peek skips whitespace and returns the next byte (0 at end or on error).
func (l *lexer) peek() byte {
	l.ws()
	if l.i >= len(l.s) {
		return 0
	}
	return l.s[l.i]
}

func (l *lexer) expect(c byte) {
	if l.peek() != c {
		l.fail("expected %q", c)
		return
	}
	l.i++
}

// str reads a JSON string. Strings without escapes are returned as substrings.
func (l *lexer) str() string {
	if l.peek() != '"' {
		l.fail("expected string")
		return ""
	}
	l.i++
	start := l.i
	for l.i < len(l.s) {
		c := l.s[l.i]
		if c == '"' {
			s := l.s[start:l.i]
			l.i++
			return s
		}
		if c == '\\' {
			return l.strSlow(start)
		}
		if c < 0x20 {
			l.fail("control character in string")
			return ""
		}
		l.i++
	}
	l.fail("unterminated string")
	return ""
}

func (l *lexer) strSlow(start int) string {
	var b strings.Builder
	b.WriteString(l.s[start:l.i])
	for l.i < len(l.s) {
		c := l.s[l.i]
		switch {
		case c == '"':
			l.i++
			return b.String()
		case c < 0x20:
			l.fail("control character in string")
			return ""
		case c != '\\':
			b.WriteByte(c)
			l.i++
			continue
		}
		if l.i+1 >= len(l.s) {
			break
		}
		e := l.s[l.i+1]
		l.i += 2
		switch e {
		case '"', '\\', '/':
			b.WriteByte(e)
		case 'b':
			b.WriteByte('\b')
		case 'f':
			b.WriteByte('\f')
		case 'n':
			b.WriteByte('\n')
		case 'r':
			b.WriteByte('\r')
		case 't':
			b.WriteByte('\t')
		case 'u':
			r := l.hex4()
			if utf16.IsSurrogate(r) {
				r2 := rune(-1)
				if l.i+1 < len(l.s) && l.s[l.i] == '\\' && l.s[l.i+1] == 'u' {
					save := l.i
					l.i += 2
					r2 = l.hex4()
					if d := utf16.DecodeRune(r, r2); d != utf8.RuneError {
						r = d
					} else {
						l.i = save
						r = utf8.RuneError
					}
				} else {
					r = utf8.RuneError
				}
			}
			b.WriteRune(r)
		default:
			l.fail("bad escape")
			return ""
		}
	}
	l.fail("unterminated string")
	return ""
}

func (l *lexer) hex4() rune {
	if l.i+4 > len(l.s) {
		l.fail("bad \\u escape")
		return 0
	}
	v, err := strconv.ParseUint(l.s[l.i:l.i+4], 16, 32)
	if err != nil {
		l.fail("bad \\u escape")
		return 0
	}
	l.i += 4
	return rune(v)
}

func (l *lexer) integer() int64 {
	l.ws()
	start := l.i
	if l.i < len(l.s) && l.s[l.i] == '-' {
		l.i++
	}
	for l.i < len(l.s) && l.s[l.i] >= '0' && l.s[l.i] <= '9' {
		l.i++
	}
	v, err := strconv.ParseInt(l.s[start:l.i], 10, 64)
	if err != nil {
		l.fail("expected integer")
	}
	return v
}

// skip skips one JSON value and returns its raw text.
func (l *lexer) skip() string {
	l.ws()
	start := l.i
	depth := 0
	for l.i < len(l.s) {
		c := l.s[l.i]
		switch c {
		case '"':
			l.str()
		case '{', '[':
			depth++
			l.i++
		case '}', ']':
			if depth == 0 {
				return l.s[start:l.i]
			}
			depth--
			l.i++
		case ',':
			if depth == 0 {
				return l.s[start:l.i]
			}
			l.i++
		default:
			l.i++
		}
		if depth == 0 && (c == '"' || c == '}' || c == ']') {
			return l.s[start:l.i]
		}
	}
	if depth != 0 {
		l.fail("unterminated value")
	}
	return l.s[start:l.i]
}

// object iterates the members of a JSON object, calling member with the
// lexer positioned at the value; member must consume the value.
func (l *lexer) object(member func(key string)) {
	l.expect('{')
	if l.peek() == '}' {
		l.i++
		return
	}
	for l.err == nil {
		k := l.str()
		l.expect(':')
		if l.err != nil {
			return
		}
		member(k)
		switch l.peek() {
		case ',':
			l.i++
		case '}':
			l.i++
			return
		default:
			l.fail("expected , or }")
		}
	}
}

func (l *lexer) array(elem func()) {
	l.expect('[')
	if l.peek() == ']' {
		l.i++
		return
	}
	for l.err == nil {
		elem()
		switch l.peek() {
		case ',':
			l.i++
		case ']':
			l.i++
			return
		default:
			l.fail("expected , or ]")
		}
	}
}

type rawModel struct {
	rest     jsonModel
	vocabK   []string
	vocabV   []int32
	hasVocab bool
	merges   [][2]string
}

// parseTokenizerJSON decodes tokenizer.json. The strings in the returned
// model reference doc; the caller copies what it keeps.
func parseTokenizerJSON(doc string) (*jsonTokenizer, *rawModel, error) {
	l := &lexer{s: doc}
	var rest, modelRest strings.Builder
	rest.WriteByte('{')
	m := &rawModel{}
	seenModel := false
	l.object(func(key string) {
		if key != "model" {
			if rest.Len() > 1 {
				rest.WriteByte(',')
			}
			rest.WriteString(strconv.Quote(key))
			rest.WriteByte(':')
			rest.WriteString(l.skip())
			return
		}
		seenModel = true
		modelRest.WriteByte('{')
		l.object(func(key string) {
			switch key {
			case "vocab":
				if l.peek() == 'n' { // null
					l.skip()
					return
				}
				m.hasVocab = true
				m.vocabK = make([]string, 0, len(l.s)/64)
				m.vocabV = make([]int32, 0, len(l.s)/64)
				l.object(func(tok string) {
					id := l.integer()
					if id < 0 || id > 1<<31-1 {
						l.fail("token id %d out of range", id)
					}
					m.vocabK = append(m.vocabK, tok)
					m.vocabV = append(m.vocabV, int32(id))
				})
			case "merges":
				if l.peek() == 'n' {
					l.skip()
					return
				}
				m.merges = make([][2]string, 0, len(l.s)/32)
				l.array(func() {
					switch l.peek() {
					case '"':
						s := l.str()
						a, b, ok := strings.Cut(s, " ")
						if !ok || strings.Contains(b, " ") {
							l.fail("bad merge %q (want exactly two space-separated tokens)", s)
						}
						m.merges = append(m.merges, [2]string{a, b})
					case '[':
						var p [2]string
						n := 0
						l.array(func() {
							s := l.str()
							if n < 2 {
								p[n] = s
							}
							n++
						})
						if n != 2 {
							l.fail("bad merge: want a pair of tokens")
						}
						m.merges = append(m.merges, p)
					default:
						l.fail("bad merge")
					}
				})
			default:
				if modelRest.Len() > 1 {
					modelRest.WriteByte(',')
				}
				modelRest.WriteString(strconv.Quote(key))
				modelRest.WriteByte(':')
				modelRest.WriteString(l.skip())
			}
		})
		modelRest.WriteByte('}')
	})
	if l.err == nil && l.peek() != 0 {
		l.fail("trailing data")
	}
	if l.err != nil {
		return nil, nil, l.err
	}
	if !seenModel {
		return nil, nil, errors.New("no model")
	}
	rest.WriteByte('}')
	var tj jsonTokenizer
	if err := json.Unmarshal([]byte(rest.String()), &tj); err != nil {
		return nil, nil, err
	}
	if err := json.Unmarshal([]byte(modelRest.String()), &m.rest); err != nil {
		return nil, nil, fmt.Errorf("model: %w", err)
	}
	return &tj, m, nil
}
