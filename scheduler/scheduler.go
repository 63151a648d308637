// Package scheduler runs continuous batching across adapters on one engine:
// every step mixes decode tokens and prefill chunks of many sequences, each
// with its own adapter slot; admission checks KV capacity; sequences are
// preempted (and later recomputed) when pages run out; adapter queues are
// served by deficit round robin so a hot adapter cannot starve a cold one.
package scheduler

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"runtime/debug"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/lora"
	"github.com/peftd/peftd/runtime/sample"
)

// Errors returned (wrapped) by the scheduler.
var (
	ErrQueueFull = errors.New("scheduler: queue full")
	ErrClosed    = errors.New("scheduler: closed")
	ErrTooLong   = errors.New("scheduler: request does not fit")
	// ErrNonFinite: the model produced NaN or infinite logits for a
	// sequence (a broken adapter or base model); the request fails
	// instead of emitting meaningless tokens.
	ErrNonFinite = errors.New("scheduler: the model produced non-finite logits (NaN or Inf)")
	// ErrInternal: the engine step panicked; the requests in it fail and
	// the scheduler goes on.
	ErrInternal = errors.New("scheduler: internal error in the engine step")
	// ErrEngineFailing: steps keep failing (Healthy).
	ErrEngineFailing = errors.New("scheduler: the engine is failing")
)

// FieldError is a request field the scheduler refuses (it wraps
// engine.ErrBadInput); Field names it as the API does: prompt, max_tokens,
// stop.
type FieldError struct {
	Field string
	Msg   string
}

func (e *FieldError) Error() string { return e.Msg }

func (e *FieldError) Unwrap() error { return engine.ErrBadInput }

func badField(field, format string, args ...any) error {
	return &FieldError{Field: field, Msg: fmt.Sprintf(format, args...)}
}

// Lease holds an adapter resident in a device slot until Release.
type Lease interface {
	Slot() int
	Version() string
	Release()
}

// LoadReporter is a Lease that says whether taking it loaded its adapter.
type LoadReporter interface {
	// LoadSource is where taking the lease loaded the adapter from into
	// its slot (store, disk or host), or "" when it was there already.
	LoadSource() string
}

// Residency makes adapters resident (the loader implements it).
type Residency interface {
	Acquire(ctx context.Context, id string) (Lease, error)
}

// Request is one generation.
type Request struct {
	Adapter   string // "" for the base model
	Prompt    []int32
	MaxTokens int // 0 only with PromptLogprobs: score the prompt, generate nothing
	Sampling  sample.Params
	Stop      []int32
	// PromptLogprobs scores the prompt (echo): every prompt token after
	// the first gets its Choice (log-probability and Sampling.Logprobs
	// alternatives under the raw logits before it), delivered in the first
	// Event's Prompt. Its prefix is computed, not taken from the prefix
	// cache.
	PromptLogprobs bool
}

// Event is a generated token, or the end of the request.
type Event struct {
	Token        sample.Choice
	Done         bool
	FinishReason string // with Done
	Err          error  // with Done, when the request failed
	// Set with Done.
	PromptTokens, CompletionTokens int
	// Loaded, with a request's first token: where its adapter was loaded
	// from for it (its lease's LoadSource), "" when it was resident.
	Loaded string
	// Prompt, on a PromptLogprobs request's first event (its first token,
	// or Done when it generates none): the Choices of prompt tokens 1..n-1.
	Prompt []sample.Choice
}

// Config sizes the scheduler.
type Config struct {
	MaxQueue int // requests waiting or running at most; more get ErrQueueFull
	Quantum  int // DRR tokens credited to an adapter queue per round
	Logger   *slog.Logger
	// OnStep receives the statistics of every step, and a zero-load
	// report when the scheduler goes idle, so gauges read from it are
	// never stale.
	OnStep func(StepStats)
	// OnPanic is called (after logging) when a step or an engine command
	// panicked and was recovered.
	OnPanic func()
	// PrefixCache keeps full KV pages for reuse by later sequences whose
	// tokens start the same way with the same adapter version.
	PrefixCache bool
	// FailWindow is how long Healthy reports the engine failing after
	// failStreak steps in a row failed (default 30 s): long enough for a
	// load balancer to steer away from a server whose device is broken, short
	// enough that a passing fault does not keep it out for good (the first
	// steps after the window tell again).
	FailWindow time.Duration
	// IdleWarm records the engine's step programs (CUDA graphs:
	// engine.WarmSome) one at a time while nothing else is to be done, until
	// none is missing, so that a server can be ready before they are all
	// recorded. A request that arrives meanwhile waits for one recording at
	// most.
	IdleWarm bool
	// FillRows, when positive, is the rows a step is filled to with prompt
	// chunks while its decode rows leave room (fewer than FillRows); past
	// that the engine's MaxTokens bounds it. A GPU server sets it to its
	// largest CUDA-graph recording (256), so that the steps of a moderate
	// load are recorded ones and chain, while a load of more running
	// sequences still decodes them all in one step (docs/PERFORMANCE.md
	// v0.30: serving +4-9% against steps filled to 512 rows).
	FillRows int
}

// StepStats describes one engine step (for metrics).
type StepStats struct {
	Rows, Sequences, Adapters, Prefill, Decode int
	// LoRA: some sequence of the step runs an adapter (not the base model)
	LoRA     bool
	Duration time.Duration
	// Device is the step's device time (GPU: from the metadata upload to
	// the result copy, less the device's wait for the host between the
	// forward and the draw), 0 when the backend does not measure it;
	// Duration minus Device is the host's share.
	Device time.Duration
	// Where the host time of the step went, in order: Plan (admission,
	// cancelled sequences, the plan and its KV pages), then the engine's
	// Prepare, Issue and Wait (engine.StepTimes: Duration, from the launch
	// to the tokens, is about Issue + Wait), then Emit (the new tokens
	// handed to their requests). A step planned Ahead did its Plan and
	// Prepare while the step before it ran; Settle is then the host time
	// between that step's tokens and this step's launch (landing it, its
	// tokens set into this step), time the device has nothing queued.
	Plan, Prepare, Issue, Wait, Emit, Settle time.Duration
	FreeBlocks, TotalBlocks                  int
	Waiting, Running                         int
	RunningAdapters, WaitingAdapters         []string
	Preempted                                int
	// Ahead: the step was planned and prepared while the one before it
	// ran on the device (step.go), not after its tokens came back.
	Ahead bool
	// Chained: the step was launched before the tokens of the one before it
	// were back, its decode rows reading them on the device (engine
	// Chainer); Ahead too.
	Chained bool
	// Prefix cache since the last report: prompt tokens looked up and
	// found; pages kept (CachedPages, of which EvictablePages only the
	// cache holds).
	PrefixQueries, PrefixHits   int
	CachedPages, EvictablePages int
}

type seq struct {
	ctx     context.Context
	req     Request
	lease   Lease
	slot    int
	out     chan Event // read by the client; fed by box
	box     *outbox
	sampler *sample.Sampler
	pen     *sample.Tracker // penalties and logit bias (nil: none)
	seed    uint64          // keys device sampling (engine.Sampling.Seed)
	kv      engine.Sequence
	tokens  []int32 // prompt followed by what was generated
	fed     int     // tokens of `tokens` in the KV cache
	// scores: with PromptLogprobs, the Choices of prompt tokens 1.. scored
	// so far (a recompute after preemption does not score them again);
	// sent with the first event
	scores []sample.Choice
	// lastFly is the last launched step q has rows in while it is in
	// flight (step.go): flyRows rows, and it draws q's next token when
	// flySamples
	lastFly    *flight
	flySamples bool
	flyRows    int
	gen        int // generated tokens
	admitted   time.Time
	ended      bool // finish ran
	// acquiring: an Acquire for this waiting request runs (admission.go)
	acquiring bool
	// Prefix cache: chain is the key of the last full page of tokens known
	// to the cache (keyed tokens), rooted in the adapter's version.
	chain prefixKey
	keyed int
}

// Scheduler owns the engine goroutine.
type Scheduler struct {
	e    *engine.Engine
	res  Residency
	cfg  Config
	log  *slog.Logger
	cmds chan func()
	wake chan struct{}

	mu      sync.Mutex
	queues  map[string][]*seq // waiting, by adapter
	order   []string          // adapters with waiting requests, round-robin order
	deficit map[string]int
	pending atomic.Int64 // waiting + running + acquiring
	// Slot admission (admission.go): loads is the number of Acquires under
	// way that take a free slot; draining maps an adapter that yields its
	// slot (its waiting requests are held back) to the one it yields for.
	loads    int
	draining map[string]string

	running []*seq  // engine goroutine only
	fly     *flight // engine goroutine only: the step in flight (step.go)
	next    *flight // engine goroutine only: one launched behind it (chained)
	// devEst: the device time of recent steps (a moving average), which
	// times the planning of the next step (planDelay); engine goroutine only
	devEst  time.Duration
	stepped bool // engine goroutine only: the last step ran sequences
	// steps that failed in a row (not for one slot), the last one's error
	// and time (Healthy reads them from other goroutines)
	failMu     sync.Mutex
	failStreak int
	failErr    error
	failAt     time.Time

	// engine goroutine only: IdleWarm's state (warming: recordings may be
	// missing; warmed and warmTime: done so far, and the time they took;
	// missed: steps that ran without their program since the last
	// recording made between steps)
	warming, warmFailed bool
	warmed              int
	warmTime            time.Duration
	missed              int
	cache               *prefixCache // engine goroutine only; nil: prefix caching off
	// Prefix cache statistics since the last report (tokens).
	prefixQueries, prefixHits int
	// The emitter (emitter.go): posts are the events posted since the
	// last flush (engine goroutine only); emitc carries the batches,
	// spare returns their slices, emitted is closed when the emitter ends.
	posts   []posted
	emitc   chan emitBatch
	spare   chan []posted
	emitted chan struct{}
	done    chan struct{} // closed when the engine goroutine has exited
	quit    chan struct{} // closed by Close
	closed  atomic.Bool
}

// New starts the engine goroutine.
func New(e *engine.Engine, res Residency, cfg Config) *Scheduler {
	if cfg.MaxQueue <= 0 {
		cfg.MaxQueue = 1024
	}
	if cfg.Quantum <= 0 {
		cfg.Quantum = 256
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.FailWindow <= 0 {
		cfg.FailWindow = 30 * time.Second
	}
	s := &Scheduler{e: e, res: res, cfg: cfg, log: cfg.Logger, cmds: make(chan func(), 64), wake: make(chan struct{}, 1),
		queues: map[string][]*seq{}, deficit: map[string]int{}, draining: map[string]string{},
		done: make(chan struct{}), quit: make(chan struct{}),
		emitc: make(chan emitBatch, emitDepth), spare: make(chan []posted, 4), emitted: make(chan struct{})}
	if cfg.PrefixCache {
		s.cache = newPrefixCache(e)
	}
	s.warming = cfg.IdleWarm
	go s.emit()
	go s.loop()
	return s
}

// Close stops the engine goroutine; running requests end with ErrClosed.
func (s *Scheduler) Close() {
	if s.closed.Swap(true) {
		return
	}
	close(s.quit) // never close cmds: Do may be sending on it from another goroutine
	<-s.done
}

// Do runs fn on the engine goroutine (adapter loads use it) and waits.
func (s *Scheduler) Do(ctx context.Context, fn func(e *engine.Engine) error) error {
	res := make(chan error, 1)
	if s.closed.Load() {
		return ErrClosed
	}
	select {
	case s.cmds <- func() {
		defer func() {
			if v := recover(); v != nil {
				res <- fmt.Errorf("%w: %v", ErrInternal, v)
				panic(v) // logged and counted by the loop's guard
			}
		}()
		res <- fn(s.e)
	}:
	case <-s.quit:
		return ErrClosed
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case err := <-res:
		return err
	case <-s.done:
		return ErrClosed
	}
}

// Device adapts the scheduler to the loader's device interface: loads run on
// the engine goroutine between steps.
//
// The host-side work (conversion to the device format, staging in pinned
// memory) starts on the caller's goroutine (engine.PrepareAdapter), while
// steps go on; only the commit runs on the engine goroutine, and on backends
// that support it the upload overlaps the following steps (only the first
// step that uses the slot waits for it, layer by layer on the CUDA backend).
func (s *Scheduler) Load(ctx context.Context, slot int, a *lora.Adapter) error {
	p, err := s.e.PrepareAdapter(a)
	if err != nil {
		return err
	}
	err = s.Do(ctx, func(e *engine.Engine) error { return e.LoadPrepared(slot, p) })
	p.Release() // no-op once loaded; frees the staging if the load never ran
	return err
}

// Unload empties a device slot between steps.
func (s *Scheduler) Unload(ctx context.Context, slot int) error {
	return s.Do(ctx, func(e *engine.Engine) error { return e.UnloadAdapter(slot) })
}

// Pending is the number of requests not yet finished.
func (s *Scheduler) Pending() int { return int(s.pending.Load()) }

// Submit queues a request. Events arrive on the returned channel, which is
// closed after the Done event. Cancelling ctx ends the request and frees its
// KV pages at the next step.
func (s *Scheduler) Submit(ctx context.Context, r Request) (<-chan Event, error) {
	if s.closed.Load() {
		return nil, ErrClosed
	}
	if len(r.Prompt) == 0 {
		return nil, badField("prompt", "empty prompt")
	}
	if r.MaxTokens < 0 || (r.MaxTokens == 0 && !r.PromptLogprobs) {
		return nil, badField("max_tokens", "max tokens must be positive (0 only to score the prompt), got %d", r.MaxTokens)
	}
	opts := s.e.Options()
	// Compared without adding: MaxTokens is a client's number and
	// len(Prompt)+MaxTokens can overflow.
	if len(r.Prompt) > opts.MaxContext || r.MaxTokens > opts.MaxContext-len(r.Prompt) {
		return nil, fmt.Errorf("%w: prompt (%d tokens) + max tokens (%d) exceeds the context length %d", ErrTooLong, len(r.Prompt), r.MaxTokens, opts.MaxContext)
	}
	if need := s.e.BlocksFor(len(r.Prompt) + r.MaxTokens); need > opts.KVBlocks {
		return nil, fmt.Errorf("%w: needs %d KV pages, the cache has %d", ErrTooLong, need, opts.KVBlocks)
	}
	vocab := s.e.Config().VocabSize
	for _, t := range r.Prompt {
		if t < 0 || int(t) >= vocab {
			return nil, badField("prompt", "prompt token id %d outside the vocabulary [0, %d)", t, vocab)
		}
	}
	for _, t := range r.Stop {
		if t < 0 || int(t) >= vocab {
			return nil, badField("stop", "stop token id %d outside the vocabulary [0, %d)", t, vocab)
		}
	}
	for id := range r.Sampling.Penalties.LogitBias {
		if id < 0 || int(id) >= vocab {
			return nil, badField("logit_bias", "logit_bias token id %d outside the vocabulary [0, %d)", id, vocab)
		}
	}
	smp, err := sample.New(r.Sampling)
	if err != nil {
		return nil, err
	}
	if s.pending.Add(1) > int64(s.cfg.MaxQueue) {
		s.pending.Add(-1)
		return nil, fmt.Errorf("%w: %d requests pending", ErrQueueFull, s.cfg.MaxQueue)
	}
	out := make(chan Event, 8)
	q := &seq{ctx: ctx, req: r, slot: -1, out: out, box: newOutbox(), sampler: smp,
		seed: rand.Uint64(), tokens: slices.Clone(r.Prompt), pen: sample.NewTracker(r.Sampling.Penalties, r.Prompt)}
	go q.box.forward(ctx, out)
	if r.Sampling.Seed != nil {
		q.seed = *r.Sampling.Seed
	}
	// An adapter's lease is taken when the request's turn comes (admit):
	// the deficit round robin decides who gets a device slot.
	s.enqueue(q)
	return q.out, nil
}

// admitPoll is how often the scheduler looks again at waiting requests it
// could not admit when nothing runs and nothing signals.
const admitPoll = 20 * time.Millisecond

func (s *Scheduler) enqueue(q *seq) {
	s.mu.Lock()
	if len(s.queues[q.req.Adapter]) == 0 {
		s.order = append(s.order, q.req.Adapter)
	}
	s.queues[q.req.Adapter] = append(s.queues[q.req.Adapter], q)
	s.mu.Unlock()
	s.signal()
}

// finish ends a request. The lease and the pending count are released
// before the Done event, so a caller that has seen Done sees them released.
func (s *Scheduler) finish(q *seq, reason string, err error) { s.finishWith(q, reason, err, Event{}) }

// finishWith is finish with more in the Done event (ev's other fields). On
// the engine goroutine: the event goes out with the next flush.
func (s *Scheduler) finishWith(q *seq, reason string, err error, ev Event) {
	if ev, ok := s.end(q, reason, err, ev); ok {
		s.post(q, ev)
	}
}

// finishAway is finish for a request that never ran, off the engine
// goroutine: its Done event is put at once.
func (s *Scheduler) finishAway(q *seq, err error) {
	if ev, ok := s.end(q, "", err, Event{}); ok {
		q.box.put(ev)
	}
}

// end marks q ended, releases its lease and pending count, and completes
// its Done event; false when q had ended already.
func (s *Scheduler) end(q *seq, reason string, err error, ev Event) (Event, bool) {
	if q.ended {
		return ev, false // a step that panicked may fail a sequence it had ended
	}
	q.ended = true
	if q.lease != nil {
		q.lease.Release()
	}
	s.pending.Add(-1)
	ev.Done, ev.FinishReason, ev.Err, ev.PromptTokens, ev.CompletionTokens = true, reason, err, len(q.req.Prompt), q.gen
	return ev, true
}

func (s *Scheduler) loop() {
	defer close(s.done)
	defer s.stopEmitter()
	idleReported := true
	for {
		s.flush(nil) // what the last step or command posted goes out before any wait
		if s.fly == nil && len(s.running) == 0 && !s.hasWaiting() {
			if !idleReported {
				// The gauges read from the last report must say "idle".
				s.report(StepStats{TotalBlocks: s.e.Options().KVBlocks, FreeBlocks: s.e.FreeBlocks()})
				idleReported = true
			}
			// Nothing to step: wait for a command or a request, or, with a
			// program still to record, record it (one at a time: what
			// comes in meanwhile waits for one recording at most).
			var warm <-chan struct{} // nil: never ready
			if s.warming {
				warm = closedChan
			}
			select {
			case fn := <-s.cmds:
				s.command(fn)
			case <-s.wake:
			case <-warm:
				if !s.guard("idle warm-up", s.warmOne) {
					s.warming = false
				}
			case <-s.quit:
				s.shutdown()
				return
			}
			continue
		}
		// Engine commands (adapter loads) run between steps, with no step
		// in flight: drain them first.
		select {
		case fn := <-s.cmds:
			s.guard("landing the step in flight", s.drain)
			s.command(fn)
			continue
		case <-s.quit:
			s.guard("landing the step in flight", s.drain)
			s.shutdown()
			return
		default:
		}
		idleReported = false
		if !s.guard("engine step", s.step) {
			// The step's sequences are in an unknown state: fail them
			// (their pages are returned) and go on serving.
			s.guard("failing the requests of a panicked step", func() { s.failAll(ErrInternal) })
			s.running = nil
			s.stepDone(ErrInternal)
		}
		if !s.stepped && s.fly == nil {
			// Requests wait, but none could be admitted (a lease on its way,
			// a slot to free): wait for a change, and look again now and
			// then (a slot can free outside the scheduler: an unpin).
			s.flush(nil)
			select {
			case fn := <-s.cmds:
				s.command(fn)
			case <-s.wake:
			case <-time.After(admitPoll):
			case <-s.quit:
				s.shutdown()
				return
			}
		}
	}
}

// warmOne records one missing step program (IdleWarm). A round ends with
// a call that records none and finds none missing (a recording can drop
// earlier ones when a buffer moves: the next call finds them); it is
// logged, and an engine command (an adapter load can change what is
// missing) or a step that ran without its program starts another; under a
// load that never leaves it idle, one recording is made between steps
// every busyWarmEvery steps that ran without their program. A failed
// recording ends the warm-up for good (serving goes on: a step whose
// program is missing runs without one).
func (s *Scheduler) warmOne() {
	t0 := time.Now()
	n, left, err := s.e.WarmSome(1)
	s.warmTime += time.Since(t0)
	s.warmed += n
	if err != nil {
		s.warming, s.warmFailed = false, true
		s.log.Warn("idle warm-up stopped: a step program failed to record (steps whose program is missing run without one)",
			"recorded", s.warmed, "err", err)
		return
	}
	if n == 0 && left == 0 {
		s.warming = false
		if s.warmed > 0 {
			s.log.Info("step programs recorded while idle", "recorded", s.warmed, "seconds", fmt.Sprintf("%.2f", s.warmTime.Seconds()))
		}
		s.warmed, s.warmTime = 0, 0
	}
}

// busyWarmEvery is how many steps that ran without their program (a
// backend that leaves recording to WarmSome) the scheduler lets pass
// before it records one program between steps: a load that never leaves
// the engine idle must not keep it off its recordings for good.
const busyWarmEvery = 4

// failStreak steps in a row that fail make Healthy report the engine
// failing (for Config.FailWindow after the last).
const failStreak = 3

// stepDone records how a step ended for Healthy: err nil resets the count
// of failures in a row.
func (s *Scheduler) stepDone(err error) {
	s.failMu.Lock()
	defer s.failMu.Unlock()
	if err == nil {
		s.failStreak, s.failErr = 0, nil
		return
	}
	s.failStreak++
	s.failErr, s.failAt = err, time.Now()
}

// Healthy reports an error while the engine is failing: the last
// failStreak steps failed (not only for one adapter slot), the last within
// Config.FailWindow. /readyz says so, and a load balancer can steer away.
func (s *Scheduler) Healthy() error {
	s.failMu.Lock()
	defer s.failMu.Unlock()
	if s.failStreak >= failStreak && time.Since(s.failAt) < s.cfg.FailWindow {
		return fmt.Errorf("%w: the last %d steps failed: %v", ErrEngineFailing, s.failStreak, s.failErr)
	}
	return nil
}

// closedChan is always ready to receive from.
var closedChan = func() chan struct{} { c := make(chan struct{}); close(c); return c }()

// command runs an engine command (an adapter load or unload) between
// steps; with IdleWarm it starts a warm-up round, for what the command
// may have made missing.
func (s *Scheduler) command(fn func()) {
	s.guard("engine command", fn)
	s.warming = s.cfg.IdleWarm && !s.warmFailed
}

// guard runs fn, recovering a panic: it is logged with its stack and
// counted, and guard reports false. A bug hit by one request must not end
// the process for every tenant.
func (s *Scheduler) guard(what string, fn func()) (ok bool) {
	defer func() {
		if v := recover(); v != nil {
			ok = false
			s.log.Error("recovered from a panic", "in", what, "panic", fmt.Sprint(v), "stack", string(debug.Stack()))
			if s.cfg.OnPanic != nil {
				s.cfg.OnPanic()
			}
		}
	}()
	fn()
	return true
}

func (s *Scheduler) hasWaiting() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.order) > 0
}

func (s *Scheduler) shutdown() {
	for _, q := range s.running {
		s.release(q)
		s.finish(q, "", ErrClosed)
	}
	s.running = nil
	s.mu.Lock()
	var waiting []*seq
	for _, a := range s.order {
		waiting = append(waiting, s.queues[a]...)
	}
	s.queues, s.order = map[string][]*seq{}, nil
	s.mu.Unlock()
	for _, q := range waiting {
		s.finish(q, "", ErrClosed)
	}
}
