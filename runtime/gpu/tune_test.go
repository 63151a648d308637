package gpu

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/peftd/peftd/runtime/cuda"
)

// TestSharedShapes groups weights by shape in order of first appearance,
// drops a shape only one weight has and reports the kept shapes' largest
// dimensions.
func TestSharedShapes(t *testing.T) {
	type w struct {
		id   int
		n, k int
	}
	ws := []w{{0, 6144, 4096}, {1, 4096, 4096}, {2, 128256, 4096}, {3, 6144, 4096}, {4, 4096, 14336}, {5, 4096, 4096}, {6, 4096, 14336}}
	order, byShape, maxN, maxK := sharedShapes(ws, func(x w) tuneShape { return tuneShape{x.n, x.k} })
	if want := []tuneShape{{6144, 4096}, {4096, 4096}, {4096, 14336}}; !slices.Equal(order, want) {
		t.Errorf("order %v, want %v", order, want)
	}
	if got := byShape[tuneShape{6144, 4096}]; len(got) != 2 || got[0].id != 0 || got[1].id != 3 {
		t.Errorf("[6144, 4096]: %v, want weights 0 and 3 in turn", got)
	}
	if maxN != 6144 || maxK != 14336 {
		t.Errorf("largest %d x %d, want 6144 x 14336 (the one-weight [128256, 4096] left out)", maxN, maxK)
	}
	if order, _, maxN, _ := sharedShapes([]w{{0, 8, 8}}, func(x w) tuneShape { return tuneShape{x.n, x.k} }); len(order) != 0 || maxN != 0 {
		t.Errorf("one weight: %v, largest rows %d; want nothing", order, maxN)
	}
}

// TestTuneCacheRoundTrip writes tuneFP8's records and reads them back
// under the same key; a file of another key, or not JSON, yields no
// records and an error naming the file, and is rewritten.
func TestTuneCacheRoundTrip(t *testing.T) {
	dir := t.TempDir()
	key := tuneKey{Version: tuneCacheVersion, Device: "NVIDIA H200", CC: 90, SMs: 132, Driver: 13000, CublasLt: 130100, FastAccum: true, Routes: "r"}
	path := filepath.Join(dir, "sub", "fp8-x.json")
	open := func(k tuneKey) *tuneCache[fp8TuneRecord] {
		c := &tuneCache[fp8TuneRecord]{path: path, key: k, records: map[[4]int]fp8TuneRecord{}}
		c.load()
		return c
	}
	c := open(key)
	if c.loadErr != nil || len(c.records) != 0 {
		t.Fatalf("no file: %v, %d records; want none and no error", c.loadErr, len(c.records))
	}
	if err := c.save(); err != nil { // nothing new: nothing written
		t.Fatal(err)
	}
	if _, err := os.Stat(path); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("save with no records wrote %s (%v)", path, err)
	}
	r := cuda.TuneResult{T: 256, N: 4096, K: 14336, SMs: 116, Us: []float64{37.3, 30, 24.5}, Kept: 2,
		Configs: []cuda.AlgoConfig{{Tile: 20, Stages: 36, Cluster: 3}, {Tile: 15, Stages: 36, Cluster: 2}, {Tile: 18, Stages: 36, Cluster: 2}}}
	recs := []fp8TuneRecord{
		{T: 256, N: 4096, K: 14336, SMs: 116, Configs: []tunedConfig{tunedConfigOf(r)}, Split: &SplitTune{T: 256, N: 4096, K: 14336, SMs: 116, S: 2, SplitUs: 29.8, WholeUs: 26.6, Whole: true}},
		{T: 96, N: 6144, K: 4096, Configs: []tunedConfig{{Rows: 128, Heuristic: r.Configs[0], Kept: r.Configs[0], HeurUs: 12}, {Rows: 96, Heuristic: r.Configs[0], Kept: r.Configs[1], HeurUs: 12.5, KeptUs: 11}}, PadNo: true},
		{T: 64, N: 4096, K: 4096, SMs: 100, Configs: []tunedConfig{{Rows: 64, Heuristic: r.Configs[0], Kept: r.Configs[1], HeurUs: 14, KeptUs: 8.1}}, Route: &RouteTune{T: 64, N: 4096, K: 4096, SMs: 100, RouteUs: 10.4, LtUs: 8.3, Lt: true}},
	}
	for _, rec := range recs {
		c.put(rec)
	}
	if err := c.save(); err != nil {
		t.Fatal(err)
	}
	c2 := open(key)
	if c2.loadErr != nil || len(c2.records) != len(recs) {
		t.Fatalf("read back: %v, %d records; want %d", c2.loadErr, len(c2.records), len(recs))
	}
	for _, want := range recs {
		got, ok := c2.get(want.T, want.N, want.K, want.SMs)
		if !ok || !reflect.DeepEqual(got, want) {
			t.Errorf("record %d x [%d, %d] at %d SMs: %+v, want %+v", want.T, want.N, want.K, want.SMs, got, want)
		}
	}
	if _, ok := c2.get(256, 4096, 14336, 0); ok {
		t.Error("a record for an SM target never tuned")
	}
	// the record's configurations as TuneStats reports them
	if res := recs[0].Configs[0].result(recs[0]); res.Kept != 1 || res.Configs[1] != r.Configs[2] || res.Us[1] != 24.5 || res.Us[0] != 37.3 {
		t.Errorf("cached result %+v: want the heuristic's 37.3 us, then the kept %s at 24.5", res, r.Configs[2])
	}
	if res := recs[1].Configs[0].result(recs[1]); res.Kept != 0 || len(res.Configs) != 1 {
		t.Errorf("cached result %+v: want the heuristic's alone", res)
	}
	other := key
	other.CublasLt++
	if c3 := open(other); c3.loadErr == nil || !strings.Contains(c3.loadErr.Error(), path) || len(c3.records) != 0 || !c3.dirty {
		t.Errorf("another cuBLASLt: %v, %d records, dirty %t; want an error naming the file, none, rewritten", c3.loadErr, len(c3.records), c3.dirty)
	}
	if err := os.WriteFile(path, []byte("{not json"), 0o644); err != nil {
		t.Fatal(err)
	}
	if c4 := open(key); c4.loadErr == nil || len(c4.records) != 0 {
		t.Errorf("a broken file: %v, %d records; want an error, none", c4.loadErr, len(c4.records))
	}
	var nilCache *tuneCache[fp8TuneRecord] // no TuneCacheDir
	nilCache.put(recs[0])
	if _, ok := nilCache.get(256, 4096, 14336, 116); ok || nilCache.save() != nil {
		t.Error("the nil cache holds records")
	}
}

// TestBF16TuneRecord: a bf16 record (TuneGemmTN's heuristic and kept
// algorithms, bytes cuBLASLt hands out) goes through a cache file and back
// as it was, reports itself to TuneStats as the tuning did, and an
// algorithm's text of the wrong length is refused.
func TestBF16TuneRecord(t *testing.T) {
	var heur, kept cuda.Algo
	for i := range heur {
		heur[i], kept[i] = byte(i), byte(255-i)
	}
	r := cuda.TuneResult{T: 64, N: 4096, K: 4096, SMs: 116, Us: []float64{16.6, 15.9, 14.4}, Kept: 2, Heuristic: heur, Algo: kept}
	rec := bf16RecordOf(r)
	if rec.HeurUs != 16.6 || rec.KeptUs != 14.4 || rec.Kept != kept || rec.Heuristic != heur {
		t.Fatalf("record %+v: want the heuristic at 16.6 us and the kept algorithm at 14.4", rec)
	}
	if res := rec.result(); res.Kept != 1 || len(res.Us) != 2 || res.Us[1] != 14.4 || res.Algo != kept || res.Heuristic != heur {
		t.Errorf("as TuneStats reports it: %+v", res)
	}
	same := bf16RecordOf(cuda.TuneResult{T: 32, N: 6144, K: 4096, Us: []float64{17.8, 18.1}, Heuristic: heur, Algo: heur})
	if res := same.result(); res.Kept != 0 || len(res.Us) != 1 {
		t.Errorf("the heuristic kept: %+v, want its time alone", res)
	}
	path := filepath.Join(t.TempDir(), "bf16-x.json")
	key := tuneKey{Version: bf16TuneVersion, Device: "NVIDIA H200", CC: 90, SMs: 132, Driver: 13000, CublasLt: 130100}
	c := &tuneCache[bf16TuneRecord]{path: path, key: key, records: map[[4]int]bf16TuneRecord{}}
	c.put(rec)
	c.put(same)
	if err := c.save(); err != nil {
		t.Fatal(err)
	}
	c2 := &tuneCache[bf16TuneRecord]{path: path, key: key, records: map[[4]int]bf16TuneRecord{}}
	c2.load()
	if c2.loadErr != nil || len(c2.records) != 2 {
		t.Fatalf("read back: %v, %d records", c2.loadErr, len(c2.records))
	}
	for _, want := range []bf16TuneRecord{rec, same} {
		if got, ok := c2.get(want.T, want.N, want.K, want.SMs); !ok || got != want {
			t.Errorf("record %v: %+v, want %+v", want.at(), got, want)
		}
	}
	var a cuda.Algo
	if err := a.UnmarshalText([]byte("00ff")); err == nil {
		t.Error("a 2-byte algorithm was read")
	}
	txt, _ := kept.MarshalText()
	if err := a.UnmarshalText(txt); err != nil || a != kept {
		t.Errorf("text %s read back as %x (%v)", txt, a, err)
	}
	txt[0] = 'z'
	if err := a.UnmarshalText(txt); err == nil {
		t.Error("text that is not hex was read")
	}
}

// TestBF16DefaultScope: Options.TuneBF16 times the products of more than
// wsMaxRows rows on the whole card only (the base steps'), those up to it
// where bf16Beside says (none without the LoRA stream), and the startup
// line names both ranges.
func TestBF16DefaultScope(t *testing.T) {
	b := &Backend{}
	sh := tuneShape{4096, 14336}
	for _, c := range []struct {
		rows int
		want []int
	}{{32, nil}, {wsMaxRows, nil}, {wsMaxRows + 1, []int{0}}, {96, []int{0}}, {256, []int{0}}} {
		if got := b.bf16Default(c.rows, sh, false); !slices.Equal(got, c.want) {
			t.Errorf("%d rows: SM targets %v, want %v", c.rows, got, c.want)
		}
	}
	b.tune.bf16, b.g.maxRows = true, 256
	for _, c := range []struct {
		stream bool
		want   string
	}{
		{false, "bf16 products of 65-256 rows on the whole card"},
		{true, "bf16 products of 32-64 rows beside the LoRA stream, bf16 products of 65-256 rows on the whole card"},
	} {
		b.la.on = c.stream
		if got, _ := b.TuneScope(); got != c.want {
			t.Errorf("LoRA stream %v: scope %q, want %q", c.stream, got, c.want)
		}
	}
	b.g.maxRows = wsMaxRows
	if got, _ := b.TuneScope(); got != "bf16 products of 32-64 rows beside the LoRA stream" {
		t.Errorf("recordings of at most %d rows: scope %q", wsMaxRows, got)
	}
}
