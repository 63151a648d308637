package lora_test

import (
	"slices"
	"testing"
	"time"

	"github.com/peftd/peftd/internal/adaptertest"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/lora"
)

// BenchmarkParse8B: lora.Parse (the checks, and a copy of the bf16 bits)
// of a 168 MB rank-32 adapter of Llama-3.1-8B shapes, median MB/s.
func BenchmarkParse8B(b *testing.B) { benchParse8B(b, lora.Parse) }

// BenchmarkParse8BOwned is the loader's path: the weights are handed over
// and the bf16 pairs alias them (no copy).
func BenchmarkParse8BOwned(b *testing.B) { benchParse8B(b, lora.ParseOwned) }

func benchParse8B(b *testing.B, parse func(string, []byte, []byte, *llama.Config) (*lora.Adapter, error)) {
	base := adaptertest.Llama8B(b)
	cfg, weights := adaptertest.Random(b, base, 32, 1)
	b.SetBytes(int64(len(weights)))
	var times []time.Duration
	for range b.N {
		t0 := time.Now()
		if _, err := parse("a", cfg, weights, base); err != nil {
			b.Fatal(err)
		}
		times = append(times, time.Since(t0))
	}
	slices.Sort(times)
	b.ReportMetric(float64(len(weights))/1e6/times[len(times)/2].Seconds(), "MB/s_median")
}
