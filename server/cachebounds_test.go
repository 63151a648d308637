package server_test

import (
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/peftd/peftd/internal/adaptertest"
	"github.com/peftd/peftd/internal/apitest"
	"github.com/peftd/peftd/internal/fixture"
	"github.com/peftd/peftd/internal/testlog"
	"github.com/peftd/peftd/server"
)

// TestCacheBoundsDerived: with no flag the host and disk bounds come from
// the machine, are logged once each with their source and exported; -1
// means no bound.
func TestCacheBoundsDerived(t *testing.T) {
	var logs testlog.Buffer
	s, url := start(t, server.Config{Store: fixtureStore(t), Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	st := s.Core().Loader.Stats()
	for _, re := range []string{
		`msg="host adapter cache bound" bytes=` + fmt.Sprint(st.HostLimit) + ` size=\S+ source=(cgroup|meminfo) `,
		`msg="disk adapter cache bound" bytes=` + fmt.Sprint(st.DiskLimit) + ` size=\S+ source=statfs `,
	} {
		if !regexp.MustCompile(re).MatchString(logs.String()) {
			t.Errorf("no log line %s in:\n%s", re, logs.String())
		}
	}
	for _, l := range regexp.MustCompile(`.*cache bound.*`).FindAllString(logs.String(), -1) {
		t.Log(l)
	}
	if st.HostLimit <= 0 || st.DiskLimit <= 0 {
		t.Fatalf("derived bounds: host %d disk %d", st.HostLimit, st.DiskLimit)
	}
	ms := httpc.Scrape(t, url)
	for tier, want := range map[string]int64{"host": st.HostLimit, "disk": st.DiskLimit} {
		if v, ok := apitest.Value(ms, "peftd_adapter_cache_limit_bytes", "tier", tier); !ok || v != float64(want) {
			t.Errorf("peftd_adapter_cache_limit_bytes{tier=%q} = %v (present %v), want %d", tier, v, ok, want)
		}
	}

	logs.Reset()
	s, url = start(t, server.Config{Store: fixtureStore(t), HostBytes: -1, DiskBytes: 12345, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if st := s.Core().Loader.Stats(); st.HostLimit != 0 || st.DiskLimit != 12345 {
		t.Errorf("HostBytes -1, DiskBytes 12345: limits %d %d", st.HostLimit, st.DiskLimit)
	}
	for _, re := range []string{`msg="host adapter cache bound" bytes=0 size=none source=unbounded `, `msg="disk adapter cache bound" bytes=12345 \S+ source=flag `} {
		if !regexp.MustCompile(re).MatchString(logs.String()) {
			t.Errorf("no log line %s in:\n%s", re, logs.String())
		}
	}
	ms = httpc.Scrape(t, url)
	if _, ok := apitest.Value(ms, "peftd_adapter_cache_limit_bytes", "tier", "host"); ok {
		t.Error("an unbounded host cache exports a limit")
	}
}

// TestCacheBoundsUnderRequests: a store of 24 adapters, several times what
// the host and disk bounds hold, under concurrent random requests through
// the HTTP API: every request answers the adapter's reference tokens, and
// host and disk bytes stay within their bounds after every request and at
// every sample in between (the files on disk too).
func TestCacheBoundsUnderRequests(t *testing.T) {
	const slots, copies, clients = 2, 6, 3
	storeDir := t.TempDir()
	var ids []string
	orig := map[string]string{}
	var maxFile int64
	for _, n := range fixture.AdapterNames {
		c, w := adaptertest.Read(t, adapterDir(n))
		maxFile = max(maxFile, int64(len(c)+len(w)))
		for i := range copies {
			id := fmt.Sprintf("%s-%d", n, i)
			adaptertest.Copy(t, adapterDir(n), filepath.Join(storeDir, id))
			ids = append(ids, id)
			orig[id] = n
		}
	}
	// Host: the device's adapters and one more of the largest (float32
	// weights, about the file size); disk: two of the largest.
	hostLimit, diskLimit := (slots+1)*maxFile*11/10, 2*maxFile*11/10
	cacheDir := t.TempDir()
	s, url := start(t, server.Config{Store: storeDir, Slots: slots, HostBytes: hostLimit, DiskBytes: diskLimit, CacheDir: cacheDir})

	var mu sync.Mutex
	var peakHost, peakDisk int64
	check := func(when string) {
		st := s.Core().Loader.Stats()
		files := dirFiles(cacheDir)
		mu.Lock()
		peakHost, peakDisk = max(peakHost, st.HostBytes), max(peakDisk, st.DiskBytes, files)
		mu.Unlock()
		if st.HostBytes > hostLimit {
			t.Errorf("%s: host bytes %d > bound %d", when, st.HostBytes, hostLimit)
		}
		if st.DiskBytes > diskLimit || files > diskLimit {
			t.Errorf("%s: disk bytes %d (files %d) > bound %d", when, st.DiskBytes, files, diskLimit)
		}
	}
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			select {
			case <-stop:
				return
			case <-time.After(2 * time.Millisecond):
				check("sample")
			}
		}
	}()

	perClient := 15
	if testing.Short() {
		perClient = 8
	}
	var wg sync.WaitGroup
	for cl := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(cl), 11))
			for range perClient {
				id := ids[rng.IntN(len(ids))]
				c := caseFor(t, orig[id])
				status, got, body := generate(t, url, id, c)
				if status != 200 || !slices.Equal(got, c.Greedy) {
					t.Errorf("%s: status %d tokens %v, want %v: %s", id, status, got, c.Greedy, body)
				}
				check("after " + id)
			}
		}()
	}
	wg.Wait()
	close(stop)
	<-sampled

	ms := httpc.Scrape(t, url)
	for tier, limit := range map[string]int64{"host": hostLimit, "disk": diskLimit} {
		if v, ok := apitest.Value(ms, "peftd_adapter_cache_limit_bytes", "tier", tier); !ok || v != float64(limit) {
			t.Errorf("peftd_adapter_cache_limit_bytes{tier=%q} = %v (present %v), want %d", tier, v, ok, limit)
		}
		if v, ok := apitest.Value(ms, "peftd_adapter_bytes", "tier", tier); !ok || v > float64(limit) {
			t.Errorf("peftd_adapter_bytes{tier=%q} = %v (present %v), bound %d", tier, v, ok, limit)
		}
	}
	evictions, _ := apitest.Value(ms, "peftd_adapter_evictions_total", "tier", "host")
	fetches, _ := apitest.Value(ms, "peftd_adapter_store_fetches_total")
	t.Logf("%d requests; peak host %d of %d, disk %d of %d; host evictions %v, store fetches %v",
		clients*perClient, peakHost, hostLimit, peakDisk, diskLimit, evictions, fetches)
	if evictions == 0 {
		t.Error("the host bound never evicted")
	}
}

// dirFiles sums the regular files under dir.
func dirFiles(dir string) int64 {
	var n int64
	_ = filepath.Walk(dir, func(_ string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() {
			n += fi.Size()
		}
		return nil
	})
	return n
}
