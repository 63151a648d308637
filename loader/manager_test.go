package loader_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/peftd/peftd/internal/adaptertest"
	"github.com/peftd/peftd/loader"
	"github.com/peftd/peftd/loader/store"
	"github.com/peftd/peftd/runtime/cpu"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/lora"
)

const fixture = "../testdata/tiny-llama-lora"

var fixtureAdapters = []string{"qv-r8", "all-r16", "attn-r32-rslora", "mlp-r64"}

// engineDevice runs Device calls on a real engine under a mutex (the test
// stand-in for the scheduler's engine goroutine).
type engineDevice struct {
	mu      sync.Mutex
	e       *engine.Engine
	slots   []string // adapter name in each slot
	loads   atomic.Int64
	unloads atomic.Int64
}

func (d *engineDevice) Load(ctx context.Context, slot int, a *lora.Adapter) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.e.LoadAdapter(slot, a); err != nil {
		return err
	}
	d.slots[slot] = a.Name
	d.loads.Add(1)
	return nil
}

func (d *engineDevice) Unload(ctx context.Context, slot int) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.e.UnloadAdapter(slot); err != nil {
		return err
	}
	d.slots[slot] = ""
	d.unloads.Add(1)
	return nil
}

// step runs one forward pass with slot's adapter: it fails if the slot is empty.
func (d *engineDevice) step(t *testing.T, slot int) []float32 {
	t.Helper()
	d.mu.Lock()
	defer d.mu.Unlock()
	var seq engine.Sequence
	defer d.e.Release(&seq)
	out, err := d.e.Step(context.Background(), []engine.Input{{Seq: &seq, Tokens: []int32{1, 5, 9}, Slot: slot}})
	if err != nil {
		t.Fatalf("step on slot %d: %v", slot, err)
	}
	return out[0]
}

func (d *engineDevice) slotName(slot int) string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.slots[slot]
}

// countingStore counts Gets through to the real store.
type countingStore struct {
	store.Store
	gets atomic.Int64
}

func (c *countingStore) Get(ctx context.Context, id string, o store.GetOptions) ([]byte, []byte, string, error) {
	c.gets.Add(1)
	return c.Store.Get(ctx, id, o)
}

type env struct {
	t     *testing.T
	base  *llama.Config
	fs    *store.FS
	store *countingStore
	dev   *engineDevice
	m     *loader.Manager
	cache string
}

func readAdapter(t testing.TB, name string) (cfg, weights []byte) {
	t.Helper()
	return adaptertest.Read(t, filepath.Join(fixture, "adapters", name))
}

// newEnv copies the fixture adapters into a temp folder store and starts a
// Manager over a CPU engine with opts' other fields.
func newEnv(t *testing.T, slots int, opts loader.Options) *env {
	t.Helper()
	fs := fixtureFS(t)
	e := newEnvWithStore(t, slots, fs, opts)
	e.fs = fs
	return e
}

// fixtureFS is a folder store (polled every 20ms) holding the fixture
// adapters.
func fixtureFS(t *testing.T) *store.FS {
	t.Helper()
	fs, err := store.NewFS(filepath.Join(t.TempDir(), "store"), store.FSOptions{PollInterval: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range fixtureAdapters {
		c, w := readAdapter(t, name)
		if _, err := fs.Put(context.Background(), name, c, w); err != nil {
			t.Fatal(err)
		}
	}
	return fs
}

// newEnvWithStore starts a Manager on st over a CPU engine.
func newEnvWithStore(t *testing.T, slots int, st store.Store, opts loader.Options) *env {
	t.Helper()
	model, err := llama.Open(filepath.Join(fixture, "base"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { model.Close() })
	eng, err := engine.New(model, cpu.New(1), engine.Options{MaxTokens: 32, KVBlocks: 8, BlockSize: 16, AdapterSlots: slots})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { eng.Close() })
	e := &env{t: t, base: model.Config, store: &countingStore{Store: st},
		dev: &engineDevice{e: eng, slots: make([]string, slots)}, cache: filepath.Join(t.TempDir(), "cache")}
	opts.Store, opts.Device, opts.Base, opts.Slots = e.store, e.dev, model.Config, slots
	if opts.CacheDir == "" {
		opts.CacheDir = e.cache
	}
	if opts.RecheckInterval == 0 {
		opts.RecheckInterval = -1 // every Acquire checks the ETag
	}
	e.m, err = loader.New(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.m.Close() })
	return e
}

func (e *env) acquire(id string) *loader.Lease {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	l, err := e.m.Acquire(ctx, id)
	if err != nil {
		e.t.Fatalf("Acquire(%s): %v", id, err)
	}
	if got := e.dev.slotName(l.Slot()); got != id {
		e.t.Fatalf("Acquire(%s): slot %d holds %q", id, l.Slot(), got)
	}
	e.dev.step(e.t, l.Slot())
	return l
}

func (e *env) tier(id string) loader.Tier {
	e.t.Helper()
	info, ok := e.m.Get(id)
	if !ok {
		return loader.TierNone
	}
	return info.Tier
}

func (e *env) waitTier(id string, tier loader.Tier, within time.Duration) loader.AdapterInfo {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	info, err := e.m.WatchResidency(ctx, id, tier)
	if err != nil {
		e.t.Fatalf("%s never reached tier %v (now %v): %v", id, tier, info.Tier, err)
	}
	return info
}

// eventually retries cond (test-side only; the Manager itself never polls).
func eventually(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestLRUEviction(t *testing.T) {
	e := newEnv(t, 2, loader.Options{})
	steps := []struct {
		acquire   string
		evicted   string // "" if a free slot is used
		onDevice  []string
		offDevice []string
	}{
		{acquire: "qv-r8", onDevice: []string{"qv-r8"}},
		{acquire: "all-r16", onDevice: []string{"qv-r8", "all-r16"}},
		{acquire: "attn-r32-rslora", evicted: "qv-r8", onDevice: []string{"all-r16", "attn-r32-rslora"}},
		{acquire: "all-r16", onDevice: []string{"all-r16", "attn-r32-rslora"}}, // hit refreshes LRU
		{acquire: "mlp-r64", evicted: "attn-r32-rslora", onDevice: []string{"all-r16", "mlp-r64"}},
		{acquire: "qv-r8", evicted: "all-r16", onDevice: []string{"mlp-r64", "qv-r8"}, offDevice: []string{"all-r16", "attn-r32-rslora"}},
	}
	var evictions uint64
	for i, s := range steps {
		before := map[string]int{}
		for _, a := range e.m.List() {
			before[a.ID] = a.Slot
		}
		l := e.acquire(s.acquire)
		if s.evicted != "" {
			evictions++
			if l.Slot() != before[s.evicted] {
				t.Errorf("step %d: %s got slot %d, want %s's slot %d", i, s.acquire, l.Slot(), s.evicted, before[s.evicted])
			}
			if tr := e.tier(s.evicted); tr != loader.TierHost {
				t.Errorf("step %d: evicted %s is at %v, want host", i, s.evicted, tr)
			}
		}
		l.Release()
		for _, id := range s.onDevice {
			if tr := e.tier(id); tr != loader.TierDevice {
				t.Errorf("step %d: %s at %v, want device", i, id, tr)
			}
		}
		for _, id := range s.offDevice {
			if tr := e.tier(id); tr == loader.TierDevice {
				t.Errorf("step %d: %s still on the device", i, id)
			}
		}
	}
	st := e.m.Stats()
	if st.DeviceEvictions != evictions || st.SlotsUsed != 2 || st.StoreFetches != 4 {
		t.Errorf("stats: evictions %d (want %d), slots used %d, fetches %d (want 4)", st.DeviceEvictions, evictions, st.SlotsUsed, st.StoreFetches)
	}
	if got := e.store.gets.Load(); got != 4 {
		t.Errorf("store Gets = %d, want 4 (host tier serves the re-acquire of qv-r8)", got)
	}
	info, _ := e.m.Get("qv-r8")
	if info.LastLoadSource != loader.TierHost || info.Invocations != 2 || info.Rank != 8 {
		t.Errorf("qv-r8 info %+v: want source host, 2 invocations, rank 8", info)
	}
}

func TestRefcountBlocksEvictionAndWaiterWakes(t *testing.T) {
	e := newEnv(t, 2, loader.Options{})
	a, b := e.acquire("qv-r8"), e.acquire("all-r16")

	ctx, cancel := context.WithTimeout(context.Background(), 150*time.Millisecond)
	_, err := e.m.Acquire(ctx, "mlp-r64")
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Acquire with every slot held: %v, want deadline exceeded", err)
	}
	for _, l := range []*loader.Lease{a, b} {
		if got := e.dev.slotName(l.Slot()); got != l.ID() {
			t.Fatalf("held %s was evicted: slot %d has %q", l.ID(), l.Slot(), got)
		}
	}

	got := make(chan *loader.Lease)
	errc := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		l, err := e.m.Acquire(ctx, "mlp-r64")
		if err != nil {
			errc <- err
			return
		}
		got <- l
	}()
	// The waiter has fetched and parsed mlp-r64 and waits for a slot.
	e.waitTier("mlp-r64", loader.TierHost, 5*time.Second)
	select {
	case <-got:
		t.Fatal("Acquire returned while every slot was held")
	case err := <-errc:
		t.Fatal(err)
	case <-time.After(50 * time.Millisecond):
	}
	start := time.Now()
	b.Release()
	select {
	case l := <-got:
		if l.Slot() != b.Slot() {
			t.Errorf("waiter got slot %d, want the released slot %d", l.Slot(), b.Slot())
		}
		t.Logf("waiter woke %v after Release", time.Since(start))
		e.dev.step(t, l.Slot())
		l.Release()
	case err := <-errc:
		t.Fatal(err)
	case <-time.After(5 * time.Second):
		t.Fatal("waiter did not wake after Release")
	}
	if got := e.dev.slotName(a.Slot()); got != "qv-r8" {
		t.Errorf("held qv-r8's slot now has %q", got)
	}
	a.Release()
}

func TestSingleflight(t *testing.T) {
	e := newEnv(t, 2, loader.Options{})
	const n = 100
	var wg sync.WaitGroup
	leases := make([]*loader.Lease, n)
	errs := make([]error, n)
	startGate := make(chan struct{})
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-startGate
			leases[i], errs[i] = e.m.Acquire(context.Background(), "mlp-r64")
		}()
	}
	close(startGate)
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("acquire %d: %v", i, err)
		}
		if leases[i].Slot() != leases[0].Slot() || leases[i].Version() != leases[0].Version() {
			t.Fatalf("acquire %d: slot %d version %s, want %d %s", i, leases[i].Slot(), leases[i].Version(), leases[0].Slot(), leases[0].Version())
		}
	}
	if got := e.store.gets.Load(); got != 1 {
		t.Errorf("%d concurrent first Acquires made %d store Gets, want 1", n, got)
	}
	if got := e.dev.loads.Load(); got != 1 {
		t.Errorf("device loads = %d, want 1", got)
	}
	info, _ := e.m.Get("mlp-r64")
	if info.Refs != n || info.Invocations != n {
		t.Errorf("refs %d invocations %d, want %d", info.Refs, info.Invocations, n)
	}
	for _, l := range leases {
		l.Release()
		l.Release() // idempotent
	}
	if info, _ := e.m.Get("mlp-r64"); info.Refs != 0 {
		t.Errorf("refs after release = %d", info.Refs)
	}
}

func TestBadAdapterRefused(t *testing.T) {
	qvCfg, qvW := readAdapter(t, "qv-r8")
	_, mlpW := readAdapter(t, "mlp-r64")
	dora := []byte(`{"peft_type":"LORA","task_type":"CAUSAL_LM","r":8,"lora_alpha":16,"target_modules":["q_proj","v_proj"],"use_dora":true}`)
	cases := []struct {
		name         string
		cfg, weights []byte
		want         string
	}{
		{"use_dora", dora, qvW, "use_dora"},
		{"wrong-shape", qvCfg, mlpW, "target_modules"},
		{"truncated", qvCfg, qvW[:len(qvW)/2], "safetensors"},
		{"not-json", []byte("{"), qvW, "adapter_config.json"},
	}
	e := newEnv(t, 2, loader.Options{})
	// Two serving adapters: one held, one idle (evictable) on the device.
	held := e.acquire("qv-r8")
	idle := e.acquire("all-r16")
	idleSlot := idle.Slot()
	idle.Release()
	before := e.dev.loads.Load()
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			id := "bad-" + c.name
			if _, err := e.fs.Put(context.Background(), id, c.cfg, c.weights); err != nil {
				t.Fatal(err)
			}
			gets := e.store.gets.Load()
			for range 2 { // the second is answered from the index, no refetch
				_, err := e.m.Acquire(context.Background(), id)
				if !errors.Is(err, loader.ErrInvalidAdapter) {
					t.Fatalf("Acquire(%s) = %v, want ErrInvalidAdapter", id, err)
				}
				if !contains(err.Error(), c.want) {
					t.Errorf("error %q does not name %q", err, c.want)
				}
			}
			if got := e.store.gets.Load() - gets; got != 1 {
				t.Errorf("%d Gets for a bad version, want 1", got)
			}
			info, _ := e.m.Get(id)
			if info.Error == "" || info.Tier != loader.TierStore || info.OnDisk {
				t.Errorf("bad adapter info %+v: want an error, tier store, not cached on disk", info)
			}
			if _, err := os.Stat(filepath.Join(e.cache, id)); !os.IsNotExist(err) {
				t.Errorf("bad adapter reached the disk cache: %v", err)
			}
		})
	}
	if e.dev.loads.Load() != before || e.dev.slotName(idleSlot) != "all-r16" || e.dev.slotName(held.Slot()) != "qv-r8" {
		t.Errorf("bad uploads disturbed the device: loads %d->%d, slots %q %q", before, e.dev.loads.Load(), e.dev.slotName(idleSlot), e.dev.slotName(held.Slot()))
	}
	e.dev.step(t, held.Slot())
	held.Release()
	l := e.acquire("all-r16")
	if l.Slot() != idleSlot {
		t.Errorf("all-r16 moved from slot %d to %d", idleSlot, l.Slot())
	}
	l.Release()
	if st := e.m.Stats(); st.InvalidUploads != uint64(len(cases)) {
		t.Errorf("InvalidUploads = %d, want %d", st.InvalidUploads, len(cases))
	}
	// A fixed upload (new ETag) serves.
	if _, err := e.fs.Put(context.Background(), "bad-use_dora", qvCfg, qvW); err != nil {
		t.Fatal(err)
	}
	e.acquire("bad-use_dora").Release()
}

func contains(s, sub string) bool {
	return len(sub) == 0 || (len(s) >= len(sub) && (s[:len(sub)] == sub || contains(s[1:], sub)))
}

func TestReplace(t *testing.T) {
	for _, tc := range []struct {
		name    string
		recheck time.Duration // -1: Acquire checks; 1h: only Watch notices
	}{{"acquire-check", -1}, {"watch", time.Hour}} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, 3, loader.Options{RecheckInterval: tc.recheck})
			old := e.acquire("qv-r8")
			oldOut := e.dev.step(t, old.Slot())
			// Re-deploy qv-r8 with all-r16's files.
			c, w := readAdapter(t, "all-r16")
			etag, err := e.fs.Put(context.Background(), "qv-r8", c, w)
			if err != nil {
				t.Fatal(err)
			}
			if etag == old.Version() {
				t.Fatal("replacement has the old ETag")
			}
			if tc.recheck > 0 {
				eventually(t, 5*time.Second, "the watcher to see the new version", func() bool {
					info, _ := e.m.Get("qv-r8")
					return info.Version == etag
				})
			}
			l, err := e.m.Acquire(context.Background(), "qv-r8")
			if err != nil {
				t.Fatal(err)
			}
			if l.Version() != etag || l.Slot() == old.Slot() {
				t.Fatalf("new lease: version %s slot %d; want %s in a slot other than %d", l.Version(), l.Slot(), etag, old.Slot())
			}
			// The old lease still runs the old weights.
			if got := e.dev.step(t, old.Slot()); !slices.Equal(got, oldOut) {
				t.Error("old lease's slot changed under it")
			}
			if slices.Equal(e.dev.step(t, l.Slot()), oldOut) {
				t.Error("new version computes like the old one")
			}
			if n := len(e.m.List()); n != 5 {
				t.Errorf("List has %d versions, want 5 (4 adapters + the held old version)", n)
			}
			old.Release()
			eventually(t, 5*time.Second, "the old version to leave the device", func() bool {
				for _, a := range e.m.List() {
					if a.ID == "qv-r8" && a.Version == old.Version() {
						return false
					}
				}
				return e.dev.slotName(old.Slot()) == ""
			})
			l.Release()
		})
	}
}

func TestDelete(t *testing.T) {
	e := newEnv(t, 2, loader.Options{})
	l := e.acquire("attn-r32-rslora")
	eventually(t, 5*time.Second, "the disk cache to hold attn-r32-rslora (written in the background)", func() bool {
		_, err := os.Stat(filepath.Join(e.cache, "attn-r32-rslora"))
		return err == nil
	})
	if err := e.fs.Delete(context.Background(), "attn-r32-rslora"); err != nil {
		t.Fatal(err)
	}
	if _, err := e.m.Acquire(context.Background(), "attn-r32-rslora"); !errors.Is(err, loader.ErrNotFound) {
		t.Fatalf("Acquire of a deleted adapter: %v, want ErrNotFound", err)
	}
	e.dev.step(t, l.Slot()) // the held lease still serves
	if info := e.m.List(); len(info) != 4 {
		t.Errorf("List: %d rows, want 4 (the held deleted one included)", len(info))
	}
	l.Release()
	e.waitTier("attn-r32-rslora", loader.TierNone, 5*time.Second)
	eventually(t, 5*time.Second, "every cache to drop the deleted adapter", func() bool {
		_, statErr := os.Stat(filepath.Join(e.cache, "attn-r32-rslora"))
		_, known := e.m.Get("attn-r32-rslora")
		return os.IsNotExist(statErr) && !known && e.dev.slotName(l.Slot()) == "" && len(e.m.List()) == 3
	})
	if !e.m.Idle() {
		t.Error("Idle() = false with nothing resident")
	}
	// Upload again: deploys without restart.
	c, w := readAdapter(t, "attn-r32-rslora")
	if _, err := e.fs.Put(context.Background(), "attn-r32-rslora", c, w); err != nil {
		t.Fatal(err)
	}
	e.acquire("attn-r32-rslora").Release()
}

func TestIdleTTLAndDiskCache(t *testing.T) {
	e := newEnv(t, 2, loader.Options{DeviceTTL: time.Second, HostTTL: 2 * time.Second, JanitorInterval: 50 * time.Millisecond})
	start := time.Now()
	l := e.acquire("all-r16")
	l.Release()
	if e.m.Idle() {
		t.Fatal("Idle() with an adapter on the device")
	}
	e.waitTier("all-r16", loader.TierHost, 5*time.Second)
	tDev := time.Since(start)
	e.waitTier("all-r16", loader.TierDisk, 5*time.Second)
	tHost := time.Since(start)
	t.Logf("left the device after %v, host memory after %v", tDev, tHost)
	if tDev < time.Second || tHost < 2*time.Second {
		t.Errorf("evicted too early: device %v host %v", tDev, tHost)
	}
	if e.dev.slotName(l.Slot()) != "" || e.dev.unloads.Load() != 1 {
		t.Errorf("device slot %d holds %q after TTL (unloads %d)", l.Slot(), e.dev.slotName(l.Slot()), e.dev.unloads.Load())
	}
	if !e.m.Idle() {
		t.Error("Idle() = false after TTLs")
	}
	st := e.m.Stats()
	if st.DeviceEvictions != 1 || st.HostEvictions != 1 || st.HostBytes != 0 || st.DeviceBytes != 0 || st.DiskBytes == 0 {
		t.Errorf("stats after TTLs: %+v", st)
	}
	gets := e.store.gets.Load()
	l = e.acquire("all-r16")
	l.Release()
	if e.store.gets.Load() != gets {
		t.Error("re-acquire after host eviction read the store, want the disk cache")
	}
	info, _ := e.m.Get("all-r16")
	if info.LastLoadSource != loader.TierDisk || info.Tier != loader.TierDevice {
		t.Errorf("re-acquire: source %v tier %v, want disk, device", info.LastLoadSource, info.Tier)
	}
	if e.m.Stats().DiskHits != 1 {
		t.Errorf("disk hits = %d", e.m.Stats().DiskHits)
	}
}

func TestHostBudget(t *testing.T) {
	// all-r16 is 2*(7 projections)*... float32; a budget that holds only one adapter.
	e := newEnv(t, 1, loader.Options{HostBytes: 1})
	e.acquire("qv-r8").Release()
	e.acquire("all-r16").Release()                      // evicts qv-r8 from the device, then from host memory
	e.waitTier("qv-r8", loader.TierDisk, 5*time.Second) // the disk copy is written in the background
	if st := e.m.Stats(); st.HostEvictions != 1 {
		t.Errorf("host evictions %d, want 1", st.HostEvictions)
	}
}

func TestPinAndClose(t *testing.T) {
	e := newEnv(t, 2, loader.Options{DeviceTTL: 20 * time.Millisecond, JanitorInterval: 10 * time.Millisecond})
	if err := e.m.Pin(context.Background(), "qv-r8"); err != nil {
		t.Fatal(err)
	}
	if err := e.m.Pin(context.Background(), "all-r16"); !errors.Is(err, loader.ErrTooManyPinned) {
		t.Errorf("second pin with 2 slots: %v", err)
	}
	// LRU churn and TTL leave the pinned adapter alone.
	for _, id := range []string{"all-r16", "mlp-r64", "attn-r32-rslora"} {
		e.acquire(id).Release()
	}
	time.Sleep(100 * time.Millisecond)
	if tr := e.tier("qv-r8"); tr != loader.TierDevice {
		t.Fatalf("pinned adapter at %v", tr)
	}
	e.m.Unpin("qv-r8")
	e.waitTier("qv-r8", loader.TierHost, 5*time.Second)

	// Close wakes a waiter.
	a, b := e.acquire("qv-r8"), e.acquire("all-r16")
	defer a.Release()
	defer b.Release()
	errc := make(chan error, 1)
	go func() {
		_, err := e.m.Acquire(context.Background(), "mlp-r64")
		errc <- err
	}()
	e.waitTier("mlp-r64", loader.TierHost, 5*time.Second)
	e.m.Close()
	select {
	case err := <-errc:
		if !errors.Is(err, loader.ErrClosed) {
			t.Errorf("waiter after Close: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not wake the waiter")
	}
	if _, err := e.m.Acquire(context.Background(), "qv-r8"); !errors.Is(err, loader.ErrClosed) {
		t.Errorf("Acquire after Close: %v", err)
	}
}

func TestAcquireBadID(t *testing.T) {
	e := newEnv(t, 1, loader.Options{})
	for _, id := range []string{"", "..", "a/b", "../x", "x y"} {
		if _, err := e.m.Acquire(context.Background(), id); !errors.Is(err, loader.ErrBadID) {
			t.Errorf("Acquire(%q) = %v, want ErrBadID", id, err)
		}
	}
	if _, err := e.m.Acquire(context.Background(), "nope"); !errors.Is(err, loader.ErrNotFound) {
		t.Errorf("Acquire(nope) = %v", err)
	}
}
