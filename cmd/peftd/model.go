package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/peftd/peftd/models"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/lora"
	"github.com/peftd/peftd/runtime/tokenizer"
)

// embeddedRoot extracts the embedded models once and returns their folder.
func embeddedRoot() (string, error) {
	return models.Extract(models.DefaultCacheDir())
}

// resolveModel returns dir, or the embedded default model when dir is empty.
func resolveModel(dir string) (string, error) {
	if dir != "" {
		return dir, nil
	}
	root, err := embeddedRoot()
	if err != nil {
		return "", err
	}
	return filepath.Join(root, models.DefaultModel), nil
}

// resolveAdapter accepts a folder, or the name of an embedded demo adapter.
func resolveAdapter(arg string) (string, error) {
	if st, err := os.Stat(arg); err == nil && st.IsDir() {
		return arg, nil
	}
	if filepath.Base(arg) == arg {
		root, err := embeddedRoot()
		if err != nil {
			return "", err
		}
		p := filepath.Join(root, models.AdaptersDir, arg)
		if _, err := os.Stat(filepath.Join(p, lora.ConfigFile)); err == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("adapter %q: no such folder (and not an embedded demo adapter: pirate, space)", arg)
}

type loaded struct {
	model *llama.Model
	tok   *tokenizer.Tokenizer // nil in token-ID mode
}

func loadModel(dir string) (*loaded, error) {
	dir, err := resolveModel(dir)
	if err != nil {
		return nil, err
	}
	m, err := llama.Open(dir)
	if err != nil {
		return nil, err
	}
	tok, err := tokenizer.Load(dir)
	if err != nil && !errors.Is(err, tokenizer.ErrNoTokenizer) {
		m.Close()
		return nil, err
	}
	return &loaded{model: m, tok: tok}, nil
}
