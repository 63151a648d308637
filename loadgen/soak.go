package loadgen

// The soak driver (peftd soak): closed-loop mixed load over many adapters
// for a while, with one adapter-store outage and one adapter replaced
// mid-run, then a report of what failed, latencies and the server's memory
// at the start and the end.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"slices"
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
