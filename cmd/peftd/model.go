package main

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/peftd/peftd/models"
	"github.com/peftd/peftd/runtime/lora"
)

// embeddedRoot extracts the embedded models once and returns their folder.
func embeddedRoot() (string, error) {
	return models.Extract(models.DefaultCacheDir())
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
