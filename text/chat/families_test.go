package chat

import (
	"os"
	"path/filepath"
	"testing"
)

// TestFamilyTemplates renders the chat cases of the Qwen2.5, Qwen3 and Mistral NeMo
// fixtures (transformers' apply_chat_template) with the real
// tokenizer_config.json templates and compares byte for byte.
func TestFamilyTemplates(t *testing.T) {
	for _, name := range []string{"qwen2.5", "qwen3", "mistral-nemo"} {
		t.Run(name, func(t *testing.T) {
			root := filepath.Join("..", "..", "testdata", name+"-tokenizer")
			model := filepath.Join(root, "model")
			if _, err := os.Stat(filepath.Join(model, "tokenizer_config.json")); err != nil {
				if os.Getenv("PEFTD_SKIP_NPM") == "1" {
					t.Skipf("PEFTD_SKIP_NPM=1 and %s is missing", model)
				}
				t.Fatalf("%s missing: run .ci/setup-tokenizer.sh (or set PEFTD_SKIP_NPM=1 to skip)", model)
			}
			tmpl, err := LoadTemplate(model)
			if err != nil {
				t.Fatalf("LoadTemplate: %v", err)
			}
			checkChatFixture(t, tmpl, filepath.Join(root, "expected.json"))
		})
	}
}
