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
	e, err := engine.New(f.Model, cpu.New(0), opts)
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
	s := New(e, res, cfg)
	t.Cleanup(s.Close)
	return s, f
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
			var evictable atomic.Int64
			s, f := setup(t, tc.opts, Config{PrefixCache: tc.cache, OnStep: func(st StepStats) {
				evictable.Store(int64(st.EvictablePages))
				preempted.Add(int64(st.Preempted))
				if int64(st.Adapters) > maxAdapters.Load() {
					maxAdapters.Store(int64(st.Adapters))
				}
				if st.Prefill > 0 && st.Decode > 0 {
					prefillWithDecode.Add(1)
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
			if strings.HasPrefix(tc.name, "tight") && preempted.Load() == 0 {
				t.Error("the tight configuration never preempted")
			}
			if maxAdapters.Load() < 3 || prefillWithDecode.Load() == 0 {
				t.Error("steps did not mix adapters or prefill with decode")
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
	release := make(chan struct{})
	held := make(chan struct{})
	go s.Do(context.Background(), func(*engine.Engine) error { close(held); <-release; return nil })
	<-held
	var order []string
	var mu sync.Mutex
	var wg sync.WaitGroup
	submit := func(c fixture.Case, tag string) {
		ch, err := s.Submit(context.Background(), Request{Adapter: c.AdapterName(), Prompt: c.Prompt, MaxTokens: 2})
		if err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			collect(t, ch)
			mu.Lock()
			order = append(order, tag)
			mu.Unlock()
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
	if i := slices.Index(order, "cold"); i > 1 {
		t.Errorf("cold adapter finished at position %d of %v", i, order)
	}
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
