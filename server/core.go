package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/peftd/peftd/api"
	"github.com/peftd/peftd/loader"
	"github.com/peftd/peftd/loader/modelfetch"
	"github.com/peftd/peftd/loader/store"
	"github.com/peftd/peftd/metrics"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/gpu"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/lora"
	"github.com/peftd/peftd/scheduler"
)

// CoreConfig configures a Core: the engine, scheduler and loader over an
// opened model, a backend and a store.
type CoreConfig struct {
	Model   *llama.Model
	Backend engine.Backend // closed by Core.Close (and by NewCore when it fails)
	Store   store.Store
	// Slots is the number of device adapter slots (required, > 0).
	Slots int
	// KVBlocks and MaxBatchTokens size the engine; 0: the engine defaults.
	KVBlocks, MaxBatchTokens int
	// FillRows is the scheduler's: the rows prompt chunks fill a step to
	// while its decode rows leave room (0: MaxBatchTokens).
	FillRows int
	// MaxQueue bounds pending requests (0: the scheduler default).
	MaxQueue int
	// NoPrefixCache turns off the reuse of KV pages across requests that
	// start with the same tokens and adapter version.
	NoPrefixCache bool
	// CacheDir is the loader's disk cache; empty: no disk tier.
	CacheDir string
	// MaxAdapterBytes bounds an adapter download; 0: none.
	MaxAdapterBytes int64
	// HostBytes bounds parsed adapters in host memory and DiskBytes the
	// disk cache; 0: no bound (server.New derives defaults for serve).
	HostBytes, DiskBytes int64
	// DeviceTTL and HostTTL: 0 means never.
	DeviceTTL, HostTTL time.Duration
	// RecheckInterval and JanitorInterval tune the loader (0: its defaults).
	RecheckInterval, JanitorInterval time.Duration
	// IdleWarm records the engine's step programs (CUDA graphs) while it is
	// idle, after NewCore returns, instead of before (Config.WarmGraphs).
	IdleWarm bool
	// Metrics gets the loader collector and the scheduler's steps; nil: a new one.
	Metrics *metrics.Metrics
	Logger  *slog.Logger
}

// Core is the serving stack below HTTP: engine, scheduler (the loader's
// device) and loader (the scheduler's residency), with an api.Catalog over
// the loader and its store.
type Core struct {
	Engine    *engine.Engine
	Scheduler *scheduler.Scheduler
	Loader    *loader.Manager
	Store     store.Store
	Catalog   api.Catalog
	Metrics   *metrics.Metrics

	log       *slog.Logger
	closeOnce sync.Once
	closeErr  error
}

// NewCore builds the stack. On error everything it made is closed,
// Backend included.
func NewCore(ctx context.Context, cc CoreConfig) (*Core, error) {
	if cc.Model == nil || cc.Backend == nil || cc.Store == nil {
		return nil, errors.New("server: CoreConfig needs Model, Backend and Store")
	}
	if cc.Slots <= 0 {
		cc.Backend.Close()
		return nil, fmt.Errorf("server: slots must be positive, got %d", cc.Slots)
	}
	if cc.DeviceTTL < 0 || cc.HostTTL < 0 {
		cc.Backend.Close()
		return nil, errors.New("server: the device and host TTLs must not be negative")
	}
	log := cc.Logger
	if log == nil {
		log = slog.Default()
	}
	e, err := engine.New(cc.Model, cc.Backend, engineOptions(cc.Slots, cc.KVBlocks, cc.MaxBatchTokens))
	if err != nil {
		cc.Backend.Close()
		return nil, err
	}
	if cc.IdleWarm {
		logIdleWarm(e, log)
	} else if err := warmEngine(e, log, true); err != nil {
		e.Close()
		return nil, err
	}
	met := cc.Metrics
	if met == nil {
		met = metrics.New(cc.Slots)
	}
	res := &residency{}
	sched := scheduler.New(e, res, scheduler.Config{MaxQueue: cc.MaxQueue, Logger: log, OnStep: met.OnStep, PrefixCache: !cc.NoPrefixCache,
		OnPanic: func() { met.Panic("engine") }, IdleWarm: cc.IdleWarm, FillRows: cc.FillRows})
	col := metrics.NewLoader()
	mgr, err := loader.New(ctx, loader.Options{Store: cc.Store, Device: sched, Base: cc.Model.Config, Slots: cc.Slots,
		CacheDir: cc.CacheDir, MaxAdapterBytes: adapterBound(cc), HostBytes: max(cc.HostBytes, 0), DiskBytes: max(cc.DiskBytes, 0), DeviceTTL: cc.DeviceTTL, HostTTL: cc.HostTTL,
		RecheckInterval: cc.RecheckInterval, JanitorInterval: cc.JanitorInterval, OnLoad: col.OnLoad, OnPhase: col.OnPhase, Logger: log,
		Progress: modelfetch.LogProgress(log, "downloading adapter", 5*time.Second)})
	if err != nil {
		sched.Close()
		e.Close()
		return nil, err
	}
	res.m.Store(mgr)
	c := &Core{Engine: e, Scheduler: sched, Loader: mgr, Store: cc.Store, Metrics: met, log: log,
		Catalog: &loaderCatalog{m: mgr, st: cc.Store, base: cc.Model.Config}}
	col.Use(c.Loader.Stats, c.Idle)
	if err := met.Registry.Register(col); err != nil {
		c.Close()
		return nil, fmt.Errorf("server: metrics: %w", err)
	}
	return c, nil
}

// Idle reports that no request is pending in the scheduler and the loader
// holds nothing on the device or in host memory: the replica may stop.
func (c *Core) Idle() bool { return c.Scheduler.Pending() == 0 && c.Loader.Idle() }

// Close stops the scheduler (running requests end with scheduler.ErrClosed),
// then the loader, then the engine (and its backend). Later calls return
// the first call's result.
func (c *Core) Close() error {
	c.closeOnce.Do(func() {
		c.Scheduler.Close()
		if g, ok := c.Engine.Backend().(*gpu.Backend); ok {
			rec, rep := g.GraphStats()
			c.log.Info("CUDA graphs (decode and mixed steps)", "recorded", rec, "steps_replayed", rep)
		}
		var errs []error
		if err := c.Loader.Close(); err != nil {
			errs = append(errs, fmt.Errorf("loader: %w", err))
		}
		if err := c.Engine.Close(); err != nil {
			errs = append(errs, fmt.Errorf("engine: %w", err))
		}
		c.closeErr = errors.Join(errs...)
	})
	return c.closeErr
}

// residency is the scheduler's Residency over the loader's Manager, which is
// created after the scheduler (the Manager's Device is the scheduler).
type residency struct {
	m atomic.Pointer[loader.Manager]
}

func (r *residency) Acquire(ctx context.Context, id string) (scheduler.Lease, error) {
	m := r.m.Load()
	if m == nil {
		return nil, errors.New("server: the adapter loader is not ready")
	}
	l, err := m.Acquire(ctx, id)
	switch {
	case err == nil:
		return l, nil
	case errors.Is(err, loader.ErrNotFound) || errors.Is(err, loader.ErrBadID):
		return nil, fmt.Errorf("%w %q: %w", scheduler.ErrUnknownAdapter, id, err)
	case errors.Is(err, loader.ErrStoreUnavailable):
		return nil, fmt.Errorf("%w: adapter %q is not cached here and the store failed: %w", api.ErrUnavailable, id, err)
	case errors.Is(err, loader.ErrInvalidAdapter):
		return nil, invalidAdapter{err}
	}
	return nil, err
}

// TryAcquire and FreeSlots make the residency a scheduler.SlotAdmission:
// the scheduler's round robin decides which adapter takes a free slot.
func (r *residency) TryAcquire(id string) (scheduler.Lease, scheduler.Admission) {
	m := r.m.Load()
	if m == nil {
		return nil, scheduler.AcquireNow
	}
	l, st := m.TryAcquire(id)
	switch st {
	case loader.Leased:
		return l, scheduler.Leased
	case loader.NeedsSlot:
		return nil, scheduler.NeedsSlot
	}
	return nil, scheduler.AcquireNow
}

func (r *residency) FreeSlots() int {
	if m := r.m.Load(); m != nil {
		return m.FreeSlots()
	}
	return 0
}

// Prefetch brings a waiting adapter into host memory (scheduler.Prefetcher).
func (r *residency) Prefetch(id string) {
	if m := r.m.Load(); m != nil {
		m.Prefetch(id)
	}
}

var (
	_ scheduler.SlotAdmission = (*residency)(nil)
	_ scheduler.Prefetcher    = (*residency)(nil)
)

// invalidAdapter marks err (which says what is wrong) as
// api.ErrInvalidAdapter without repeating that in its message.
type invalidAdapter struct{ err error }

func (e invalidAdapter) Error() string        { return e.err.Error() }
func (e invalidAdapter) Unwrap() error        { return e.err }
func (e invalidAdapter) Is(target error) bool { return target == api.ErrInvalidAdapter }

// loaderCatalog is api.Catalog over the loader's index and its store.
type loaderCatalog struct {
	m    *loader.Manager
	st   store.Store
	base *llama.Config
}

func toInfo(a loader.AdapterInfo) api.AdapterInfo {
	status := api.StatusReady
	if a.Error != "" {
		status = api.StatusInvalid
	}
	return api.AdapterInfo{ID: a.ID, Tier: a.Tier.String(), Version: a.Version, Rank: a.Rank, Bytes: a.StoreBytes,
		Refcount: a.Refs, LastUsed: a.LastUsed, Invocations: int64(a.Invocations), Pinned: a.Pinned,
		Status: status, Error: a.Error}
}

// BaseModel is the model adapters are validated against (api.BaseModeler).
func (c *loaderCatalog) BaseModel() *llama.Config { return c.base }

// CountInvalidUpload counts a refused upload (api.InvalidUploadCounter).
func (c *loaderCatalog) CountInvalidUpload() { c.m.CountInvalidUpload() }

// Pin loads id and keeps it on the device (api.Pinner).
func (c *loaderCatalog) Pin(ctx context.Context, id string) error {
	if err := c.m.Pin(ctx, id); err != nil {
		if errors.Is(err, loader.ErrTooManyPinned) {
			return fmt.Errorf("%w: %w", api.ErrTooManyPinned, err)
		}
		if errors.Is(err, loader.ErrInvalidAdapter) {
			return invalidAdapter{err}
		}
		return err
	}
	return nil
}

// Unpin lets id leave the device again.
func (c *loaderCatalog) Unpin(ctx context.Context, id string) error {
	c.m.Unpin(id)
	return nil
}

// unavailable marks store failures (not a missing adapter or a bad ID) as
// api.ErrUnavailable.
func unavailable(err error) error {
	if err == nil || errors.Is(err, store.ErrNotFound) || errors.Is(err, store.ErrBadID) || errors.Is(err, store.ErrTooLarge) ||
		errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	return fmt.Errorf("%w: the adapter store failed: %w", api.ErrUnavailable, err)
}

func (c *loaderCatalog) List(ctx context.Context) ([]api.AdapterInfo, error) {
	out := []api.AdapterInfo{}
	for _, a := range c.m.List() {
		if a.Current && !a.Deleted {
			out = append(out, toInfo(a))
		}
	}
	return out, nil
}

func (c *loaderCatalog) Get(ctx context.Context, id string) (api.AdapterInfo, error) {
	a, ok := c.m.Get(id)
	if !ok || a.Deleted || !a.Current {
		return api.AdapterInfo{}, fmt.Errorf("%w: %q", api.ErrNotFound, id)
	}
	return toInfo(a), nil
}

func (c *loaderCatalog) Put(ctx context.Context, id string, configJSON, weights []byte) error {
	if err := store.ValidateID(id); err != nil {
		return invalidAdapter{err}
	}
	// Everything is checked before anything is written: a refused upload
	// leaves the store (and an adapter it would replace) as it was.
	chk, err := lora.Check(id, configJSON, weights, c.base)
	if err != nil {
		return invalidAdapter{err}
	}
	// The float32 copy the loader keeps is made while the store writes.
	parsed := make(chan *lora.Adapter, 1)
	go func() { parsed <- chk.Adapter() }()
	etag, err := c.st.Put(ctx, id, configJSON, weights)
	a := <-parsed // weights may alias the request body: nothing reads them past Put
	if err != nil {
		return unavailable(err)
	}
	// The loader keeps the parsed copy: the first request needs no fetch.
	c.m.Offer(id, etag, a, int64(len(configJSON)+len(weights)))
	return unavailable(c.m.Sync(ctx))
}

func (c *loaderCatalog) Delete(ctx context.Context, id string) error {
	if _, err := c.Get(ctx, id); err != nil {
		return err
	}
	if err := c.st.Delete(ctx, id); err != nil {
		if errors.Is(err, store.ErrNotFound) {
			return fmt.Errorf("%w: %q", api.ErrNotFound, id)
		}
		return unavailable(err)
	}
	return unavailable(c.m.Sync(ctx))
}

// adapterBound bounds an adapter download from the store: what an adapter
// of this base model can be at the largest accepted rank
// (lora.MaxWeightsBytes), or MaxAdapterBytes when smaller.
func adapterBound(cc CoreConfig) int64 {
	b := lora.MaxWeightsBytes(cc.Model.Config)
	if cc.MaxAdapterBytes > 0 && cc.MaxAdapterBytes < b {
		b = cc.MaxAdapterBytes
	}
	return b
}
