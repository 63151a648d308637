package loader_test

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/peftd/peftd/loader"
	"github.com/peftd/peftd/loader/store"
)

// TestTryAcquire: a lease without waiting only for an adapter on the device
// whose version was checked lately; NeedsSlot for a known one off the
// device; AcquireNow for the rest. FreeSlots counts empty and unleased slots.
func TestTryAcquire(t *testing.T) {
	e := newEnv(t, 2, loader.Options{RecheckInterval: time.Hour})
	eventually(t, 5*time.Second, "qv-r8, listed by the store and not loaded, to need a slot", func() bool {
		_, st := e.m.TryAcquire("qv-r8")
		return st == loader.NeedsSlot
	})
	if _, st := e.m.TryAcquire("no-such"); st != loader.AcquireNow {
		t.Errorf("unknown: %v, want AcquireNow", st)
	}
	if n := e.m.FreeSlots(); n != 2 {
		t.Errorf("FreeSlots with nothing loaded = %d, want 2", n)
	}
	l := e.acquire("qv-r8")
	if n := e.m.FreeSlots(); n != 1 {
		t.Errorf("FreeSlots with qv-r8 leased = %d, want 1", n)
	}
	l2, st := e.m.TryAcquire("qv-r8")
	if st != loader.Leased || l2 == nil || l2.Slot() != l.Slot() || l2.Version() != l.Version() {
		t.Fatalf("on the device: %v %v, want a lease on slot %d", st, l2, l.Slot())
	}
	l.Release()
	if n := e.m.FreeSlots(); n != 1 {
		t.Errorf("FreeSlots with qv-r8 still leased once = %d, want 1", n)
	}
	l2.Release()
	if n := e.m.FreeSlots(); n != 2 {
		t.Errorf("FreeSlots with qv-r8 unleased = %d, want 2 (it may be replaced)", n)
	}
	// Known (checked) but off the device once evicted: NeedsSlot.
	e.acquire("all-r16").Release()
	e.acquire("mlp-r64").Release() // evicts qv-r8 (LRU)
	if _, st := e.m.TryAcquire("qv-r8"); st != loader.NeedsSlot {
		t.Errorf("evicted: %v, want NeedsSlot", st)
	}
	// Pinned adapters are not free slots.
	if err := e.m.Pin(t.Context(), "mlp-r64"); err != nil {
		t.Fatal(err)
	}
	if n := e.m.FreeSlots(); n != 1 {
		t.Errorf("FreeSlots with mlp-r64 pinned = %d, want 1", n)
	}
	// A version not checked within RecheckInterval goes to Acquire.
	e2 := newEnv(t, 1, loader.Options{RecheckInterval: -1})
	e2.acquire("qv-r8").Release()
	if _, st := e2.m.TryAcquire("qv-r8"); st != loader.AcquireNow {
		t.Errorf("recheck on every Acquire: %v, want AcquireNow", st)
	}
}

// TestPrefetch: a prefetched adapter is in host memory without a slot, and
// its load then comes from there.
func TestPrefetch(t *testing.T) {
	e := newEnv(t, 1, loader.Options{RecheckInterval: time.Hour})
	eventually(t, 5*time.Second, "mlp-r64 to be known from the store", func() bool {
		_, st := e.m.TryAcquire("mlp-r64")
		return st == loader.NeedsSlot
	})
	l := e.acquire("qv-r8") // holds the only slot
	e.m.Prefetch("mlp-r64")
	e.waitTier("mlp-r64", loader.TierHost, 5*time.Second)
	if n := e.m.FreeSlots(); n != 0 {
		t.Errorf("FreeSlots = %d after a prefetch, want 0 (it takes no slot)", n)
	}
	e.m.Prefetch("mlp-r64") // already there: nothing to do
	e.m.Prefetch("no-such") // unknown: nothing to do
	l.Release()
	e.acquire("mlp-r64").Release()
	if info, _ := e.m.Get("mlp-r64"); info.LastLoadSource != loader.TierHost {
		t.Errorf("mlp-r64 loaded from %v, want host (prefetched)", info.LastLoadSource)
	}
}

// statCounter counts Stats through to the real store.
type statCounter struct {
	store.Store
	stats atomic.Int64
}

func (c *statCounter) Stat(ctx context.Context, id string) (store.Object, error) {
	c.stats.Add(1)
	return c.Store.Stat(ctx, id)
}

// TestTryAcquireStale: a loaded version not checked within RecheckInterval
// is leased at once while one check runs in the background (then it is
// fresh again); a deleted adapter stops being leased once that check has
// seen it gone.
func TestTryAcquireStale(t *testing.T) {
	var mu sync.Mutex
	now := time.Now()
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	advance := func(d time.Duration) { mu.Lock(); now = now.Add(d); mu.Unlock() }
	fs := fixtureFS(t)
	sc := &statCounter{Store: fs}
	// no store Watch: its first listing, should it land after advance,
	// would make the row fresh on its own and TryAcquire would check nothing
	e := newEnvWithStore(t, 1, sc, loader.Options{RecheckInterval: time.Second, Now: clock, NoWatch: true})
	e.acquire("qv-r8").Release()
	advance(2 * time.Second)
	before := sc.stats.Load()
	l, st := e.m.TryAcquire("qv-r8")
	if st != loader.Leased {
		t.Fatalf("stale but loaded: %v, want Leased", st)
	}
	l.Release()
	eventually(t, 5*time.Second, "the background store check", func() bool { return sc.stats.Load() > before })
	if err := fs.Delete(context.Background(), "qv-r8"); err != nil {
		t.Fatal(err)
	}
	advance(2 * time.Second)
	eventually(t, 5*time.Second, "qv-r8 to stop being leased once its deletion is seen", func() bool {
		l, st := e.m.TryAcquire("qv-r8")
		if l != nil {
			l.Release()
		}
		return st != loader.Leased
	})
}
