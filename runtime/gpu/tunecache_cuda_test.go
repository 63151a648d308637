//go:build cuda

package gpu

import (
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"strings"
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
		results    int
		cached     int
		routes, lt int
		configs    map[[4]int]string
		cases      caseStats
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
		r.cases = caseStats{q.worst(), q.worstRow, q.match}
		t.Logf("%d products tuned in %v, %d from the cache, %d routes of 16-64 rows (%d to cuBLASLt); worst relative error %.4g (row %.4g), greedy %d exact", len(res), took, cached, r.routes, r.lt, r.cases.worst, r.cases.worstRow, q.match)
		return r // the engine closes with the test
	}
	first, second, files := twoStarts(t, dir, "fp8", "FP8 product of more than 64 rows", start, func(r run) (int, int) { return r.results, r.cached })
	if first.routes == 0 || second.routes != first.routes || second.lt != first.lt {
		t.Errorf("routes of 16-64 rows: %d (%d to cuBLASLt) tuned, %d (%d) from the cache; want some, the same", first.routes, first.lt, second.routes, second.lt)
	}
	if !reflect.DeepEqual(second.configs, first.configs) {
		t.Errorf("configurations from the cache %v, tuned %v", second.configs, first.configs)
	}
	second.cases.same(t, first.cases, fp8GrossTol)
	// a stale record: its heuristic is not cuBLASLt's now
	f := readCacheFile[fp8TuneRecord](t, files[0])
	f.Records[0].Configs[0].Heuristic.Tile = 9999
	stale := len(f.Records[0].Configs)
	writeCacheFile(t, files[0], f)
	third := start()
	if third.cached != first.results-stale || third.results != first.results {
		t.Errorf("a stale record: %d products, %d from the cache; want %d and %d", third.results, third.cached, first.results, first.results-stale)
	}
	if f = readCacheFile[fp8TuneRecord](t, files[0]); f.Records[0].Configs[0].Heuristic.Tile == 9999 {
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
		cases                    caseStats
	}
	start := func() run {
		t.Helper()
		e, b := newEngineBackend(t, m, opts, bo)
		if products, cdir := b.TuneScope(); !strings.HasPrefix(products, "bf16 products of 32-") || cdir != dir {
			t.Errorf("before the warm-up the tuning's scope is %q (cache %q), want the bf16 products from 32 rows (cache %s)", products, cdir, dir)
		}
		if err := e.Warmup(); err != nil {
			t.Fatal(err)
		}
		if products, _ := b.TuneScope(); products != "" {
			t.Errorf("after the warm-up the tuning's scope is %q, want none (it ran)", products)
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
		r.cases = caseStats{q.worst(), q.worstRow, q.match}
		t.Logf("%d products tuned in %v (%d changed), %d from the cache; worst relative error %.4g (row %.4g), greedy %d exact", len(res), took, r.changed, cached, r.cases.worst, r.cases.worstRow, q.match)
		return r
	}
	first, second, files := twoStarts(t, dir, "bf16", "bf16 product of 32 rows or more", start, func(r run) (int, int) { return r.results, r.cached })
	if !reflect.DeepEqual(second.algos, first.algos) {
		t.Errorf("algorithms from the cache differ from those tuned (%d products)", len(first.algos))
	}
	second.cases.same(t, first.cases, fixtureTol)
	f := readCacheFile[bf16TuneRecord](t, files[0])
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
	writeCacheFile(t, files[0], f)
	third := start()
	if third.cached != first.results-2 || third.results != first.results {
		t.Errorf("two stale records: %d products, %d from the cache; want %d and %d", third.results, third.cached, first.results, first.results-2)
	}
	g := readCacheFile[bf16TuneRecord](t, files[0])
	for _, r := range g.Records {
		if r.at() == f.Records[0].at() && r.Heuristic == f.Records[0].Heuristic || r.at() == f.Records[1].at() && r.Kept == f.Records[1].Kept {
			t.Errorf("stale record %v was not rewritten", r.at())
		}
	}
}

// twoStarts starts a backend twice on the tuning cache folder dir: the
// first (an empty cache) must tune some product (none skips the test: the
// fixture's steps run no `what`) and take none from the cache, leaving one
// file prefix-*.json; the second must take every product from it. counts
// is a start's products and those from the cache. It returns both starts
// and the file (a one-element slice).
func twoStarts[R any](t *testing.T, dir, prefix, what string, start func() R, counts func(R) (results, cached int)) (first, second R, files []string) {
	t.Helper()
	first = start()
	n, cached := counts(first)
	if n == 0 {
		t.Skipf("the fixture's steps run no %s: nothing to tune", what)
	}
	if cached != 0 {
		t.Errorf("an empty cache gave %d products", cached)
	}
	files, _ = filepath.Glob(filepath.Join(dir, prefix+"-*.json"))
	if len(files) != 1 {
		t.Fatalf("cache files %v, want one", files)
	}
	second = start()
	if n2, c2 := counts(second); c2 != n || n2 != n {
		t.Errorf("second start: %d products, %d from the cache; want all %d", n2, c2, n)
	}
	return first, second, files
}

// caseStats is measureCases' result a tuning test compares between
// starts.
type caseStats struct {
	worst, worstRow float64
	match           int
}

// same reports a start whose cases differ from the tuned one's (c is the
// start from the cache) or exceed bound.
func (c caseStats) same(t *testing.T, tuned caseStats, bound float64) {
	t.Helper()
	if c != tuned || !(c.worst <= bound) {
		t.Errorf("cases from the cache: worst %.4g, %d greedy exact; tuned: %.4g, %d (bound %.2g)", c.worst, c.match, tuned.worst, tuned.match, bound)
	}
}

// readCacheFile is the tuning cache file at path.
func readCacheFile[R tuneRecord](t *testing.T, path string) tuneCacheFile[R] {
	t.Helper()
	var f tuneCacheFile[R]
	data, err := os.ReadFile(path)
	if err == nil {
		err = json.Unmarshal(data, &f)
	}
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// writeCacheFile writes f as the tuning cache file at path.
func writeCacheFile[R tuneRecord](t *testing.T, path string, f tuneCacheFile[R]) {
	t.Helper()
	data, err := json.Marshal(f)
	if err == nil {
		err = os.WriteFile(path, data, 0o644)
	}
	if err != nil {
		t.Fatal(err)
	}
}
