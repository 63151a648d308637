package loader_test

import (
	"context"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/peftd/peftd/loader"
	"github.com/peftd/peftd/loader/store"
)

// filesBytes sums the regular files under dir, as du would.
func filesBytes(t *testing.T, dir string) int64 {
	var n int64
	_ = filepath.WalkDir(dir, func(_ string, e fs.DirEntry, err error) error {
		if err == nil && e.Type().IsRegular() {
			if fi, err := e.Info(); err == nil {
				n += fi.Size()
			}
		}
		return nil
	})
	return n
}

// TestCacheBoundsUnderRandomLoad: a store of many adapters, far more than
// the host and disk bounds hold, under concurrent random acquires: host and
// disk bytes stay within their bounds after every operation and at every
// sample in between, and every acquire is served with the right adapter.
func TestCacheBoundsUnderRandomLoad(t *testing.T) {
	const slots, copies, workers = 2, 6, 4
	fsStore, err := store.NewFS(filepath.Join(t.TempDir(), "store"), store.FSOptions{PollInterval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	var maxFile, storeTotal int64
	for _, name := range fixtureAdapters {
		c, w := readAdapter(t, name)
		maxFile = max(maxFile, int64(len(c)+len(w)))
		for i := range copies {
			id := fmt.Sprintf("%s-%d", name, i)
			if _, err := fsStore.Put(context.Background(), id, c, w); err != nil {
				t.Fatal(err)
			}
			ids = append(ids, id)
			storeTotal += int64(len(c) + len(w))
		}
	}
	// The host bound holds the device's adapters and one more of the
	// largest (float32 weights about the file size), the disk bound two.
	hostLimit := (slots + 1) * maxFile * 11 / 10
	diskLimit := 2 * maxFile * 11 / 10
	e := newEnvWithStore(t, slots, fsStore, loader.Options{HostBytes: hostLimit, DiskBytes: diskLimit, NoWatch: true})
	t.Logf("%d adapters, %d store bytes; host bound %d, disk bound %d", len(ids), storeTotal, hostLimit, diskLimit)

	var maxHost, maxDisk int64
	var mu sync.Mutex
	check := func(when string) {
		st := e.m.Stats()
		disk := filesBytes(t, e.cache)
		mu.Lock()
		maxHost, maxDisk = max(maxHost, st.HostBytes), max(maxDisk, st.DiskBytes, disk)
		mu.Unlock()
		if st.HostBytes > hostLimit || st.HostLimit != hostLimit {
			t.Errorf("%s: host bytes %d, bound %d (Stats says %d)", when, st.HostBytes, hostLimit, st.HostLimit)
		}
		if st.DiskBytes > diskLimit || disk > diskLimit || st.DiskLimit != diskLimit {
			t.Errorf("%s: disk bytes %d (files %d), bound %d (Stats says %d)", when, st.DiskBytes, disk, diskLimit, st.DiskLimit)
		}
	}
	stop := make(chan struct{})
	var sampler sync.WaitGroup
	sampler.Add(1)
	go func() { // samples between operations too
		defer sampler.Done()
		for {
			select {
			case <-stop:
				return
			case <-time.After(time.Millisecond):
				check("sample")
			}
		}
	}()

	ops := 60
	if testing.Short() {
		ops = 25
	}
	var wg sync.WaitGroup
	var served sync.Map
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 7))
			for i := range ops {
				id := ids[rng.IntN(len(ids))]
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				l, err := e.m.Acquire(ctx, id)
				cancel()
				if err != nil {
					t.Errorf("worker %d op %d: Acquire(%s): %v", w, i, id, err)
					return
				}
				if got := e.dev.slotName(l.Slot()); got != id || l.Adapter() == nil {
					t.Errorf("Acquire(%s): slot %d holds %q (adapter %v)", id, l.Slot(), got, l.Adapter() != nil)
				}
				check("acquired " + id)
				time.Sleep(time.Duration(rng.IntN(500)) * time.Microsecond)
				l.Release()
				served.Store(id, true)
				check("released " + id)
			}
		}()
	}
	wg.Wait()
	close(stop)
	sampler.Wait()
	st := e.m.Stats()
	n := 0
	served.Range(func(any, any) bool { n++; return true })
	t.Logf("served %d distinct adapters; peak host %d disk %d; host evictions %d, store fetches %d, disk hits %d",
		n, maxHost, maxDisk, st.HostEvictions, st.StoreFetches, st.DiskHits)
	if st.HostEvictions == 0 || st.StoreFetches <= uint64(n) {
		t.Errorf("the bounds never acted: host evictions %d, store fetches %d for %d adapters", st.HostEvictions, st.StoreFetches, n)
	}
}

// TestHostBoundSparesDeviceAndLeases: a bound smaller than one adapter
// never takes an adapter that is leased or on the device (the total
// overshoots instead); once they leave the device they leave host memory.
func TestHostBoundSparesDeviceAndLeases(t *testing.T) {
	e := newEnv(t, 2, loader.Options{HostBytes: 1})
	a, b := e.acquire("qv-r8"), e.acquire("all-r16")
	st := e.m.Stats()
	if st.HostBytes <= 1 || st.HostEvictions != 0 || a.Adapter() == nil || b.Adapter() == nil {
		t.Fatalf("with two leases: host bytes %d evictions %d", st.HostBytes, st.HostEvictions)
	}
	a.Release()
	b.Release()
	// Released but on the device: still held.
	if e.tier("qv-r8") != loader.TierDevice || e.m.Stats().HostEvictions != 0 {
		t.Fatalf("released adapters on the device: qv-r8 at %v, evictions %d", e.tier("qv-r8"), e.m.Stats().HostEvictions)
	}
	for _, id := range []string{"attn-r32-rslora", "mlp-r64"} {
		l := e.acquire(id)
		l.Release()
	}
	// Both first adapters were replaced on the device and left host memory;
	// the disk tier is written in the background, so they reach it once
	// their writes finish.
	for _, id := range []string{"qv-r8", "all-r16"} {
		e.waitTier(id, loader.TierDisk, 5*time.Second)
	}
	if st := e.m.Stats(); st.HostEvictions != 2 {
		t.Errorf("host evictions %d, want 2", st.HostEvictions)
	}
}
