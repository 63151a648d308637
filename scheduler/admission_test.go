package scheduler

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/peftd/peftd/internal/fixture"
	"github.com/peftd/peftd/runtime/cpu"
	"github.com/peftd/peftd/runtime/engine"
)

// slotted is a SlotAdmission over the fixture adapters placed in the engine
// up front, with only n of them "on the device" at once, as the loader
// keeps them: an adapter takes a slot when first leased and keeps it until
// another needs one and nobody leases it. Acquire waits for a slot as the
// loader does. It records the adapter of every released lease, in order.
type slotted struct {
	mu       sync.Mutex
	slot     map[string]int // engine slot of each adapter
	n        int
	on       map[string]bool
	refs     map[string]int
	released []string
	prefetch map[string]int // Prefetch calls per adapter
	changed  chan struct{}  // closed and replaced at every release
}

func (r *slotted) Prefetch(id string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.prefetch[id]++
}

type slottedLease struct {
	r    *slotted
	id   string
	once sync.Once
}

func (l *slottedLease) Slot() int       { return l.r.slot[l.id] }
func (l *slottedLease) Version() string { return "" }
func (l *slottedLease) Release() {
	l.once.Do(func() {
		r := l.r
		r.mu.Lock()
		defer r.mu.Unlock()
		r.refs[l.id]--
		r.released = append(r.released, l.id)
		close(r.changed)
		r.changed = make(chan struct{})
	})
}

func (r *slotted) leaseLocked(id string) Lease {
	r.refs[id]++
	return &slottedLease{r: r, id: id}
}

func (r *slotted) TryAcquire(id string) (Lease, Admission) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.slot[id]; !ok {
		return nil, AcquireNow
	}
	if r.on[id] {
		return r.leaseLocked(id), Leased
	}
	return nil, NeedsSlot
}

func (r *slotted) FreeSlots() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := r.n - len(r.on)
	for id := range r.on {
		if r.refs[id] == 0 {
			n++
		}
	}
	return n
}

func (r *slotted) Acquire(ctx context.Context, id string) (Lease, error) {
	for {
		r.mu.Lock()
		if _, ok := r.slot[id]; !ok {
			r.mu.Unlock()
			return nil, fmt.Errorf("%w %q", ErrUnknownAdapter, id)
		}
		if !r.on[id] && len(r.on) >= r.n {
			for v := range r.on {
				if r.refs[v] == 0 {
					delete(r.on, v)
					break
				}
			}
		}
		if r.on[id] || len(r.on) < r.n {
			r.on[id] = true
			l := r.leaseLocked(id)
			r.mu.Unlock()
			return l, nil
		}
		ch := r.changed
		r.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// TestSlotAdmission: with one device slot, a hot adapter with many queued
// requests and a cold one behind them, the scheduler's round robin hands
// the slot over: the hot adapter stops admitting (its running requests
// finish and release the slot), the cold one loads and runs, then the hot
// one comes back. Before, every request took its lease on arrival, so the
// hot adapter held the slot until its whole queue had run and the cold
// request finished last. The cold adapter is prefetched while it waits. Every request gives the reference tokens, and an
// unknown adapter fails at once while the slot is busy.
func TestSlotAdmission(t *testing.T) {
	f, err := fixture.Load()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	e, err := engine.New(f.Model, cpu.New(0), engine.Options{MaxTokens: 64, KVBlocks: 256, BlockSize: 8, AdapterSlots: 4})
	if err != nil {
		t.Fatal(err)
	}
	res := &slotted{slot: map[string]int{}, n: 1, on: map[string]bool{}, refs: map[string]int{}, prefetch: map[string]int{}, changed: make(chan struct{})}
	for i, n := range fixture.AdapterNames {
		if err := e.LoadAdapter(i, f.Adapters[n]); err != nil {
			t.Fatal(err)
		}
		res.slot[n] = i
	}
	s := New(e, res, Config{})
	t.Cleanup(s.Close)
	hot, cold := f.Cases[1], f.Cases[3]
	if hot.AdapterName() == cold.AdapterName() || hot.AdapterName() == "" || cold.AdapterName() == "" {
		t.Fatalf("fixture cases 1 and 3 use adapters %q and %q", hot.AdapterName(), cold.AdapterName())
	}
	const nHot = 24
	// Every request queues before the first admission (the engine goroutine
	// is held meanwhile), so the test does not depend on how fast steps run.
	release, held := make(chan struct{}), make(chan struct{})
	go s.Do(context.Background(), func(*engine.Engine) error { close(held); <-release; return nil })
	<-held
	var wg sync.WaitGroup
	run := func(c fixture.Case) {
		ch, err := s.Submit(context.Background(), Request{Adapter: c.AdapterName(), Prompt: c.Prompt, MaxTokens: min(4, c.Decode)})
		if err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			toks, end := collect(t, ch)
			if end.Err != nil || !slices.Equal(toks, c.Greedy[:len(toks)]) || len(toks) != min(4, c.Decode) {
				t.Errorf("%s: %v %v, want %v", c.AdapterName(), toks, end.Err, c.Greedy[:min(4, c.Decode)])
			}
		}()
	}
	for range nHot {
		run(hot)
	}
	run(cold)
	waitQueued(t, s, nHot+1)
	close(release)
	// An unknown adapter is refused at once, slot busy or not.
	t0 := time.Now()
	ch, err := s.Submit(context.Background(), Request{Adapter: "no-such-adapter", Prompt: hot.Prompt, MaxTokens: 2})
	if err != nil {
		t.Fatal(err)
	}
	if _, end := collect(t, ch); !errors.Is(end.Err, ErrUnknownAdapter) {
		t.Errorf("unknown adapter: %v, want ErrUnknownAdapter", end.Err)
	} else if d := time.Since(t0); d > 2*time.Second {
		t.Errorf("unknown adapter refused after %v", d)
	}
	wg.Wait()
	res.mu.Lock()
	order := slices.Clone(res.released)
	res.mu.Unlock()
	i := slices.Index(order, cold.AdapterName())
	t.Logf("leases released in order (cold at %d of %d): %v", i, len(order), order)
	if len(order) != nHot+1 {
		t.Fatalf("%d leases released, want %d", len(order), nHot+1)
	}
	if i < 0 || i >= nHot-4 {
		t.Errorf("the cold adapter's request released its lease at position %d of %d: the hot adapter kept the only slot", i, len(order))
	}
	if s.Pending() != 0 {
		t.Errorf("%d requests still pending", s.Pending())
	}
	res.mu.Lock()
	defer res.mu.Unlock()
	if res.prefetch[cold.AdapterName()] == 0 {
		t.Errorf("the cold adapter waited for the slot without a prefetch (prefetches: %v)", res.prefetch)
	}
}
