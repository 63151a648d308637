// Package models ships the embedded default: stories260K, a real tiny Llama
// (MIT, see stories260K/LICENSE), and two demo LoRA adapters, so the first
// command runs a real model with no download.
package models

import (
	"crypto/sha256"
	"embed"
	"encoding/hex"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

//go:embed stories260K adapters heldout
var files embed.FS

// Names of the embedded model and adapters.
const (
	DefaultModel = "stories260K"
	AdaptersDir  = "adapters"
	// HeldoutDir holds text of the kind stories260K and its adapters were
	// trained on, written for peftd and never trained on: stories.txt
	// (base), pirate.txt and space.txt, stories separated by blank lines.
	// peftd eval scores it.
	HeldoutDir = "heldout"
)

// FS is the embedded tree: stories260K/, adapters/{pirate,space}/ and
// heldout/.
func FS() fs.FS { return files }

// Extract writes the embedded tree under cacheDir/embedded-<hash>/ once and
// returns that folder; later calls find it there. The hash covers the
// contents, so a new build never reads an old copy.
func Extract(cacheDir string) (string, error) {
	h := sha256.New()
	err := fs.WalkDir(files, ".", func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := files.ReadFile(p)
		if err != nil {
			return err
		}
		fmt.Fprintf(h, "%s\x00%d\x00", p, len(b))
		h.Write(b)
		return nil
	})
	if err != nil {
		return "", err
	}
	dst := filepath.Join(cacheDir, "embedded-"+hex.EncodeToString(h.Sum(nil))[:16])
	if _, err := os.Stat(filepath.Join(dst, ".complete")); err == nil {
		return dst, nil
	}
	tmp, err := os.MkdirTemp(cacheDir, ".extract-")
	if err != nil {
		if err := os.MkdirAll(cacheDir, 0o755); err != nil {
			return "", fmt.Errorf("models: %w", err)
		}
		if tmp, err = os.MkdirTemp(cacheDir, ".extract-"); err != nil {
			return "", fmt.Errorf("models: %w", err)
		}
	}
	defer os.RemoveAll(tmp)
	if err := os.CopyFS(tmp, files); err != nil {
		return "", fmt.Errorf("models: extract: %w", err)
	}
	if err := os.WriteFile(filepath.Join(tmp, ".complete"), nil, 0o644); err != nil {
		return "", err
	}
	if err := os.Rename(tmp, dst); err != nil {
		if _, e2 := os.Stat(filepath.Join(dst, ".complete")); e2 == nil {
			return dst, nil // another process won the race
		}
		return "", fmt.Errorf("models: %w", err)
	}
	return dst, nil
}

// DefaultCacheDir is $PEFTD_CACHE, else the user cache dir's peftd folder.
func DefaultCacheDir() string {
	if d := os.Getenv("PEFTD_CACHE"); d != "" {
		return d
	}
	if d, err := os.UserCacheDir(); err == nil {
		return filepath.Join(d, "peftd")
	}
	return filepath.Join(os.TempDir(), "peftd")
}
