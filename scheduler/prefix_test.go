package scheduler

import (
	"context"
	"slices"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/peftd/peftd/internal/fixture"
	"github.com/peftd/peftd/runtime/cpu"
	"github.com/peftd/peftd/runtime/engine"
)

// versioned is a Residency whose adapters carry a version (as the loader's
// leases do), so a test can replace an adapter in place.
type versioned struct {
	mu   sync.Mutex
	slot map[string]int
	ver  map[string]string
}

type verLease struct {
	slot int
	ver  string
}

func (l verLease) Slot() int       { return l.slot }
func (l verLease) Version() string { return l.ver }
func (l verLease) Release()        {}

func (v *versioned) Acquire(_ context.Context, id string) (Lease, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	slot, ok := v.slot[id]
	if !ok {
		return nil, ErrUnknownAdapter
	}
	return verLease{slot, v.ver[id]}, nil
}

type prefixRig struct {
	s     *Scheduler
	e     *engine.Engine
	f     *fixture.Fixture
	res   *versioned
	stats atomic.Pointer[StepStats]
	hits  atomic.Int64
}

func newPrefixRig(t *testing.T, cache bool, kvBlocks int) *prefixRig {
	t.Helper()
	f, err := fixture.Load()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	e, err := engine.New(f.Model, cpu.New(0), engine.Options{MaxTokens: 64, KVBlocks: kvBlocks, BlockSize: 4, AdapterSlots: 4})
	if err != nil {
		t.Fatal(err)
	}
	r := &prefixRig{e: e, f: f, res: &versioned{slot: map[string]int{}, ver: map[string]string{}}}
	for i, n := range fixture.AdapterNames {
		if err := e.LoadAdapter(i, f.Adapters[n]); err != nil {
			t.Fatal(err)
		}
		r.res.slot[n], r.res.ver[n] = i, "v1"
	}
	r.s = New(e, r.res, Config{PrefixCache: cache, OnStep: func(st StepStats) {
		r.hits.Add(int64(st.PrefixHits))
		r.stats.Store(&st)
	}})
	t.Cleanup(r.s.Close)
	return r
}

func (r *prefixRig) run(t *testing.T, adapter string, prompt []int32, n int) []int32 {
	t.Helper()
	ch, err := r.s.Submit(context.Background(), Request{Adapter: adapter, Prompt: prompt, MaxTokens: n})
	if err != nil {
		t.Fatal(err)
	}
	toks, end := collect(t, ch)
	if end.Err != nil {
		t.Fatalf("%s: %v", adapter, end.Err)
	}
	return toks
}

// prefixWorkload: prompts sharing a 22-token system prefix, over every
// adapter and the base model, with suffixes of several lengths.
func prefixWorkload(f *fixture.Fixture) (adapters []string, prompts [][]int32) {
	system := slices.Clone(f.Cases[2].Prompt[:22])
	for i := range 12 {
		p := slices.Clone(system)
		p = append(p, f.Cases[i%len(f.Cases)].Prompt[:1+i%5]...)
		prompts = append(prompts, p)
		adapters = append(adapters, []string{"", "qv-r8", "all-r16", "attn-r32-rslora", "mlp-r64"}[i%5])
	}
	return adapters, prompts
}

// TestPrefixCacheSameTokens: greedy outputs are identical with the prefix
// cache on and off (the CPU backend computes every row alike, so exactly),
// sequential and concurrent, the cache hits, and every page is accounted
// for at the end.
func TestPrefixCacheSameTokens(t *testing.T) {
	off, on := newPrefixRig(t, false, 256), newPrefixRig(t, true, 256)
	adapters, prompts := prefixWorkload(off.f)
	want := make([][]int32, len(prompts))
	for i := range prompts {
		want[i] = off.run(t, adapters[i], prompts[i], 10)
	}
	for round := range 2 {
		for i := range prompts {
			if got := on.run(t, adapters[i], prompts[i], 10); !slices.Equal(got, want[i]) {
				t.Errorf("round %d prompt %d (%q): %v with the cache, %v without", round, i, adapters[i], got, want[i])
			}
		}
	}
	var wg sync.WaitGroup
	for rep := range 3 {
		for i := range prompts {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if got := on.run(t, adapters[i], prompts[i], 10); !slices.Equal(got, want[i]) {
					t.Errorf("concurrent %d prompt %d: %v, want %v", rep, i, got, want[i])
				}
			}()
		}
	}
	wg.Wait()
	if on.hits.Load() == 0 {
		t.Error("the prefix cache never hit")
	}
	// Do runs between steps, after the last step's report: a client gets
	// its Done event before that report, so the stats are read after Do.
	var free int
	on.s.Do(context.Background(), func(e *engine.Engine) error { free = e.FreeBlocks(); return nil })
	st := on.stats.Load()
	if free+st.EvictablePages != 256 || st.CachedPages != st.EvictablePages {
		t.Errorf("at rest: %d free + %d evictable of 256, %d cached", free, st.EvictablePages, st.CachedPages)
	}
	t.Logf("prefix tokens hit: %d; pages cached at rest: %d", on.hits.Load(), st.CachedPages)
}

// TestPrefixCacheAdapterReplaced: an adapter replaced under the same ID
// (a new version in its slot) never reuses the old version's pages.
func TestPrefixCacheAdapterReplaced(t *testing.T) {
	ref, on := newPrefixRig(t, false, 256), newPrefixRig(t, true, 256)
	_, prompts := prefixWorkload(ref.f)
	p := prompts[3]
	before := on.run(t, "all-r16", p, 10)
	if got := on.run(t, "all-r16", p, 10); !slices.Equal(got, before) {
		t.Fatalf("a repeat differs: %v vs %v", got, before)
	}
	// Replace all-r16 by mlp-r64's weights under the same ID, as a deploy does.
	for _, r := range []*prefixRig{ref, on} {
		r.s.Do(context.Background(), func(e *engine.Engine) error {
			return e.LoadAdapter(r.res.slot["all-r16"], r.f.Adapters["mlp-r64"])
		})
		r.res.mu.Lock()
		r.res.ver["all-r16"] = "v2"
		r.res.mu.Unlock()
	}
	want := ref.run(t, "all-r16", p, 10)
	if slices.Equal(want, before) {
		t.Fatal("the replacement does not change the output: the test cannot tell")
	}
	hits := on.hits.Load()
	if got := on.run(t, "all-r16", p, 10); !slices.Equal(got, want) {
		t.Errorf("after the replacement: %v, want %v (old version: %v)", got, want, before)
	}
	if on.hits.Load() != hits {
		t.Errorf("the new version hit %d tokens of the old one's pages", on.hits.Load()-hits)
	}
}

// TestPrefixCacheEviction: with a pool too small to keep every prefix,
// cached pages give way to running sequences and outputs stay identical.
func TestPrefixCacheEviction(t *testing.T) {
	off, on := newPrefixRig(t, false, 24), newPrefixRig(t, true, 24)
	f := off.f
	for round := range 3 {
		for i, c := range f.Cases {
			p := append(slices.Clone(c.Prompt), int32(3+round), int32(3+i))
			a := c.AdapterName()
			if got, want := on.run(t, a, p, 8), off.run(t, a, p, 8); !slices.Equal(got, want) {
				t.Errorf("round %d case %d: %v with the cache, %v without", round, i, got, want)
			}
		}
	}
	var free int // stats after Do: see TestPrefixCacheSameTokens
	on.s.Do(context.Background(), func(e *engine.Engine) error { free = e.FreeBlocks(); return nil })
	st := on.stats.Load()
	if free+st.EvictablePages != 24 {
		t.Errorf("at rest: %d free + %d evictable of 24", free, st.EvictablePages)
	}
}
