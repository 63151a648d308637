package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"io"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/peftd/peftd/runtime/lora"
)

// randomAdapterDir writes an adapter folder whose weights file holds n bytes
// of bf16 values drawn like LoRA weights (normal, std 0.02), the size of a
// rank-32 adapter on all seven projections of Llama-3.1-8B when n = 168 MB.
func randomAdapterDir(tb testing.TB, n int) string {
	tb.Helper()
	dir := tb.TempDir()
	rng := rand.New(rand.NewPCG(1, 2))
	w := make([]byte, n&^1)
	for i := 0; i < len(w); i += 2 {
		binary.LittleEndian.PutUint16(w[i:], uint16(math.Float32bits(float32(rng.NormFloat64()*0.02))>>16))
	}
	if err := os.WriteFile(filepath.Join(dir, lora.WeightsFile), w, 0o644); err != nil {
		tb.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, lora.ConfigFile), []byte(`{"r":32,"lora_alpha":64}`), 0o644); err != nil {
		tb.Fatal(err)
	}
	return dir
}

// TestAdapterArchive: the archive holds both files byte for byte, plain and
// gzipped.
func TestAdapterArchive(t *testing.T) {
	dir := randomAdapterDir(t, 1<<16)
	for _, compress := range []bool{false, true} {
		buf, err := adapterArchive(dir, compress)
		if err != nil {
			t.Fatal(err)
		}
		var r io.Reader = buf
		if compress {
			if r, err = gzip.NewReader(buf); err != nil {
				t.Fatal(err)
			}
		}
		tr := tar.NewReader(r)
		got := map[string][]byte{}
		for {
			h, err := tr.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
			got[h.Name], _ = io.ReadAll(tr)
		}
		for _, name := range []string{lora.ConfigFile, lora.WeightsFile} {
			want, _ := os.ReadFile(filepath.Join(dir, name))
			if !bytes.Equal(got[name], want) {
				t.Errorf("compress=%v: %s differs (%d bytes, want %d)", compress, name, len(got[name]), len(want))
			}
		}
	}
}

// BenchmarkAdapterArchive: building what deploy sends for a 168 MB adapter,
// as a plain tar and as a tar.gz (what deploy sent before).
func BenchmarkAdapterArchive(b *testing.B) {
	const size = 168 << 20
	dir := randomAdapterDir(b, size)
	for _, c := range []struct {
		name     string
		compress bool
	}{{"tar", false}, {"tar.gz", true}} {
		b.Run(c.name, func(b *testing.B) {
			b.SetBytes(size)
			var out int
			for b.Loop() {
				buf, err := adapterArchive(dir, c.compress)
				if err != nil {
					b.Fatal(err)
				}
				out = buf.Len()
			}
			b.ReportMetric(float64(out)/size, "ratio")
		})
	}
}
