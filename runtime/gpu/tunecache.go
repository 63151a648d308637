package gpu

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"

	"github.com/peftd/peftd/internal/atomicfile"
	"github.com/peftd/peftd/runtime/cuda"
)

// tuneCacheVersion names the FP8 routes a record was measured on: bump it
// when what tuneFP8Product compares changes (fp8State.linear's split,
// scaledRows' padding), so that no start takes a decision made for other
// routes.
const tuneCacheVersion = 1

// tuneKey is what a tuning's records hold for: the card, the driver and
// cuBLASLt whose configurations were timed, the accumulation, and (FP8)
// the routes the steps take beside cuBLASLt. A record of another key is
// never read (the file is named by the key's hash).
type tuneKey struct {
	Version   int    `json:"version"`
	Device    string `json:"device"`
	CC        int    `json:"compute_capability"`
	SMs       int    `json:"sms"`
	Driver    int    `json:"driver"`
	CublasLt  int    `json:"cublaslt"`
	FastAccum bool   `json:"fast_accum"`
	Routes    string `json:"routes"`
}

// tunedConfig is what cuda.Matmul.TuneGemmTNScaled kept for one product
// (rows of activations, the record's weights and SM target): the
// heuristic's configuration, the one kept (the heuristic's when none beat
// it), and their microseconds then.
type tunedConfig struct {
	Rows      int             `json:"rows"`
	Heuristic cuda.AlgoConfig `json:"heuristic"`
	Kept      cuda.AlgoConfig `json:"kept"`
	HeurUs    float64         `json:"heuristic_us"`
	KeptUs    float64         `json:"kept_us"`
}

func tunedConfigOf(r cuda.TuneResult) tunedConfig {
	c := tunedConfig{Rows: r.T}
	if len(r.Configs) > 0 && len(r.Us) == len(r.Configs) {
		c.Heuristic, c.HeurUs = r.Configs[0], r.Us[0]
		c.Kept, c.KeptUs = r.Configs[r.Kept], r.Us[r.Kept]
	} else if len(r.Configs) > 0 { // one configuration only: nothing was timed
		c.Heuristic, c.Kept = r.Configs[0], r.Configs[0]
	}
	return c
}

// result is c as TuneStats reports a tuning: the heuristic's first, then
// the configuration kept when it is another.
func (c tunedConfig) result(rec fp8TuneRecord) cuda.TuneResult {
	r := cuda.TuneResult{T: c.Rows, N: rec.N, K: rec.K, SMs: rec.SMs, Us: []float64{c.HeurUs}, Configs: []cuda.AlgoConfig{c.Heuristic}}
	if c.Kept != c.Heuristic {
		r.Us, r.Configs, r.Kept = append(r.Us, c.KeptUs), append(r.Configs, c.Kept), 1
	}
	return r
}

// fp8TuneRecord is what tuneFP8Product decided for T rows of one weight
// shape at one SM target: the configuration of the product at the rows
// the route runs (scaledRows' padding) and, when it pads, unpadded;
// whether unpadded runs (fp8State.padNo); and where the route splits K,
// the split against the whole product. For wsMaxRows rows or fewer: the
// configuration at T rows and the route against it.
type fp8TuneRecord struct {
	T       int           `json:"t"`
	N       int           `json:"n"`
	K       int           `json:"k"`
	SMs     int           `json:"sms"`
	Configs []tunedConfig `json:"configs"`
	PadNo   bool          `json:"pad_no,omitempty"`
	Split   *SplitTune    `json:"split,omitempty"`
	// Route: wsMaxRows rows or fewer (Options.TuneFP8From), the route
	// against cuBLASLt's product tuned at T rows (Configs' one entry)
	Route *RouteTune `json:"route,omitempty"`
}

// bf16TuneVersion names what a bf16 record holds: bump it when
// tuneGemms' products change.
const bf16TuneVersion = 1

// bf16TuneRecord is what tuneGemms kept for T rows x one bf16 weight
// shape at one SM target (cuda.Matmul.TuneGemmTN): cuBLASLt's first choice
// then, the algorithm kept (the same when none beat it by tuneMargin), and
// their microseconds a product.
type bf16TuneRecord struct {
	T         int       `json:"t"`
	N         int       `json:"n"`
	K         int       `json:"k"`
	SMs       int       `json:"sms"`
	Heuristic cuda.Algo `json:"heuristic"`
	Kept      cuda.Algo `json:"kept"`
	HeurUs    float64   `json:"heuristic_us"`
	KeptUs    float64   `json:"kept_us"`
}

func bf16RecordOf(r cuda.TuneResult) bf16TuneRecord {
	rec := bf16TuneRecord{T: r.T, N: r.N, K: r.K, SMs: r.SMs, Heuristic: r.Heuristic, Kept: r.Algo}
	if len(r.Us) > r.Kept {
		rec.HeurUs, rec.KeptUs = r.Us[0], r.Us[r.Kept]
	}
	return rec
}

// result is rec as TuneStats reports a tuning: the heuristic's
// microseconds, then the kept algorithm's when it is another.
func (rec bf16TuneRecord) result() cuda.TuneResult {
	r := cuda.TuneResult{T: rec.T, N: rec.N, K: rec.K, SMs: rec.SMs, Us: []float64{rec.HeurUs}, Heuristic: rec.Heuristic, Algo: rec.Kept}
	if rec.Kept != rec.Heuristic {
		r.Us, r.Kept = append(r.Us, rec.KeptUs), 1
	}
	return r
}

// tuneRecord is a record a tuning cache keeps: at is its rows, weight
// shape and SM target.
type tuneRecord interface {
	fp8TuneRecord | bf16TuneRecord
	at() [4]int
}

func (r fp8TuneRecord) at() [4]int  { return [4]int{r.T, r.N, r.K, r.SMs} }
func (r bf16TuneRecord) at() [4]int { return [4]int{r.T, r.N, r.K, r.SMs} }

// tuneCache is a tuning's records in Options.TuneCacheDir (nil: no
// cache): read when the tuning starts, written when it tuned anything new.
type tuneCache[R tuneRecord] struct {
	path    string
	key     tuneKey
	records map[[4]int]R
	dirty   bool
	loadErr error // a file there that could not be read (it is rewritten)
}

// tuneCacheFile is the cache's file.
type tuneCacheFile[R tuneRecord] struct {
	Key     tuneKey `json:"key"`
	Records []R     `json:"records"`
}

// openTuneCache is the cache of Options.TuneCacheDir for this card and
// these routes (nil without the option): its records when a file holds
// them.
func (b *Backend) openTuneCache() *tuneCache[fp8TuneRecord] {
	return openCache[fp8TuneRecord](b, "fp8", tuneCacheVersion, b.mm.FastAccum(),
		fmt.Sprintf("fp8sms=%d wg=%t ws=%t lora_beside=%t", b.f8.sms, b.f8.wg != nil, b.f8.wsAuto, b.la.on))
}

// openBF16TuneCache is tuneGemms' cache (nil without
// Options.TuneCacheDir). A bf16 record is cuBLASLt's product alone, so no
// route names it: the card, driver and cuBLASLt do.
func (b *Backend) openBF16TuneCache() *tuneCache[bf16TuneRecord] {
	return openCache[bf16TuneRecord](b, "bf16", bf16TuneVersion, false, "")
}

// openCache is the cache file prefix-<key's hash>.json in
// Options.TuneCacheDir, read.
func openCache[R tuneRecord](b *Backend, prefix string, version int, fast bool, routes string) *tuneCache[R] {
	if b.tune.cacheDir == "" {
		return nil
	}
	d := b.ctx.Device()
	key := tuneKey{Version: version, Device: d.Name, CC: d.Major*10 + d.Minor, SMs: d.SMs, FastAccum: fast, Routes: routes}
	key.Driver, _ = cuda.DriverVersion()
	key.CublasLt, _ = cuda.CublasLtVersion()
	kj, _ := json.Marshal(key)
	h := sha256.Sum256(kj)
	c := &tuneCache[R]{path: filepath.Join(b.tune.cacheDir, prefix+"-"+hex.EncodeToString(h[:8])+".json"), key: key, records: map[[4]int]R{}}
	c.load()
	return c
}

func (c *tuneCache[R]) load() {
	data, err := os.ReadFile(c.path)
	if errors.Is(err, fs.ErrNotExist) {
		return
	}
	var f tuneCacheFile[R]
	if err == nil {
		err = json.Unmarshal(data, &f)
	}
	if err == nil && f.Key != c.key {
		err = fmt.Errorf("its key %+v is not this start's %+v", f.Key, c.key)
	}
	if err != nil {
		c.loadErr = fmt.Errorf("gpu: tuning cache %s: %w", c.path, err)
		c.dirty = true // rewritten with what this start measures
		return
	}
	for _, r := range f.Records {
		c.records[r.at()] = r
	}
}

// get is the record of T rows x [N, K] at SM target sms, if any.
func (c *tuneCache[R]) get(T, N, K, sms int) (R, bool) {
	if c == nil {
		var none R
		return none, false
	}
	r, ok := c.records[[4]int{T, N, K, sms}]
	return r, ok
}

func (c *tuneCache[R]) put(r R) {
	if c == nil {
		return
	}
	c.records[r.at()] = r
	c.dirty = true
}

// save writes the records when any is new, through a temporary file
// renamed over the old (a reader never sees half a file).
func (c *tuneCache[R]) save() error {
	if c == nil || !c.dirty {
		return nil
	}
	f := tuneCacheFile[R]{Key: c.key}
	for _, r := range c.records {
		f.Records = append(f.Records, r)
	}
	sortRecords(f.Records)
	data, err := json.MarshalIndent(f, "", "\t")
	if err != nil {
		return err
	}
	if err := atomicfile.Write(c.path, data); err != nil {
		return fmt.Errorf("gpu: tuning cache %s: %w", c.path, err)
	}
	c.dirty = false
	return nil
}

// sortRecords orders records by rows, weight shape and SM target (a
// stable file for the same measurements).
func sortRecords[R tuneRecord](rs []R) {
	slices.SortFunc(rs, func(a, b R) int {
		x, y := a.at(), b.at()
		return slices.Compare(x[:], y[:])
	})
}
