package tokenizer

import (
	"encoding/json"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// TestHFDifferential compares against outputs of the real Hugging Face
// tokenizers library (testdata/hf_diff.json, see testdata/gen_hf_diff.js).
func TestHFDifferential(t *testing.T) {
	type cases struct {
		Variant *struct {
			Base string         `json:"base"`
			Set  map[string]any `json:"set"`
		} `json:"variant"`
		Encode []struct {
			Text string  `json:"text"`
			IDs  []int32 `json:"ids"`
		} `json:"encode"`
		Decode []struct {
			IDs  []int32 `json:"ids"`
			Text string  `json:"text"`
			Skip string  `json:"skip"`
		} `json:"decode"`
	}
	var all map[string]cases
	file := "testdata/hf_diff.json"
	if f := os.Getenv("HF_DIFF_FILE"); f != "" {
		file = f // a larger fixture made with HF_DIFF_N=... HF_DIFF_OUT=...
	}
	readJSON(t, file, &all)
	for name, c := range all {
		t.Run(name, func(t *testing.T) {
			base := name
			if c.Variant != nil {
				base = c.Variant.Base
			}
			var tk *Tokenizer
			dir := storiesDir
			if base == "llama3" {
				tk = loadLlama3(t)
				dir = llama3Dir
			} else {
				tk = loadStories(t)
			}
			if c.Variant != nil {
				data, err := os.ReadFile(filepath.Join(dir, "tokenizer.json"))
				if err != nil {
					t.Fatal(err)
				}
				var m map[string]any
				if err := json.Unmarshal(data, &m); err != nil {
					t.Fatal(err)
				}
				maps.Copy(m, c.Variant.Set)
				if data, err = json.Marshal(m); err != nil {
					t.Fatal(err)
				}
				if tk, err = Parse(data, nil); err != nil {
					t.Fatal(err)
				}
			}
			bad := 0
			for _, e := range c.Encode {
				if got := tk.Encode(e.Text, false); !slices.Equal(got, e.IDs) {
					t.Errorf("Encode(%q) = %v, want %v", e.Text, got, e.IDs)
					bad++
				}
				if got := tk.Decode(e.IDs, false); got != tk.Decode(tk.Encode(e.Text, false), false) {
					t.Errorf("Decode mismatch for %q", e.Text)
				}
				if bad > 20 {
					t.Fatal("too many failures")
				}
			}
			for _, d := range c.Decode {
				if got := tk.Decode(d.IDs, false); got != d.Text {
					t.Errorf("Decode(%v, false) = %q, want %q", d.IDs, got, d.Text)
				}
				if got := tk.Decode(d.IDs, true); got != d.Skip {
					t.Errorf("Decode(%v, true) = %q, want %q", d.IDs, got, d.Skip)
				}
				checkStream(t, tk, d.IDs, false)
				checkStream(t, tk, d.IDs, true)
			}
		})
	}
}
