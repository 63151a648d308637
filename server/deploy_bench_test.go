package server

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"testing"
	"time"

	"github.com/peftd/peftd/api"
	"github.com/peftd/peftd/internal/adaptertest"
	"github.com/peftd/peftd/internal/s3test"
	"github.com/peftd/peftd/internal/testlog"
	"github.com/peftd/peftd/loader"
	"github.com/peftd/peftd/loader/store"
	"github.com/peftd/peftd/runtime/lora"
)

// BenchmarkDeploy times the phases of PUT /v1/adapters/{id} (what peftd
// deploy calls) for a 168 MB rank-32 adapter of Llama-3.1-8B shapes (bf16,
// all seven projections) into a local S3 server (versitygw; skipped without
// it): lora.Check (validation alone), lora.Parse, the store's Put, the catalog's Put (validation, store,
// the loader's Offer and Sync) and the whole PUT of a plain tar over HTTP
// through the API server. The server has no engine (an 8B base model has
// no weights here): a deploy does not use it. Run with -benchtime Nx; it
// reports each phase's median MB/s of the weights file. The tar parse alone
// is api's BenchmarkReadUpload.
func BenchmarkDeploy(b *testing.B) {
	v := s3test.Start(b)
	v.MakeBucket(b, "bench")
	st, err := store.NewS3(store.S3Options{Endpoint: v.Endpoint, Region: v.Region, Bucket: "bench", PathStyle: true,
		AccessKey: v.AccessKey, SecretKey: v.Secret, Notify: store.NotifyPoll, PollInterval: time.Minute})
	if err != nil {
		b.Fatal(err)
	}
	base := adaptertest.Llama8B(b)
	cfg, weights := adaptertest.Random(b, base, 32, 1)
	body := adaptertest.Tar(b, map[string][]byte{lora.ConfigFile: cfg, lora.WeightsFile: weights})
	ctx := context.Background()
	log := testlog.Logger(b)
	mgr, err := loader.New(ctx, loader.Options{Store: st, Device: adaptertest.NopDevice{}, Base: base, Slots: 2, CacheDir: b.TempDir(),
		MaxAdapterBytes: lora.MaxWeightsBytes(base), Logger: log})
	if err != nil {
		b.Fatal(err)
	}
	defer mgr.Close()
	cat := &loaderCatalog{m: mgr, st: st, base: base}
	srv := api.New(api.Config{Catalog: cat, ModelName: "Llama-3.1-8B", Logger: log})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	go srv.Serve(ln)
	defer srv.Shutdown(ctx)
	url := "http://" + ln.Addr().String() + "/v1/adapters/"

	phases := []struct {
		name string
		run  func(i int) error
	}{
		{"check", func(int) error { _, err := lora.Check("bench", cfg, weights, base); return err }},
		{"parse", func(int) error { _, err := lora.Parse("bench", cfg, weights, base); return err }},
		{"s3put", func(int) error { _, err := st.Put(ctx, "bench-store", cfg, weights); return err }},
		{"catalog", func(int) error { return cat.Put(ctx, "bench-catalog", cfg, weights) }},
		{"http", func(int) error {
			req, err := http.NewRequest(http.MethodPut, url+"bench-http", bytes.NewReader(body))
			if err != nil {
				return err
			}
			req.Header.Set("Content-Type", "application/x-tar")
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				return err
			}
			defer resp.Body.Close()
			msg, _ := io.ReadAll(resp.Body)
			if resp.StatusCode/100 != 2 {
				return fmt.Errorf("PUT: %d %s", resp.StatusCode, msg)
			}
			return nil
		}},
	}
	times := make([][]time.Duration, len(phases))
	b.SetBytes(int64(len(weights)))
	b.ResetTimer()
	for i := range b.N {
		for p, ph := range phases {
			t0 := time.Now()
			if err := ph.run(i); err != nil {
				b.Fatalf("%s: %v", ph.name, err)
			}
			times[p] = append(times[p], time.Since(t0))
		}
	}
	b.StopTimer()
	for p, ph := range phases {
		b.Logf("%s: %v", ph.name, times[p])
		slices.Sort(times[p])
		b.ReportMetric(float64(len(weights))/1e6/times[p][len(times[p])/2].Seconds(), ph.name+"_MB/s")
	}
}
