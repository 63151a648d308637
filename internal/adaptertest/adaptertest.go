// Package adaptertest reads, copies and packs a LoRA adapter folder's two
// files (lora.ConfigFile, lora.WeightsFile) for tests.
package adaptertest

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"io"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/peftd/peftd/runtime/lora"
)

// Read returns the adapter folder dir's config and weights.
func Read(t testing.TB, dir string) (cfg, weights []byte) {
	t.Helper()
	cfg, err := os.ReadFile(filepath.Join(dir, lora.ConfigFile))
	if err != nil {
		t.Fatal(err)
	}
	weights, err = os.ReadFile(filepath.Join(dir, lora.WeightsFile))
	if err != nil {
		t.Fatal(err)
	}
	return cfg, weights
}

// Files maps prefix+name to the content of each of dir's two files.
func Files(t testing.TB, dir, prefix string) map[string][]byte {
	t.Helper()
	cfg, weights := Read(t, dir)
	return map[string][]byte{prefix + lora.ConfigFile: cfg, prefix + lora.WeightsFile: weights}
}

// Copy copies the adapter folder src's two files into dst (made if needed).
func Copy(t testing.TB, src, dst string) {
	t.Helper()
	if err := os.MkdirAll(dst, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, b := range Files(t, src, "") {
		if err := os.WriteFile(filepath.Join(dst, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// TarGz is a gzipped tar of files (name to content), in name order.
func TarGz(t testing.TB, files map[string][]byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	gz := gzip.NewWriter(&buf)
	writeTar(t, gz, files)
	if err := gz.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// Tar is a plain tar of files (name to content), in name order: what
// peftd deploy sends.
func Tar(t testing.TB, files map[string][]byte) []byte {
	t.Helper()
	n := 0
	for _, b := range files {
		n += len(b) + 1024
	}
	buf := bytes.NewBuffer(make([]byte, 0, n+2048))
	writeTar(t, buf, files)
	return buf.Bytes()
}

func writeTar(t testing.TB, w io.Writer, files map[string][]byte) {
	t.Helper()
	tw := tar.NewWriter(w)
	for _, name := range slices.Sorted(maps.Keys(files)) {
		b := files[name]
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(b)), Typeflag: tar.TypeReg}); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write(b); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
}

// NopDevice is a loader device with no engine behind it: every adapter goes
// into its slot at once and nothing computes (benchmarks of the host side
// of deploys and cold loads).
type NopDevice struct{}

// Load implements the loader's Device.
func (NopDevice) Load(context.Context, int, *lora.Adapter) error { return nil }

// Unload implements the loader's Device.
func (NopDevice) Unload(context.Context, int) error { return nil }
