package e2e

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/peftd/peftd/infra"
	"github.com/peftd/peftd/internal/apitest"
	"github.com/peftd/peftd/internal/fixture"
	"github.com/peftd/peftd/internal/s3test"
	"github.com/peftd/peftd/server"
)

// replica is one peftd behind haproxy.
type replica struct {
	name, url string
}

// counters are one replica's loader counters and requests for one adapter.
type counters struct {
	fetches, loads, requests float64
}

func (r replica) counters(t *testing.T, adapter string) counters {
	t.Helper()
	ms := httpc.Scrape(t, r.url)
	var c counters
	c.fetches, _ = apitest.Value(ms, "peftd_adapter_store_fetches_total")
	c.loads, _ = apitest.Value(ms, "peftd_adapter_loads_total")
	c.requests, _ = apitest.Value(ms, "peftd_requests_total", "adapter", adapter, "status", "200")
	return c
}

func snapshot(t *testing.T, rs []replica, adapter string) []counters {
	t.Helper()
	out := make([]counters, len(rs))
	for i, r := range rs {
		out[i] = r.counters(t, adapter)
	}
	return out
}

// resident says whether the adapter sits on the device or in host memory
// (the replica paid its cold start and keeps it warm).
func resident(tier string) bool { return tier == "device" || tier == "host" }

func tiers(t *testing.T, rs []replica, id string) []string {
	t.Helper()
	out := make([]string, len(rs))
	for i, r := range rs {
		out[i] = tier(t, r.url, id)
	}
	return out
}

// complete runs a greedy completion of c's token-id prompt on model at url
// (a replica or haproxy, which hashes on the body's "model") and returns the
// generated token IDs.
func complete(t *testing.T, url, model string, c fixture.Case, maxTokens int) []int32 {
	t.Helper()
	r := do(t, "POST", url+"/v1/completions", map[string]any{"model": model, "prompt": c.Prompt,
		"max_tokens": maxTokens, "temperature": 0, "ignore_eos": true, "return_token_ids": true})
	if r.Status != 200 {
		t.Fatalf("%s via %s: %d %s", model, url, r.Status, r.Body)
	}
	var m struct {
		Choices []struct {
			TokenIDs []int32 `json:"token_ids"`
		} `json:"choices"`
	}
	if err := json.Unmarshal(r.Body, &m); err != nil || len(m.Choices) != 1 {
		t.Fatalf("bad completion: %v %s", err, r.Body)
	}
	return m.Choices[0].TokenIDs
}

// TestScaleOutHAProxy runs ONE versitygw S3 server, THREE peftd replicas
// (in-process, CPU, the fixture base model, each its own disk cache, all
// polling the same bucket) and haproxy with infra/haproxy/haproxy.cfg in
// front (only its ports rewritten), and checks:
//
//  1. an adapter uploaded once to the bucket with a plain S3 client serves
//     the reference tokens from every replica, hit directly;
//  2. a lightly used adapter (sequential requests through haproxy) goes to
//     one replica only: one store fetch and one device load in the whole
//     fleet, the other replicas never fetch it (one cold start);
//  3. a hot adapter (concurrent long streams through haproxy) spills past
//     the bounded load of its primary replica to 2+ replicas;
//  4. after the burst, light traffic goes to the primary only, and the
//     other replicas drop the adapter from device and host memory when
//     their short TTLs pass while the primary keeps it.
func TestScaleOutHAProxy(t *testing.T) {
	if testing.Short() {
		t.Skip("starts versitygw, haproxy and three replicas")
	}
	t0 := time.Now()
	requireHAProxy(t)
	v := s3test.Start(t)
	v.SetCredentialsEnv(t) // the replicas' S3 stores read them
	v.MakeBucket(t, "adapters")
	fx, err := fixture.Load()
	if err != nil {
		t.Fatal(err)
	}
	defer fx.Close()
	adapterDir := func(n string) string { return filepath.Join(fixture.Dir(), "adapters", n) }

	const (
		deviceTTL = 2 * time.Second
		hostTTL   = 3 * time.Second
	)
	var rs []replica
	var backends []string
	for i := range 3 {
		name := fmt.Sprintf("peftd%d", i+1)
		_, url := startServer(t, name, server.Config{Model: filepath.Join(fixture.Dir(), "base"), Store: v.StoreURL("adapters", "notify=poll", "poll=200ms"),
			Slots: 4, Threads: 1, DeviceTTL: deviceTTL, HostTTL: hostTTL, JanitorInterval: 100 * time.Millisecond})
		rs = append(rs, replica{name, url})
		backends = append(backends, strings.TrimPrefix(url, "http://"))
	}
	h := startHAProxy(t, backends)
	t.Logf("versitygw, 3 replicas and haproxy up in %v", time.Since(t0))

	// 1. Uploaded once, serves from every replica.
	t1 := time.Now()
	v.Upload(t, "adapters", "shared", adapterDir("qv-r8"))
	v.Upload(t, "adapters", "light", adapterDir("all-r16"))
	v.Upload(t, "adapters", "hot", adapterDir("mlp-r64"))
	for _, r := range rs {
		eventually(t, 30*time.Second, r.name+" to list the uploads", func() bool {
			return tier(t, r.url, "shared") != "" && tier(t, r.url, "light") != "" && tier(t, r.url, "hot") != ""
		})
	}
	t.Logf("all replicas list the uploads %v after them", time.Since(t1))
	qv := fx.Case(t, "qv-r8")
	for _, r := range rs {
		if got := complete(t, r.url, "shared", qv, len(qv.Greedy)); !slices.Equal(got, qv.Greedy) {
			t.Errorf("%s: shared (qv-r8) = %v, want %v", r.name, got, qv.Greedy)
		}
	}
	if ts := tiers(t, rs, "shared"); slices.ContainsFunc(ts, func(s string) bool { return !resident(s) }) {
		t.Errorf("shared after a request to each replica: tiers %v, want device or host everywhere", ts)
	}

	// 2. Light use: sequential requests through haproxy land on one replica.
	all := fx.Case(t, "all-r16")
	before := snapshot(t, rs, "light")
	const light = 5
	for range light {
		if got := complete(t, h.url, "light", all, len(all.Greedy)); !slices.Equal(got, all.Greedy) {
			t.Errorf("light (all-r16) via haproxy = %v, want %v", got, all.Greedy)
		}
	}
	after := snapshot(t, rs, "light")
	var owner []string
	for i, r := range rs {
		d := counters{after[i].fetches - before[i].fetches, after[i].loads - before[i].loads, after[i].requests - before[i].requests}
		t.Logf("light: %s served %v requests, fetched %v, loaded %v", r.name, d.requests, d.fetches, d.loads)
		switch d {
		case counters{}:
		case counters{fetches: 1, loads: 1, requests: light}:
			owner = append(owner, r.name)
		default:
			t.Errorf("light: %s served %v requests with %v store fetches and %v device loads; want all %d (1 fetch, 1 load) or none",
				r.name, d.requests, d.fetches, d.loads, light)
		}
	}
	if len(owner) != 1 {
		t.Errorf("light: served by %v, want exactly one replica (one cold start)", owner)
	}
	// The other replicas never fetched it (tier store); the owner holds it
	// (device or host, or its disk cache once the short TTLs pass).
	ts := tiers(t, rs, "light")
	if n := len(slices.DeleteFunc(slices.Clone(ts), func(s string) bool { return s == "store" })); n != 1 {
		t.Errorf("light: tiers %v, want it fetched from the store by exactly one replica", ts)
	}

	// 3. Hot: first find its primary with sequential requests, then burst.
	mlp := fx.Case(t, "mlp-r64")
	before = snapshot(t, rs, "hot")
	for range 3 {
		complete(t, h.url, "hot", mlp, 4)
	}
	after = snapshot(t, rs, "hot")
	primary := -1
	for i := range rs {
		if d := after[i].requests - before[i].requests; d == 3 {
			primary = i
		} else if d != 0 {
			t.Errorf("hot, sequential: %s served %v of 3", rs[i].name, d)
		}
	}
	if primary < 0 {
		t.Fatalf("hot: no single replica served the 3 sequential requests")
	}
	t.Logf("hot: primary replica %s", rs[primary].name)

	// N concurrent long streams: haproxy counts each as served by its
	// replica until it ends, and with hash-balance-factor F a replica takes a
	// new one only while it serves fewer than ceil(F/100 * (served+1) / 3),
	// served counting the whole backend: with F = 150 the second concurrent
	// request already finds the primary full (1 >= ceil(1.5*2/3) = 1) and
	// goes to the next replica on the ring.
	const burst, streamTokens = 6, 1000
	before = snapshot(t, rs, "hot")
	t2 := time.Now()
	var wg sync.WaitGroup
	startGate := make(chan struct{})
	events := make([]int, burst)
	for i := range burst {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-startGate
			_, events[i] = stream(t, h.url, map[string]any{"model": "hot", "prompt": mlp.Prompt, "max_tokens": streamTokens,
				"temperature": 0, "ignore_eos": true}, nil)
		}()
	}
	close(startGate)
	wg.Wait()
	burstTime := time.Since(t2)
	hotTiers := tiers(t, rs, "hot")
	after = snapshot(t, rs, "hot")
	var spread []string
	for i, r := range rs {
		d := after[i].requests - before[i].requests
		t.Logf("hot burst: %s served %v of %d streams (tier now %s)", r.name, d, burst, hotTiers[i])
		if d > 0 {
			spread = append(spread, r.name)
		}
	}
	t.Logf("hot burst: %d streams of %d tokens in %v", burst, streamTokens, burstTime)
	for i, n := range events {
		if n < streamTokens {
			t.Errorf("stream %d: %d events, want %d tokens", i, n, streamTokens)
		}
	}
	if len(spread) < 2 {
		t.Errorf("hot: the burst stayed on %v, want 2+ replicas (bounded-load spill)", spread)
	}

	// 4. Load gone: light traffic goes to the primary alone; the others
	// drop the adapter once their TTLs pass, the primary keeps serving it.
	before = snapshot(t, rs, "hot")
	t3 := time.Now()
	sent := 0
	eventually(t, 60*time.Second, "the extra replicas to drop hot", func() bool {
		complete(t, h.url, "hot", mlp, 4)
		sent++
		ts := tiers(t, rs, "hot")
		for i, s := range ts {
			if resident(s) != (i == primary) {
				return false
			}
		}
		hotTiers = ts
		return true
	})
	after = snapshot(t, rs, "hot")
	t.Logf("hot: %d light requests over %v until only %s holds it (tiers %v)", sent, time.Since(t3), rs[primary].name, hotTiers)
	for i, r := range rs {
		want := 0.0
		if i == primary {
			want = float64(sent)
		}
		if d := after[i].requests - before[i].requests; d != want {
			t.Errorf("hot after the burst: %s served %v light requests, want %v", r.name, d, want)
		}
	}
	// The picker's view agrees: no replica lists hot as running now.
	for _, r := range rs {
		if run := apitest.Find(httpc.Scrape(t, r.url), infra.LoRAInfoMetric); len(run) != 1 || run[0].Labels[infra.LoRARunningLabel] != "" {
			t.Errorf("%s: %v after the traffic, want no running adapters", r.name, run)
		}
	}
	t.Logf("total %v", time.Since(t0))
}
