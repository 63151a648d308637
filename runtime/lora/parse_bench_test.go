package lora_test

import (
	"slices"
	"testing"
	"time"

	"github.com/peftd/peftd/internal/adaptertest"
	"github.com/peftd/peftd/runtime/lora"
)

// BenchmarkParse8B: lora.Parse (checks and the float32 copy the loader
// keeps) of a 168 MB rank-32 adapter of Llama-3.1-8B shapes, median MB/s.
func BenchmarkParse8B(b *testing.B) {
	base := adaptertest.Llama8B(b)
	cfg, weights := adaptertest.Random(b, base, 32, 1)
	b.SetBytes(int64(len(weights)))
	var times []time.Duration
	for range b.N {
		t0 := time.Now()
		if _, err := lora.Parse("a", cfg, weights, base); err != nil {
			b.Fatal(err)
		}
		times = append(times, time.Since(t0))
	}
	slices.Sort(times)
	b.ReportMetric(float64(len(weights))/1e6/times[len(times)/2].Seconds(), "MB/s_median")
}
