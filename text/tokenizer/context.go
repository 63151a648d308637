package tokenizer

import "unicode/utf8"

// contextTokens is how many trailing tokens of the context NewDecoderAfter
// decodes before the first new token (at least: it reaches further back when
// that token does not restart decoding cleanly). vLLM's
// detokenize_incrementally keeps 5 prompt tokens and re-decodes its window
// for every token; this decoder carries its state from token to token, so
// the window only has to rebuild that state once.
const contextTokens = 4

// NewDecoderAfter returns a streaming decoder for ids that follow context
// (typically the prompt). Add returns what each id adds to the text, so
// that Decode(context) + the concatenation of all Add results and Flush ==
// Decode(context+ids), whenever Decode(context) is a prefix of
// Decode(context+ids) (the context does not end inside a character). In
// particular a SentencePiece "▁upon" after "Once" gives " upon", where
// NewDecoder, which decodes ids as the start of a text, strips the space.
//
// Only a bounded window of the context is decoded (its last few tokens,
// back to a token where decoding restarts cleanly, plus the tokens up to the
// first text, which settle the decoder's start-of-text state).
func (t *Tokenizer) NewDecoderAfter(context []int32, skipSpecial bool) *StreamDecoder {
	d := t.NewDecoder(skipSpecial)
	if len(context) == 0 {
		return d
	}
	start := t.contextStart(context, skipSpecial)
	// The first token that yields text settles the start-of-text state
	// (Strip's leading characters, Metaspace's and JoinSpace's first token):
	// no later token changes it.
	i := 0
	for i < start {
		d.push(context[i])
		i++
		if d.out.Len() > 0 {
			break
		}
	}
	if i < start {
		// What the skipped tokens could leave (a byte-fallback run, an
		// incomplete byte-level character) is resolved by context[start]
		// without changing what it decodes to: drop it.
		for k := range d.st {
			d.st[k].pending, d.st[k].shown = d.st[k].pending[:0], 0
		}
		i = start
	}
	for _, id := range context[i:] {
		d.push(id)
	}
	d.settleContext()
	d.out.Reset()
	return d
}

// DecodeAfter returns the text ids add after context (see NewDecoderAfter):
// Decode(context+ids) without the text of context.
func (t *Tokenizer) DecodeAfter(context, ids []int32, skipSpecial bool) string {
	d := t.NewDecoderAfter(context, skipSpecial)
	for _, id := range ids {
		d.push(id)
	}
	d.finish(0)
	return d.out.String()
}

// contextStart is where NewDecoderAfter's window of context begins.
func (t *Tokenizer) contextStart(context []int32, skip bool) int {
	for _, s := range t.stages {
		if s.kind == stStrip && s.stop > 0 {
			return 0 // trailing characters held back can come from any token
		}
	}
	start := max(0, len(context)-contextTokens)
	for start > 0 && !t.restarts(context[start], skip) {
		start--
	}
	return start
}

// restarts reports whether decoding restarts cleanly at id: what earlier
// tokens left pending (a byte-fallback run, an incomplete byte-level
// character) is flushed by id without changing what id and the tokens after
// it decode to.
func (t *Tokenizer) restarts(id int32, skip bool) bool {
	if id < 0 || int(id) >= len(t.idToToken) {
		return false
	}
	tok := t.idToToken[id]
	if tok == "" || (skip && t.special[id]) {
		return false // ignored: a byte run goes on across it
	}
	for _, s := range t.stages {
		switch s.kind {
		case stByteFallback:
			if _, ok := byteToken(tok); ok {
				return false
			}
		case stByteLevel:
			b := tok[0]
			if r, _ := utf8.DecodeRuneInString(tok); r >= 0 && int(r) < len(runeToByte) && runeToByte[r] >= 0 {
				b = byte(runeToByte[r])
			}
			if b >= 0x80 && b < 0xC0 { // a continuation byte
				return false
			}
		}
	}
	return true
}

// settleContext ends the context: the bytes still pending at its end go
// through the rest of the decoder as Decode(context) would flush them (their
// text is the context's: it is dropped with the rest, but it moves the
// decoder's state as in Decode). A byte-fallback run of complete characters
// is done with. An incomplete character at the end stays pending, to be
// completed by the next ids; if they do not complete it, its U+FFFD, which
// Decode(context) already shows, is not repeated (Decode(context+ids) shows
// it once). So is the invalid rest of a byte-fallback run (tokenizers turns
// every byte of an invalid run into U+FFFD: the run stays invalid).
func (d *StreamDecoder) settleContext() {
	for i, s := range d.t.stages {
		ss := &d.st[i]
		if len(ss.pending) == 0 {
			continue
		}
		switch s.kind {
		case stByteLevel:
			d.emit(i+1, "\uFFFD") // one per incomplete sequence, as appendLossy
			ss.shown = len(ss.pending)
		case stByteFallback:
			n := 0 // complete characters
			for n < len(ss.pending) {
				k, ok, _ := utf8Seq(ss.pending[n:])
				if !ok {
					break
				}
				n += k
			}
			if n == len(ss.pending) {
				d.emit(i+1, string(ss.pending))
				ss.pending = ss.pending[:0]
				break
			}
			for range ss.pending {
				d.emit(i+1, "\uFFFD") // the run as a whole is invalid so far
			}
			ss.pending = ss.pending[:copy(ss.pending, ss.pending[n:])]
			ss.shown = len(ss.pending)
		}
	}
}

// Peek returns the text id would add after the ids fed so far if it were
// the last one (Add(id) then Flush): any text still held back, by id or by
// earlier ids, comes out, an incomplete character as U+FFFD. d is unchanged.
func (d *StreamDecoder) Peek(id int32) string {
	p := d.fork(false)
	p.push(id)
	p.finish(0)
	return p.out.String()
}

// PeekBytes returns id's own bytes after the ids fed so far: what Add(id)
// would add with byte tokens and byte-level bytes taken as they are, never
// held back nor checked as UTF-8 (OpenAI's logprobs "bytes": concatenated
// over the tokens they give the text's bytes). A special token d skips has
// none. d is unchanged.
func (d *StreamDecoder) PeekBytes(id int32) []byte {
	p := d.fork(true)
	p.push(id)
	return []byte(p.out.String())
}

// fork copies d's state into its scratch decoder.
func (d *StreamDecoder) fork(raw bool) *StreamDecoder {
	p := d.peek
	if p == nil {
		p = &StreamDecoder{t: d.t, st: make([]stageState, len(d.st))}
		d.peek = p
	}
	p.skip, p.raw = d.skip, raw
	for i := range d.st {
		buf := p.st[i].pending[:0]
		p.st[i] = d.st[i]
		if raw {
			// Bytes pending belong to earlier tokens.
			p.st[i].pending, p.st[i].held, p.st[i].shown = buf, "", 0
		} else {
			p.st[i].pending = append(buf, d.st[i].pending...)
		}
	}
	p.out.Reset()
	return p
}
