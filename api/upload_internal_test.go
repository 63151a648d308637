package api

import (
	"bytes"
	"slices"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/gofiber/fiber/v2"
	"github.com/valyala/fasthttp"

	"github.com/peftd/peftd/internal/adaptertest"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/lora"
)

// baseCatalog is a Catalog that only knows its base model (readUpload asks
// nothing else of it).
type baseCatalog struct {
	Catalog
	base *llama.Config
}

func (c baseCatalog) BaseModel() *llama.Config { return c.base }

// BenchmarkReadUpload: the tar parse of PUT /v1/adapters/{id} (readUpload,
// with its checks against the base model) for a 168 MB rank-32 adapter of
// Llama-3.1-8B shapes, from the request body fasthttp has read. Run with
// -benchtime Nx; it reports the median MB/s of the weights file.
func BenchmarkReadUpload(b *testing.B) {
	base := adaptertest.Llama8B(b)
	cfg, weights := adaptertest.Random(b, base, 32, 1)
	body := adaptertest.Tar(b, map[string][]byte{lora.ConfigFile: cfg, lora.WeightsFile: weights})
	s := New(Config{Catalog: baseCatalog{base: base}})
	lim := s.uploadLimits(s.cfg.Catalog)
	app := fiber.New()
	var times []time.Duration
	b.SetBytes(int64(len(weights)))
	b.ResetTimer()
	for range b.N {
		rc := &fasthttp.RequestCtx{}
		rc.Request.SetBodyRaw(body)
		c := app.AcquireCtx(rc)
		t0 := time.Now()
		gotCfg, gotW, err := s.readUpload(c, lim)
		times = append(times, time.Since(t0))
		app.ReleaseCtx(c)
		if err != nil || len(gotCfg) != len(cfg) || len(gotW) != len(weights) {
			b.Fatalf("readUpload: %v (%d, %d bytes)", err, len(gotCfg), len(gotW))
		}
	}
	b.Logf("readUpload: %v", times)
	slices.Sort(times)
	b.ReportMetric(float64(len(weights))/1e6/times[len(times)/2].Seconds(), "MB/s_median")
}

// TestReadUploadInPlace: the weights of a plain tar are taken from the
// body in place, whatever else the tar holds (other files, a folder, long
// names in PAX headers), byte for byte; a tar.gz's are copied out.
func TestReadUploadInPlace(t *testing.T) {
	base, err := llama.ParseConfig([]byte(`{"hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,
		"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":100}`))
	if err != nil {
		t.Fatal(err)
	}
	cfg, weights := adaptertest.Random(t, base, 4, 2)
	s := New(Config{Catalog: baseCatalog{base: base}})
	lim := s.uploadLimits(s.cfg.Catalog)
	app := fiber.New()
	long := strings.Repeat("x", 150)
	for _, c := range []struct {
		name  string
		files map[string][]byte
		gz    bool
	}{
		{"top level", map[string][]byte{lora.ConfigFile: cfg, lora.WeightsFile: weights}, false},
		{"one folder down, after a README", map[string][]byte{"a/README.md": []byte("hello"), "a/" + lora.ConfigFile: cfg, "a/" + lora.WeightsFile: weights}, false},
		{"long folder name (PAX)", map[string][]byte{long + "/" + lora.ConfigFile: cfg, long + "/" + lora.WeightsFile: weights, "0" + long: []byte("x")}, false},
		{"tar.gz", map[string][]byte{lora.ConfigFile: cfg, lora.WeightsFile: weights}, true},
	} {
		body := adaptertest.Tar(t, c.files)
		if c.gz {
			body = adaptertest.TarGz(t, c.files)
		}
		rc := &fasthttp.RequestCtx{}
		rc.Request.SetBodyRaw(body)
		ctx := app.AcquireCtx(rc)
		gotCfg, gotW, err := s.readUpload(ctx, lim)
		app.ReleaseCtx(ctx)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if !bytes.Equal(gotCfg, cfg) || !bytes.Equal(gotW, weights) {
			t.Errorf("%s: files differ", c.name)
		}
		in := func(b []byte) bool {
			p, lo := uintptr(unsafe.Pointer(unsafe.SliceData(b))), uintptr(unsafe.Pointer(unsafe.SliceData(body)))
			return len(b) > 0 && p >= lo && p+uintptr(len(b)) <= lo+uintptr(len(body))
		}
		if in(gotW) == c.gz {
			t.Errorf("%s: weights in the body: %v, want %v", c.name, in(gotW), !c.gz)
		}
	}
}
