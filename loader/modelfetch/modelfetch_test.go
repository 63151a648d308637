package modelfetch_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/minio/minio-go/v7"

	"github.com/peftd/peftd/internal/fixture"
	"github.com/peftd/peftd/internal/s3test"
	"github.com/peftd/peftd/loader/modelfetch"
	"github.com/peftd/peftd/runtime/llama"
)

func put(t *testing.T, s *s3test.Server, key string, b []byte) {
	t.Helper()
	if _, err := s.Client.PutObject(context.Background(), "models", key, bytes.NewReader(b), int64(len(b)), minio.PutObjectOptions{}); err != nil {
		t.Fatal(err)
	}
}

func TestFetch(t *testing.T) {
	s := s3test.Start(t)
	s.SetCredentialsEnv(t)
	s.MakeBucket(t, "models")
	base := filepath.Join(fixture.Dir(), "base")
	for _, f := range []string{"config.json", "model.safetensors"} {
		b, err := os.ReadFile(filepath.Join(base, f))
		if err != nil {
			t.Fatal(err)
		}
		put(t, s, "llama/tiny/"+f, b)
	}
	put(t, s, "llama/tiny/pytorch_model.bin", []byte("pickle"))      // not read by the engine: skipped
	put(t, s, "llama/tiny/sub/config.json", []byte(`{"x":1}`))       // a sub-folder: skipped
	put(t, s, "llama/tiny-other/config.json", []byte(`{"other":1}`)) // a sibling prefix: skipped
	url := strings.Replace(s.StoreURL("models"), "s3://models/", "s3://models/llama/tiny", 1)
	cache := t.TempDir()
	var mu sync.Mutex
	downloads := map[string]int64{}
	prog := func(file string, done, total int64) {
		mu.Lock()
		defer mu.Unlock()
		if done == total {
			downloads[file] = total
		}
	}
	ctx := context.Background()
	dir, err := modelfetch.Fetch(ctx, url, cache, prog, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(downloads) != 2 || downloads["model.safetensors"] == 0 {
		t.Fatalf("downloads %v", downloads)
	}
	if _, err := os.Stat(filepath.Join(dir, "pytorch_model.bin")); err == nil {
		t.Error("pickle file was fetched")
	}
	m, err := llama.Open(dir)
	if err != nil {
		t.Fatalf("fetched model does not open: %v", err)
	}
	m.Close()

	// A second start downloads nothing.
	clear(downloads)
	if dir2, err := modelfetch.Fetch(ctx, url, cache, prog, nil); err != nil || dir2 != dir || len(downloads) != 0 {
		t.Fatalf("second fetch: %v %s downloads %v", err, dir2, downloads)
	}
	// A changed object is fetched again, alone.
	gen := []byte(`{"eos_token_id":[2,7]}`)
	put(t, s, "llama/tiny/generation_config.json", gen)
	if _, err := modelfetch.Fetch(ctx, url, cache, prog, nil); err != nil || len(downloads) != 1 {
		t.Fatalf("third fetch: %v downloads %v", err, downloads)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "generation_config.json")); !bytes.Equal(b, gen) {
		t.Errorf("generation_config.json = %s", b)
	}
	// The store down: the cached copy serves.
	s.Stop()
	if dir3, err := modelfetch.Fetch(ctx, url, cache, prog, nil); err != nil || dir3 != dir {
		t.Fatalf("fetch with the store down: %v", err)
	}
	if _, err := modelfetch.Fetch(ctx, url, t.TempDir(), prog, nil); err == nil {
		t.Fatal("a first fetch with the store down succeeded")
	}
	if err := s.Restart(); err != nil {
		t.Fatal(err)
	}
	// A sharded checkpoint: the index names its shards.
	weights, _ := os.ReadFile(filepath.Join(base, "model.safetensors"))
	config, _ := os.ReadFile(filepath.Join(base, "config.json"))
	m0, err := llama.Open(base)
	if err != nil {
		t.Fatal(err)
	}
	wm := map[string]string{}
	for _, n := range m0.Tensors.Names() {
		wm[n] = "model-00001-of-00001.safetensors"
	}
	m0.Close()
	index, _ := json.Marshal(map[string]any{"weight_map": wm})
	put(t, s, "llama/sharded/config.json", config)
	put(t, s, "llama/sharded/model.safetensors.index.json", index)
	put(t, s, "llama/sharded/model-00001-of-00001.safetensors", weights)
	sharded := strings.Replace(url, "llama/tiny", "llama/sharded", 1)
	sdir, err := modelfetch.Fetch(ctx, sharded, t.TempDir(), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if m, err := llama.Open(sdir); err != nil {
		t.Fatalf("sharded model does not open: %v", err)
	} else {
		m.Close()
	}
	if got := modelfetch.Name(sharded); got != "sharded" {
		t.Errorf("Name = %q", got)
	}
	// No model under the prefix.
	bad := strings.Replace(url, "llama/tiny", "llama/none", 1)
	if _, err := modelfetch.Fetch(ctx, bad, t.TempDir(), nil, nil); !errors.Is(err, modelfetch.ErrNoModel) {
		t.Fatalf("empty prefix: %v", err)
	}
}
