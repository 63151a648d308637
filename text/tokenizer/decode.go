package tokenizer

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"
)

type stageKind uint8

const (
	stReplace stageKind = iota
	stByteFallback
	stFuse
	stStrip
	stMetaspace
	stByteLevel
	stJoinSpace // no decoder: tokens joined with " "
)

// stage is one decoder of the pipeline. Stages before a Fuse/ByteLevel see
// whole tokens; later stages ("fused") see successive chunks of the single
// fused token, which lets the pipeline run incrementally.
type stage struct {
	kind        stageKind
	fused       bool
	from, to    string // Replace
	content     rune   // Strip
	start, stop int    // Strip
	rep         string // Metaspace replacement
	stripFirst  bool   // Metaspace: prepend_scheme != never
}

func parseDecoder(raw json.RawMessage) ([]stage, error) {
	if isNull(raw) {
		return []stage{{kind: stJoinSpace}}, nil
	}
	var flat []jsonNode
	var walk func(raw json.RawMessage) error
	walk = func(raw json.RawMessage) error {
		var n jsonNode
		if err := json.Unmarshal(raw, &n); err != nil {
			return err
		}
		if n.Type == "Sequence" {
			for _, d := range n.Decoders {
				if err := walk(d); err != nil {
					return err
				}
			}
			return nil
		}
		flat = append(flat, n)
		return nil
	}
	if err := walk(raw); err != nil {
		return nil, err
	}
	var out []stage
	fused := false
	for _, n := range flat {
		st := stage{fused: fused}
		switch n.Type {
		case "Replace":
			if n.Pattern == nil || n.Pattern.String == nil || *n.Pattern.String == "" {
				return nil, errors.New("unsupported Replace decoder: only non-empty string patterns are supported")
			}
			st.kind, st.from, st.to = stReplace, *n.Pattern.String, n.Content
			if fused && utf8.RuneCountInString(st.from) != 1 {
				return nil, errors.New("unsupported decoder: multi-character Replace after Fuse")
			}
		case "ByteFallback":
			if fused {
				return nil, errors.New("unsupported decoder: ByteFallback after Fuse/ByteLevel")
			}
			st.kind = stByteFallback
		case "Fuse":
			st.kind = stFuse
			fused = true
		case "Strip":
			r, w := utf8.DecodeRuneInString(n.Content)
			if w == 0 || w != len(n.Content) {
				return nil, fmt.Errorf("bad Strip content %q", n.Content)
			}
			if n.Start < 0 || n.Stop < 0 {
				return nil, errors.New("bad Strip decoder")
			}
			st.kind, st.content, st.start, st.stop = stStrip, r, n.Start, n.Stop
		case "Metaspace":
			rep := n.Replacement
			if utf8.RuneCountInString(rep) != 1 {
				return nil, fmt.Errorf("bad Metaspace replacement %q", rep)
			}
			st.kind, st.rep = stMetaspace, rep
			switch n.PrependScheme {
			case "":
				st.stripFirst = n.AddPrefixSpace == nil || *n.AddPrefixSpace
			case "always", "first":
				st.stripFirst = true
			case "never":
			default:
				return nil, fmt.Errorf("bad Metaspace prepend_scheme %q", n.PrependScheme)
			}
		case "ByteLevel":
			if fused {
				return nil, errors.New("unsupported decoder: ByteLevel after Fuse")
			}
			st.kind = stByteLevel
			fused = true
		default:
			return nil, fmt.Errorf("unsupported decoder type %q", n.Type)
		}
		out = append(out, st)
	}
	return out, nil
}

// byteToken parses "<0xXX>" like tokenizers' ByteFallback decoder
// (u8::from_str_radix, which also accepts a leading '+').
func byteToken(s string) (byte, bool) {
	if len(s) != 6 || s[:3] != "<0x" || s[5] != '>' {
		return 0, false
	}
	v := 0
	for i, c := range []byte(s[3:5]) {
		var d int
		switch {
		case c == '+' && i == 0:
			continue
		case '0' <= c && c <= '9':
			d = int(c - '0')
		case 'a' <= c && c <= 'f':
			d = int(c-'a') + 10
		case 'A' <= c && c <= 'F':
			d = int(c-'A') + 10
		default:
			return 0, false
		}
		v = v*16 + d
	}
	return byte(v), true
}

// utf8Seq classifies the UTF-8 sequence at the start of b (len(b) > 0):
// n bytes form a valid char (ok), an invalid maximal subpart (!ok), or an
// incomplete but so far valid prefix that reaches the end of b (incomplete).
func utf8Seq(b []byte) (n int, ok, incomplete bool) {
	c := b[0]
	if c < 0x80 {
		return 1, true, false
	}
	need := 0
	lo, hi := byte(0x80), byte(0xBF)
	switch {
	case 0xC2 <= c && c <= 0xDF:
		need = 1
	case c == 0xE0:
		need, lo = 2, 0xA0
	case 0xE1 <= c && c <= 0xEC, c == 0xEE, c == 0xEF:
		need = 2
	case c == 0xED:
		need, hi = 2, 0x9F
	case c == 0xF0:
		need, lo = 3, 0x90
	case 0xF1 <= c && c <= 0xF3:
		need = 3
	case c == 0xF4:
		need, hi = 3, 0x8F
	default:
		return 1, false, false
	}
	for i := 1; i <= need; i++ {
		if i >= len(b) {
			return i, false, true
		}
		if b[i] < lo || b[i] > hi {
			return i, false, false
		}
		lo, hi = 0x80, 0xBF
	}
	return need + 1, true, false
}

// appendLossy appends b converted like Rust's String::from_utf8_lossy (one
// U+FFFD per maximal invalid subpart). Unless final, a trailing incomplete
// sequence is left unconsumed; the number of consumed bytes is returned.
func appendLossy(dst *strings.Builder, b []byte, final bool) int {
	i := 0
	for i < len(b) {
		n, ok, inc := utf8Seq(b[i:])
		if inc && !final {
			break
		}
		if ok {
			dst.Write(b[i : i+n])
		} else {
			dst.WriteString("\uFFFD")
		}
		i += n
	}
	return i
}

// StreamDecoder decodes ids incrementally. The concatenation of all Add
// results and Flush equals Tokenizer.Decode of all ids; incomplete UTF-8
// sequences are held back until they complete or are proven invalid.
type StreamDecoder struct {
	t    *Tokenizer
	skip bool
	raw  bool // PeekBytes: bytes as they are, nothing held back
	st   []stageState
	out  strings.Builder
	tmp  strings.Builder
	peek *StreamDecoder // scratch copy for Peek and PeekBytes
}

type stageState struct {
	pending   []byte // ByteFallback run / ByteLevel bytes
	startLeft int    // Strip: leading chars still to examine
	held      string // Strip: trailing content chars held back
	notFirst  bool   // Metaspace / JoinSpace
	shown     int    // ByteFallback/ByteLevel: pending bytes of the context, already shown as U+FFFD (NewDecoderAfter)
}

// NewDecoder returns a streaming decoder. With skipSpecial, special added tokens are dropped.
func (t *Tokenizer) NewDecoder(skipSpecial bool) *StreamDecoder {
	d := &StreamDecoder{t: t, skip: skipSpecial, st: make([]stageState, len(t.stages))}
	for i, s := range t.stages {
		if s.kind == stStrip {
			d.st[i].startLeft = s.start
		}
	}
	return d
}

// Add feeds one id and returns the newly completed text.
func (d *StreamDecoder) Add(id int32) string {
	d.push(id)
	s := d.out.String()
	d.out.Reset()
	return s
}

// Flush ends the stream and returns any remaining text (incomplete byte
// sequences become U+FFFD). The decoder is reset and can be reused.
func (d *StreamDecoder) Flush() string {
	d.finish(0)
	s := d.out.String()
	d.out.Reset()
	for i := range d.st {
		d.st[i] = stageState{}
		if d.t.stages[i].kind == stStrip {
			d.st[i].startLeft = d.t.stages[i].start
		}
	}
	return s
}

func (d *StreamDecoder) push(id int32) {
	t := d.t
	if id < 0 || int(id) >= len(t.idToToken) {
		return
	}
	tok := t.idToToken[id]
	if tok == "" || (d.skip && t.special[id]) {
		return
	}
	d.emit(0, tok)
}

func (d *StreamDecoder) emit(i int, s string) {
	if i == len(d.t.stages) {
		d.out.WriteString(s)
		return
	}
	sp, ss := &d.t.stages[i], &d.st[i]
	switch sp.kind {
	case stReplace:
		d.emit(i+1, strings.ReplaceAll(s, sp.from, sp.to))
	case stFuse:
		d.emit(i+1, s)
	case stJoinSpace:
		if ss.notFirst {
			s = " " + s
		}
		ss.notFirst = true
		d.emit(i+1, s)
	case stByteFallback:
		if b, ok := byteToken(s); ok {
			if d.raw {
				d.emit(i+1, string([]byte{b}))
				return
			}
			ss.pending = append(ss.pending, b)
			return
		}
		d.flushByteRun(i)
		d.emit(i+1, s)
	case stMetaspace:
		first := !ss.notFirst
		if !sp.fused {
			ss.notFirst = true
		}
		if first && sp.stripFirst {
			s = strings.ReplaceAll(s, sp.rep, "")
		} else {
			s = strings.ReplaceAll(s, sp.rep, " ")
		}
		d.emit(i+1, s)
	case stByteLevel:
		start := len(ss.pending)
		for _, r := range s {
			if r < 0 || int(r) >= len(runeToByte) || runeToByte[r] < 0 {
				// A char outside the byte map: tokenizers uses the raw token bytes.
				ss.pending = append(ss.pending[:start], s...)
				break
			}
			ss.pending = append(ss.pending, byte(runeToByte[r]))
		}
		if d.raw {
			b := string(ss.pending)
			ss.pending = ss.pending[:0]
			d.emit(i+1, b)
			return
		}
		shown := byteLevelShown(ss, false)
		d.tmp.Reset()
		n := appendLossy(&d.tmp, ss.pending, false)
		ss.pending = ss.pending[:copy(ss.pending, ss.pending[n:])]
		out := d.tmp.String()
		if shown {
			out = strings.TrimPrefix(out, "\uFFFD")
		}
		if out != "" {
			d.emit(i+1, out)
		}
	case stStrip:
		if !sp.fused {
			d.emit(i+1, stripToken(s, sp.content, sp.start, sp.stop))
			return
		}
		for ss.startLeft > 0 && s != "" {
			r, w := utf8.DecodeRuneInString(s)
			if r != sp.content {
				ss.startLeft = 0
				break
			}
			s = s[w:]
			ss.startLeft--
		}
		if sp.stop == 0 || d.raw {
			if s != "" {
				d.emit(i+1, s)
			}
			return
		}
		if s == "" {
			return
		}
		comb := ss.held + s
		cut := len(comb)
		for k := 0; k < sp.stop && cut > 0; k++ {
			r, w := utf8.DecodeLastRuneInString(comb[:cut])
			if r != sp.content {
				break
			}
			cut -= w
		}
		ss.held = comb[cut:]
		if cut > 0 {
			d.emit(i+1, comb[:cut])
		}
	}
}

// byteLevelShown reports whether the first character of ss.pending, now
// resolved, is an invalid sequence that began with the context's pending
// bytes: Decode(context) already shows its U+FFFD (see NewDecoderAfter).
func byteLevelShown(ss *stageState, final bool) bool {
	if ss.shown == 0 || len(ss.pending) == 0 {
		return false
	}
	_, ok, inc := utf8Seq(ss.pending)
	if inc && !final {
		return false
	}
	ss.shown = 0
	return !ok
}

func stripToken(s string, content rune, start, stop int) string {
	for k := 0; k < start && s != ""; k++ {
		r, w := utf8.DecodeRuneInString(s)
		if r != content {
			break
		}
		s = s[w:]
	}
	for k := 0; k < stop && s != ""; k++ {
		r, w := utf8.DecodeLastRuneInString(s)
		if r != content {
			break
		}
		s = s[:len(s)-w]
	}
	return s
}

func (d *StreamDecoder) flushByteRun(i int) {
	ss := &d.st[i]
	shown := ss.shown
	ss.shown = 0
	if len(ss.pending) == 0 {
		return
	}
	if utf8.Valid(ss.pending) {
		d.emit(i+1, string(ss.pending))
	} else {
		// One U+FFFD per byte; Decode(context) already has those of its bytes.
		for range ss.pending[shown:] {
			d.emit(i+1, "\uFFFD")
		}
	}
	ss.pending = ss.pending[:0]
}

func (d *StreamDecoder) finish(i int) {
	if i == len(d.t.stages) {
		return
	}
	sp, ss := &d.t.stages[i], &d.st[i]
	switch sp.kind {
	case stByteFallback:
		d.flushByteRun(i)
	case stByteLevel:
		if len(ss.pending) > 0 {
			shown := byteLevelShown(ss, true)
			var b strings.Builder
			appendLossy(&b, ss.pending, true)
			ss.pending = ss.pending[:0]
			out := b.String()
			if shown {
				out = strings.TrimPrefix(out, "\uFFFD")
			}
			if out != "" {
				d.emit(i+1, out)
			}
		}
	case stStrip:
		ss.held = "" // trailing content chars are stripped
	}
	d.finish(i + 1)
}
