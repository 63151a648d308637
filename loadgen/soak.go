package loadgen

// The soak driver (peftd soak): closed-loop mixed load over many adapters
// for a while, with one adapter-store outage and one adapter replaced
// mid-run, then a report of what failed, latencies and the server's memory
// at the start and the end.

import (
	"archive/tar"
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// SoakConfig describes a soak run.
type SoakConfig struct {
	URL    string // base URL, e.g. http://127.0.0.1:8080
	APIKey string // sent as a Bearer token when set
	// Adapters are every adapter ID under load; Hot is a subset of them
	// that gets HotShare of the requests (the rest go to the others, the
	// cold ones, uniformly).
	Adapters []string
	Hot      []string
	HotShare float64 // default 0.7
	// PinHot pins the hot adapters (PUT /v1/adapters/{id}/pin) before the run.
	PinHot bool
	// Reserve cold adapters (the last ones) get no request before the
	// outage starts, so that the outage finds adapters the server can only
	// fetch from the store; during the outage half the cold requests go to
	// them. With a disk cache, adapters the server has seen are served
	// from it during an outage: without a reserve nothing would need the
	// store.
	Reserve int
	// Duration of the timed load (after the warm-up).
	Duration    time.Duration
	Concurrency int // requests in flight (closed loop), default 16
	// MinTokens..MaxTokens tokens are asked per request (ignore_eos).
	MinTokens, MaxTokens int
	// StreamShare of the requests are streamed (SSE).
	StreamShare  float64
	PromptWords  int  // default 8
	TokenPrompts bool // send token-id prompts (a model without tokenizer.json)
	Seed         uint64
	// Warmup sends one request to every adapter but the reserve before the
	// timed load, so that the caches are full when the start memory is
	// read; WarmupMax bounds it (default 3m).
	Warmup    bool
	WarmupMax time.Duration

	// The outage: OutageStart runs at OutageAt (a fraction of Duration,
	// default 1/3), OutageStop OutageFor later (default 20s) and must
	// return once the store is back. Requests overlapping the outage or
	// the OutageGrace after it (default 5s) may get a 503 naming the store
	// when their adapter is cold. Nil OutageStart: no outage.
	OutageStart, OutageStop func(context.Context) error
	OutageAt                float64
	OutageFor, OutageGrace  time.Duration

	// The replacement: at ReplaceAt (a fraction of Duration, default 1/2;
	// never before the outage's grace ends) ReplaceBody (a tar.gz of an
	// adapter folder, see TarGzAdapter) is uploaded as ReplaceID with
	// PUT /v1/adapters/{id}; GET /v1/adapters/{id} must then report a new
	// version. Nil ReplaceBody: no replacement.
	ReplaceID   string
	ReplaceBody []byte
	ReplaceAt   float64

	// Mem reads the server's memory (see ProcMem); nil: not checked.
	Mem func() (Mem, error)
	// The soak fails when the server's resident memory grows from the
	// start (after the warm-up) to the end by more than MaxRSSGrowth of
	// the start (default 0.3) and RSSSlack bytes (default 64 MiB): the
	// larger bound wins. GPU memory (peftd_gpu_memory_used_bytes) may
	// grow by GPUSlack bytes (default 256 MiB).
	MaxRSSGrowth       float64
	RSSSlack, GPUSlack int64

	Client   *http.Client `json:"-"`
	Progress io.Writer    `json:"-"` // a line every ProgressEvery (default 10s) and the events; nil: none
	// ProgressEvery is the period of the progress lines.
	ProgressEvery time.Duration
}

// Routes a soak request takes.
const (
	RouteInvoke      = "invoke"      // POST /v1/adapters/{id}/invoke
	RouteCompletions = "completions" // POST /v1/completions
)

// Phases of a soak request.
const (
	PhaseWarmup   = "warmup"
	PhaseLoad     = "load"
	PhaseRecovery = "recovery" // after the load: adapters refused during the outage, asked again
)

// SoakSample is one finished soak request.
type SoakSample struct {
	Phase      string
	Route      string
	Stream     bool
	Adapter    string
	Hot        bool
	Reserve    bool // one of the reserve cold adapters
	Start, End time.Time
	// Status is the HTTP status, or, for a stream that ended with an error
	// event, the status that event's code names; 0 when no response came.
	Status  int
	Message string // the error message (empty on success)
	Tokens  int    // completion tokens
}

// Window is a time span; the zero Window holds nothing.
type Window struct{ Start, End time.Time }

// Overlaps reports whether [start, end] meets w.
func (w Window) Overlaps(start, end time.Time) bool {
	return !w.Start.IsZero() && !start.After(w.End) && !end.Before(w.Start)
}

// Verdict is how a soak sample counts.
type Verdict int

// Verdicts.
const (
	VerdictOK      Verdict = iota // served
	VerdictAllowed                // a cold adapter refused with a 503 naming the store during the outage
	VerdictFailed
)

func (v Verdict) String() string {
	switch v {
	case VerdictOK:
		return "ok"
	case VerdictAllowed:
		return "allowed"
	case VerdictFailed:
		return "failed"
	}
	return fmt.Sprintf("Verdict(%d)", int(v))
}

// Classify judges a sample against the outage window (its grace
// included): a 200 with no error is served; a 503 for a cold adapter that
// overlaps the outage and whose message names the store is allowed;
// anything else — a hot adapter refused, another status, a 503 outside the
// outage or one that does not say the store failed, no response — is a
// failure.
func Classify(s SoakSample, outage Window) Verdict {
	switch {
	case s.Status == http.StatusOK && s.Message == "":
		return VerdictOK
	case s.Status == http.StatusServiceUnavailable && !s.Hot && outage.Overlaps(s.Start, s.End) &&
		strings.Contains(strings.ToLower(s.Message), "store"):
		return VerdictAllowed
	}
	return VerdictFailed
}

// Mem is a reading of the server's memory.
type Mem struct {
	RSS, RSSAnon, RSSFile int64 // bytes: VmRSS, RssAnon, RssFile of /proc/PID/status
}

// ProcMem reads /proc/pid/status.
func ProcMem(pid int) (Mem, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return Mem{}, err
	}
	var m Mem
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		var dst *int64
		switch k {
		case "VmRSS":
			dst = &m.RSS
		case "RssAnon":
			dst = &m.RSSAnon
		case "RssFile":
			dst = &m.RSSFile
		default:
			continue
		}
		f := strings.Fields(v) // "123456 kB"
		if len(f) == 0 {
			continue
		}
		n, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return Mem{}, fmt.Errorf("/proc/%d/status: %s: %w", pid, line, err)
		}
		*dst = n << 10
	}
	if m.RSS == 0 {
		return Mem{}, fmt.Errorf("/proc/%d/status has no VmRSS", pid)
	}
	return m, nil
}

// Snapshot is the server's state at one moment: its memory and the
// /metrics counters the report compares.
type Snapshot struct {
	At      time.Time
	Mem     Mem   // zero without SoakConfig.Mem
	GPUUsed int64 // peftd_gpu_memory_used_bytes summed over GPUs; -1: not exported
	// Counters are the sums of some /metrics series (loads, evictions,
	// store fetches, disk hits, panics).
	Counters map[string]float64
}

// soakCounters are the /metrics series a snapshot keeps.
var soakCounters = []string{"peftd_adapter_loads_total", "peftd_adapter_evictions_total", "peftd_adapter_store_fetches_total",
	"peftd_adapter_disk_hits_total", "peftd_panics_total"}

// GroupStats are latency percentiles of the served requests of a group.
type GroupStats struct {
	Served   int
	P50, P99 time.Duration
}

// SoakReport is the outcome of a soak run.
type SoakReport struct {
	Duration  time.Duration // of the timed load
	Requests  int           // every request sent, warm-up and recovery included
	Served    int
	Allowed   int         // 503s for cold adapters during the outage
	Failed    int         // everything else
	ByStatus  map[int]int // failures by status (0: no response)
	Examples  []string    // a few failure messages
	AllowedEx string      // one allowed 503's message
	Tokens    int
	TokensPS  float64 // completion tokens per second of the timed load
	Overall   GroupStats
	Hot, Cold GroupStats
	// HotOutage are the hot adapters' requests that overlapped the outage
	// (its grace included); Refusal is how long the allowed 503s took.
	HotOutage, Refusal GroupStats
	// Served requests per second of the timed load before, during and
	// after the outage (by start time; the grace counts as after).
	RateBefore, RateDuring, RateAfter float64
	ByRoute                           map[string]int // requests per route (stream marked "+stream")

	Outage      Window // without the grace
	OutageGrace time.Duration
	OutageErr   string
	// ReserveMet are the requests for reserve (store-only) adapters that
	// met the outage; ReserveServed those served between the return of the
	// command stopping the store and the call of the one restarting it,
	// which only a store that is not down can do.
	ReserveMet, ReserveServed int
	Refused                   []string // cold adapters refused during the outage
	Recovered                 int      // of them, served after the outage
	NotRecovered              []string

	ReplaceID                string
	OldVersion, NewVersion   string
	ReplacedAt               time.Time
	ReplaceErr               string
	ReplacedServed           int // requests for the replaced adapter served after the replacement
	ReplacedFailed           int
	OutputBefore, OutputSame string `json:",omitempty"`

	Start, End  Snapshot
	RSSLimit    int64 // the most RSS may grow (0: not checked)
	Problems    []string
	WarmupTook  time.Duration
	WarmupCount int
}

// OK is true when the soak passed.
func (r *SoakReport) OK() bool { return len(r.Problems) == 0 }

// soaker is one run's state.
type soaker struct {
	cfg   SoakConfig
	hot   map[string]bool
	cold  []string // non-reserve cold adapters
	resv  []string // reserve cold adapters
	isRes map[string]bool
	words []string

	pmu sync.Mutex // serializes Progress writes

	mu      sync.Mutex
	samples []SoakSample
	retry   []string        // adapters refused during the outage, to ask again after it
	queued  map[string]bool // in retry or retried

	reserveOpen atomic.Bool  // the reserve may be asked (the outage began)
	inOutage    atomic.Bool  // between OutageStart and OutageStop
	afterGrace  atomic.Bool  // the outage and its grace are over
	outage      Window       // set by the events goroutine under mu
	downAt      time.Time    // when OutageStart returned (under mu)
	upAt        time.Time    // when OutageStop was called (under mu)
	replacedAt  atomic.Int64 // unix nanos; 0: not yet
	sent        atomic.Int64
	failedLive  atomic.Int64
}

// failurePause is how long a load worker waits after a failed request.
const failurePause = 20 * time.Millisecond

// RunSoak runs the soak and returns its report; the soak passed when
// report.OK(). The error is for a run that could not be made (bad config,
// no server).
func RunSoak(ctx context.Context, cfg SoakConfig) (*SoakReport, error) {
	if err := soakDefaults(&cfg); err != nil {
		return nil, err
	}
	k := &soaker{cfg: cfg, hot: map[string]bool{}, isRes: map[string]bool{}, queued: map[string]bool{},
		words: []string{"Once", "upon", "a", "time", "there", "was", "a", "little", "girl", "who", "loved", "the", "sea", "and", "the", "stars"}}
	for _, h := range cfg.Hot {
		k.hot[h] = true
	}
	for _, a := range cfg.Adapters {
		if !k.hot[a] {
			k.cold = append(k.cold, a)
		}
	}
	if r := min(cfg.Reserve, len(k.cold)); r > 0 {
		k.resv = k.cold[len(k.cold)-r:]
		k.cold = k.cold[:len(k.cold)-r]
		for _, a := range k.resv {
			k.isRes[a] = true
		}
	}
	if cfg.OutageStart == nil {
		k.reserveOpen.Store(true)
		k.afterGrace.Store(true)
	}
	rep := &SoakReport{ByStatus: map[int]int{}, ByRoute: map[string]int{}, OutageGrace: cfg.OutageGrace, ReplaceID: cfg.ReplaceID}
	if cfg.PinHot {
		for _, h := range cfg.Hot {
			if st, msg := k.simple(ctx, http.MethodPut, "/v1/adapters/"+h+"/pin", nil, ""); st != http.StatusOK {
				return nil, fmt.Errorf("soak: pin %s: HTTP %d: %s", h, st, msg)
			}
		}
	}
	if cfg.Warmup {
		t0 := time.Now()
		wctx, cancel := context.WithTimeout(ctx, cfg.WarmupMax)
		order := slices.Concat(cfg.Hot, k.cold)
		var next atomic.Int64
		var wg sync.WaitGroup
		for w := range cfg.Concurrency {
			wg.Add(1)
			go func() {
				defer wg.Done()
				rng := rand.New(rand.NewPCG(cfg.Seed, uint64(1000+w)))
				for wctx.Err() == nil {
					i := int(next.Add(1)) - 1
					if i >= len(order) {
						return
					}
					k.record(k.one(wctx, rng, PhaseWarmup, order[i]))
				}
			}()
		}
		wg.Wait()
		cancel()
		rep.WarmupTook, rep.WarmupCount = time.Since(t0), min(int(next.Load()), len(order))
		k.progress("warm-up: %d requests to %d adapters in %.1fs", len(k.samples), len(order), rep.WarmupTook.Seconds())
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	rep.Start = k.snapshot(ctx)

	start := time.Now()
	deadline := start.Add(cfg.Duration)
	lctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	var wg sync.WaitGroup
	for w := range cfg.Concurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(cfg.Seed, uint64(w)))
			// No request starts after the deadline; those in flight finish.
			// After a refusal a worker pauses a little, as a client would,
			// rather than spin on a server that fails at once.
			for lctx.Err() == nil {
				s := k.one(ctx, rng, PhaseLoad, k.pick(rng))
				k.record(s)
				if s.Status != http.StatusOK || s.Message != "" {
					select {
					case <-time.After(failurePause):
					case <-lctx.Done():
					}
				}
			}
		}()
	}
	events := make(chan struct{})
	go func() {
		defer close(events)
		k.events(lctx, start, rep)
	}()
	stopTicker := k.ticker(lctx, start)
	wg.Wait()
	<-events
	stopTicker()
	rep.Duration = time.Since(start)
	loadEnd := time.Now()

	// Every adapter refused during the outage must be served again: ask
	// those the load did not get back to.
	k.mu.Lock()
	refused := k.refusedLocked()
	k.mu.Unlock()
	if len(refused) > 0 && ctx.Err() == nil {
		if d := time.Until(k.outage.End.Add(cfg.OutageGrace)); d > 0 {
			time.Sleep(d) // the run ended within the grace
		}
		rng := rand.New(rand.NewPCG(cfg.Seed, 99))
		for _, a := range refused {
			if !k.servedAfter(a, k.outage.End) {
				k.record(k.one(ctx, rng, PhaseRecovery, a))
			}
		}
	}
	rep.End = k.snapshot(ctx)
	k.summarize(rep, start, loadEnd)
	return rep, nil
}

func soakDefaults(c *SoakConfig) error {
	if c.URL == "" || len(c.Adapters) == 0 || c.Duration <= 0 {
		return errors.New("soak: need a URL, adapters and a duration > 0")
	}
	for _, h := range c.Hot {
		if !slices.Contains(c.Adapters, h) {
			return fmt.Errorf("soak: hot adapter %q is not among the adapters", h)
		}
	}
	if c.HotShare <= 0 {
		c.HotShare = 0.7
	}
	if c.Concurrency <= 0 {
		c.Concurrency = 16
	}
	if c.MinTokens <= 0 {
		c.MinTokens = 16
	}
	if c.MaxTokens < c.MinTokens {
		c.MaxTokens = max(c.MinTokens, 32)
	}
	if c.StreamShare < 0 || c.StreamShare > 1 {
		return fmt.Errorf("soak: stream share %v is not in [0, 1]", c.StreamShare)
	}
	if c.PromptWords <= 0 {
		c.PromptWords = 8
	}
	if c.WarmupMax <= 0 {
		c.WarmupMax = 3 * time.Minute
	}
	if c.OutageAt <= 0 {
		c.OutageAt = 1.0 / 3
	}
	if c.OutageFor <= 0 {
		c.OutageFor = 20 * time.Second
	}
	if c.OutageGrace <= 0 {
		c.OutageGrace = 5 * time.Second
	}
	if (c.OutageStart == nil) != (c.OutageStop == nil) {
		return errors.New("soak: give both an outage start and an outage stop, or neither")
	}
	if c.ReplaceAt <= 0 {
		c.ReplaceAt = 0.5
	}
	if c.ReplaceBody != nil && c.ReplaceID == "" {
		if len(c.Hot) == 0 {
			return errors.New("soak: a replacement needs an adapter ID (or a hot set to take the first of)")
		}
		c.ReplaceID = c.Hot[0]
	}
	if c.MaxRSSGrowth <= 0 {
		c.MaxRSSGrowth = 0.3
	}
	if c.RSSSlack <= 0 {
		c.RSSSlack = 64 << 20
	}
	if c.GPUSlack <= 0 {
		c.GPUSlack = 256 << 20
	}
	if c.ProgressEvery <= 0 {
		c.ProgressEvery = 10 * time.Second
	}
	if c.Client == nil {
		c.Client = &http.Client{Timeout: 5 * time.Minute, Transport: &http.Transport{MaxIdleConnsPerHost: c.Concurrency + 4}}
	}
	return nil
}

// pick chooses the next adapter: first any adapter refused during the
// outage once it is over, else a hot one (HotShare), else a cold one; the
// reserve opens when the outage starts and gets half of the cold requests
// while it lasts.
func (k *soaker) pick(rng *rand.Rand) string {
	if k.afterGrace.Load() {
		k.mu.Lock()
		if n := len(k.retry); n > 0 {
			a := k.retry[n-1]
			k.retry = k.retry[:n-1]
			k.mu.Unlock()
			return a
		}
		k.mu.Unlock()
	}
	if len(k.cfg.Hot) > 0 && (rng.Float64() < k.cfg.HotShare || len(k.cold)+len(k.resv) == 0) {
		return k.cfg.Hot[rng.IntN(len(k.cfg.Hot))]
	}
	if k.reserveOpen.Load() && len(k.resv) > 0 {
		if len(k.cold) == 0 || (k.inOutage.Load() && rng.IntN(2) == 0) {
			return k.resv[rng.IntN(len(k.resv))]
		}
		if i := rng.IntN(len(k.cold) + len(k.resv)); i >= len(k.cold) {
			return k.resv[i-len(k.cold)]
		}
	}
	if len(k.cold) == 0 {
		return k.cfg.Adapters[rng.IntN(len(k.cfg.Adapters))]
	}
	return k.cold[rng.IntN(len(k.cold))]
}

func (k *soaker) record(s SoakSample) {
	k.sent.Add(1)
	k.mu.Lock()
	defer k.mu.Unlock()
	k.samples = append(k.samples, s)
	if s.Status == http.StatusOK && s.Message == "" {
		return
	}
	// A 503 naming the store for a cold adapter: ask it again once the
	// outage is over (whether the 503 was allowed is judged at the end).
	if s.Status == http.StatusServiceUnavailable && !s.Hot && !k.queued[s.Adapter] {
		k.queued[s.Adapter] = true
		k.retry = append(k.retry, s.Adapter)
	}
	if Classify(s, k.outageLocked()) == VerdictFailed {
		k.failedLive.Add(1)
	}
}

// outageLocked is the outage window with its grace; while the outage
// lasts its end is open.
func (k *soaker) outageLocked() Window {
	w := k.outage
	if w.Start.IsZero() {
		return w
	}
	if w.End.IsZero() {
		w.End = time.Now().Add(time.Hour)
	} else {
		w.End = w.End.Add(k.cfg.OutageGrace)
	}
	return w
}

// refusedLocked are the cold adapters refused during the outage, sorted.
func (k *soaker) refusedLocked() []string {
	w := k.outageLocked()
	set := map[string]bool{}
	for _, s := range k.samples {
		if Classify(s, w) == VerdictAllowed {
			set[s.Adapter] = true
		}
	}
	out := make([]string, 0, len(set))
	for a := range set {
		out = append(out, a)
	}
	slices.Sort(out)
	return out
}

// servedAfter reports whether adapter a was served by a request started after t.
func (k *soaker) servedAfter(a string, t time.Time) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	for _, s := range k.samples {
		if s.Adapter == a && s.Start.After(t) && s.Status == http.StatusOK && s.Message == "" {
			return true
		}
	}
	return false
}

// events runs the outage and the replacement at their times.
func (k *soaker) events(ctx context.Context, start time.Time, rep *SoakReport) {
	cfg := k.cfg
	sleepUntil := func(t time.Time) bool {
		select {
		case <-time.After(time.Until(t)):
			return true
		case <-ctx.Done():
			return false
		}
	}
	at := func(f float64) time.Time { return start.Add(time.Duration(f * float64(cfg.Duration))) }
	replaceAt := at(cfg.ReplaceAt)
	if cfg.OutageStart != nil {
		if !sleepUntil(at(cfg.OutageAt)) {
			return
		}
		k.mu.Lock()
		k.outage.Start = time.Now()
		k.mu.Unlock()
		k.progress("outage: stopping the store (for %v)", cfg.OutageFor)
		// The commands run to completion even past the end of the run: the
		// store must come back.
		if err := cfg.OutageStart(context.WithoutCancel(ctx)); err != nil {
			rep.OutageErr = "start: " + err.Error()
		}
		// The reserve opens once the store is down, so that no reserve
		// adapter is fetched before.
		k.mu.Lock()
		k.downAt = time.Now()
		k.mu.Unlock()
		k.reserveOpen.Store(true)
		k.inOutage.Store(true)
		sleepUntil(time.Now().Add(cfg.OutageFor))
		k.mu.Lock()
		k.upAt = time.Now()
		k.mu.Unlock()
		if err := cfg.OutageStop(context.WithoutCancel(ctx)); err != nil {
			rep.OutageErr = strings.TrimPrefix(rep.OutageErr+"; stop: "+err.Error(), "; ")
		}
		k.mu.Lock()
		k.outage.End = time.Now()
		k.mu.Unlock()
		k.inOutage.Store(false)
		k.progress("outage: the store is back after %.1fs", time.Since(k.outage.Start).Seconds())
		if !sleepUntil(time.Now().Add(cfg.OutageGrace)) {
			k.afterGrace.Store(true)
			return
		}
		k.afterGrace.Store(true)
		if t := time.Now(); replaceAt.Before(t) {
			replaceAt = t
		}
	}
	if cfg.ReplaceBody == nil || !sleepUntil(replaceAt) {
		return
	}
	k.replace(ctx, rep)
}

// replace uploads ReplaceBody as ReplaceID and checks that the server
// reports a new version.
func (k *soaker) replace(ctx context.Context, rep *SoakReport) {
	id := k.cfg.ReplaceID
	old, err := k.version(ctx, id)
	if err != nil {
		rep.ReplaceErr = "before: " + err.Error()
		return
	}
	rep.OldVersion = old
	before, _ := k.greedyText(ctx, id)
	k.progress("replace: uploading a new %s (version %s)", id, old)
	rep.ReplacedAt = time.Now()
	k.replacedAt.Store(rep.ReplacedAt.UnixNano())
	st, msg := k.simple(ctx, http.MethodPut, "/v1/adapters/"+id, k.cfg.ReplaceBody, "application/gzip")
	if st != http.StatusOK && st != http.StatusCreated {
		rep.ReplaceErr = fmt.Sprintf("PUT /v1/adapters/%s: HTTP %d: %s", id, st, msg)
		return
	}
	var info struct {
		Version string `json:"version"`
	}
	_ = json.Unmarshal([]byte(msg), &info)
	cur, err := k.version(ctx, id)
	if err != nil {
		rep.ReplaceErr = "after: " + err.Error()
		return
	}
	rep.NewVersion = cur
	switch {
	case cur == old:
		rep.ReplaceErr = fmt.Sprintf("GET /v1/adapters/%s still reports version %s after the upload", id, old)
	case info.Version != "" && cur != info.Version:
		rep.ReplaceErr = fmt.Sprintf("the upload answered version %s, GET /v1/adapters/%s reports %s", info.Version, id, cur)
	}
	after, err := k.greedyText(ctx, id)
	if err != nil {
		rep.ReplaceErr = strings.TrimPrefix(rep.ReplaceErr+"; serving the new version: "+err.Error(), "; ")
	} else if before != "" {
		rep.OutputBefore = before
		rep.OutputSame = "no"
		if before == after {
			rep.OutputSame = "yes"
		}
	}
	k.progress("replace: %s is now version %s", id, cur)
}

func (k *soaker) version(ctx context.Context, id string) (string, error) {
	st, body := k.simple(ctx, http.MethodGet, "/v1/adapters/"+id, nil, "")
	if st != http.StatusOK {
		return "", fmt.Errorf("GET /v1/adapters/%s: HTTP %d: %s", id, st, body)
	}
	var info struct {
		Version string `json:"version"`
	}
	if err := json.Unmarshal([]byte(body), &info); err != nil || info.Version == "" {
		return "", fmt.Errorf("GET /v1/adapters/%s: no version in %s", id, body)
	}
	return info.Version, nil
}

// greedyText is the adapter's greedy answer to a fixed prompt.
func (k *soaker) greedyText(ctx context.Context, id string) (string, error) {
	body := map[string]any{"max_tokens": 16, "temperature": 0, "ignore_eos": true}
	if k.cfg.TokenPrompts {
		body["prompt_ids"] = []int32{10, 20, 30, 40}
	} else {
		body["prompt"] = "Once upon a time"
	}
	b, _ := json.Marshal(body)
	st, msg := k.simple(ctx, http.MethodPost, "/v1/adapters/"+id+"/invoke", b, "application/json")
	if st != http.StatusOK {
		return "", fmt.Errorf("HTTP %d: %s", st, msg)
	}
	var r struct {
		Text     string  `json:"text"`
		TokenIDs []int32 `json:"token_ids"`
	}
	if err := json.Unmarshal([]byte(msg), &r); err != nil {
		return "", err
	}
	return fmt.Sprint(r.Text, r.TokenIDs), nil
}

// simple sends a request and returns the status and the body (or the
// transport error's text with status 0).
func (k *soaker) simple(ctx context.Context, method, path string, body []byte, ctype string) (int, string) {
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, strings.TrimRight(k.cfg.URL, "/")+path, rd)
	if err != nil {
		return 0, err.Error()
	}
	if ctype != "" {
		req.Header.Set("Content-Type", ctype)
	}
	if k.cfg.APIKey != "" {
		req.Header.Set("Authorization", "Bearer "+k.cfg.APIKey)
	}
	resp, err := k.cfg.Client.Do(req)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	return resp.StatusCode, string(bytes.TrimSpace(b))
}

// one sends a request for adapter a, alternating the native route and
// /v1/completions, some streamed.
func (k *soaker) one(ctx context.Context, rng *rand.Rand, phase, a string) (s SoakSample) {
	cfg := k.cfg
	s = SoakSample{Phase: phase, Adapter: a, Hot: k.hot[a], Reserve: k.isRes[a], Route: RouteInvoke}
	if rng.IntN(2) == 1 {
		s.Route = RouteCompletions
	}
	s.Stream = rng.Float64() < cfg.StreamShare
	body := map[string]any{"max_tokens": cfg.MinTokens + rng.IntN(cfg.MaxTokens-cfg.MinTokens+1), "temperature": 0,
		"ignore_eos": true, "stream": s.Stream}
	var prompt any
	if cfg.TokenPrompts {
		ids := make([]int32, cfg.PromptWords)
		for i := range ids {
			ids[i] = int32(10 + rng.IntN(240))
		}
		prompt = ids
	} else {
		var p strings.Builder
		for w := range cfg.PromptWords {
			if w > 0 {
				p.WriteByte(' ')
			}
			p.WriteString(k.words[rng.IntN(len(k.words))])
		}
		prompt = p.String()
	}
	path := "/v1/completions"
	if s.Route == RouteInvoke {
		path = "/v1/adapters/" + a + "/invoke"
		if cfg.TokenPrompts {
			body["prompt_ids"] = prompt
		} else {
			body["prompt"] = prompt
		}
	} else {
		body["model"] = a
		body["prompt"] = prompt
		if s.Stream {
			body["stream_options"] = map[string]any{"include_usage": true}
		}
	}
	b, _ := json.Marshal(body)
	s.Start = time.Now()
	defer func() { s.End = time.Now() }()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, strings.TrimRight(cfg.URL, "/")+path, bytes.NewReader(b))
	if err != nil {
		s.Message = err.Error()
		return s
	}
	req.Header.Set("Content-Type", "application/json")
	if cfg.APIKey != "" {
		req.Header.Set("Authorization", "Bearer "+cfg.APIKey)
	}
	resp, err := cfg.Client.Do(req)
	if err != nil {
		s.Message = err.Error()
		return s
	}
	defer resp.Body.Close()
	s.Status = resp.StatusCode
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<10))
		s.Message = errorMessage(msg)
		return s
	}
	if !s.Stream {
		var r struct {
			Usage struct {
				CompletionTokens int `json:"completion_tokens"`
			} `json:"usage"`
		}
		if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
			s.Message = "reading the answer: " + err.Error()
			return s
		}
		s.Tokens = r.Usage.CompletionTokens
		return s
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	done := false
	for sc.Scan() {
		data, ok := strings.CutPrefix(sc.Text(), "data: ")
		if !ok {
			continue
		}
		if data == "[DONE]" {
			done = true
			break
		}
		var ev struct {
			Usage *struct {
				CompletionTokens int `json:"completion_tokens"`
			} `json:"usage"`
			Error *struct {
				Message string `json:"message"`
				Code    string `json:"code"`
			} `json:"error"`
		}
		if err := json.Unmarshal([]byte(data), &ev); err != nil {
			s.Message = fmt.Sprintf("bad SSE event %q: %v", data, err)
			return s
		}
		if ev.Error != nil {
			s.Status = statusOfCode(ev.Error.Code)
			s.Message = "(in the stream) " + ev.Error.Message
			return s
		}
		if ev.Usage != nil {
			s.Tokens = ev.Usage.CompletionTokens
		}
	}
	if err := sc.Err(); err != nil {
		s.Message = "reading the stream: " + err.Error()
		return s
	}
	if !done {
		s.Message = "the stream ended without [DONE]"
	}
	return s
}

// errorMessage is an OpenAI-shaped error body's message, else the body.
func errorMessage(body []byte) string {
	var e struct {
		Error struct {
			Message string `json:"message"`
		} `json:"error"`
	}
	if json.Unmarshal(body, &e) == nil && e.Error.Message != "" {
		return e.Error.Message
	}
	if m := strings.TrimSpace(string(body)); m != "" {
		return m
	}
	return "(empty body)"
}

// statusOfCode maps an error event's code (peftd's: a specific code or the
// status's name in snake case) to a status; 500 when unknown.
func statusOfCode(code string) int {
	switch code {
	case "service_unavailable":
		return http.StatusServiceUnavailable
	case "model_not_found", "adapter_not_found":
		return http.StatusNotFound
	case "cancelled":
		return 499
	case "internal_error", "non_finite_logits":
		return http.StatusInternalServerError
	}
	for st := 400; st < 600; st++ {
		t := http.StatusText(st)
		if t != "" && strings.NewReplacer(" ", "_", "-", "_", "'", "").Replace(strings.ToLower(t)) == code {
			return st
		}
	}
	return http.StatusInternalServerError
}

// snapshot reads the server's memory and counters.
func (k *soaker) snapshot(ctx context.Context) Snapshot {
	s := Snapshot{At: time.Now(), GPUUsed: -1, Counters: map[string]float64{}}
	if k.cfg.Mem != nil {
		if m, err := k.cfg.Mem(); err == nil {
			s.Mem = m
		} else {
			k.progress("memory: %v", err)
		}
	}
	st, body := k.simple(ctx, http.MethodGet, "/metrics", nil, "")
	if st != http.StatusOK {
		return s
	}
	for _, line := range strings.Split(body, "\n") {
		if line == "" || line[0] == '#' {
			continue
		}
		name, rest, _ := strings.Cut(line, " ")
		if i := strings.IndexByte(name, '{'); i >= 0 {
			// labels may hold spaces: the value is the last field
			name = name[:i]
			f := strings.Fields(line)
			rest = f[len(f)-1]
		}
		v, err := strconv.ParseFloat(strings.TrimSpace(rest), 64)
		if err != nil {
			continue
		}
		if name == "peftd_gpu_memory_used_bytes" {
			s.GPUUsed = max(s.GPUUsed, 0) + int64(v)
		} else if slices.Contains(soakCounters, name) {
			s.Counters[name] += v
		}
	}
	return s
}

// ticker prints a progress line every ProgressEvery until stopped.
func (k *soaker) ticker(ctx context.Context, start time.Time) (stop func()) {
	if k.cfg.Progress == nil {
		return func() {}
	}
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		t := time.NewTicker(k.cfg.ProgressEvery)
		defer t.Stop()
		for {
			select {
			case <-t.C:
			case <-done:
				return
			case <-ctx.Done():
				return
			}
			rss := ""
			if k.cfg.Mem != nil {
				if m, err := k.cfg.Mem(); err == nil {
					rss = fmt.Sprintf(", server RSS %s", mib(m.RSS))
				}
			}
			k.progress("%4.0fs/%.0fs: %d requests, %d failed so far%s", time.Since(start).Seconds(), k.cfg.Duration.Seconds(),
				k.sent.Load(), k.failedLive.Load(), rss)
		}
	}()
	return func() { close(done); wg.Wait() }
}

func (k *soaker) progress(format string, args ...any) {
	if k.cfg.Progress == nil {
		return
	}
	k.pmu.Lock()
	defer k.pmu.Unlock()
	fmt.Fprintf(k.cfg.Progress, "soak: %s %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, args...))
}

// summarize fills the report from the samples and sets its problems.
func (k *soaker) summarize(r *SoakReport, start, loadEnd time.Time) {
	k.mu.Lock()
	defer k.mu.Unlock()
	w := k.outageLocked()
	r.Outage = k.outage
	var all, hot, cold, hotOut, refusal []time.Duration
	var nBefore, nDuring, nAfter int
	seenMsg := map[string]bool{}
	var replAt time.Time
	if ns := k.replacedAt.Load(); ns != 0 {
		replAt = time.Unix(0, ns)
	}
	for _, s := range k.samples {
		r.Requests++
		route := s.Route
		if s.Stream {
			route += "+stream"
		}
		r.ByRoute[route]++
		v := Classify(s, w)
		if s.Reserve && k.outage.End.After(k.downAt) && (Window{k.outage.Start, k.outage.End}).Overlaps(s.Start, s.End) {
			r.ReserveMet++
			if v == VerdictOK && !s.Start.Before(k.downAt) && !s.End.After(k.upAt) {
				r.ReserveServed++
			}
		}
		if s.Adapter == r.ReplaceID && !replAt.IsZero() && s.Start.After(replAt) {
			if v == VerdictOK {
				r.ReplacedServed++
			} else {
				r.ReplacedFailed++
			}
		}
		switch v {
		case VerdictOK:
			r.Served++
			if s.Phase == PhaseLoad {
				switch {
				case k.outage.Start.IsZero() || s.Start.Before(k.outage.Start):
					nBefore++
				case s.Start.Before(k.outage.End):
					nDuring++
				default:
					nAfter++
				}
			}
			d := s.End.Sub(s.Start)
			all = append(all, d)
			if s.Hot {
				hot = append(hot, d)
				if w.Overlaps(s.Start, s.End) {
					hotOut = append(hotOut, d)
				}
			} else {
				cold = append(cold, d)
			}
			if s.Phase == PhaseLoad {
				r.Tokens += s.Tokens
			}
		case VerdictAllowed:
			r.Allowed++
			refusal = append(refusal, s.End.Sub(s.Start))
			if r.AllowedEx == "" {
				r.AllowedEx = s.Adapter + ": " + s.Message
			}
		default:
			r.Failed++
			r.ByStatus[s.Status]++
			// one example per status and hot/cold, then other messages
			key := fmt.Sprint(s.Status, s.Hot)
			if !seenMsg[key] || (len(r.Examples) < 6 && !seenMsg[key+s.Message]) {
				seenMsg[key], seenMsg[key+s.Message] = true, true
				kind := "cold"
				if s.Hot {
					kind = "hot"
				}
				when := s.Start.Sub(start).Round(100 * time.Millisecond)
				r.Examples = append(r.Examples, fmt.Sprintf("HTTP %d %s %s %s (%s, t=%v): %s", s.Status, s.Route, kind, s.Adapter, s.Phase, when, s.Message))
			}
		}
	}
	r.TokensPS = float64(r.Tokens) / loadEnd.Sub(start).Seconds()
	gs := func(ds []time.Duration) GroupStats {
		st := stats(ds)
		return GroupStats{Served: len(ds), P50: st.P50, P99: st.P99}
	}
	r.Overall, r.Hot, r.Cold, r.HotOutage, r.Refusal = gs(all), gs(hot), gs(cold), gs(hotOut), gs(refusal)
	if o := k.outage; !o.Start.IsZero() && !o.End.IsZero() {
		r.RateBefore = float64(nBefore) / o.Start.Sub(start).Seconds()
		r.RateDuring = float64(nDuring) / o.End.Sub(o.Start).Seconds()
		if d := loadEnd.Sub(o.End).Seconds(); d > 0 {
			r.RateAfter = float64(nAfter) / d
		}
	} else {
		r.RateBefore = float64(nBefore) / loadEnd.Sub(start).Seconds()
	}
	r.Refused = k.refusedLocked()
	for _, a := range r.Refused {
		ok := false
		for _, s := range k.samples {
			if s.Adapter == a && s.Start.After(k.outage.End) && Classify(s, w) == VerdictOK {
				ok = true
				break
			}
		}
		if ok {
			r.Recovered++
		} else {
			r.NotRecovered = append(r.NotRecovered, a)
		}
	}

	// The verdict.
	if r.Failed > 0 {
		r.Problems = append(r.Problems, fmt.Sprintf("%d failed requests", r.Failed))
	}
	if k.cfg.OutageStart != nil {
		switch {
		case r.OutageErr != "":
			r.Problems = append(r.Problems, "the outage commands failed: "+r.OutageErr)
		case k.outage.Start.IsZero() || k.outage.End.IsZero():
			r.Problems = append(r.Problems, "the run ended before the outage was over")
		case k.cfg.Reserve > 0 && r.ReserveMet == 0:
			r.Problems = append(r.Problems, "no request for a store-only (reserve) adapter met the outage")
		case r.ReserveServed > 0:
			r.Problems = append(r.Problems, fmt.Sprintf("%d requests for store-only (reserve) adapters were served while the store was down: was it?", r.ReserveServed))
		}
		if len(r.NotRecovered) > 0 {
			r.Problems = append(r.Problems, fmt.Sprintf("%d adapters refused during the outage were not served after it: %s",
				len(r.NotRecovered), strings.Join(r.NotRecovered[:min(5, len(r.NotRecovered))], ", ")))
		}
	}
	if k.cfg.ReplaceBody != nil {
		switch {
		case r.ReplaceErr != "":
			r.Problems = append(r.Problems, "replacement: "+r.ReplaceErr)
		case r.ReplacedAt.IsZero():
			r.Problems = append(r.Problems, "the run ended before the replacement")
		case r.ReplacedServed == 0:
			r.Problems = append(r.Problems, fmt.Sprintf("no request for %s was served after its replacement", r.ReplaceID))
		}
	}
	if k.cfg.Mem != nil && r.Start.Mem.RSS > 0 && r.End.Mem.RSS > 0 {
		r.RSSLimit = max(int64(k.cfg.MaxRSSGrowth*float64(r.Start.Mem.RSS)), k.cfg.RSSSlack)
		if g := r.End.Mem.RSS - r.Start.Mem.RSS; g > r.RSSLimit {
			r.Problems = append(r.Problems, fmt.Sprintf("server RSS grew by %s (%s -> %s), more than %s", mib(g),
				mib(r.Start.Mem.RSS), mib(r.End.Mem.RSS), mib(r.RSSLimit)))
		}
	}
	if r.Start.GPUUsed >= 0 && r.End.GPUUsed >= 0 {
		if g := r.End.GPUUsed - r.Start.GPUUsed; g > k.cfg.GPUSlack {
			r.Problems = append(r.Problems, fmt.Sprintf("GPU memory grew by %s (%s -> %s), more than %s", mib(g),
				mib(r.Start.GPUUsed), mib(r.End.GPUUsed), mib(k.cfg.GPUSlack)))
		}
	}
	if p := r.End.Counters["peftd_panics_total"]; p > 0 {
		r.Problems = append(r.Problems, fmt.Sprintf("the server recovered from %.0f panics (peftd_panics_total)", p))
	}
}

func mib(b int64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }

// Print writes the report.
func (r *SoakReport) Print(w io.Writer) {
	ms := func(d time.Duration) string { return fmt.Sprintf("%.1f ms", float64(d)/1e6) }
	g := func(name string, s GroupStats) {
		fmt.Fprintf(w, "latency %-12s p50 %s  p99 %s  (%d served)\n", name, ms(s.P50), ms(s.P99), s.Served)
	}
	fmt.Fprintf(w, "== soak report: %.0fs of load", r.Duration.Seconds())
	if r.WarmupCount > 0 {
		fmt.Fprintf(w, " after a %.1fs warm-up (%d adapters)", r.WarmupTook.Seconds(), r.WarmupCount)
	}
	fmt.Fprintln(w)
	routes := make([]string, 0, len(r.ByRoute))
	for k, n := range r.ByRoute {
		routes = append(routes, fmt.Sprintf("%s %d", k, n))
	}
	slices.Sort(routes)
	fmt.Fprintf(w, "requests      %d (%s)\n", r.Requests, strings.Join(routes, ", "))
	fmt.Fprintf(w, "served        %d\n", r.Served)
	fmt.Fprintf(w, "allowed 503s  %d (cold adapters during the outage)", r.Allowed)
	if r.AllowedEx != "" {
		fmt.Fprintf(w, ", e.g. %s", r.AllowedEx)
	}
	fmt.Fprintln(w)
	codes := make([]int, 0, len(r.ByStatus))
	for c := range r.ByStatus {
		codes = append(codes, c)
	}
	slices.Sort(codes)
	var fs []string
	for _, c := range codes {
		name := fmt.Sprint(c)
		if c == 0 {
			name = "no response"
		}
		fs = append(fs, fmt.Sprintf("%s: %d", name, r.ByStatus[c]))
	}
	fmt.Fprintf(w, "failures      %d", r.Failed)
	if len(fs) > 0 {
		fmt.Fprintf(w, " (%s)", strings.Join(fs, ", "))
	}
	fmt.Fprintln(w)
	for _, e := range r.Examples {
		fmt.Fprintf(w, "  e.g. %s\n", e)
	}
	g("overall", r.Overall)
	g("hot", r.Hot)
	g("cold", r.Cold)
	if r.HotOutage.Served > 0 {
		g("hot/outage", r.HotOutage)
	}
	fmt.Fprintf(w, "throughput    %.1f completion tokens/s (%d tokens)\n", r.TokensPS, r.Tokens)
	if !r.Outage.Start.IsZero() {
		fmt.Fprintf(w, "outage        %.1fs (+%v grace): %d requests for store-only adapters met it; %d cold adapters refused, %d of them served after",
			r.Outage.End.Sub(r.Outage.Start).Seconds(), r.OutageGrace, r.ReserveMet, len(r.Refused), r.Recovered)
		if r.Allowed == 0 && r.ReserveMet > 0 {
			fmt.Fprint(w, " (no 503: their store calls outlasted the outage)")
		}
		if r.OutageErr != "" {
			fmt.Fprintf(w, "; error: %s", r.OutageErr)
		}
		fmt.Fprintln(w)
		if r.Refusal.Served > 0 {
			fmt.Fprintf(w, "time to 503   p50 %s  p99 %s  (%d allowed 503s)\n", ms(r.Refusal.P50), ms(r.Refusal.P99), r.Refusal.Served)
		}
		fmt.Fprintf(w, "served/s      %.1f before the outage, %.1f during, %.1f after\n", r.RateBefore, r.RateDuring, r.RateAfter)
	}
	if r.ReplaceID != "" {
		fmt.Fprintf(w, "replacement   %s: version %s -> %s; %d served, %d failed after it", r.ReplaceID, orNone(r.OldVersion), orNone(r.NewVersion),
			r.ReplacedServed, r.ReplacedFailed)
		if r.OutputSame != "" {
			fmt.Fprintf(w, "; same greedy output as before: %s", r.OutputSame)
		}
		if r.ReplaceErr != "" {
			fmt.Fprintf(w, "; error: %s", r.ReplaceErr)
		}
		fmt.Fprintln(w)
	}
	if r.Start.Mem.RSS > 0 {
		fmt.Fprintf(w, "server RSS    start %s, end %s (%+.1f MiB; limit +%s) [anon %s -> %s, file %s -> %s]\n",
			mib(r.Start.Mem.RSS), mib(r.End.Mem.RSS), float64(r.End.Mem.RSS-r.Start.Mem.RSS)/(1<<20), mib(r.RSSLimit),
			mib(r.Start.Mem.RSSAnon), mib(r.End.Mem.RSSAnon), mib(r.Start.Mem.RSSFile), mib(r.End.Mem.RSSFile))
	} else {
		fmt.Fprintln(w, "server RSS    not read (no --pid)")
	}
	if r.Start.GPUUsed >= 0 || r.End.GPUUsed >= 0 {
		fmt.Fprintf(w, "GPU memory    start %s, end %s\n", mib(r.Start.GPUUsed), mib(r.End.GPUUsed))
	} else {
		fmt.Fprintln(w, "GPU memory    not exported (no peftd_gpu_memory_used_bytes: CPU or no NVML)")
	}
	var cs []string
	for _, name := range soakCounters {
		d := r.End.Counters[name] - r.Start.Counters[name]
		cs = append(cs, fmt.Sprintf("%s +%.0f", strings.TrimSuffix(strings.TrimPrefix(name, "peftd_"), "_total"), d))
	}
	fmt.Fprintf(w, "server        %s\n", strings.Join(cs, ", "))
	if r.OK() {
		fmt.Fprintln(w, "PASS")
		return
	}
	for _, p := range r.Problems {
		fmt.Fprintf(w, "FAIL: %s\n", p)
	}
}

func orNone(s string) string {
	if s == "" {
		return "?"
	}
	return s
}

// TarGzAdapter packs an adapter folder's two files (PEFT's
// adapter_config.json and adapter_model.safetensors) as a tar.gz, the body
// PUT /v1/adapters/{id} takes. With fresh, the config ends with a blank
// line (white space JSON ignores), so that uploading the adapter a store
// already holds still makes new bytes, hence a new version.
func TarGzAdapter(dir string, fresh bool) ([]byte, error) {
	var buf bytes.Buffer
	gz := gzip.NewWriter(&buf)
	tw := tar.NewWriter(gz)
	for _, name := range []string{"adapter_config.json", "adapter_model.safetensors"} {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			return nil, err
		}
		if name == "adapter_config.json" && fresh {
			b = append(bytes.TrimRight(b, " \t\r\n"), "\n\n"...)
		}
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(b)), ModTime: time.Now(), Typeflag: tar.TypeReg}); err != nil {
			return nil, err
		}
		if _, err := tw.Write(b); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	if err := gz.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}
