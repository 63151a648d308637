package loader_test

import (
	"context"
	"fmt"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/peftd/peftd/internal/adaptertest"
	"github.com/peftd/peftd/internal/s3test"
	"github.com/peftd/peftd/internal/stallwatch"
	"github.com/peftd/peftd/loader"
	"github.com/peftd/peftd/loader/store"
)

// BenchmarkColdLoad8B: the host side of an adapter's cold load, S3 to its
// slot, through the Manager: a rank-32 adapter at Llama-3.1-8B shapes
// (168 MB bf16) put in versitygw under a new ID each iteration, then one
// Acquire. Reports the median Acquire and each phase the Manager reports
// (OnPhase: fetch_store, validate, disk_write, device), in ms. The host
// tier holds three such adapters, so after the untimed first loads it
// evicts one per load and its memory is reused, as in a busy server. The
// device stands in (adaptertest.NopDevice): the GPU's part is measured by
// TestDecodeBench's adapter-load bench and gpu-check's cold8b. stalls/op
// and worst_stall_ms: wakes of a stall watcher (internal/stallwatch) over
// 5 ms late during the timed loads; with -v, those over 20 ms are logged
// with the GC pauses that ended meanwhile.
func BenchmarkColdLoad8B(b *testing.B) {
	v := s3test.Start(b)
	v.MakeBucket(b, "bench")
	base := adaptertest.Llama8B(b)
	cfg, weights := adaptertest.Random(b, base, 32, 1)
	ctx := context.Background()
	st, err := store.NewS3(store.S3Options{Endpoint: v.Endpoint, Region: v.Region, Bucket: "bench", PathStyle: true,
		AccessKey: v.AccessKey, SecretKey: v.Secret, Notify: store.NotifyPoll})
	if err != nil {
		b.Fatal(err)
	}
	var mu sync.Mutex
	phases := map[string][]time.Duration{}
	m, err := loader.New(ctx, loader.Options{Store: st, Device: adaptertest.NopDevice{}, Base: base, Slots: 1, CacheDir: b.TempDir(),
		HostBytes: 3 * int64(len(weights)), RecheckInterval: -1, OnPhase: func(_, phase string, d time.Duration) {
			mu.Lock()
			phases[phase] = append(phases[phase], d)
			mu.Unlock()
		}})
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	var acquire []time.Duration
	load := func(i int) time.Duration {
		b.StopTimer()
		id := fmt.Sprintf("cold-%d", i)
		if _, err := st.Put(ctx, id, cfg, weights); err != nil {
			b.Fatal(err)
		}
		runtime.GC() // the previous load's garbage is not this one's cost
		b.StartTimer()
		t0 := time.Now()
		l, err := m.Acquire(ctx, id)
		if err != nil {
			b.Fatal(err)
		}
		d := time.Since(t0)
		l.Release()
		return d
	}
	const warm = 4 // fill the host tier: later loads reuse evicted memory
	for i := range warm {
		load(-1 - i)
	}
	// the process's stalls during the timed loads (internal/stallwatch:
	// wakes over 5 ms late), what a serving step beside the load would see
	var stalls []stallwatch.Stall
	wctx, stopWatch := context.WithCancel(ctx)
	watched := make(chan struct{})
	go func() {
		defer close(watched)
		stallwatch.Watch(wctx, time.Millisecond, 5*time.Millisecond, func(s stallwatch.Stall) {
			mu.Lock()
			stalls = append(stalls, s)
			mu.Unlock()
		})
	}()
	mu.Lock()
	clear(phases)
	mu.Unlock()
	b.SetBytes(int64(len(weights)))
	b.ResetTimer()
	for i := range b.N {
		acquire = append(acquire, load(i))
	}
	b.StopTimer()
	stopWatch()
	<-watched
	var worst time.Duration
	for _, s := range stalls {
		worst = max(worst, s.Late)
		if testing.Verbose() && s.Late > 20*time.Millisecond {
			b.Logf("stall %v late, %d GC pauses ended", s.Late, s.GCPauses)
		}
	}
	b.ReportMetric(float64(len(stalls))/float64(b.N), "stalls/op")
	b.ReportMetric(float64(worst.Microseconds())/1e3, "worst_stall_ms")
	med := func(ds []time.Duration) float64 {
		ds = slices.Clone(ds)
		slices.Sort(ds)
		return float64(ds[len(ds)/2].Microseconds()) / 1e3
	}
	b.ReportMetric(med(acquire), "acquire_ms")
	mu.Lock()
	defer mu.Unlock()
	for p, ds := range phases {
		b.ReportMetric(med(ds), p+"_ms")
	}
}
