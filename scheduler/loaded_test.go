package scheduler

import (
	"context"
	"sync"
	"testing"

	"github.com/peftd/peftd/internal/fixture"
	"github.com/peftd/peftd/runtime/cpu"
	"github.com/peftd/peftd/runtime/engine"
)

// loadingLease is a lease whose taking loaded its adapter from src.
type loadingLease struct {
	verLease
	src string
}

func (l loadingLease) LoadSource() string { return l.src }

// coldOnce hands out a lease that loaded its adapter for the first
// Acquire of each adapter, and plain resident leases after it.
type coldOnce struct {
	mu   sync.Mutex
	seen map[string]bool
}

func (c *coldOnce) Acquire(_ context.Context, id string) (Lease, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	l := verLease{slot: 0, ver: "v1"}
	if c.seen[id] {
		return loadingLease{l, ""}, nil
	}
	c.seen[id] = true
	return loadingLease{l, "store"}, nil
}

// TestFirstTokenSaysTheAdapterWasLoaded: a request whose lease loaded its
// adapter says so (Event.Loaded, where from) with its first token only; a
// request for the resident adapter, and the base model, say nothing.
func TestFirstTokenSaysTheAdapterWasLoaded(t *testing.T) {
	f, err := fixture.Load()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	e, err := engine.New(f.Model, cpu.New(0), engine.Options{MaxTokens: 64, KVBlocks: 64, BlockSize: 4, AdapterSlots: 1})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.LoadAdapter(0, f.Adapters["qv-r8"]); err != nil {
		t.Fatal(err)
	}
	s := New(e, &coldOnce{seen: map[string]bool{}}, Config{})
	t.Cleanup(s.Close)
	loaded := func(adapter string) []string {
		ch, err := s.Submit(context.Background(), Request{Adapter: adapter, Prompt: f.Cases[0].Prompt, MaxTokens: 3})
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for ev := range ch {
			if ev.Done {
				if ev.Err != nil {
					t.Fatal(ev.Err)
				}
				continue
			}
			out = append(out, ev.Loaded)
		}
		return out
	}
	for _, c := range []struct {
		adapter string
		want    []string
	}{{"qv-r8", []string{"store", "", ""}}, {"qv-r8", []string{"", "", ""}}, {"", []string{"", "", ""}}} {
		if got := loaded(c.adapter); len(got) != len(c.want) || got[0] != c.want[0] || got[1] != "" || got[2] != "" {
			t.Errorf("%q: Loaded per token %q, want %q", c.adapter, got, c.want)
		}
	}
}
