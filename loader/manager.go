// Package loader moves LoRA adapters through the tiers
// store -> disk cache -> host memory -> device slots, and keeps an index of
// where every adapter is (hashicorp/go-memdb) that callers can read and
// block on.
//
// Files by job: manager.go (types, New, Close), schema.go (the index: rows,
// tables, indexes), query.go (the questions asked of it), storesync.go (the
// store: listing, watching, rechecks, outages), acquire.go (leases, device
// slots), fetch.go (store and disk into host memory), evict.go (the LRU
// choices and the host byte budget), janitor.go (TTLs, replaced versions),
// pins.go, stats.go (what callers read), disk.go and bounds.go (the disk
// cache and the default bounds).
package loader

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-memdb"
	"golang.org/x/sync/singleflight"

	"github.com/peftd/peftd/loader/store"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/lora"
)

// Errors returned (wrapped) by the Manager.
var (
	// ErrInvalidAdapter: the adapter does not validate against the base model.
	ErrInvalidAdapter = errors.New("loader: invalid adapter")
	// ErrNotFound: the store has no such adapter.
	ErrNotFound = store.ErrNotFound
	// ErrBadID: the adapter id is not acceptable.
	ErrBadID = store.ErrBadID
	// ErrClosed: the Manager was closed.
	ErrClosed = errors.New("loader: manager closed")
	// ErrNoSlots: the Manager has no device slots.
	ErrNoSlots = errors.New("loader: no device slots")
	// ErrTooManyPinned: pinning would leave no slot for other adapters.
	ErrTooManyPinned = errors.New("loader: too many pinned adapters")
	// ErrStoreUnavailable: the store could not be reached (or failed) while
	// the adapter was needed from it; retrying later may succeed.
	ErrStoreUnavailable = errors.New("loader: store unavailable")
)

// InvalidError is the error for an adapter version that does not validate
// against the base model (it matches ErrInvalidAdapter). Its message says
// what is wrong once.
type InvalidError struct {
	ID, Version string
	Reason      string // what is wrong (the validation error's message)
	Err         error  // the validation error, when this call found it
}

func (e *InvalidError) Error() string {
	return fmt.Sprintf("adapter %q (version %s) is invalid: %s", e.ID, e.Version, e.Reason)
}

// Is matches ErrInvalidAdapter.
func (e *InvalidError) Is(target error) bool { return target == ErrInvalidAdapter }

// Unwrap gives the validation error, if any.
func (e *InvalidError) Unwrap() error { return e.Err }

// Device places adapters in device slots. Implementations must be safe to
// call from any goroutine (the scheduler runs each call on the engine
// goroutine). The Manager may call for different slots concurrently, never
// twice for one slot at once. Load replaces whatever is in slot.
type Device interface {
	Load(ctx context.Context, slot int, a *lora.Adapter) error
	Unload(ctx context.Context, slot int) error
}

// Tier is where an adapter is, from the farthest to the nearest.
type Tier int

// Tiers.
const (
	TierNone   Tier = iota // gone (deleted)
	TierStore              // only in the store
	TierDisk               // in the disk cache
	TierHost               // parsed in host memory
	TierDevice             // in a device slot
)

func (t Tier) String() string {
	switch t {
	case TierNone:
		return "none"
	case TierStore:
		return "store"
	case TierDisk:
		return "disk"
	case TierHost:
		return "host"
	case TierDevice:
		return "device"
	}
	return fmt.Sprintf("Tier(%d)", int(t))
}

// Options configure a Manager.
type Options struct {
	Store  store.Store
	Device Device
	// Base is the base model config adapters are validated against.
	Base *llama.Config
	// Slots is the number of device slots (the engine's AdapterSlots).
	Slots int
	// CacheDir is the disk cache folder; empty disables the disk tier.
	CacheDir string
	// HostBytes bounds parsed adapters in host memory (their weights as held:
	// bf16 as in the file, else float32; lora.Adapter.HostBytes);
	// 0 means no bound. Past it the least recently used adapters that are
	// neither on the device, loading, pinned nor leased leave host memory;
	// when only such adapters remain the bound is overshot (and logged)
	// until they are let go. HostCacheBound derives a default.
	HostBytes int64
	// DiskBytes bounds the disk cache (file bytes); 0 means no bound. Past
	// it the least recently used entries not being read or written are
	// removed; an adapter that does not fit is not cached. DiskCacheBound
	// derives a default.
	DiskBytes int64
	// MaxAdapterBytes bounds a download of adapter_model.safetensors; 0: none.
	MaxAdapterBytes int64
	// DeviceTTL unloads an adapter unused this long from the device; 0: never.
	DeviceTTL time.Duration
	// HostTTL drops an adapter unused this long from host memory; 0: never.
	HostTTL time.Duration
	// JanitorInterval is the TTL sweep period (default: a quarter of the
	// smaller TTL, at least 10ms, at most 30s).
	JanitorInterval time.Duration
	// RecheckInterval throttles Acquire's check of the store's ETag
	// (default 1s; negative: check on every Acquire).
	RecheckInterval time.Duration
	// StatTimeout bounds the store check on a request's path (default 2s):
	// a store that hangs or retries must not hold requests for long.
	StatTimeout time.Duration
	// StoreBackoff is how long, after a store failure, requests do not wait
	// on the store again (default 2s): known versions serve, adapters
	// found nowhere else fail at once with ErrStoreUnavailable.
	StoreBackoff time.Duration
	// FetchStall ends an adapter download during which the store sent no
	// data for this long (default 10s).
	FetchStall time.Duration
	// NoWatch disables the store Watch (changes are then seen only by
	// Acquire's recheck).
	NoWatch bool
	// Progress, if set, is called while an adapter downloads.
	Progress func(id string, done, total int64)
	// OnPhase, if set, is called as an adapter makes its way to the device,
	// with how long each phase took: "fetch_store" or "fetch_disk" (the
	// files read), "validate" (parsed and checked against the base model),
	// "disk_write" (the disk tier written, on the request's path), "device"
	// (Device.Load: staging and upload).
	OnPhase func(id, phase string, d time.Duration)
	// OnLoad, if set, is called after each device load with where the
	// adapter came from (TierStore, TierDisk or TierHost) and how long it
	// took from the first need to the adapter sitting in its slot.
	OnLoad func(id string, source Tier, d time.Duration)
	Logger *slog.Logger
	// Now is the clock (tests); default time.Now.
	Now func() time.Time
}

// DefaultRecheckInterval is Options.RecheckInterval's default.
const DefaultRecheckInterval = time.Second

// Manager makes adapters resident on the device on demand.
type Manager struct {
	opts Options
	log  *slog.Logger
	db   *memdb.MemDB
	disk *diskCache
	sf   singleflight.Group

	ctx    context.Context // ends at Close
	cancel context.CancelFunc
	wg     sync.WaitGroup
	// background disk-cache writes (fetch.go): counted in bg while bgOpen
	bgMu   sync.Mutex
	bg     sync.WaitGroup
	bgDone bool
	// adapters whose version a background check asks the store for (TryAcquire)
	rechecking sync.Map
	kick       chan struct{}

	deviceEvictions, hostEvictions atomic.Uint64
	storeFetches, diskHits         atomic.Uint64
	deviceLoads, invalid           atomic.Uint64
	closed                         atomic.Bool
	hostOver                       warnEvery // host memory past HostBytes
	storeDown                      atomic.Pointer[storeFailure]
	storeTrial                     atomic.Bool // a request tries the store during a backoff
	probing                        sync.Map    // adapter ID -> a background store probe runs
	storeWarn                      warnEvery   // store checks failing
}

// New starts a Manager: it lists the store, then watches it and runs the
// TTL janitor until Close. A failing first listing is logged, not fatal.
func New(ctx context.Context, opts Options) (*Manager, error) {
	if opts.Store == nil || opts.Device == nil || opts.Base == nil {
		return nil, errors.New("loader: Options need Store, Device and Base")
	}
	if opts.Slots < 0 {
		return nil, fmt.Errorf("loader: %d slots", opts.Slots)
	}
	if opts.RecheckInterval == 0 {
		opts.RecheckInterval = DefaultRecheckInterval
	}
	if opts.StatTimeout <= 0 {
		opts.StatTimeout = 2 * time.Second
	}
	if opts.StoreBackoff <= 0 {
		opts.StoreBackoff = 2 * time.Second
	}
	if opts.FetchStall <= 0 {
		opts.FetchStall = 10 * time.Second
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.JanitorInterval <= 0 {
		opts.JanitorInterval = 30 * time.Second
		for _, ttl := range []time.Duration{opts.DeviceTTL, opts.HostTTL} {
			if ttl > 0 {
				opts.JanitorInterval = min(opts.JanitorInterval, max(ttl/4, 10*time.Millisecond))
			}
		}
	}
	db, err := memdb.NewMemDB(stateSchema())
	if err != nil {
		return nil, fmt.Errorf("loader: index: %w", err)
	}
	m := &Manager{opts: opts, log: opts.Logger, db: db, kick: make(chan struct{}, 1)}
	m.hostOver.interval = time.Minute
	m.storeWarn.interval = 10 * time.Second
	if m.log == nil {
		m.log = slog.Default()
	}
	if opts.CacheDir != "" {
		if m.disk, err = newDiskCache(opts.CacheDir, opts.DiskBytes, m.log, m.diskEvicted); err != nil {
			return nil, fmt.Errorf("loader: disk cache: %w", err)
		}
	}
	m.ctx, m.cancel = context.WithCancel(context.Background())
	if err := m.Sync(ctx); err != nil {
		m.log.Warn("loader: first store listing failed", "err", err)
	}
	if !opts.NoWatch {
		events := opts.Store.Watch(m.ctx)
		m.wg.Add(1)
		go m.watch(events)
	}
	m.wg.Add(1)
	go m.janitor()
	return m, nil
}

// Close stops the watcher and the janitor and fails waiting Acquires. It
// leaves the device as it is; leases stay valid until released.
func (m *Manager) Close() error {
	if m.closed.Swap(true) {
		return nil
	}
	m.cancel()
	m.wg.Wait()
	m.bgMu.Lock()
	m.bgDone = true
	m.bgMu.Unlock()
	m.bg.Wait()
	return nil
}

// background runs fn on its own goroutine unless the Manager is closing;
// Close waits for it.
func (m *Manager) background(fn func()) bool {
	m.bgMu.Lock()
	defer m.bgMu.Unlock()
	if m.bgDone {
		return false
	}
	m.bg.Add(1)
	go func() {
		defer m.bg.Done()
		fn()
	}()
	return true
}

func (m *Manager) now() time.Time { return m.opts.Now() }

func (m *Manager) kickJanitor() {
	select {
	case m.kick <- struct{}{}:
	default:
	}
}

// phase reports how long a load phase took (Options.OnPhase).
func (m *Manager) phase(id, name string, since time.Time) {
	if m.opts.OnPhase != nil {
		m.opts.OnPhase(id, name, m.now().Sub(since))
	}
}
