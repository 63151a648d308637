package store_test

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/peftd/peftd/internal/adaptertest"
	"github.com/peftd/peftd/internal/s3test"
	"github.com/peftd/peftd/loader/store"
)

// BenchmarkS3Get: the store's Get of a 168 MB adapter (rank 32, Llama-3.1-8B
// shapes) from versitygw with 1, 4 and 8 parallel byte ranges (median MB/s
// of -benchtime Nx).
func BenchmarkS3Get(b *testing.B) {
	v := s3test.Start(b)
	v.MakeBucket(b, "bench")
	cfg, weights := adaptertest.Random(b, adaptertest.Llama8B(b), 32, 1)
	ctx := context.Background()
	for _, streams := range []int{1, 4, 8} {
		s, err := store.NewS3(store.S3Options{Endpoint: v.Endpoint, Region: v.Region, Bucket: "bench", PathStyle: true,
			AccessKey: v.AccessKey, SecretKey: v.Secret, Notify: store.NotifyPoll, FetchStreams: streams})
		if err != nil {
			b.Fatal(err)
		}
		if streams == 1 {
			if _, err := s.Put(ctx, "a", cfg, weights); err != nil {
				b.Fatal(err)
			}
		}
		b.Run(fmt.Sprintf("streams%d", streams), func(b *testing.B) {
			var times []time.Duration
			b.SetBytes(int64(len(weights)))
			for range b.N {
				t0 := time.Now()
				if _, _, _, err := s.Get(ctx, "a", store.GetOptions{}); err != nil {
					b.Fatal(err)
				}
				times = append(times, time.Since(t0))
			}
			b.Logf("%v", times)
			slices.Sort(times)
			b.ReportMetric(float64(len(weights))/1e6/times[len(times)/2].Seconds(), "MB/s_median")
		})
	}
}
