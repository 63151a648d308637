package api

import (
	"slices"
	"testing"
	"time"

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
