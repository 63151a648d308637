package main

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"math"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"testing"
	"time"

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

// TestAdapterStream: the stream is a tar of both files byte for byte, of
// exactly the length it announces; a missing file fails before anything
// is sent.
func TestAdapterStream(t *testing.T) {
	for _, n := range []int{0, 1, 511, 512, 1 << 16, 1<<16 + 77} {
		dir := randomAdapterDir(t, n)
		r, size, err := adapterStream(dir)
		if err != nil {
			t.Fatal(err)
		}
		all, err := io.ReadAll(r)
		if err != nil {
			t.Fatal(err)
		}
		if int64(len(all)) != size {
			t.Errorf("weights of %d bytes: %d bytes streamed, %d announced", n, len(all), size)
		}
		tr := tar.NewReader(bytes.NewReader(all))
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
				t.Errorf("weights of %d bytes: %s differs (%d bytes, want %d)", n, name, len(got[name]), len(want))
			}
		}
	}
	dir := randomAdapterDir(t, 8)
	os.Remove(filepath.Join(dir, lora.WeightsFile))
	if _, _, err := adapterStream(dir); err == nil {
		t.Error("a folder without weights streamed")
	}
}

// BenchmarkDeployBody: what deploy sends for a 168 MB adapter, read by a
// local HTTP server that discards it: the client's side of a deploy.
func BenchmarkDeployBody(b *testing.B) {
	const size = 168 << 20
	dir := randomAdapterDir(b, size)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Write([]byte(`{}`))
	}))
	defer srv.Close()
	c := clientFlags{url: srv.URL, timeout: time.Minute}
	b.SetBytes(size)
	for b.Loop() {
		body, n, err := adapterStream(dir)
		if err != nil {
			b.Fatal(err)
		}
		resp, err := c.do(context.Background(), http.MethodPut, "/v1/adapters/x", "application/x-tar", sized{body, n})
		if err != nil {
			b.Fatal(err)
		}
		resp.Body.Close()
	}
}
