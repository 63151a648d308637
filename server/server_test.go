package server_test

import (
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/peftd/peftd/internal/apitest"
	"github.com/peftd/peftd/server"
)

// TestConcurrentCoBatched: 64 concurrent requests over the fixture's four
// adapters and the base model, with only 2 device slots, each return
// exactly the tokens the reference gives alone; adapters were evicted to
// make room; every request answered 200.
func TestConcurrentCoBatched(t *testing.T) {
	s, url := start(t, server.Config{Store: fixtureStore(t), Slots: 2})
	if s.Device() != server.DeviceCPU {
		t.Fatalf("device %q", s.Device())
	}
	const n = 64
	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan string, n)
	for i := range n {
		c := fix.Cases[i%len(fix.Cases)]
		wg.Add(1)
		go func() {
			defer wg.Done()
			status, got, body := generate(t, url, c.AdapterName(), c)
			if status != 200 || !slices.Equal(got, c.Greedy) {
				errs <- fmt.Sprintf("request %d (case %d, adapter %q): status %d tokens %v, want %v: %s", i, c.ID, c.AdapterName(), status, got, c.Greedy, body)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
	t.Logf("%d requests over %d cases in %v", n, len(fix.Cases), time.Since(start))

	ms := httpc.Scrape(t, url)
	if v, ok := apitest.Value(ms, "peftd_adapter_evictions_total", "tier", "device"); !ok || v <= 0 {
		t.Errorf("peftd_adapter_evictions_total{tier=\"device\"} = %v (present %v), want > 0", v, ok)
	}
	if v, _ := apitest.Value(ms, "peftd_adapter_loads_total"); v < 4 {
		t.Errorf("peftd_adapter_loads_total = %v, want >= 4", v)
	}
	if v, _ := apitest.Value(ms, "peftd_adapter_store_fetches_total"); v != 4 {
		t.Errorf("peftd_adapter_store_fetches_total = %v, want 4 (one per adapter)", v)
	}
	// Every device load is in the histogram, by where it came from.
	var timed float64
	for _, src := range []string{"store", "disk", "host"} {
		v, _ := apitest.Value(ms, "peftd_adapter_load_seconds_count", "source", src)
		timed += v
	}
	if loads, _ := apitest.Value(ms, "peftd_adapter_loads_total"); timed != loads {
		t.Errorf("peftd_adapter_load_seconds counts %v loads, peftd_adapter_loads_total %v", timed, loads)
	}
	// Where cold time goes: every store fetch was read, validated and
	// written to disk; every device load is a device phase.
	for phase, want := range map[string]float64{"fetch_store": 4, "disk_write": 4} {
		if v, _ := apitest.Value(ms, "peftd_adapter_load_phase_seconds_count", "phase", phase); v != want {
			t.Errorf("peftd_adapter_load_phase_seconds{phase=%q} counts %v, want %v", phase, v, want)
		}
	}
	fetched, _ := apitest.Value(ms, "peftd_adapter_load_phase_seconds_count", "phase", "fetch_disk")
	if v, _ := apitest.Value(ms, "peftd_adapter_load_phase_seconds_count", "phase", "validate"); v != 4+fetched {
		t.Errorf("validate phases %v, want one per fetch (%v)", v, 4+fetched)
	}
	if v, _ := apitest.Value(ms, "peftd_adapter_load_phase_seconds_count", "phase", "device"); v != timed {
		t.Errorf("device phases %v, want one per device load (%v)", v, timed)
	}
	if v, ok := apitest.Value(ms, "peftd_adapters", "tier", "device"); !ok || v != 2 {
		t.Errorf("peftd_adapters{tier=\"device\"} = %v, want 2", v)
	}
	if v, ok := apitest.Value(ms, "peftd_idle"); !ok || v != 0 {
		t.Errorf("peftd_idle = %v (present %v), want 0 (adapters resident, no TTL)", v, ok)
	}
	var total float64
	for _, m := range ms {
		if m.Name != "peftd_requests_total" {
			continue
		}
		total += m.Value
		if m.Labels["status"] != "200" {
			t.Errorf("a request failed: peftd_requests_total%v %v", m.Labels, m.Value)
		}
	}
	if total != n {
		t.Errorf("peftd_requests_total sums to %v, want %d", total, n)
	}
}

// TestDeviceTTL: with a 1s device TTL an idle adapter leaves the device by
// itself, then comes back on demand with the right tokens; once host and
// device TTLs pass, peftd_idle reports 1.
func TestDeviceTTL(t *testing.T) {
	_, url := start(t, server.Config{Store: fixtureStore(t), Slots: 2, DeviceTTL: time.Second, HostTTL: 2 * time.Second})
	wantServes(t, url, "qv-r8")
	if got, _ := tier(t, url, "qv-r8"); got != "device" {
		t.Fatalf("tier after use %q, want device", got)
	}
	took := eventually(t, 3*time.Second, "qv-r8 leaving the device", func() bool {
		got, _ := tier(t, url, "qv-r8")
		return got != "device"
	})
	got, _ := tier(t, url, "qv-r8")
	t.Logf("left the device after %v (now %q)", took, got)
	if got != "host" && got != "disk" {
		t.Errorf("tier after the device TTL %q, want host or disk", got)
	}
	if v, _ := apitest.Value(httpc.Scrape(t, url), "peftd_adapter_evictions_total", "tier", "device"); v < 1 {
		t.Errorf("device evictions %v after a TTL unload", v)
	}
	wantServes(t, url, "qv-r8")
	if got, _ := tier(t, url, "qv-r8"); got != "device" {
		t.Errorf("tier after coming back %q, want device", got)
	}
	took = eventually(t, 6*time.Second, "peftd_idle 1", func() bool {
		v, _ := apitest.Value(httpc.Scrape(t, url), "peftd_idle")
		return v == 1
	})
	t.Logf("idle %v after the last request", took)
	if got, _ := tier(t, url, "qv-r8"); got != "disk" {
		t.Errorf("tier when idle %q, want disk", got)
	}
}

// TestWarmGraphsIdle: with --warm-graphs idle a CPU server (no graphs to
// record) serves exactly as with the default.
func TestWarmGraphsIdle(t *testing.T) {
	_, url := start(t, server.Config{Store: fixtureStore(t), Slots: 2, WarmGraphs: server.WarmIdle})
	wantServes(t, url, "qv-r8")
	wantServes(t, url, "all-r16")
}
