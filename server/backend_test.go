package server

import (
	"bytes"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"

	"github.com/peftd/peftd/runtime/cpu"
	"github.com/peftd/peftd/runtime/gpu"
)

// TestPickBackendFormats: on the CPU, fp8 weights and keys asked for by
// name are emulated (and the device line says so); bad names are refused.
func TestPickBackendFormats(t *testing.T) {
	for _, tc := range []struct {
		weights, kv string
		fp8W, fp8K  bool
		line        string
	}{
		{WeightsBF16, KVCacheBF16, false, false, "weights=f32 kv_cache=f32"},
		{WeightsFP8, KVCacheBF16, true, false, `weights="fp8 emulated`},
		{WeightsBF16, KVCacheFP8, false, true, `kv_cache="fp8 keys emulated`},
		{WeightsFP8, KVCacheFP8, true, true, "emulated in float32"},
	} {
		var logs bytes.Buffer
		b, dev, err := pickBackend(Config{Device: DeviceCPU, Weights: tc.weights, KVCache: tc.kv}, slog.New(slog.NewTextHandler(&logs, nil)))
		if err != nil || dev != DeviceCPU {
			t.Fatalf("%s/%s: %v, %s", tc.weights, tc.kv, err, dev)
		}
		o := b.(*cpu.Backend).Options()
		if o.FP8Weights != tc.fp8W || o.FP8Keys != tc.fp8K || !strings.Contains(logs.String(), tc.line) {
			t.Errorf("%s/%s: options %+v, log %q (want %q)", tc.weights, tc.kv, o, logs.String(), tc.line)
		}
		b.Close()
	}
	for _, s := range []string{"", "bf16", "FP8", " fp8 "} {
		if _, err := ParseKVCache(s); err != nil {
			t.Errorf("ParseKVCache(%q): %v", s, err)
		}
	}
	if _, err := ParseKVCache("int8"); err == nil || !strings.Contains(err.Error(), `"int8"`) {
		t.Errorf("ParseKVCache(int8): %v", err)
	}
}

func TestParseWarmGraphs(t *testing.T) {
	for _, c := range []struct{ in, want string }{{"", WarmReady}, {"ready", WarmReady}, {"idle", WarmIdle}} {
		if got, err := ParseWarmGraphs(c.in); err != nil || got != c.want {
			t.Errorf("ParseWarmGraphs(%q) = %q, %v; want %q", c.in, got, err, c.want)
		}
	}
	if _, err := ParseWarmGraphs("lazy"); err == nil || !strings.Contains(err.Error(), `"lazy"`) || !strings.Contains(err.Error(), "idle") {
		t.Errorf("ParseWarmGraphs(lazy): %v", err)
	}
}

// TestBaseHostBytesGPU: on the GPU the host adapter cache leaves room for
// the pinned memory the backend keeps (adapter image blocks and the
// staging ring), whatever the model.
func TestBaseHostBytesGPU(t *testing.T) {
	for _, c := range []struct {
		pinned, want int64
	}{
		{0, gpu.DefaultPinnedImageBytes + gpu.StagingRingBytes},
		{-1, gpu.StagingRingBytes},
		{3 << 30, 3<<30 + gpu.StagingRingBytes},
	} {
		if got := baseHostBytes(nil, DeviceCUDA, 0, c.pinned); got != c.want {
			t.Errorf("baseHostBytes(cuda, pinned %d) = %d, want %d", c.pinned, got, c.want)
		}
	}
}

// TestTuneCacheDir: --tune-cache's default is the peftd cache's tune folder
// (PEFTD_CACHE's, as the other caches), "-" none, anything else as given.
func TestTuneCacheDir(t *testing.T) {
	root := t.TempDir()
	t.Setenv("PEFTD_CACHE", root)
	for _, c := range []struct{ in, want string }{{"", filepath.Join(root, "tune")}, {"-", ""}, {"/srv/tune", "/srv/tune"}} {
		if got := tuneCacheDir(c.in); got != c.want {
			t.Errorf("tuneCacheDir(%q) = %q, want %q", c.in, got, c.want)
		}
	}
}
