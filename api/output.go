package api

import (
	"strings"

	"github.com/peftd/peftd/text/tokenizer"
)

// Output turns a generation's tokens into its text as every route shows
// it, and as `peftd generate` prints it. The text is decoded incrementally
// after the prompt (the decoder keeps a few of the prompt's last tokens as
// context, like vLLM's detokenize_incrementally), so the first token reads
// as it does after the prompt: " upon" after "Once", not "upon". The text
// ends before the first stop string; what a stop string could still take
// back (its length less one byte) is not Shown until more text comes.
// Without a tokenizer there is no text: tokens only.
type Output struct {
	dec   textDecoder
	stops []string
	hold  int
	text  strings.Builder
	ends  []int // ends[k]: where token k's piece ends in the text (non-decreasing)
}

// NewOutput starts the text of a generation after prompt.
func NewOutput(tok *tokenizer.Tokenizer, prompt []int32, stops []string) *Output {
	o := &Output{stops: stops}
	if tok != nil {
		o.dec = tok.NewDecoderAfter(prompt, true)
	}
	for _, st := range stops {
		o.hold = max(o.hold, len(st)-1)
	}
	return o
}

// Add appends token id's text. True: a stop string now ends the text (it
// is cut there, and the generation should end).
func (o *Output) Add(id int32) bool {
	before := o.text.Len()
	if o.dec != nil {
		o.text.WriteString(o.dec.Add(id))
	}
	o.ends = append(o.ends, o.text.Len())
	return o.cutAtStop(before)
}

// Finish appends what the decoder still held (the generation ended).
// True: a stop string now ends the text (cut there).
func (o *Output) Finish() bool {
	if o.dec == nil {
		return false
	}
	before := o.text.Len()
	o.text.WriteString(o.dec.Flush())
	return o.cutAtStop(before)
}

// Text is the text so far.
func (o *Output) Text() string { return o.text.String() }

// Shown is how many bytes of the text can be shown now: all but what a
// stop string could still take back (negative: none yet).
func (o *Output) Shown() int { return o.text.Len() - o.hold }

// Pieces cuts the text's bytes [from, to) into the pieces of tokens k0..k1
// (what each adds; clipped to [from, to], the last one reaching to).
func (o *Output) Pieces(k0, k1, from, to int) []string {
	return pieces(o.text.String(), o.ends[k0:k1], from, to)
}

// decoder is the stream decoder (nil without a tokenizer), for peeking at
// a token's bytes before Add.
func (o *Output) decoder() textDecoder { return o.dec }

// cutAtStop cuts the text at the first stop string that ends at or after
// byte from (what was added last); true if one did.
func (o *Output) cutAtStop(from int) bool {
	if o.dec == nil || len(o.stops) == 0 {
		return false
	}
	t := o.text.String()
	idx := -1
	for _, st := range o.stops {
		lo := max(0, from-len(st)+1)
		if i := strings.Index(t[lo:], st); i >= 0 && (idx < 0 || lo+i < idx) {
			idx = lo + i
		}
	}
	if idx < 0 {
		return false
	}
	o.text.Reset()
	o.text.WriteString(t[:idx])
	return true
}
