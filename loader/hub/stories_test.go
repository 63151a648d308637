package hub

import (
	"context"
	"io/fs"
	"log/slog"
	"path"
	"path/filepath"
	"slices"
	"testing"

	"github.com/peftd/peftd/models"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/text/tokenizer"
)

// TestStories260KFromTheHub is what `peftd generate --model
// karpathy/stories260K --prompt-ids 1,2,3 --max-tokens 2` does before it
// generates, with HF_ENDPOINT pointing at a Hub serving the embedded
// stories260K: the model is resolved through the environment as the CLI
// resolves it, downloaded, and opened by the project's loader and
// tokenizer; a second start needs no Hub.
func TestStories260KFromTheHub(t *testing.T) {
	files := map[string][]byte{"pytorch_model.bin": randomBytes(4096, 1)} // never fetched
	err := fs.WalkDir(models.FS(), models.DefaultModel, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := fs.ReadFile(models.FS(), p)
		files[path.Base(p)] = b
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	h := newFakeHub(t)
	repo := h.addRepo("karpathy/stories260K", false, files)

	for _, v := range []string{"HUGGINGFACE_HUB_CACHE", "HF_HOME", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"} {
		t.Setenv(v, "")
	}
	t.Setenv("HF_HUB_CACHE", t.TempDir())
	t.Setenv("HF_ENDPOINT", h.hub.URL)
	log := slog.New(slog.DiscardHandler)

	if !Is("karpathy/stories260K") {
		t.Fatal("karpathy/stories260K is not taken for a Hub model")
	}
	dir, err := Resolve(context.Background(), "karpathy/stories260K", FromEnv(log))
	if err != nil {
		t.Fatal(err)
	}
	if want := filepath.Join(CacheDir(), "models--karpathy--stories260K", "snapshots", repo.commit); dir != want {
		t.Fatalf("dir %s, want %s", dir, want)
	}
	m, err := llama.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if m.Config.Layers != 5 || m.Config.VocabSize != 512 {
		t.Errorf("config: %d layers, vocabulary %d", m.Config.Layers, m.Config.VocabSize)
	}
	if _, ok := m.Tensors.Info(llama.EmbedName); !ok {
		t.Error("no embedding tensor")
	}
	tok, err := tokenizer.Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	// expected.json: "Once upon a time" -> [1 403 407 261 378].
	if ids := tok.Encode("Once upon a time", true); !slices.Equal(ids, []int32{1, 403, 407, 261, 378}) {
		t.Errorf("Encode = %v", ids)
	}
	if s := tok.Decode([]int32{1, 403, 407, 261, 378}, true); s != "Once upon a time" {
		t.Errorf("Decode = %q", s)
	}
	for _, r := range h.took() {
		if path.Base(r.Path) == "pytorch_model.bin" {
			t.Errorf("requested %s", r)
		}
	}

	// The next start: offline, no request.
	h.close()
	t.Setenv("HF_HUB_OFFLINE", "1")
	if d, err := Resolve(context.Background(), "karpathy/stories260K", FromEnv(log)); err != nil || d != dir {
		t.Fatalf("offline: %s, %v", d, err)
	}
}
