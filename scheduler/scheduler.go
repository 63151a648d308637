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
	"math"
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

// Residency makes adapters resident (the loader implements it).
type Residency interface {
	Acquire(ctx context.Context, id string) (Lease, error)
}

// Request is one generation.
type Request struct {
	Adapter   string // "" for the base model
	Prompt    []int32
	MaxTokens int
	Sampling  sample.Params
	Stop      []int32
}

// Event is a generated token, or the end of the request.
type Event struct {
	Token        sample.Choice
	Done         bool
	FinishReason string // with Done
	Err          error  // with Done, when the request failed
	// Set with Done.
	PromptTokens, CompletionTokens int
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
}

// StepStats describes one engine step (for metrics).
type StepStats struct {
	Rows, Sequences, Adapters, Prefill, Decode int
	Duration                                   time.Duration
	FreeBlocks, TotalBlocks                    int
	Waiting, Running                           int
	RunningAdapters, WaitingAdapters           []string
	Preempted                                  int
	// Prefix cache since the last report: prompt tokens looked up and
	// found; pages kept (CachedPages, of which EvictablePages only the
	// cache holds).
	PrefixQueries, PrefixHits   int
	CachedPages, EvictablePages int
}

type seq struct {
	ctx      context.Context
	req      Request
	lease    Lease
	slot     int
	out      chan Event // read by the client; fed by box
	box      *outbox
	sampler  *sample.Sampler
	seed     uint64 // keys device sampling (engine.Sampling.Seed)
	kv       engine.Sequence
	tokens   []int32 // prompt followed by what was generated
	fed      int     // tokens of `tokens` in the KV cache
	gen      int     // generated tokens
	admitted time.Time
	ended    bool // finish ran
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

	running []*seq       // engine goroutine only
	stepped bool         // engine goroutine only: the last step ran sequences
	cache   *prefixCache // engine goroutine only; nil: prefix caching off
	// Prefix cache statistics since the last report (tokens).
	prefixQueries, prefixHits int
	done                      chan struct{} // closed when the engine goroutine has exited
	quit                      chan struct{} // closed by Close
	closed                    atomic.Bool
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
	s := &Scheduler{e: e, res: res, cfg: cfg, log: cfg.Logger, cmds: make(chan func(), 64), wake: make(chan struct{}, 1),
		queues: map[string][]*seq{}, deficit: map[string]int{}, draining: map[string]string{},
		done: make(chan struct{}), quit: make(chan struct{})}
	if cfg.PrefixCache {
		s.cache = newPrefixCache(e)
	}
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
// memory) runs first on the caller's goroutine (engine.PrepareAdapter), while
// steps go on; only the commit runs on the engine goroutine, and on backends
// that support it the upload overlaps the following steps (only the first
// step that uses the slot waits for it).
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
	if r.MaxTokens <= 0 {
		return nil, badField("max_tokens", "max tokens must be positive, got %d", r.MaxTokens)
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
		seed: rand.Uint64(), tokens: slices.Clone(r.Prompt)}
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
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// finish ends a request. The lease and the pending count are released
// before the Done event, so a caller that has seen Done sees them released.
func (s *Scheduler) finish(q *seq, reason string, err error) {
	if q.ended {
		return // a step that panicked may fail a sequence it had ended
	}
	q.ended = true
	if q.lease != nil {
		q.lease.Release()
	}
	s.pending.Add(-1)
	q.box.put(Event{Done: true, FinishReason: reason, Err: err, PromptTokens: len(q.req.Prompt), CompletionTokens: q.gen})
}

func (s *Scheduler) loop() {
	defer close(s.done)
	idleReported := true
	for {
		if len(s.running) == 0 && !s.hasWaiting() {
			if !idleReported {
				// The gauges read from the last report must say "idle".
				s.report(StepStats{TotalBlocks: s.e.Options().KVBlocks, FreeBlocks: s.e.FreeBlocks()})
				idleReported = true
			}
			// Nothing to step: block until a command or a request arrives.
			select {
			case fn := <-s.cmds:
				s.guard("engine command", fn)
			case <-s.wake:
			case <-s.quit:
				s.shutdown()
				return
			}
			continue
		}
		// Engine commands (adapter loads) run between steps: drain them first.
		select {
		case fn := <-s.cmds:
			s.guard("engine command", fn)
			continue
		case <-s.quit:
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
		}
		if !s.stepped {
			// Requests wait, but none could be admitted (a lease on its way,
			// a slot to free): wait for a change, and look again now and
			// then (a slot can free outside the scheduler: an unpin).
			select {
			case fn := <-s.cmds:
				s.guard("engine command", fn)
			case <-s.wake:
			case <-time.After(admitPoll):
			case <-s.quit:
				s.shutdown()
				return
			}
		}
	}
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

// admit moves waiting requests into the running set by deficit round robin
// over adapter queues, while KV pages allow.
func (s *Scheduler) admit() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.dropCancelledLocked()
	for b, a := range s.draining { // nobody waits for the slot any more
		if len(s.queues[a]) == 0 {
			delete(s.draining, b)
		}
	}
	free := s.e.FreeBlocks()
	if s.cache != nil {
		free += s.cache.evictable() // evicted when pages are reserved
	}
	for _, q := range s.running {
		free -= s.e.BlocksFor(len(q.tokens)+1) - s.e.BlocksFor(q.fed) // pages running sequences still need soon
	}
	running := map[string]int{} // running sequences per adapter (drain candidates)
	for _, q := range s.running {
		running[q.req.Adapter]++
	}
	for progressed := true; progressed && len(s.order) > 0; {
		progressed = false
		for i := 0; i < len(s.order); i++ {
			a := s.order[i]
			if head := len(s.queues[a][0].tokens); true {
				// Credit a quantum, capped so a queue blocked on KV pages does not bank credit.
				s.deficit[a] = min(s.deficit[a]+s.cfg.Quantum, max(s.cfg.Quantum, head))
			}
			for len(s.queues[a]) > 0 {
				q := s.queues[a][0]
				cost := len(q.tokens)
				need := s.e.BlocksFor(len(q.tokens) + 1)
				if q.ctx.Err() == nil && (need > free || cost > s.deficit[a]) {
					break
				}
				if q.ctx.Err() == nil && q.lease == nil && a != "" && !s.leaseLocked(q, running) {
					break // acquiring, waiting for a slot, or yielding its slot
				}
				s.queues[a] = s.queues[a][1:]
				if q.ctx.Err() != nil {
					s.finish(q, "", q.ctx.Err())
					continue
				}
				s.deficit[a] -= cost
				free -= need
				q.admitted = time.Now()
				s.attachPrefix(q)
				s.running = append(s.running, q)
				running[a]++
				progressed = true
			}
			if len(s.queues[a]) == 0 {
				delete(s.queues, a)
				delete(s.deficit, a)
				s.order = slices.Delete(s.order, i, i+1)
				i--
			}
		}
	}
}

// dropCancelledLocked ends the waiting requests whose context is done, in
// every queue (not only at the heads), so the queue gauges count only
// requests somebody still waits for.
func (s *Scheduler) dropCancelledLocked() {
	for i := 0; i < len(s.order); i++ {
		a := s.order[i]
		s.queues[a] = slices.DeleteFunc(s.queues[a], func(q *seq) bool {
			if err := q.ctx.Err(); err != nil {
				s.finish(q, "", err)
				return true
			}
			return false
		})
		if len(s.queues[a]) == 0 {
			delete(s.queues, a)
			delete(s.deficit, a)
			s.order = slices.Delete(s.order, i, i+1)
			i--
		}
	}
}

// step runs one engine step over the running sequences and reports it
// (also when it had nothing to run: the gauges must not keep the load of a
// step whose sequences have all been cancelled since).
func (s *Scheduler) step() {
	stats := StepStats{TotalBlocks: s.e.Options().KVBlocks}
	defer func() { s.reportStep(&stats) }()
	s.stepped = false
	s.admit()
	// Drop cancelled sequences first: their pages free at once.
	live := s.running[:0]
	for _, q := range s.running {
		if err := q.ctx.Err(); err != nil {
			s.release(q)
			s.finish(q, "", err)
			continue
		}
		live = append(live, q)
	}
	clear(s.running[len(live):])
	s.running = live
	if len(s.running) == 0 {
		return
	}
	// Plan, then give every planned sequence its KV pages before the step
	// is issued; when the pool runs short, preempt the most recently
	// admitted sequence and plan again. The engine never fails the step
	// for want of pages.
	var in []engine.Input
	var who []*seq
	for {
		in, who = s.plan(&stats)
		if len(in) == 0 {
			return
		}
		err := s.reserve(in)
		if err == nil {
			break
		}
		if !s.preempt() {
			s.failAll(fmt.Errorf("scheduler: a lone sequence does not fit the KV cache: %w", err))
			return
		}
		stats.Preempted++
	}
	start := time.Now()
	sp := make([]engine.Sampling, len(in))
	for k, q := range who {
		n := len(in[k].Tokens)
		sp[k] = engine.Sampling{Skip: q.fed+n < len(q.tokens), Params: q.req.Sampling, Seed: q.seed,
			Index: uint64(q.fed + n), CPU: q.sampler}
	}
	s.stepped = true
	choices, err := s.e.StepSample(context.Background(), in, sp)
	if err != nil {
		s.failAll(err)
		return
	}
	stats.Duration = time.Since(start)
	s.afterStep(in, who, choices)
}

// reserve gives each input's sequence the pages its tokens need, in plan
// order (decode rows first); pages reserved before a failure stay with
// their sequences.
func (s *Scheduler) reserve(in []engine.Input) error {
	for _, x := range in {
		n := x.Seq.Len() + len(x.Tokens)
		if short := s.e.BlocksFor(n) - len(x.Seq.Blocks()) - s.e.FreeBlocks(); short > 0 && s.cache != nil {
			s.cache.evict(short) // cached prefixes nobody uses give way first
		}
		if err := s.e.Reserve(x.Seq, n); err != nil {
			return err
		}
	}
	return nil
}

// reportStep completes a step's statistics with the state after it and
// hands them to OnStep.
func (s *Scheduler) reportStep(stats *StepStats) {
	if s.cfg.OnStep == nil {
		return
	}
	stats.FreeBlocks = s.e.FreeBlocks()
	stats.Running = len(s.running)
	seen := map[string]bool{}
	for _, q := range s.running {
		if !seen[q.req.Adapter] && q.req.Adapter != "" {
			seen[q.req.Adapter] = true
			stats.RunningAdapters = append(stats.RunningAdapters, q.req.Adapter)
		}
	}
	s.report(*stats)
}

// report adds the waiting queues and the prefix cache to stats and calls
// OnStep.
func (s *Scheduler) report(stats StepStats) {
	if s.cfg.OnStep == nil {
		return
	}
	stats.PrefixQueries, stats.PrefixHits = s.prefixQueries, s.prefixHits
	s.prefixQueries, s.prefixHits = 0, 0
	if s.cache != nil {
		stats.CachedPages, stats.EvictablePages = len(s.cache.pages), s.cache.evictable()
	}
	s.mu.Lock()
	for _, a := range s.order {
		stats.Waiting += len(s.queues[a])
		stats.WaitingAdapters = append(stats.WaitingAdapters, a)
	}
	s.mu.Unlock()
	s.cfg.OnStep(stats)
}

// plan packs decode rows first, then prefill chunks, within the token budget.
func (s *Scheduler) plan(st *StepStats) ([]engine.Input, []*seq) {
	budget := s.e.Options().MaxTokens
	var in []engine.Input
	var who []*seq
	adapters := map[int]bool{}
	add := func(q *seq, n int) {
		in = append(in, engine.Input{Seq: &q.kv, Tokens: q.tokens[q.fed : q.fed+n], Slot: q.slot})
		who = append(who, q)
		adapters[q.slot] = true
		budget -= n
	}
	*st = StepStats{TotalBlocks: st.TotalBlocks, Preempted: st.Preempted}
	for _, q := range s.running {
		if budget > 0 && len(q.tokens)-q.fed == 1 {
			add(q, 1)
			st.Decode++
		}
	}
	for _, q := range s.running {
		if n := len(q.tokens) - q.fed; budget > 0 && n > 1 {
			add(q, min(n, budget))
			st.Prefill++
		}
	}
	st.Sequences, st.Adapters = len(in), len(adapters)
	for _, x := range in {
		st.Rows += len(x.Tokens)
	}
	return in, who
}

// preempt frees the pages of the most recently admitted sequence; it will
// recompute its tokens when pages allow. Reports whether one was preempted.
func (s *Scheduler) preempt() bool {
	if len(s.running) <= 1 {
		return false
	}
	victim := 0
	for i, q := range s.running {
		if q.admitted.After(s.running[victim].admitted) {
			victim = i
		}
	}
	q := s.running[victim]
	s.running = slices.Delete(s.running, victim, victim+1)
	s.release(q)
	q.fed = 0
	s.mu.Lock()
	if len(s.queues[q.req.Adapter]) == 0 {
		s.order = append(s.order, q.req.Adapter)
	}
	s.queues[q.req.Adapter] = append([]*seq{q}, s.queues[q.req.Adapter]...)
	s.mu.Unlock()
	s.log.Debug("preempted a sequence for KV pages", "adapter", q.req.Adapter, "tokens", len(q.tokens))
	return true
}

func (s *Scheduler) failAll(err error) {
	s.log.Error("engine step failed", "err", err)
	for _, q := range s.running {
		s.release(q)
		s.finish(q, "", err)
	}
	s.running = nil
}

func (s *Scheduler) afterStep(in []engine.Input, who []*seq, choices []sample.Choice) {
	var ended []*seq
	for k, q := range who {
		q.fed += len(in[k].Tokens)
		s.keepPages(q)
		if q.fed < len(q.tokens) {
			continue // more prompt (or recompute) to feed
		}
		c := choices[k]
		if math.IsNaN(c.Logprob) || math.IsInf(c.Logprob, 0) {
			s.release(q)
			adapter := q.req.Adapter
			if adapter == "" {
				adapter = "the base model"
			}
			s.finish(q, "", fmt.Errorf("%w at generated token %d (adapter %s)", ErrNonFinite, q.gen, adapter))
			ended = append(ended, q)
			continue
		}
		q.tokens = append(q.tokens, c.ID)
		q.gen++
		q.box.put(Event{Token: c})
		reason := ""
		switch {
		case slices.Contains(q.req.Stop, c.ID):
			reason = engine.FinishStop
		case q.gen >= q.req.MaxTokens:
			reason = engine.FinishLength
		}
		if reason != "" {
			s.release(q)
			s.finish(q, reason, nil)
			ended = append(ended, q)
		}
	}
	if len(ended) > 0 {
		s.running = slices.DeleteFunc(s.running, func(q *seq) bool { return slices.Contains(ended, q) })
	}
}

// release returns a sequence's KV pages (those the prefix cache keeps stay
// with it).
func (s *Scheduler) release(q *seq) {
	if s.cache != nil {
		s.cache.done(q.kv.Blocks())
	}
	s.e.Release(&q.kv)
	q.chain, q.keyed = prefixKey{}, 0
}

// attachPrefix starts an admitted sequence with no KV on the cached pages
// of the longest prefix of its tokens (whole pages, leaving at least its
// last token to compute).
func (s *Scheduler) attachPrefix(q *seq) {
	if s.cache == nil || q.fed != 0 || q.kv.Len() != 0 {
		return
	}
	version := ""
	if q.lease != nil {
		version = q.lease.Version()
	}
	root := prefixRoot(q.req.Adapter, version)
	q.chain, q.keyed = root, 0
	bs := s.e.Options().BlockSize
	blocks, last := s.cache.match(root, q.tokens, bs, len(q.tokens)-1)
	s.prefixQueries += len(q.tokens)
	if len(blocks) == 0 {
		return
	}
	n := len(blocks) * bs
	if err := s.e.Attach(&q.kv, blocks, n); err != nil {
		s.log.Error("prefix cache: attach failed", "err", err)
		return
	}
	s.cache.use(blocks)
	q.chain, q.fed, q.keyed = last, n, n
	s.prefixHits += n
}

// keepPages offers the prefix cache the sequence's pages that its fed
// tokens have filled since the last call.
func (s *Scheduler) keepPages(q *seq) {
	if s.cache == nil {
		return
	}
	bs := s.e.Options().BlockSize
	blocks := q.kv.Blocks()
	for q.keyed+bs <= q.fed && q.keyed+bs <= len(q.tokens) {
		i := q.keyed / bs
		q.chain = q.chain.next(q.tokens[q.keyed : q.keyed+bs])
		s.cache.add(q.chain, blocks[i])
		q.keyed += bs
	}
}
