//go:build cuda

package gpu

import (
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	fx "github.com/peftd/peftd/internal/fixture"
	"github.com/peftd/peftd/runtime/cuda"
	"github.com/peftd/peftd/runtime/engine"
)

// TestFP8TuneCache: Options.TuneFP8 (from 16 rows: TuneFP8From) with a
// TuneCacheDir tunes the fixture's FP8 products once and writes what it
// kept; a second backend takes every
// product from the file (the same configurations, no timing) and computes
// the fixture's cases as the first did; a record whose heuristic no longer
// matches (here edited) is stale, and that product alone is tuned again
// and the file rewritten.
func TestFP8TuneCache(t *testing.T) {
	if err := Available(); err != nil {
		t.Skipf("no GPU: %v", err)
	}
	m, adapters, cases := loadFixture(t)
	dir := t.TempDir()
	opts := engine.DefaultOptions()
	opts.AdapterSlots = len(adapters)
	// from 16 rows: the routes of 16-64 rows against cuBLASLt too
	bo := Options{WeightFormat: WeightsFP8, TuneFP8: true, TuneFP8From: 16, TuneCacheDir: dir}
	type run struct {
		results        int
		cached         int
		routes, lt     int
		configs        map[[4]int]string
		worst, worstRw float64
		match          int
	}
	start := func() run {
		t.Helper()
		e, b := newEngineBackend(t, m, opts, bo)
		if b.f8 == nil {
			t.Skip("no FP8 weights on this GPU")
		}
		if err := e.Warmup(); err != nil {
			t.Fatal(err)
		}
		res, took := b.TuneStats()
		cached, file, err := b.TuneCacheStats()
		if err != nil {
			t.Fatalf("tuning cache: %v", err)
		}
		if filepath.Dir(file) != dir {
			t.Errorf("tuning cache file %q, want one in %s", file, dir)
		}
		r := run{results: len(res), cached: cached, routes: len(b.RouteTunes()), configs: map[[4]int]string{}}
		for _, rt := range b.RouteTunes() {
			if rt.Lt {
				r.lt++
			}
		}
		for _, x := range res {
			if len(x.Configs) > 0 {
				r.configs[[4]int{x.T, x.N, x.K, x.SMs}] = x.Configs[x.Kept].String()
			}
		}
		q := measureCases(t, e, loadSlots(t, e, adapters, fx.AdapterNames, 0), cases)
		r.worst, r.worstRw, r.match = q.worst(), q.worstRow, q.match
		t.Logf("%d products tuned in %v, %d from the cache, %d routes of 16-64 rows (%d to cuBLASLt); worst relative error %.4g (row %.4g), greedy %d exact", len(res), took, cached, r.routes, r.lt, r.worst, r.worstRw, q.match)
		return r // the engine closes with the test
	}
	first := start()
	if first.results == 0 {
		t.Skip("the fixture's steps run no FP8 product of more than 64 rows: nothing to tune")
	}
	if first.cached != 0 {
		t.Errorf("an empty cache gave %d products", first.cached)
	}
	files, _ := filepath.Glob(filepath.Join(dir, "fp8-*.json"))
	if len(files) != 1 {
		t.Fatalf("cache files %v, want one", files)
	}
	second := start()
	if second.cached != first.results || second.results != first.results {
		t.Errorf("second start: %d products, %d from the cache; want all %d", second.results, second.cached, first.results)
	}
	if first.routes == 0 || second.routes != first.routes || second.lt != first.lt {
		t.Errorf("routes of 16-64 rows: %d (%d to cuBLASLt) tuned, %d (%d) from the cache; want some, the same", first.routes, first.lt, second.routes, second.lt)
	}
	if !reflect.DeepEqual(second.configs, first.configs) {
		t.Errorf("configurations from the cache %v, tuned %v", second.configs, first.configs)
	}
	if second.worst != first.worst || second.worstRw != first.worstRw || second.match != first.match || !(second.worst <= fp8GrossTol) {
		t.Errorf("cases from the cache: worst %.4g, %d greedy exact; tuned: %.4g, %d (bound %.2g)", second.worst, second.match, first.worst, first.match, fp8GrossTol)
	}
	// a stale record: its heuristic is not cuBLASLt's now
	data, err := os.ReadFile(files[0])
	if err != nil {
		t.Fatal(err)
	}
	var f tuneCacheFile[fp8TuneRecord]
	if err := json.Unmarshal(data, &f); err != nil {
		t.Fatal(err)
	}
	f.Records[0].Configs[0].Heuristic.Tile = 9999
	stale := len(f.Records[0].Configs)
	if data, err = json.Marshal(f); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(files[0], data, 0o644); err != nil {
		t.Fatal(err)
	}
	third := start()
	if third.cached != first.results-stale || third.results != first.results {
		t.Errorf("a stale record: %d products, %d from the cache; want %d and %d", third.results, third.cached, first.results, first.results-stale)
	}
	if data, err = os.ReadFile(files[0]); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(data, &f); err != nil {
		t.Fatal(err)
	}
	if f.Records[0].Configs[0].Heuristic.Tile == 9999 {
		t.Error("the stale record was not rewritten")
	}
}

// TestBF16TuneCache: Options.TuneGEMMs with a TuneCacheDir tunes the
// fixture's bf16 products once and writes the algorithms it kept; a second
// backend takes every product from the file (the same algorithms, no
// timing) and computes the fixture's cases as the first did (bit for bit:
// the same algorithms); a record whose heuristic no longer matches, and
// one whose kept algorithm cuBLASLt refuses (bytes it never made), are
// stale: those products alone are tuned again and the file rewritten.
func TestBF16TuneCache(t *testing.T) {
	if err := Available(); err != nil {
		t.Skipf("no GPU: %v", err)
	}
	m, adapters, cases := loadFixture(t)
	dir := t.TempDir()
	opts := engine.DefaultOptions()
	opts.AdapterSlots = len(adapters)
	bo := Options{TuneGEMMs: true, TuneCacheDir: dir}
	type run struct {
		results, cached, changed int
		algos                    map[[4]int]cuda.Algo
		worst, worstRw           float64
		match                    int
	}
	start := func() run {
		t.Helper()
		e, b := newEngineBackend(t, m, opts, bo)
		if err := e.Warmup(); err != nil {
			t.Fatal(err)
		}
		res, took := b.TuneStats()
		cached, file, err := b.TuneCacheStats()
		if err != nil {
			t.Fatalf("tuning cache: %v", err)
		}
		if len(res) > 0 && filepath.Dir(file) != dir {
			t.Errorf("tuning cache file %q, want one in %s", file, dir)
		}
		r := run{results: len(res), cached: cached, algos: map[[4]int]cuda.Algo{}}
		for _, x := range res {
			r.algos[[4]int{x.T, x.N, x.K, x.SMs}] = x.Algo
			if x.Kept != 0 {
				r.changed++
			}
		}
		q := measureCases(t, e, loadSlots(t, e, adapters, fx.AdapterNames, 0), cases)
		r.worst, r.worstRw, r.match = q.worst(), q.worstRow, q.match
		t.Logf("%d products tuned in %v (%d changed), %d from the cache; worst relative error %.4g (row %.4g), greedy %d exact", len(res), took, r.changed, cached, r.worst, r.worstRw, q.match)
		return r
	}
	first := start()
	if first.results == 0 {
		t.Skip("the fixture's steps run no bf16 product of 32 rows or more: nothing to tune")
	}
	if first.cached != 0 {
		t.Errorf("an empty cache gave %d products", first.cached)
	}
	files, _ := filepath.Glob(filepath.Join(dir, "bf16-*.json"))
	if len(files) != 1 {
		t.Fatalf("cache files %v, want one", files)
	}
	second := start()
	if second.cached != first.results || second.results != first.results {
		t.Errorf("second start: %d products, %d from the cache; want all %d", second.results, second.cached, first.results)
	}
	if !reflect.DeepEqual(second.algos, first.algos) {
		t.Errorf("algorithms from the cache differ from those tuned (%d products)", len(first.algos))
	}
	if second.worst != first.worst || second.worstRw != first.worstRw || second.match != first.match || !(second.worst <= fixtureTol) {
		t.Errorf("cases from the cache: worst %.4g, %d greedy exact; tuned: %.4g, %d (bound %.2g)", second.worst, second.match, first.worst, first.match, fixtureTol)
	}
	data, err := os.ReadFile(files[0])
	if err != nil {
		t.Fatal(err)
	}
	var f tuneCacheFile[bf16TuneRecord]
	if err := json.Unmarshal(data, &f); err != nil {
		t.Fatal(err)
	}
	if len(f.Records) < 2 {
		t.Skipf("%d records: the stale cases want two", len(f.Records))
	}
	f.Records[0].Heuristic[0] ^= 0xff // another first choice than cuBLASLt's now
	for i := range f.Records[1].Kept {
		f.Records[1].Kept[i] = 0xa5 // no algorithm cuBLASLt made
	}
	if f.Records[1].Kept == f.Records[1].Heuristic {
		t.Fatal("the edited record still names the heuristic")
	}
	if data, err = json.Marshal(f); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(files[0], data, 0o644); err != nil {
		t.Fatal(err)
	}
	third := start()
	if third.cached != first.results-2 || third.results != first.results {
		t.Errorf("two stale records: %d products, %d from the cache; want %d and %d", third.results, third.cached, first.results, first.results-2)
	}
	if data, err = os.ReadFile(files[0]); err != nil {
		t.Fatal(err)
	}
	var g tuneCacheFile[bf16TuneRecord]
	if err := json.Unmarshal(data, &g); err != nil {
		t.Fatal(err)
	}
	for _, r := range g.Records {
		if r.at() == f.Records[0].at() && r.Heuristic == f.Records[0].Heuristic || r.at() == f.Records[1].at() && r.Kept == f.Records[1].Kept {
			t.Errorf("stale record %v was not rewritten", r.at())
		}
	}
}
