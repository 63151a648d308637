package tokenizer

import (
	"bytes"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"unicode/utf8"
)

// bothTokenizers are stories260K's SentencePiece-style tokenizer (Metaspace
// via Replace, byte fallback, Strip) and Llama 3.1's byte-level BPE.
func bothTokenizers(t *testing.T) map[string]*Tokenizer {
	return map[string]*Tokenizer{"stories260K": loadStories(t), "llama3": loadLlama3(t)}
}

// streamAfter decodes ids after context one at a time (checking that every
// chunk is valid UTF-8) and returns the chunks.
func streamAfter(t *testing.T, tk *Tokenizer, context, ids []int32) []string {
	t.Helper()
	d := tk.NewDecoderAfter(context, true)
	var out []string
	for _, id := range ids {
		s := d.Add(id)
		if !utf8.ValidString(s) {
			t.Errorf("context %v ids %v: chunk for %d is invalid UTF-8: %q", context, ids, id, s)
		}
		out = append(out, s)
	}
	return append(out, d.Flush())
}

// refDecodeAfter is NewDecoderAfter without its window: the whole context is decoded.
func refDecodeAfter(tk *Tokenizer, context, ids []int32) string {
	d := tk.NewDecoder(true)
	for _, id := range context {
		d.push(id)
	}
	d.settleContext()
	d.out.Reset()
	for _, id := range ids {
		d.push(id)
	}
	d.finish(0)
	return d.out.String()
}

// The first generated token keeps its leading space: "Once" then "▁upon"
// reads " upon", not "upon" (the old decoder decoded the new ids as the
// start of a text, and SentencePiece's Strip decoder dropped the space).
func TestDecoderAfterLeadingSpace(t *testing.T) {
	toks := bothTokenizers(t)
	for _, tc := range []struct{ tok, prompt, completion string }{
		{"stories260K", "Once", " upon a time"},
		{"stories260K", "Once upon", " a time, there was"},
		{"stories260K", "The cat sat.", " The dog ran"},
		{"stories260K", "Tim said", "\n\"Hi\""},
		{"stories260K", "I love 🦙", " and 日本"}, // the prompt ends with byte-fallback tokens
		{"stories260K", "A", "🙂 smile"},
		{"llama3", "Once", " upon a time"},
		{"llama3", "I love 🦙", " and 日本"},
		{"llama3", "naïve", " café 🙂"},
	} {
		tk := toks[tc.tok]
		prompt := tk.Encode(tc.prompt, true)
		all := tk.Encode(tc.prompt+tc.completion, true)
		if !slices.Equal(all[:len(prompt)], prompt) {
			t.Fatalf("%s: %q does not tokenize as a prefix of %q", tc.tok, tc.prompt, tc.prompt+tc.completion)
		}
		gen := all[len(prompt):]
		if got := tk.DecodeAfter(prompt, gen, true); got != tc.completion {
			t.Errorf("%s: DecodeAfter(%q, %v) = %q, want %q", tc.tok, tc.prompt, gen, got, tc.completion)
		}
		if got := strings.Join(streamAfter(t, tk, prompt, gen), ""); got != tc.completion {
			t.Errorf("%s: streamed after %q = %q, want %q", tc.tok, tc.prompt, got, tc.completion)
		}
	}
}

var (
	promptWords = []string{"Once", "upon", "a", "time", "the", "little", "cat", "dog", "said", "\"Hi!\"", "Tim", "and",
		"Sue", "ran", "to", "park.", "café", "naïve", "🙂", "🦙", "日本語", "über", "42", "x+y", "(ok)", "—", "it's"}
	promptSeps = []string{" ", " ", " ", ", ", ". ", "\n", "  ", ""}
)

// randomPrompt is a text that decodes back to itself from its ids.
func randomPrompt(r *rand.Rand) string {
	var b strings.Builder
	for i := range 1 + r.IntN(8) {
		if i > 0 {
			b.WriteString(promptSeps[r.IntN(len(promptSeps))])
		}
		b.WriteString(promptWords[r.IntN(len(promptWords))])
	}
	return b.String()
}

// randomIDs draws ids of every kind: anywhere in the vocabulary, near the
// start (specials, byte tokens), tokens of random text, and specials.
func randomIDs(r *rand.Rand, tk *Tokenizer, n int) []int32 {
	var ids []int32
	for len(ids) < n {
		switch r.IntN(6) {
		case 0, 1:
			ids = append(ids, int32(r.IntN(tk.VocabSize())))
		case 2:
			ids = append(ids, int32(r.IntN(min(300, tk.VocabSize()))))
		case 3:
			ids = append(ids, tk.Encode(randomPrompt(r), false)...)
		case 4:
			for _, s := range []string{"🙂", "日", "é"} { // pieces of a multi-byte character
				if e := tk.Encode(s, false); len(e) > 1 && r.IntN(3) == 0 {
					ids = append(ids, e[r.IntN(len(e))])
				}
			}
		case 5:
			if eos := tk.EOS(); len(eos) > 0 {
				ids = append(ids, eos[0])
			}
			if bos, ok := tk.BOS(); ok && r.IntN(2) == 0 {
				ids = append(ids, bos)
			}
		}
	}
	return ids[:n]
}

// Prompt text + completion text == Decode(prompt ids + completion ids), for
// many prompts and random completions; streamed chunks concatenate to the
// completion text.
func TestDecodeAfterMatchesDecode(t *testing.T) {
	// Prompts of random ids too: byte runs and incomplete characters at the
	// end of the prompt. Decode(prompt) + completion == Decode(all) whenever
	// Decode(all) starts with Decode(prompt) (it need not: an incomplete
	// character the completion completes, a byte-fallback run made invalid).
	for name, tk := range bothTokenizers(t) {
		r := rand.New(rand.NewPCG(4, uint64(len(name))))
		checked := 0
		for range 5000 {
			prompt := randomIDs(r, tk, 1+r.IntN(16))
			gen := randomIDs(r, tk, 1+r.IntN(10))
			promptText := tk.Decode(prompt, true)
			want := tk.Decode(append(slices.Clone(prompt), gen...), true)
			got := tk.DecodeAfter(prompt, gen, true)
			if s := strings.Join(streamAfter(t, tk, prompt, gen), ""); s != got {
				t.Fatalf("%s: prompt %v, completion %v: streamed %q, DecodeAfter %q", name, prompt, gen, s, got)
			}
			if !strings.HasPrefix(want, promptText) {
				continue
			}
			checked++
			if promptText+got != want {
				t.Errorf("%s: prompt %v completion %v:\n prompt+completion text %q\n Decode(all)            %q", name, prompt, gen, promptText+got, want)
			}
		}
		t.Logf("%s: %d of 5000 random-id prompts checked", name, checked)
	}

	for name, tk := range bothTokenizers(t) {
		r := rand.New(rand.NewPCG(1, uint64(len(name))))
		checked, open := 0, 0
		for range 3000 {
			promptText := randomPrompt(r)
			prompt := tk.Encode(promptText, true)
			if got := tk.Decode(prompt, true); got != promptText {
				t.Fatalf("%s: Decode(Encode(%q)) = %q", name, promptText, got)
			}
			gen := randomIDs(r, tk, 1+r.IntN(12))
			want := tk.Decode(append(slices.Clone(prompt), gen...), true)
			got := tk.DecodeAfter(prompt, gen, true)
			if s := strings.Join(streamAfter(t, tk, prompt, gen), ""); s != got {
				t.Fatalf("%s: prompt %q, completion %v: streamed %q, DecodeAfter %q", name, promptText, gen, s, got)
			}
			if !strings.HasPrefix(want, promptText) {
				// Only a byte-fallback run open at the end of the prompt
				// and made invalid by the completion turns the prompt's
				// last characters into U+FFFD: no completion text can
				// follow the prompt's text then.
				last, _ := tk.Token(prompt[len(prompt)-1])
				if _, isByte := byteToken(last); !isByte {
					t.Errorf("%s: Decode(prompt+completion) = %q does not start with the prompt %q", name, want, promptText)
				}
				open++
				continue
			}
			checked++
			if promptText+got != want {
				t.Errorf("%s: prompt %q (%v) completion %v:\n prompt+completion text %q\n Decode(all)            %q", name, promptText, prompt, gen, promptText+got, want)
			}
		}
		t.Logf("%s: %d prompt/completion pairs checked, %d skipped (byte run open across the prompt's end)", name, checked, open)
		if checked < 2500 {
			t.Errorf("%s: only %d pairs checked", name, checked)
		}
	}
}

// The window of context NewDecoderAfter decodes gives the same text as
// decoding the whole context, for random contexts (byte runs and incomplete
// characters crossing the window's start, specials, unknown ids).
func TestDecoderAfterWindow(t *testing.T) {
	for name, tk := range bothTokenizers(t) {
		r := rand.New(rand.NewPCG(2, uint64(len(name))))
		for range 3000 {
			context := randomIDs(r, tk, 1+r.IntN(20))
			if r.IntN(4) == 0 {
				context = append(context, -1, int32(tk.VocabSize()))
			}
			gen := randomIDs(r, tk, 1+r.IntN(10))
			want := refDecodeAfter(tk, context, gen)
			if got := tk.DecodeAfter(context, gen, true); got != want {
				t.Fatalf("%s: context %v gen %v: DecodeAfter %q, whole context %q", name, context, gen, got, want)
			}
		}
	}
}

// Peek is what a token would add if it were the last one; PeekBytes its own
// bytes, which concatenate to the text's bytes. Neither changes the decoder.
func TestPeek(t *testing.T) {
	for name, tk := range bothTokenizers(t) {
		r := rand.New(rand.NewPCG(3, uint64(len(name))))
		for range 500 {
			prompt := tk.Encode(randomPrompt(r), true)
			var gen []int32
			if r.IntN(2) == 0 {
				gen = tk.Encode(" "+randomPrompt(r), false)
			} else {
				gen = randomIDs(r, tk, 1+r.IntN(12))
			}
			want := tk.DecodeAfter(prompt, gen, true)
			d := tk.NewDecoderAfter(prompt, true)
			var text strings.Builder
			var raw []byte
			for k, id := range gen {
				peek := d.Peek(id)
				d.Peek(int32(r.IntN(tk.VocabSize()))) // an alternative: must not change d
				raw = append(raw, d.PeekBytes(id)...)
				if full := tk.DecodeAfter(prompt, gen[:k+1], true); full != text.String()+peek {
					t.Fatalf("%s: Peek(%d) after %v = %q; the text so far %q, DecodeAfter %q", name, id, gen[:k], peek, text.String(), full)
				}
				text.WriteString(d.Add(id))
			}
			text.WriteString(d.Flush())
			if text.String() != want {
				t.Fatalf("%s: peeking changed the decoder: %q, want %q", name, text.String(), want)
			}
			if utf8.Valid(raw) && !strings.ContainsRune(want, utf8.RuneError) && !bytes.Equal(raw, []byte(want)) {
				t.Errorf("%s: PeekBytes of %v concatenate to %q, want %q", name, gen, raw, want)
			}
		}
	}
	// A byte-fallback character split over tokens: each token's own byte.
	st := loadStories(t)
	prompt := st.Encode("Hi", true)
	gen := st.Encode("Hi 🙂", true)[len(prompt):]
	d := st.NewDecoderAfter(prompt, true)
	var got [][]byte
	for _, id := range gen {
		got = append(got, d.PeekBytes(id))
		d.Add(id)
	}
	want := [][]byte{[]byte(" "), {0xF0}, {0x9F}, {0x99}, {0x82}}
	if len(gen) != len(want) || !slices.EqualFunc(got, want, bytes.Equal) {
		t.Errorf("PeekBytes of %v = %q, want %q", gen, got, want)
	}
}
