package tokenizer

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"unicode/utf8"
)

func FuzzEncodeDecode(f *testing.F) {
	for _, s := range streamTexts {
		f.Add(s)
	}
	for _, s := range []string{"", " ", "\n", "'s'S'll", "<|eot_id|>x<s>", "a\u00a0 \r\n\t b", "123456789", "\xff\xfe", "x  \n  y"} {
		f.Add(s)
	}
	stories := loadStories(f)
	var llama3 *Tokenizer
	if _, err := os.Stat(filepath.Join(llama3Dir, "tokenizer.json")); err == nil {
		llama3 = loadLlama3(f)
	}
	f.Fuzz(func(t *testing.T, s string) {
		ids := stories.Encode(s, true)
		dec := stories.Decode(ids, true)
		if utf8.ValidString(s) && !strings.Contains(s, "<s>") && !strings.Contains(s, "</s>") && !strings.Contains(s, "<unk>") && !strings.Contains(s, "▁") && dec != s {
			t.Errorf("stories260K: Decode(Encode(%q)) = %q", s, dec)
		}
		checkStream(t, stories, ids, true)
		if llama3 == nil {
			return
		}
		ids = llama3.Encode(s, false)
		if utf8.ValidString(s) {
			if dec := llama3.Decode(ids, false); dec != s {
				t.Errorf("llama3: Decode(Encode(%q)) = %q", s, dec)
			}
		}
		checkStream(t, llama3, ids, false)
		checkStream(t, llama3, ids, true)
	})
}
