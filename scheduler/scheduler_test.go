package scheduler

import (
	"context"
	"errors"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/peftd/peftd/internal/fixture"
	"github.com/peftd/peftd/runtime/cpu"
	"github.com/peftd/peftd/runtime/engine"
)

func setup(t *testing.T, opts engine.Options, cfg Config) (*Scheduler, *fixture.Fixture) {
	t.Helper()
	f, err := fixture.Load()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	e, res := fixtureEngine(t, f, opts)
	s := New(e, res, cfg)
	t.Cleanup(s.Close)
	return s, f
}

// fixtureEngine is a CPU engine with every fixture adapter loaded, and the
// residency that names them.
func fixtureEngine(t *testing.T, f *fixture.Fixture, opts engine.Options) (*engine.Engine, Static) {
	t.Helper()
	return fixtureEngineOn(t, f, cpu.New(0), opts)
}

// fixtureEngineOn is fixtureEngine on backend b.
func fixtureEngineOn(t *testing.T, f *fixture.Fixture, b engine.Backend, opts engine.Options) (*engine.Engine, Static) {
	t.Helper()
	e, err := engine.New(f.Model, b, opts)
	if err != nil {
		t.Fatal(err)
	}
	res := Static{}
	for i, n := range fixture.AdapterNames {
		if err := e.LoadAdapter(i, f.Adapters[n]); err != nil {
			t.Fatal(err)
		}
		res[n] = i
	}
	return e, res
}

func collect(t *testing.T, ch <-chan Event) ([]int32, Event) {
	t.Helper()
	var toks []int32
	for ev := range ch {
		if ev.Done {
			return toks, ev
		}
		toks = append(toks, ev.Token.ID)
	}
	t.Fatal("channel closed without a Done event")
	return nil, Event{}
}

// TestConcurrentMatchesReference submits many copies of every fixture case at
// once with a small token budget (chunked prefill) and few KV pages
// (preemption); every request must return exactly the reference greedy tokens.
func TestConcurrentMatchesReference(t *testing.T) {
	for _, tc := range []struct {
		name  string
		opts  engine.Options
		cache bool
	}{
		{"roomy", engine.Options{MaxTokens: 512, KVBlocks: 256, BlockSize: 16, AdapterSlots: 4}, false},
		{"tight", engine.Options{MaxTokens: 24, KVBlocks: 12, BlockSize: 8, AdapterSlots: 4}, false},
		{"roomy+prefix", engine.Options{MaxTokens: 512, KVBlocks: 256, BlockSize: 16, AdapterSlots: 4}, true},
		{"tight+prefix", engine.Options{MaxTokens: 24, KVBlocks: 12, BlockSize: 8, AdapterSlots: 4}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var preempted, maxAdapters, prefillWithDecode atomic.Int64
			var evictable, timed, badTime, ahead, loraSteps, notLoRA atomic.Int64
			s, f := setup(t, tc.opts, Config{PrefixCache: tc.cache, OnStep: func(st StepStats) {
				evictable.Store(int64(st.EvictablePages))
				if st.Ahead {
					ahead.Add(1)
				}
				if st.Device > 0 {
					timed.Add(1)
				}
				if st.Device > st.Duration {
					badTime.Add(1)
				}
				preempted.Add(int64(st.Preempted))
				if int64(st.Adapters) > maxAdapters.Load() {
					maxAdapters.Store(int64(st.Adapters))
				}
				if st.Prefill > 0 && st.Decode > 0 {
					prefillWithDecode.Add(1)
				}
				if st.LoRA {
					loraSteps.Add(1)
				} else if st.Adapters > 1 { // two adapters, or an adapter beside the base model
					notLoRA.Add(1)
				}
			}})
			var wg sync.WaitGroup
			for rep := 0; rep < 3; rep++ {
				for _, c := range f.Cases {
					wg.Add(1)
					go func() {
						defer wg.Done()
						ch, err := s.Submit(context.Background(), Request{Adapter: c.AdapterName(), Prompt: c.Prompt, MaxTokens: c.Decode})
						if err != nil {
							t.Error(err)
							return
						}
						toks, end := collect(t, ch)
						if end.Err != nil || end.FinishReason != engine.FinishLength {
							t.Errorf("case %d: %v %q", c.ID, end.Err, end.FinishReason)
						}
						if !slices.Equal(toks, c.Greedy) {
							t.Errorf("case %d (%s): %v, want %v", c.ID, c.AdapterName(), toks, c.Greedy)
						}
					}()
				}
			}
			wg.Wait()
			t.Logf("preemptions %d, most adapters in one step %d, mixed prefill+decode steps %d", preempted.Load(), maxAdapters.Load(), prefillWithDecode.Load())
			if timed.Load() == 0 || badTime.Load() > 0 {
				t.Errorf("steps with a device (compute) time: %d; longer than the step itself: %d", timed.Load(), badTime.Load())
			}
			if ahead.Load() == 0 {
				t.Error("no step was prepared while the one before it ran")
			}
			if loraSteps.Load() == 0 || notLoRA.Load() > 0 {
				t.Errorf("steps with an adapter: %d; steps of two or more adapters not marked LoRA: %d", loraSteps.Load(), notLoRA.Load())
			}
			if strings.HasPrefix(tc.name, "tight") && preempted.Load() == 0 {
				t.Error("the tight configuration never preempted")
			}
			// The tight cache (96 tokens) holds few sequences at once: how many
			// adapters meet in one step depends on arrival timing, two always do.
			wantAdapters := int64(3)
			if strings.HasPrefix(tc.name, "tight") {
				wantAdapters = 2
			}
			if maxAdapters.Load() < wantAdapters || prefillWithDecode.Load() == 0 {
				t.Errorf("steps did not mix adapters (at most %d in a step, want %d) or prefill with decode (%d steps)", maxAdapters.Load(), wantAdapters, prefillWithDecode.Load())
			}
			if s.Pending() != 0 {
				t.Errorf("%d requests still pending", s.Pending())
			}
			// Every KV page is back.
			var free int
			s.Do(context.Background(), func(e *engine.Engine) error { free = e.FreeBlocks(); return nil })
			if free+int(evictable.Load()) != tc.opts.KVBlocks {
				t.Errorf("%d of %d pages free (+%d kept by the prefix cache)", free, tc.opts.KVBlocks, evictable.Load())
			}
		})
	}
}

func TestErrors(t *testing.T) {
	s, f := setup(t, engine.Options{MaxTokens: 64, KVBlocks: 8, BlockSize: 4, AdapterSlots: 4}, Config{MaxQueue: 2})
	ctx := context.Background()
	c := f.Cases[0]
	if _, err := s.Submit(ctx, Request{Adapter: "nope", Prompt: c.Prompt, MaxTokens: 1}); err != nil {
		t.Fatal(err) // residency errors arrive as the Done event
	}
	if _, err := s.Submit(ctx, Request{Prompt: c.Prompt, MaxTokens: 100}); !errors.Is(err, ErrTooLong) {
		t.Errorf("too long: %v", err)
	}
	if _, err := s.Submit(ctx, Request{Prompt: []int32{9999}, MaxTokens: 1}); !errors.Is(err, engine.ErrBadInput) {
		t.Errorf("bad token: %v", err)
	}
	ch, _ := s.Submit(ctx, Request{Adapter: "nope", Prompt: c.Prompt, MaxTokens: 1})
	if _, end := collect(t, ch); !errors.Is(end.Err, ErrUnknownAdapter) {
		t.Errorf("unknown adapter: %v", end.Err)
	}
}

func TestQueueFullAndCancel(t *testing.T) {
	s, f := setup(t, engine.Options{MaxTokens: 64, KVBlocks: 64, BlockSize: 4, AdapterSlots: 4}, Config{MaxQueue: 1})
	c := f.Cases[0]
	ctx, cancel := context.WithCancel(context.Background())
	ch, err := s.Submit(ctx, Request{Prompt: c.Prompt, MaxTokens: 200})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Submit(context.Background(), Request{Prompt: c.Prompt, MaxTokens: 1}); !errors.Is(err, ErrQueueFull) {
		t.Errorf("second request: %v, want ErrQueueFull", err)
	}
	<-ch // first token arrived: it is running
	cancel()
	deadline := time.After(5 * time.Second)
	for {
		select {
		case ev := <-ch:
			if ev.Done {
				if !errors.Is(ev.Err, context.Canceled) {
					t.Errorf("cancelled request ended with %v", ev.Err)
				}
				var free int
				s.Do(context.Background(), func(e *engine.Engine) error { free = e.FreeBlocks(); return nil })
				if free != 64 {
					t.Errorf("%d of 64 pages free after cancel", free)
				}
				return
			}
		case <-deadline:
			t.Fatal("cancelled request never ended")
		}
	}
}

// TestFairness: with the engine held busy while a burst for a hot adapter
// and then one request for a cold adapter queue up, deficit round robin
// admits the cold request before most of the burst.
func TestFairness(t *testing.T) {
	s, f := setup(t, engine.Options{MaxTokens: 16, KVBlocks: 16, BlockSize: 4, AdapterSlots: 4}, Config{Quantum: 8})
	hot, cold := f.Cases[1], f.Cases[3] // qv-r8 (19 tokens), attn-r32-rslora (5 tokens)
	rec := &releaseOrder{Static: s.res.(Static)}
	s.res = rec // before any request: the engine goroutine reads it under s.mu
	release := make(chan struct{})
	held := make(chan struct{})
	go s.Do(context.Background(), func(*engine.Engine) error { close(held); <-release; return nil })
	<-held
	tags := map[string]string{}
	var wg sync.WaitGroup
	submit := func(c fixture.Case, tag string) {
		ch, err := s.Submit(context.Background(), Request{Adapter: c.AdapterName(), Prompt: c.Prompt, MaxTokens: 2})
		if err != nil {
			t.Fatal(err)
		}
		tags[c.AdapterName()] = tag
		wg.Add(1)
		go func() {
			defer wg.Done()
			collect(t, ch)
		}()
	}
	for i := 0; i < 6; i++ {
		submit(hot, "hot")
	}
	waitQueued(t, s, 6)
	submit(cold, "cold")
	waitQueued(t, s, 7)
	close(release)
	wg.Wait()
	// The order requests finished in, on the engine goroutine (their
	// leases are released there), not as their readers happen to wake.
	rec.mu.Lock()
	var order []string
	for _, id := range rec.order {
		order = append(order, tags[id])
	}
	rec.mu.Unlock()
	if i := slices.Index(order, "cold"); i < 0 || i > 1 {
		t.Errorf("cold adapter finished at position %d of %v", i, order)
	}
}

// releaseOrder is a Static residency that records the adapter of every
// lease released, in order.
type releaseOrder struct {
	Static
	mu    sync.Mutex
	order []string
}

type recordedLease struct {
	Lease
	r  *releaseOrder
	id string
}

func (l recordedLease) Release() {
	l.r.mu.Lock()
	l.r.order = append(l.r.order, l.id)
	l.r.mu.Unlock()
	l.Lease.Release()
}

func (r *releaseOrder) TryAcquire(id string) (Lease, Admission) {
	l, st := r.Static.TryAcquire(id)
	if st == Leased {
		l = recordedLease{Lease: l, r: r, id: id}
	}
	return l, st
}

func (r *releaseOrder) Acquire(ctx context.Context, id string) (Lease, error) {
	l, err := r.Static.Acquire(ctx, id)
	if err != nil {
		return nil, err
	}
	return recordedLease{Lease: l, r: r, id: id}, nil
}

// waitQueued waits until n requests sit in the adapter queues.
func waitQueued(t *testing.T, s *Scheduler, n int) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		s.mu.Lock()
		q := 0
		for _, a := range s.order {
			q += len(s.queues[a])
		}
		s.mu.Unlock()
		if q == n {
			return
		}
	}
	t.Fatalf("never saw %d queued requests", n)
}

// TestStepHostTimes: every step with rows reports where its host time went:
// the engine's prepare, issue and wait inside Duration, the plan before it
// and the emit after; the CPU backend computes in issue.
func TestStepHostTimes(t *testing.T) {
	var mu sync.Mutex
	var steps []StepStats
	s, f := setup(t, engine.Options{MaxTokens: 64, KVBlocks: 64, BlockSize: 16, AdapterSlots: 4}, Config{OnStep: func(st StepStats) {
		if st.Rows > 0 {
			mu.Lock()
			steps = append(steps, st)
			mu.Unlock()
		}
	}})
	c := f.Cases[0]
	ch, err := s.Submit(context.Background(), Request{Adapter: c.AdapterName(), Prompt: c.Prompt, MaxTokens: 8})
	if err != nil {
		t.Fatal(err)
	}
	collect(t, ch)
	mu.Lock()
	defer mu.Unlock()
	if len(steps) < 8 {
		t.Fatalf("%d steps with rows, want at least 8", len(steps))
	}
	var issue time.Duration
	for i, st := range steps {
		// Duration runs from the launch to the tokens: the step's prepare
		// comes before it (while the step before ran, for a step planned
		// ahead)
		if in := st.Issue + st.Wait; in > st.Duration || st.Plan < 0 || st.Emit < 0 || st.Prepare <= 0 {
			t.Errorf("step %d: issue %v + wait %v (%v) vs duration %v; prepare %v, plan %v, emit %v",
				i, st.Issue, st.Wait, in, st.Duration, st.Prepare, st.Plan, st.Emit)
		}
		issue += st.Issue
	}
	if issue <= 0 {
		t.Errorf("the CPU backend's steps spent no time in issue")
	}
}

// TestStopWhileNextIsPrepared: requests that draw a stop token while the
// next step, with a row for them, is already prepared end right there
// (that row is discarded), and the requests beside them still give
// exactly their reference tokens; every page comes back.
func TestStopWhileNextIsPrepared(t *testing.T) {
	opts := engine.Options{MaxTokens: 512, KVBlocks: 256, BlockSize: 16, AdapterSlots: 4}
	var ahead atomic.Int64
	s, f := setup(t, opts, Config{OnStep: countAhead(&ahead)})
	var wg sync.WaitGroup
	for rep := 0; rep < 2; rep++ {
		for _, c := range f.Cases {
			if len(c.Greedy) < 4 {
				continue
			}
			stopAt := 1 + rep // the stop token's first place in the reference
			stop := c.Greedy[stopAt]
			want := c.Greedy[:slices.Index(c.Greedy, stop)+1]
			for _, r := range []struct {
				stop []int32
				want []int32
			}{{[]int32{stop}, want}, {nil, c.Greedy}} {
				wg.Add(1)
				go func() {
					defer wg.Done()
					ch, err := s.Submit(context.Background(), Request{Adapter: c.AdapterName(), Prompt: c.Prompt, MaxTokens: c.Decode, Stop: r.stop})
					if err != nil {
						t.Error(err)
						return
					}
					toks, end := collect(t, ch)
					reason := engine.FinishLength
					if r.stop != nil {
						reason = engine.FinishStop
					}
					if end.Err != nil || end.FinishReason != reason || !slices.Equal(toks, r.want) {
						t.Errorf("case %d stop %v: %v (%v %q), want %v (%q)", c.ID, r.stop, toks, end.Err, end.FinishReason, r.want, reason)
					}
				}()
			}
		}
	}
	wg.Wait()
	if ahead.Load() == 0 {
		t.Error("no step was prepared while the one before it ran")
	}
	if free := freeBlocks(s); free != opts.KVBlocks {
		t.Errorf("%d of %d pages free", free, opts.KVBlocks)
	}
}

// countAhead is an OnStep that counts the steps planned ahead.
func countAhead(n *atomic.Int64) func(StepStats) {
	return func(st StepStats) {
		if st.Ahead {
			n.Add(1)
		}
	}
}

// freeBlocks is the engine's free KV pages, read on the engine goroutine.
func freeBlocks(s *Scheduler) int {
	var free int
	s.Do(context.Background(), func(e *engine.Engine) error { free = e.FreeBlocks(); return nil })
	return free
}

// TestCancelWhileNextIsPrepared: requests cancelled after a few tokens,
// while steps are planned ahead of the one in flight, end with their
// context's error and no token after it is seen; the requests beside them
// give exactly their reference tokens, and every page comes back.
func TestCancelWhileNextIsPrepared(t *testing.T) {
	opts := engine.Options{MaxTokens: 512, KVBlocks: 256, BlockSize: 16, AdapterSlots: 4}
	var ahead atomic.Int64
	s, f := setup(t, opts, Config{OnStep: countAhead(&ahead)})
	var wg sync.WaitGroup
	for _, c := range f.Cases {
		if len(c.Greedy) < 4 {
			continue
		}
		for _, cancelAfter := range []int{0, 2} { // 0: never
			wg.Add(1)
			go func() {
				defer wg.Done()
				ctx, cancel := context.WithCancel(context.Background())
				defer cancel()
				ch, err := s.Submit(ctx, Request{Adapter: c.AdapterName(), Prompt: c.Prompt, MaxTokens: c.Decode})
				if err != nil {
					t.Error(err)
					return
				}
				var toks []int32
				for ev := range ch {
					if ev.Done {
						switch {
						case cancelAfter == 0 && (ev.Err != nil || !slices.Equal(toks, c.Greedy)):
							t.Errorf("case %d: %v (%v), want %v", c.ID, toks, ev.Err, c.Greedy)
						case cancelAfter > 0 && ev.Err == nil:
							// The scheduler may have generated every token before
							// it saw the cancel (the outbox then drops what the
							// reader no longer wants): a normal end, complete.
							if ev.FinishReason != engine.FinishLength || ev.CompletionTokens != c.Decode {
								t.Errorf("case %d cancelled after %d tokens: ended %q with %d of %d tokens generated (%d read)",
									c.ID, cancelAfter, ev.FinishReason, ev.CompletionTokens, c.Decode, len(toks))
							}
						case cancelAfter > 0 && !errors.Is(ev.Err, context.Canceled):
							t.Errorf("case %d cancelled after %d tokens: ended with %v after %d", c.ID, cancelAfter, ev.Err, len(toks))
						}
						return
					}
					toks = append(toks, ev.Token.ID)
					if !slices.Equal(toks, c.Greedy[:min(len(toks), len(c.Greedy))]) {
						t.Errorf("case %d: token %d is %d, want %d", c.ID, len(toks), ev.Token.ID, c.Greedy[len(toks)-1])
					}
					if len(toks) == cancelAfter {
						cancel()
					}
				}
				t.Errorf("case %d: no Done event", c.ID)
			}()
		}
	}
	wg.Wait()
	if ahead.Load() == 0 {
		t.Error("no step was prepared while the one before it ran")
	}
	deadline := time.Now().Add(5 * time.Second)
	for s.Pending() != 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if free := freeBlocks(s); free != opts.KVBlocks || s.Pending() != 0 {
		t.Errorf("%d of %d pages free, %d requests pending", free, opts.KVBlocks, s.Pending())
	}
}

// TestRunningBoundedByStepBudget: the scheduler admits no more sequences
// than a step has rows, so every running sequence gets its decode row in
// every step; requests beyond that wait in the queue (before, with KV
// pages to spare, the sequences past the budget were admitted and then got
// no row until earlier ones finished: a stall in the middle of a stream).
func TestRunningBoundedByStepBudget(t *testing.T) {
	const budget = 6
	var over atomic.Int64
	s, f := setup(t, engine.Options{MaxTokens: budget, KVBlocks: 256, BlockSize: 16, AdapterSlots: 4}, Config{OnStep: func(st StepStats) {
		if st.Running > budget {
			over.Add(1)
		}
	}})
	runCases(t, s, slices.Repeat([]fixture.Case{f.Cases[0]}, 4*budget))
	if over.Load() > 0 {
		t.Errorf("steps with more running sequences than the budget (%d): %d", budget, over.Load())
	}
}

// TestFillRows: prompt chunks fill a step only to FillRows rows while its
// decode rows leave room, and decode rows are not bounded by it: a load of
// more running sequences than FillRows decodes them all in one step (up to
// MaxTokens). The tokens stay the reference's.
func TestFillRows(t *testing.T) {
	const fill, maxTokens = 4, 64
	var overfilled, maxDecode atomic.Int64
	s, f := setup(t, engine.Options{MaxTokens: maxTokens, KVBlocks: 512, BlockSize: 16, AdapterSlots: 4}, Config{FillRows: fill, OnStep: func(st StepStats) {
		if st.Prefill > 0 && st.Decode < fill && st.Rows > fill {
			overfilled.Add(1)
		}
		if int64(st.Decode) > maxDecode.Load() {
			maxDecode.Store(int64(st.Decode))
		}
	}})
	// one-token prompts go straight to decoding (they pile up past
	// FillRows); the 48-token ones are chunked
	var cases []fixture.Case
	for i := range 24 {
		c := f.Cases[6]
		if i%6 == 0 {
			c = f.Cases[4]
		}
		cases = append(cases, c)
	}
	runCases(t, s, cases)
	if overfilled.Load() > 0 {
		t.Errorf("%d steps filled past FillRows (%d) with prompt chunks while their decode rows left room", overfilled.Load(), fill)
	}
	if maxDecode.Load() <= fill {
		t.Errorf("at most %d decode rows a step with %d requests: decode rows should pass FillRows (%d)", maxDecode.Load(), len(cases), fill)
	}
}

// runCases submits every case before it reads any (so that they meet in
// the steps even on one CPU), then reads them all at once: each must end
// by length with the reference's greedy tokens.
func runCases(t *testing.T, s *Scheduler, cases []fixture.Case) {
	t.Helper()
	chs := make([]<-chan Event, len(cases))
	for i, c := range cases {
		ch, err := s.Submit(context.Background(), Request{Adapter: c.AdapterName(), Prompt: c.Prompt, MaxTokens: c.Decode})
		if err != nil {
			t.Fatal(err)
		}
		chs[i] = ch
	}
	var wg sync.WaitGroup
	for i, c := range cases {
		wg.Add(1)
		go func() {
			defer wg.Done()
			toks, end := collect(t, chs[i])
			if end.Err != nil || end.FinishReason != engine.FinishLength || !slices.Equal(toks, c.Greedy) {
				t.Errorf("case %d (%s): %v %q, tokens %v, want %v", c.ID, c.AdapterName(), end.Err, end.FinishReason, toks, c.Greedy)
			}
		}()
	}
	wg.Wait()
}
