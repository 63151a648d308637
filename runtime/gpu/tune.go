package gpu

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/peftd/peftd/runtime/cuda"
)

// tuneMinRows is the fewest rows whose products are tuned: below it
// cuBLASLt's first choice was the fastest or within 2% for every 8B
// projection on the H200 (docs/PERFORMANCE.md v0.20, TestFP8AlgoSweep in
// bf16 mode).
const tuneMinRows = 32

// tuneState is Options.TuneGEMMs: whether to tune, whether it ran, and
// what it measured.
type tuneState struct {
	on, done  bool
	results   []cuda.TuneResult
	splits    []SplitTune // FP8 weights: the K split against the tuned whole product
	took      time.Duration
	fp8       bool   // Options.TuneFP8: the FP8 products alone
	bf16      bool   // Options.TuneBF16: the bf16 products cuBLASLt runs beside the LoRA stream in decode steps, and on the whole card above wsMaxRows rows (bf16Default)
	cacheDir  string // Options.TuneCacheDir
	cached    int    // FP8 products whose configurations came from the cache
	cacheErr  error  // the cache could not be read or written
	cacheFile string // the cache's file
	fp8From   int    // Options.TuneFP8From
	routes    []RouteTune
}

// RouteTune is what Options.TuneFP8From measured for one FP8 product of
// wsMaxRows rows or fewer: microseconds a product on the route linear
// takes (peftd's own kernels, or cuBLASLt padded or split) and on
// cuBLASLt's scaled product tuned at T rows, and whether cuBLASLt runs it
// from now on.
type RouteTune struct {
	T, N, K, SMs  int
	RouteUs, LtUs float64
	Lt            bool
}

// RouteTunes reports the route decisions Options.TuneFP8From made (nil
// when it did not run).
func (b *Backend) RouteTunes() []RouteTune { return b.tune.routes }

// fp8TuneFrom is the fewest rows tuneFP8 covers (Options.TuneFP8From).
func (b *Backend) fp8TuneFrom() int {
	if b.tune.fp8From > 0 {
		return b.tune.fp8From
	}
	return wsMaxRows + 1
}

// SplitTune is what Options.TuneGEMMs measured for one FP8 product that
// splits K (fp8_split.go): microseconds a product split S ways (cuBLASLt's
// partials and fp8_splitk_reduce) and whole (the scaled product in its
// tuned configuration), and whether it runs whole from now on.
type SplitTune struct {
	T, N, K, SMs, S  int
	SplitUs, WholeUs float64
	Whole            bool
}

// SplitTunes reports the K-split decisions Options.TuneGEMMs made for FP8
// products (nil when it did not run or no product splits).
func (b *Backend) SplitTunes() []SplitTune { return b.tune.splits }

// TuneStats reports what Options.TuneGEMMs measured (nil when it did not
// run): one result per (rows, weight shape, SM target) tuned, and the time
// it took.
func (b *Backend) TuneStats() ([]cuda.TuneResult, time.Duration) { return b.tune.results, b.tune.took }

// TuneCacheStats reports how many products took their tuning from
// Options.TuneCacheDir's records, the file holding them ("" without the
// option), and what went wrong reading or writing it (the tuning stands:
// it measured what it could not read).
func (b *Backend) TuneCacheStats() (cached int, file string, err error) {
	return b.tune.cached, b.tune.cacheFile, b.tune.cacheErr
}

// tuneKind is what the tuning before the first recording times.
type tuneKind int

const (
	tuneNone        tuneKind = iota
	tuneFP8Prods             // the FP8 products (tuneFP8): Options.TuneFP8, or TuneGEMMs with FP8 weights
	tuneBF16All              // every bf16 product of tuneMinRows rows and more: Options.TuneGEMMs
	tuneBF16Default          // the bf16 decode products beside the LoRA stream, and the larger ones on the whole card (bf16Default): Options.TuneBF16
)

// tuneWhat is the tuning the options ask for with these weights (done or
// not).
func (b *Backend) tuneWhat() tuneKind {
	switch {
	case b.f8 != nil && (b.tune.on || b.tune.fp8):
		return tuneFP8Prods
	case b.f8 != nil: // Options.TuneBF16 alone: no bf16 products to tune
	case b.tune.on:
		return tuneBF16All
	case b.tune.bf16:
		return tuneBF16Default
	}
	return tuneNone
}

// TuneScope says which products the tuning before the first recording
// will time ("" when none: off, done, or eager steps), and the folder that
// keeps what it decides ("" without one): for a startup line, since a
// first start on a GPU spends seconds there.
func (b *Backend) TuneScope() (products, cacheDir string) {
	if b.tune.done || b.g.off {
		return "", ""
	}
	switch b.tuneWhat() {
	case tuneFP8Prods:
		products = fmt.Sprintf("FP8 products of %d-%d rows", b.fp8TuneFrom(), b.g.maxRows)
	case tuneBF16All:
		products = fmt.Sprintf("bf16 products of %d-%d rows", tuneMinRows, b.g.maxRows)
	case tuneBF16Default:
		var parts []string
		if b.la.on { // else no product runs beside the stream
			parts = append(parts, fmt.Sprintf("bf16 products of %d-%d rows beside the LoRA stream", tuneMinRows, min(wsMaxRows, b.g.maxRows)))
		}
		if b.g.maxRows > wsMaxRows {
			parts = append(parts, fmt.Sprintf("bf16 products of %d-%d rows on the whole card", wsMaxRows+1, b.g.maxRows))
		}
		products = strings.Join(parts, ", ")
	}
	if products == "" {
		return "", ""
	}
	return products, b.tune.cacheDir
}

// tuneGemms tunes cuBLASLt's algorithm for the bf16 products the recorded
// steps run (Options.TuneGEMMs), once, before the first recording: every
// shape of the layers' projection weights that several layers share, at
// each graph bucket of tuneMinRows rows and more, for every SM count
// target those steps set (all SMs, and the LoRA stream's partition when it
// runs beside the GEMMs). The weights of a shape are taken in turn, so the
// products read them from memory as a step does.
func (b *Backend) tuneGemms() error {
	if (!b.tune.on && !b.tune.fp8 && !b.tune.bf16) || b.tune.done || b.g.off {
		return nil
	}
	b.tune.done = true
	t0 := time.Now()
	defer func() { b.tune.took = time.Since(t0) }()
	kind := b.tuneWhat()
	switch kind {
	case tuneNone:
		return nil
	case tuneFP8Prods:
		return b.tuneFP8()
	}
	var projs []*weight
	for _, w := range b.weights {
		if w.proj {
			projs = append(projs, w)
		}
	}
	order, byShape, maxN, maxK := sharedShapes(projs, func(w *weight) tuneShape { return tuneShape{w.rows, w.cols} })
	rows := b.tuneRows(tuneMinRows)
	targets := b.tuneTargets
	if kind == tuneBF16Default {
		targets = b.bf16Default
	}
	if len(rows) == 0 || len(order) == 0 {
		return nil
	}
	in, out, err := b.tuneScratch(rows[len(rows)-1], maxN, maxK)
	if err != nil {
		return err
	}
	defer in.Free()
	defer out.Free()
	defer b.mm.SetSMTarget(0)
	b.waitPinning() // no timing beside the host memory being pinned
	cache := b.openBF16TuneCache()
	for _, n := range rows {
		for _, sh := range order {
			for _, sms := range targets(n, sh, false) {
				b.mm.SetSMTarget(sms)
				if rec, ok := cache.get(n, sh.n, sh.k, sms); ok {
					heur, err := b.mm.UseGemmTNAlgo(cuda.R16BF, cuda.R16BF, cuda.R16BF, n, sh.n, sh.k, rec.Kept)
					if err != nil && !errors.Is(err, cuda.ErrNotSupported) {
						return fmt.Errorf("gpu: tune %d rows x [%d, %d] from the cache: %w", n, sh.n, sh.k, err)
					}
					if err == nil && heur == rec.Heuristic {
						b.tune.results = append(b.tune.results, rec.result())
						b.tune.cached++
						continue
					}
					// stale (cuBLASLt's first choice is another now, or it
					// refuses the recorded one): tuned again, which starts
					// the product over from the heuristic's
				}
				ws := make([]cuda.DevicePtr, len(byShape[sh]))
				for i, w := range byShape[sh] {
					ws[i] = w.mem.Ptr()
				}
				r, err := b.mm.TuneGemmTN(b.s, out.Ptr(), cuda.R16BF, in.Ptr(), cuda.R16BF, ws, cuda.R16BF, n, sh.n, sh.k, 8, 5)
				if err != nil {
					return fmt.Errorf("gpu: tune %d rows x [%d, %d]: %w", n, sh.n, sh.k, err)
				}
				b.tune.results = append(b.tune.results, r)
				cache.put(bf16RecordOf(r))
			}
		}
	}
	if cache != nil {
		b.tune.cacheFile = cache.path
		// the tuning stands either way; a cache that cannot be written
		// makes the next start tune again
		b.tune.cacheErr = errors.Join(cache.loadErr, cache.save())
	}
	return nil
}

// tuneShape is a projection weight's rows and columns.
type tuneShape struct{ n, k int }

// sharedShapes groups weights by shape, in order of first appearance,
// leaving out a shape of one weight only (one layer's: its products would
// read the weight from L2, which no step does, so it is not tuned), and
// reports the largest rows and columns of those kept.
func sharedShapes[W any](weights []W, shape func(W) tuneShape) (order []tuneShape, byShape map[tuneShape][]W, maxN, maxK int) {
	byShape = map[tuneShape][]W{}
	for _, w := range weights {
		sh := shape(w)
		if byShape[sh] == nil {
			order = append(order, sh)
		}
		byShape[sh] = append(byShape[sh], w)
	}
	order = slices.DeleteFunc(order, func(sh tuneShape) bool { return len(byShape[sh]) < 2 })
	for _, sh := range order {
		maxN, maxK = max(maxN, sh.n), max(maxK, sh.k)
	}
	return order, byShape, maxN, maxK
}

// tuneRows is the graph buckets of from rows and more that the steps
// record.
func (b *Backend) tuneRows(from int) []int {
	var rows []int
	for _, n := range graphBuckets[:bucketIndex(b.g.maxRows)+1] {
		if n >= from {
			rows = append(rows, n)
		}
	}
	return rows
}

// tuneTargets is the SM count targets the recorded steps set for
// products of T rows x sh (fp8: FP8 weights): every SM (0), and the SMs
// left beside the LoRA stream where it holds some back.
func (b *Backend) tuneTargets(T int, sh tuneShape, fp8 bool) []int {
	targets := []int{0}
	if hold := b.holdFor(T, sh.n, sh.k, fp8); b.la.on && hold > 0 {
		targets = append(targets, max(1, b.ctx.Device().SMs-hold))
	}
	return targets
}

// bf16Beside is Options.TuneBF16's SM targets for bf16 products of T
// rows x sh (fp8 is false): the SMs left beside the LoRA stream where it
// holds some back and cuBLASLt runs the product there (gemm_ws does not
// take it: bwsTakes), else none.
func (b *Backend) bf16Beside(T int, sh tuneShape, fp8 bool) []int {
	ts := b.tuneTargets(T, sh, fp8)[1:] // not every SM: those products run without the stream
	if len(ts) > 0 && b.bws != nil && b.bwsTakes(T, sh.n, sh.k, true) {
		if _, ok := b.bws.plan(T, sh.n, sh.k); ok {
			return nil
		}
	}
	return ts
}

// bf16Default is Options.TuneBF16's SM targets for bf16 products of T
// rows x sh (fp8 is false): bf16Beside's up to wsMaxRows rows; above them
// the whole card, where the base steps run their products (steps with
// adapters hold SMs from every product above autoWideRows rows, and those
// products tuned alone ran slower beside the LoRA kernels: PERFORMANCE
// v0.70). The whole card's 65-256-row products are the mixed steps':
// tuned, an H100's base mixed steps ran 8.64 -> 8.55 ms and serve8b's
// base 7,439 -> 7,506 tok/s (v0.91, `--tune-gemms`); v0.70's H200 8,511
// -> 8,589.
func (b *Backend) bf16Default(T int, sh tuneShape, fp8 bool) []int {
	if T <= wsMaxRows {
		return b.bf16Beside(T, sh, fp8)
	}
	return []int{0}
}

// tuneScratch is the tuning's bf16 input (T rows of maxK values, all
// ~0.011) and output (T rows of maxN).
func (b *Backend) tuneScratch(T, maxN, maxK int) (in, out *cuda.DeviceBuffer, err error) {
	if in, err = b.ctx.Alloc(2 * T * maxK); err != nil {
		return nil, nil, fmt.Errorf("gpu: tune: %w", err)
	}
	if out, err = b.ctx.Alloc(2 * T * maxN); err != nil {
		in.Free()
		return nil, nil, fmt.Errorf("gpu: tune: %w", err)
	}
	if err = b.s.Memset8(in.Ptr(), 0x3c, 2*T*maxK); err != nil { // bf16 0x3c3c: ~0.011
		in.Free()
		out.Free()
		return nil, nil, fmt.Errorf("gpu: tune: %w", err)
	}
	return in, out, nil
}

// tuneFP8Reps is the products of each timed trial of the FP8 tuning, and
// splitTuneMargin how much faster than the K split the whole product must
// be to replace it (cuda's tuneMargin: noise must not swap routes).
const (
	tuneFP8Reps     = 5
	splitTuneMargin = 0.03
)

// tuneFP8 is Options.TuneGEMMs (or TuneFP8) for FP8 weights, run by
// tuneGemms. For each graph bucket of more than wsMaxRows rows (fewer
// take peftd's own FP8 kernels), each FP8 projection shape several layers
// share and each SM target the recorded steps set (all SMs, and the SMs a
// product leaves the LoRA stream):
//   - cuBLASLt's scaled product is tuned in every configuration of its one
//     algorithm (cuda.Matmul.TuneGemmTNScaled) at the rows it runs
//     (scaledRows' padding), and unpadded too, which is kept
//     (fp8State.padNo) when its best configuration is faster by
//     splitTuneMargin;
//   - where the route splits K, the split as it runs (fp8State.linear) is
//     timed against the whole tuned product, and the whole one is kept
//     (fp8State.splitWhole) when it is faster by splitTuneMargin.
//
// The products read their weights in turn, from memory, as a step does.
// With Options.TuneCacheDir, what it decided is kept there (tunecache.go)
// and a later start on the same card, driver, cuBLASLt and accumulation
// takes each product's record instead of timing it again.
func (b *Backend) tuneFP8() error {
	f := b.f8
	order, byShape, maxN, maxK := sharedShapes(f.weights, func(w *fp8Weight) tuneShape { return tuneShape{w.rows, w.cols} })
	rows := b.tuneRows(b.fp8TuneFrom())
	if len(rows) == 0 || len(order) == 0 {
		return nil
	}
	// the step's largest rows, padded as scaledRows may (to 128 rows' multiple)
	room := (rows[len(rows)-1] + 127) &^ 127
	x, out, err := b.tuneScratch(room, maxN, maxK)
	if err != nil {
		return err
	}
	defer x.Free()
	defer out.Free()
	if err := f.grow(&f.actQ, room*maxK); err != nil { // scaledRows pads where the scratch holds the rows
		return err
	}
	if err := f.grow(&f.actS, 4*room); err != nil {
		return err
	}
	defer func() {
		b.mm.SetSMTarget(0)
		f.shared, f.room, f.lone, f.plain, f.splitForce, f.ltForce = false, 0, false, false, 0, false
		f.invalidate() // the scratch holds the tuning's rows
	}()
	if rows[0] <= wsMaxRows {
		// the most rows first: a route of wsMaxRows rows or fewer that
		// pads to cuBLASLt's 128-row product is timed with that product
		// tuned
		slices.Reverse(rows)
	}
	cache := b.openTuneCache()
	// a product (rows, N, K, SM target) tuned once this start: a bucket's
	// rows padded to the next bucket's are that bucket's product
	tuned := map[[4]int]cuda.TuneResult{}
	for _, T := range rows {
		for _, sh := range order {
			ws := byShape[sh]
			for _, sms := range b.tuneTargets(T, sh, true) {
				b.mm.SetSMTarget(sms)
				f.shared, f.room, f.lone, f.plain = sms != 0, room, sms == 0, sms == 0
				if rec, ok := cache.get(T, sh.n, sh.k, sms); ok {
					if ok, err := b.useFP8Record(rec, ws[0], tuned); err != nil {
						return err
					} else if ok {
						continue
					}
				}
				rec, err := b.tuneFP8Product(T, sh, ws, sms, x.Ptr(), out.Ptr(), tuned)
				if err != nil {
					return err
				}
				cache.put(rec)
			}
		}
	}
	if cache != nil {
		b.tune.cacheFile = cache.path
		// the tuning stands either way; a cache that cannot be written
		// makes the next start tune again
		b.tune.cacheErr = errors.Join(cache.loadErr, cache.save())
	}
	return nil
}

// tuneFP8Product is tuneFP8 for T rows of the weights ws (one shape) at
// SM target sms (set), its scratch x (bf16 rows) and out: it times,
// keeps what was faster, and returns the record of it. tuned holds the
// cuBLASLt products tuned so far (it adds those it tunes): one is not
// tuned twice.
func (b *Backend) tuneFP8Product(T int, sh tuneShape, ws []*fp8Weight, sms int, x, out cuda.DevicePtr, tuned map[[4]int]cuda.TuneResult) (fp8TuneRecord, error) {
	f, gen := b.f8, b.gen
	b.waitPinning() // no timing beside the host memory being pinned
	rec := fp8TuneRecord{T: T, N: sh.n, K: sh.k, SMs: sms}
	// the route as it runs (fp8State.linear), the weights in turn
	timed := func() (float64, error) {
		ms, err := b.s.MedianMs(1, 3, func(trial int) error {
			for i := range tuneFP8Reps {
				if err := f.linear(out, x, T, ws[(trial*tuneFP8Reps+i)%len(ws)], gen); err != nil {
					return err
				}
			}
			return nil
		})
		return ms * 1000 / tuneFP8Reps, err
	}
	// x's T rows quantized into the scratch, as the route and
	// TuneGemmTNScaled read them (timed's untimed trial loads the route's
	// kernels)
	if err := f.prepare(x, T, sh.k, gen); err != nil {
		return rec, fmt.Errorf("gpu: tune fp8 %d rows x [%d, %d]: %w", T, sh.n, sh.k, err)
	}
	qs, scales := make([]cuda.DevicePtr, len(ws)), make([]cuda.DevicePtr, len(ws))
	for i, w := range ws {
		qs[i], scales[i] = w.q.Ptr(), w.scale.Ptr()
	}
	scaled := func(rows int) (cuda.TuneResult, error) {
		key := [4]int{rows, sh.n, sh.k, sms}
		if r, ok := tuned[key]; ok {
			return r, nil
		}
		r, err := b.mm.TuneGemmTNScaled(b.s, out, f.actQ.Ptr(), f.actS.Ptr(), qs, scales, rows, sh.n, sh.k, tuneFP8Reps)
		if err != nil {
			return r, fmt.Errorf("gpu: tune fp8 %d rows x [%d, %d]: %w", rows, sh.n, sh.k, err)
		}
		tuned[key] = r
		b.tune.results = append(b.tune.results, r)
		return r, nil
	}
	if T <= wsMaxRows {
		return b.tuneFP8Route(rec, timed, scaled)
	}
	split := f.split(T, sh.n, sh.k)
	var splitUs float64
	if split > 1 {
		var err error
		if splitUs, err = timed(); err != nil {
			return rec, fmt.Errorf("gpu: tune fp8 %d rows x [%d, %d]: %w", T, sh.n, sh.k, err)
		}
	}
	tp := f.padRows(T, sh.k)
	r, err := scaled(tp)
	if err != nil {
		return rec, err
	}
	rec.Configs = append(rec.Configs, tunedConfigOf(r))
	if tp != T {
		// scaledRows pads to tp rows for the heuristic's 128-row tiles; in
		// its own best configuration the product of T rows may be faster
		r2, err := scaled(T)
		if err != nil {
			return rec, err
		}
		rec.Configs = append(rec.Configs, tunedConfigOf(r2))
		if len(r.Us) > 0 && len(r2.Us) > 0 && r2.Us[r2.Kept] < r.Us[r.Kept]*(1-splitTuneMargin) {
			rec.PadNo = true
			markProduct(&f.padNo, T, sh.n, sh.k, sms)
		}
	}
	if split <= 1 {
		return rec, nil
	}
	f.splitForce = 1 // whole, in the tuned configuration
	wholeUs, err := timed()
	f.splitForce = 0
	if err != nil {
		return rec, fmt.Errorf("gpu: tune fp8 %d rows x [%d, %d] whole: %w", T, sh.n, sh.k, err)
	}
	st := SplitTune{T: T, N: sh.n, K: sh.k, SMs: sms, S: split, SplitUs: splitUs, WholeUs: wholeUs, Whole: wholeUs < splitUs*(1-splitTuneMargin)}
	if st.Whole {
		markProduct(&f.splitWhole, T, sh.n, sh.k, sms)
	}
	b.tune.splits = append(b.tune.splits, st)
	rec.Split = &st
	return rec, nil
}

// tuneFP8Route is tuneFP8Product for wsMaxRows rows or fewer (rec names
// the product, timed times linear, scaled tunes cuBLASLt's product at
// some rows): the route linear takes is timed
// against cuBLASLt's scaled product at T rows, tuned (its plan at T rows
// takes the kept configuration) and timed through linear (ltForce), and
// cuBLASLt takes the product from now on (fp8State.ltRows) when it is
// faster by splitTuneMargin.
func (b *Backend) tuneFP8Route(rec fp8TuneRecord, timed func() (float64, error), scaled func(rows int) (cuda.TuneResult, error)) (fp8TuneRecord, error) {
	f := b.f8
	T, N, K, sms := rec.T, rec.N, rec.K, rec.SMs
	routeUs, err := timed()
	if err != nil {
		return rec, fmt.Errorf("gpu: tune fp8 %d rows x [%d, %d] route: %w", T, N, K, err)
	}
	r, err := scaled(T)
	if err != nil {
		return rec, err
	}
	rec.Configs = append(rec.Configs, tunedConfigOf(r))
	f.ltForce = true
	ltUs, err := timed()
	f.ltForce = false
	if err != nil {
		return rec, fmt.Errorf("gpu: tune fp8 %d rows x [%d, %d] on cuBLASLt: %w", T, N, K, err)
	}
	rt := RouteTune{T: T, N: N, K: K, SMs: sms, RouteUs: routeUs, LtUs: ltUs, Lt: ltUs < routeUs*(1-splitTuneMargin)}
	if rt.Lt {
		markProduct(&f.ltRows, T, N, K, sms)
	}
	b.tune.routes = append(b.tune.routes, rt)
	rec.Route = &rt
	return rec, nil
}

// useFP8Record makes what rec recorded (tuneFP8Product, an earlier
// start) the products' configuration and routes, at the SM target set,
// and reports whether it could: a record the current routes or cuBLASLt's
// heuristic no longer match is stale (false), and the product is tuned
// again. w is one weight of the shape (its scales for the plan); tuned
// holds the cuBLASLt products set so far this start (tuneFP8Product's),
// which the record must agree with, and gets the record's.
func (b *Backend) useFP8Record(rec fp8TuneRecord, w *fp8Weight, tuned map[[4]int]cuda.TuneResult) (bool, error) {
	f := b.f8
	if rec.T <= wsMaxRows {
		// tuneFP8Route's record: one configuration, at T rows
		if rec.Route == nil || rec.Split != nil || len(rec.Configs) != 1 || rec.Configs[0].Rows != rec.T {
			return false, nil
		}
	} else if split := f.split(rec.T, rec.N, rec.K); rec.Route != nil || (split > 1) != (rec.Split != nil) || (rec.Split != nil && rec.Split.S != split) {
		return false, nil
	}
	for _, c := range rec.Configs {
		if r, ok := tuned[[4]int{c.Rows, rec.N, rec.K, rec.SMs}]; ok && (len(r.Configs) == 0 || r.Configs[r.Kept] != c.Kept) {
			return false, nil // set otherwise this start
		}
	}
	tp := rec.T // tuneFP8Route's records: at T rows
	if rec.T > wsMaxRows {
		tp = f.padRows(rec.T, rec.K)
	}
	want := []int{tp}
	if tp != rec.T {
		want = append(want, rec.T)
	}
	if len(rec.Configs) != len(want) {
		return false, nil
	}
	for i, c := range rec.Configs {
		if c.Rows != want[i] {
			return false, nil
		}
		heur, err := b.mm.UseScaledConfig(f.actS.Ptr(), w.scale.Ptr(), c.Rows, rec.N, rec.K, c.Kept)
		if err != nil && !errors.Is(err, cuda.ErrNotSupported) {
			return false, fmt.Errorf("gpu: tune fp8 %d rows x [%d, %d] from the cache: %w", c.Rows, rec.N, rec.K, err)
		}
		if err == nil && heur == c.Heuristic {
			continue
		}
		// stale: this product (unless cuBLASLt refused the configuration,
		// which leaves it as it was) and those set before it back to the
		// heuristic's
		if err == nil {
			if _, err := b.mm.UseScaledConfig(f.actS.Ptr(), w.scale.Ptr(), c.Rows, rec.N, rec.K, heur); err != nil {
				return false, fmt.Errorf("gpu: tune fp8 %d rows x [%d, %d]: %w", c.Rows, rec.N, rec.K, err)
			}
		}
		for _, d := range rec.Configs[:i] {
			if _, err := b.mm.UseScaledConfig(f.actS.Ptr(), w.scale.Ptr(), d.Rows, rec.N, rec.K, d.Heuristic); err != nil {
				return false, fmt.Errorf("gpu: tune fp8 %d rows x [%d, %d]: %w", d.Rows, rec.N, rec.K, err)
			}
		}
		return false, nil
	}
	for _, c := range rec.Configs {
		key := [4]int{c.Rows, rec.N, rec.K, rec.SMs}
		if _, ok := tuned[key]; !ok {
			tuned[key] = c.result(rec)
			b.tune.results = append(b.tune.results, tuned[key])
			b.tune.cached++
		}
	}
	if rec.PadNo {
		markProduct(&f.padNo, rec.T, rec.N, rec.K, rec.SMs)
	}
	if rec.Split != nil {
		if rec.Split.Whole {
			markProduct(&f.splitWhole, rec.T, rec.N, rec.K, rec.SMs)
		}
		b.tune.splits = append(b.tune.splits, *rec.Split)
	}
	if rec.Route != nil {
		if rec.Route.Lt {
			markProduct(&f.ltRows, rec.T, rec.N, rec.K, rec.SMs)
		}
		b.tune.routes = append(b.tune.routes, *rec.Route)
	}
	return true, nil
}
