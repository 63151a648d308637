package store_test

import (
	"bytes"
	"context"
	"slices"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"

	"github.com/peftd/peftd/internal/adaptertest"
	"github.com/peftd/peftd/internal/s3test"
)

// BenchmarkPutOptions: minio-go PutObject of a 168 MB adapter weights file
// into versitygw with various PutObjectOptions (median MB/s of -benchtime Nx).
func BenchmarkPutOptions(b *testing.B) {
	v := s3test.Start(b)
	v.MakeBucket(b, "bench")
	_, weights := adaptertest.Random(b, adaptertest.Llama8B(b), 32, 1)
	trailing, err := minio.New(v.Addr, &minio.Options{Creds: credentials.NewStaticV4(v.AccessKey, v.Secret, ""), Region: v.Region,
		BucketLookup: minio.BucketLookupPath, TrailingHeaders: true})
	if err != nil {
		b.Fatal(err)
	}
	for _, c := range []struct {
		name     string
		opts     minio.PutObjectOptions
		trailing bool // a CRC32C trailer (minio.Options.TrailingHeaders)
	}{
		{"default", minio.PutObjectOptions{}, false},
		{"unsigned", minio.PutObjectOptions{DisableContentSha256: true}, false},
		{"single", minio.PutObjectOptions{DisableMultipart: true}, false},
		{"single-unsigned", minio.PutObjectOptions{DisableMultipart: true, DisableContentSha256: true}, false},
		{"md5-single-unsigned", minio.PutObjectOptions{DisableMultipart: true, DisableContentSha256: true, SendContentMd5: true}, false},
		{"parts64M-unsigned", minio.PutObjectOptions{PartSize: 64 << 20, DisableContentSha256: true}, false},
		{"parts32M-8threads-unsigned", minio.PutObjectOptions{PartSize: 32 << 20, NumThreads: 8, DisableContentSha256: true}, false},
		{"unsigned-crc32c", minio.PutObjectOptions{DisableContentSha256: true}, true},
		{"single-unsigned-crc32c", minio.PutObjectOptions{DisableMultipart: true, DisableContentSha256: true}, true},
	} {
		clnt := v.Client
		if c.trailing {
			clnt = trailing
		}
		b.Run(c.name, func(b *testing.B) {
			var times []time.Duration
			b.SetBytes(int64(len(weights)))
			for range b.N {
				t0 := time.Now()
				if _, err := clnt.PutObject(context.Background(), "bench", "x/adapter_model.safetensors", bytes.NewReader(weights), int64(len(weights)), c.opts); err != nil {
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
