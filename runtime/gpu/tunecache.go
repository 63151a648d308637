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

// fp8TuneKey is what tuneFP8's records hold for: the card, the driver and
// cuBLASLt whose configurations were timed, the accumulation, and the
// routes the steps take beside cuBLASLt. A record of another key is never
// read (the file is named by the key's hash).
type fp8TuneKey struct {
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

// tuneCache is tuneFP8's records in Options.TuneCacheDir (nil: no cache):
// read when the tuning starts, written when it tuned anything new.
type tuneCache struct {
	path    string
	key     fp8TuneKey
	records map[[4]int]fp8TuneRecord
	dirty   bool
	loadErr error // a file there that could not be read (it is rewritten)
}

// tuneCacheFile is the cache's file.
type tuneCacheFile struct {
	Key     fp8TuneKey      `json:"key"`
	Records []fp8TuneRecord `json:"records"`
}

// openTuneCache is the cache of Options.TuneCacheDir for this card and
// these routes (nil without the option): its records when a file holds
// them.
func (b *Backend) openTuneCache() *tuneCache {
	if b.tune.cacheDir == "" {
		return nil
	}
	d := b.ctx.Device()
	key := fp8TuneKey{Version: tuneCacheVersion, Device: d.Name, CC: d.Major*10 + d.Minor, SMs: d.SMs, FastAccum: b.mm.FastAccum(),
		Routes: fmt.Sprintf("fp8sms=%d wg=%t ws=%t lora_beside=%t", b.f8.sms, b.f8.wg != nil, b.f8.wsAuto, b.la.on)}
	key.Driver, _ = cuda.DriverVersion()
	key.CublasLt, _ = cuda.CublasLtVersion()
	kj, _ := json.Marshal(key)
	h := sha256.Sum256(kj)
	c := &tuneCache{path: filepath.Join(b.tune.cacheDir, "fp8-"+hex.EncodeToString(h[:8])+".json"), key: key, records: map[[4]int]fp8TuneRecord{}}
	c.load()
	return c
}

func (c *tuneCache) load() {
	data, err := os.ReadFile(c.path)
	if errors.Is(err, fs.ErrNotExist) {
		return
	}
	var f tuneCacheFile
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
		c.records[[4]int{r.T, r.N, r.K, r.SMs}] = r
	}
}

// get is the record of T rows x [N, K] at SM target sms, if any.
func (c *tuneCache) get(T, N, K, sms int) (fp8TuneRecord, bool) {
	if c == nil {
		return fp8TuneRecord{}, false
	}
	r, ok := c.records[[4]int{T, N, K, sms}]
	return r, ok
}

func (c *tuneCache) put(r fp8TuneRecord) {
	if c == nil {
		return
	}
	c.records[[4]int{r.T, r.N, r.K, r.SMs}] = r
	c.dirty = true
}

// save writes the records when any is new, through a temporary file
// renamed over the old (a reader never sees half a file).
func (c *tuneCache) save() error {
	if c == nil || !c.dirty {
		return nil
	}
	f := tuneCacheFile{Key: c.key}
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
func sortRecords(rs []fp8TuneRecord) {
	slices.SortFunc(rs, func(a, b fp8TuneRecord) int {
		return slices.Compare([]int{a.T, a.N, a.K, a.SMs}, []int{b.T, b.N, b.K, b.SMs})
	})
}
