package loader_test

import (
	"context"
	"errors"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"github.com/peftd/peftd/loader"
	"github.com/peftd/peftd/loader/store"
)

// hangingStore is a store that, while down, hangs on every call until the
// caller's context ends (a network store whose client retries).
type hangingStore struct {
	store.Store
	down atomic.Bool
}

func (h *hangingStore) Stat(ctx context.Context, id string) (store.Object, error) {
	if h.down.Load() {
		<-ctx.Done()
		return store.Object{}, errors.New("connection refused (retrying)")
	}
	return h.Store.Stat(ctx, id)
}

func (h *hangingStore) Get(ctx context.Context, id string, o store.GetOptions) ([]byte, []byte, string, error) {
	if h.down.Load() {
		<-ctx.Done()
		return nil, nil, "", errors.New("connection refused (retrying)")
	}
	return h.Store.Get(ctx, id, o)
}

// TestStoreOutage: while the store hangs, a resident adapter is served
// without waiting on it, a cold one fails quickly with
// ErrStoreUnavailable (not ErrNotFound: nothing is forgotten), and after
// the store returns the cold one is served.
func TestStoreOutage(t *testing.T) {
	hs := &hangingStore{Store: fixtureFS(t)}
	e := newEnvWithStore(t, 2, hs, loader.Options{StatTimeout: 300 * time.Millisecond, StoreBackoff: time.Second,
		RecheckInterval: 10 * time.Millisecond, FetchStall: 300 * time.Millisecond})
	hot, cold := fixtureAdapters[0], fixtureAdapters[1]
	e.acquire(hot).Release()
	hs.down.Store(true)
	time.Sleep(20 * time.Millisecond) // the hot version's check is due

	acquire := func(id string) (time.Duration, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		start := time.Now()
		l, err := e.m.Acquire(ctx, id)
		if err == nil {
			l.Release()
		}
		return time.Since(start), err
	}
	// The first request to meet the outage may wait for one check.
	if d, err := acquire(hot); err != nil || d > time.Second {
		t.Fatalf("hot adapter at the outage's start: %v after %v", err, d)
	}
	var worst time.Duration
	for range 50 {
		d, err := acquire(hot)
		if err != nil {
			t.Fatalf("hot adapter during the outage: %v", err)
		}
		worst = max(worst, d)
		time.Sleep(10 * time.Millisecond)
	}
	if worst > 100*time.Millisecond {
		t.Errorf("a resident adapter waited %v on the failing store", worst)
	}
	d, err := acquire(cold)
	if !errors.Is(err, loader.ErrStoreUnavailable) || errors.Is(err, loader.ErrNotFound) {
		t.Errorf("cold adapter during the outage: %v, want ErrStoreUnavailable", err)
	}
	if d > 500*time.Millisecond {
		t.Errorf("the cold adapter's refusal took %v", d)
	}
	hs.down.Store(false)
	eventually(t, 5*time.Second, "the cold adapter served after the outage", func() bool {
		_, err := acquire(cold)
		return err == nil
	})
}

// TestFSStoreFolderGone: a folder store whose folder disappears reports the
// store unavailable, not every adapter missing; a resident adapter keeps
// serving, and every adapter is back when the folder is.
func TestFSStoreFolderGone(t *testing.T) {
	e := newEnv(t, 2, loader.Options{StatTimeout: 300 * time.Millisecond, StoreBackoff: 200 * time.Millisecond})
	hot, cold := fixtureAdapters[0], fixtureAdapters[1]
	e.acquire(hot).Release()
	root := e.fs.Root()
	if err := os.Rename(root, root+".away"); err != nil {
		t.Fatal(err)
	}
	if _, err := e.fs.Stat(context.Background(), hot); err == nil || errors.Is(err, store.ErrNotFound) {
		t.Errorf("Stat with the folder gone: %v, want an unavailable error", err)
	}
	e.acquire(hot).Release()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := e.m.Acquire(ctx, cold); !errors.Is(err, loader.ErrStoreUnavailable) {
		t.Errorf("cold adapter with the folder gone: %v, want ErrStoreUnavailable", err)
	}
	time.Sleep(100 * time.Millisecond) // watch polls fail meanwhile
	if err := os.Rename(root+".away", root); err != nil {
		t.Fatal(err)
	}
	time.Sleep(250 * time.Millisecond) // past the backoff
	for _, id := range fixtureAdapters {
		e.acquire(id).Release()
	}
}
