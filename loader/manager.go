// Package loader moves LoRA adapters through the tiers
// store -> disk cache -> host memory -> device slots, and keeps an index of
// where every adapter is (hashicorp/go-memdb) that callers can read and
// block on.
package loader

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
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

// storeErr marks a store failure other than a missing adapter, a bad id or
// a size limit as ErrStoreUnavailable.
func storeErr(err error) error {
	if err == nil || errors.Is(err, store.ErrNotFound) || errors.Is(err, store.ErrBadID) || errors.Is(err, store.ErrTooLarge) ||
		errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	return fmt.Errorf("%w: %w", ErrStoreUnavailable, err)
}

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
	// HostBytes bounds parsed adapters in host memory (float32 weights);
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

type devState int

const (
	devNone devState = iota
	devLoading
	devLoaded
	devUnloading
)

// adapterRow is one adapter version in the index. Rows are immutable once
// inserted: writers copy, change and re-insert.
type adapterRow struct {
	Key     string // ID@Version
	ID      string
	Version string
	Current bool // the store's current version: serves new Acquires
	Deleted bool
	Tier    Tier
	Slot    int // -1 unless on (or moving to/from) the device
	Dev     devState
	Refs    int
	Pinned  bool
	OnDisk  bool
	Host    *lora.Adapter
	HostAt  time.Time // when Host was set (the host LRU orders by this or LastUsed)
	Fetch   bool      // a fetch into host memory is running

	Bytes       int64 // float32 weights in host/device memory
	StoreBytes  int64 // the two files
	Rank        int
	LastUsed    time.Time
	Invocations uint64
	LoadLatency time.Duration
	LoadSource  Tier
	CheckedAt   time.Time // last time the store confirmed the ETag
	Err         string    // why this version is invalid
}

func (r *adapterRow) copy() *adapterRow { c := *r; return &c }

func (r *adapterRow) fix() *adapterRow {
	switch {
	case r.Dev == devLoaded || r.Dev == devUnloading:
		r.Tier = TierDevice
	case r.Host != nil:
		r.Tier = TierHost
	case r.OnDisk:
		r.Tier = TierDisk
	case r.Deleted:
		r.Tier = TierNone
	default:
		r.Tier = TierStore
	}
	if r.Dev == devNone {
		r.Slot = -1
	}
	return r
}

func rowKey(id, version string) string { return id + "@" + version }

// AdapterInfo describes one adapter version, for APIs and metrics.
type AdapterInfo struct {
	ID      string
	Version string // the store ETag
	Current bool   // false: replaced or deleted, kept while leases hold it
	Deleted bool
	Tier    Tier
	Slot    int // -1 unless Tier is TierDevice
	Refs    int
	Pinned  bool
	Loading bool // a fetch or device load is running
	OnDisk  bool
	// Bytes is the parsed size (float32 weights); StoreBytes the files.
	Bytes, StoreBytes int64
	Rank              int
	LastUsed          time.Time
	Invocations       uint64
	LastLoadLatency   time.Duration
	LastLoadSource    Tier
	Error             string // validation failure of this version
}

func (r *adapterRow) info() AdapterInfo {
	return AdapterInfo{ID: r.ID, Version: r.Version, Current: r.Current, Deleted: r.Deleted, Tier: r.Tier, Slot: r.Slot,
		Refs: r.Refs, Pinned: r.Pinned, Loading: r.Fetch || r.Dev == devLoading, OnDisk: r.OnDisk,
		Bytes: r.Bytes, StoreBytes: r.StoreBytes, Rank: r.Rank, LastUsed: r.LastUsed, Invocations: r.Invocations,
		LastLoadLatency: r.LoadLatency, LastLoadSource: r.LoadSource, Error: r.Err}
}

// Stats summarize the Manager for metrics.
type Stats struct {
	Adapters                    []AdapterInfo
	Slots, SlotsUsed            int
	DeviceBytes, HostBytes      int64
	DiskBytes                   int64  // the disk cache's files (writes under way included)
	HostLimit, DiskLimit        int64  // Options.HostBytes and DiskBytes (0: none)
	DeviceEvictions             uint64 // LRU replacements and TTL unloads
	HostEvictions               uint64 // byte budget and TTL drops
	StoreFetches, DiskHits      uint64
	DeviceLoads, InvalidUploads uint64
}

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
	kick   chan struct{}

	pinMu  sync.Mutex
	pinned map[string]bool

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

// storeFailure is the last store failure on a request's path, until when
// requests do not wait on the store again, and whether the store was slow
// to fail (it hung or retried until a timeout).
type storeFailure struct {
	until time.Time
	err   error
	slow  bool
}

// slowStoreFailure: a store call that failed after this long is a store
// that hangs; one that failed sooner refuses, and trying it costs nothing.
const slowStoreFailure = time.Second

// storeFailed records a store failure on a request's path after a call
// that took took.
func (m *Manager) storeFailed(err error, took time.Duration) {
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		// The store's own timeout: requests that meet this failure later
		// must not read it as their own deadline (a 504).
		err = fmt.Errorf("store: no answer in time (%v)", err)
	}
	m.storeDown.Store(&storeFailure{until: m.now().Add(m.opts.StoreBackoff), err: err, slow: took >= slowStoreFailure})
}

// storeBackingOff says whether a request may call the store: after a
// failure that was slow (a hanging store), for StoreBackoff, one caller at
// a time (it gets a nil error and calls release when its store call is
// over) and the others fail at once with the failure; after a fast failure
// (a store that refuses) everybody may try, so its return is seen at once.
func (m *Manager) storeBackingOff() (release func(), err error) {
	f := m.storeDown.Load()
	if f == nil || !f.slow || !m.now().Before(f.until) {
		return func() {}, nil
	}
	if m.storeTrial.CompareAndSwap(false, true) {
		return func() { m.storeTrial.Store(false) }, nil
	}
	return nil, fmt.Errorf("the store failed %s ago: %w", m.now().Sub(f.until.Add(-m.opts.StoreBackoff)).Round(time.Millisecond), f.err)
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
	m := &Manager{opts: opts, log: opts.Logger, db: db, kick: make(chan struct{}, 1), pinned: map[string]bool{}}
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
	return nil
}

func (m *Manager) now() time.Time { return m.opts.Now() }

func (m *Manager) kickJanitor() {
	select {
	case m.kick <- struct{}{}:
	default:
	}
}

// Sync lists the store and reconciles the index with it.
func (m *Manager) Sync(ctx context.Context) error {
	start := m.now()
	objs, err := m.opts.Store.List(ctx)
	if err != nil {
		return err
	}
	seen := map[string]bool{}
	for _, o := range objs {
		seen[o.ID] = true
		m.observe(o.ID, o.ETag, o.Size, start)
	}
	txn := m.db.Txn(false)
	it, err := txn.Get(tableAdapters, indexID)
	if err != nil {
		return err
	}
	var gone []string
	for o := it.Next(); o != nil; o = it.Next() {
		r := o.(*adapterRow)
		if r.Current && !seen[r.ID] && r.CheckedAt.Before(start) {
			gone = append(gone, r.ID)
		}
	}
	for _, id := range gone {
		m.markDeleted(id)
	}
	return nil
}

func (m *Manager) watch(events <-chan store.Event) {
	defer m.wg.Done()
	for ev := range events {
		if err := m.refresh(m.ctx, ev.ID); err != nil && m.ctx.Err() == nil && !errors.Is(err, ErrNotFound) {
			m.log.Warn("loader: refresh after store event failed", "id", ev.ID, "event", ev.Type, "err", err)
		}
	}
}

// refresh asks the store for id's ETag and updates the index.
func (m *Manager) refresh(ctx context.Context, id string) error {
	start := m.now()
	o, err := m.opts.Store.Stat(ctx, id)
	if errors.Is(err, store.ErrNotFound) {
		m.markDeleted(id)
		return err
	}
	if err != nil {
		return err
	}
	m.observe(id, o.ETag, o.Size, start)
	return nil
}

// errStalled ends a download during which the store sent nothing for
// FetchStall.
var errStalled = errors.New("the store sent no data")

// stallGuard is a context for one download that ends when progressed has
// not been called for FetchStall (a hung connection, a store retrying
// forever); stop releases it.
func (m *Manager) stallGuard() (ctx context.Context, progressed func(), stop func()) {
	ctx, cancel := context.WithCancelCause(m.ctx)
	var last atomic.Int64
	last.Store(time.Now().UnixNano())
	done := make(chan struct{})
	stall := m.opts.FetchStall
	go func() {
		t := time.NewTicker(max(stall/8, time.Millisecond))
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case now := <-t.C:
				if now.Sub(time.Unix(0, last.Load())) > stall {
					cancel(fmt.Errorf("%w for %v", errStalled, stall))
					return
				}
			}
		}
	}()
	return ctx, func() { last.Store(time.Now().UnixNano()) }, func() { close(done); cancel(nil) }
}

// probe checks id in the store in the background (one probe per adapter
// at a time), for a request that serves the known version meanwhile.
func (m *Manager) probe(id string) {
	if m.ctx.Err() != nil {
		return
	}
	if _, busy := m.probing.LoadOrStore(id, true); busy {
		return
	}
	release, err := m.storeBackingOff()
	if err != nil {
		m.probing.Delete(id)
		return // another trial is out; a later request probes again
	}
	// Not in m.wg: it ends within StatTimeout, and after Close it only
	// touches the index.
	go func() {
		defer m.probing.Delete(id)
		defer release()
		ctx, cancel := context.WithTimeout(m.ctx, m.opts.StatTimeout)
		defer cancel()
		start := m.now()
		o, err := m.opts.Store.Stat(ctx, id)
		switch {
		case errors.Is(err, store.ErrNotFound):
			m.storeDown.Store(nil)
			m.markDeleted(id)
		case err != nil:
			if m.ctx.Err() == nil {
				m.storeFailed(err, m.now().Sub(start))
				m.storeWarn.log(m.log, "loader: store check failed; serving the known version", "id", id, "err", err)
			}
		default:
			m.storeDown.Store(nil)
			m.observe(id, o.ETag, o.Size, start)
		}
	}()
}

// currentRow returns id's current version row.
func currentRow(txn *memdb.Txn, id string) (*adapterRow, <-chan struct{}) {
	it, err := txn.Get(tableAdapters, indexAdapter, id)
	if err != nil {
		panic(err) // schema bug
	}
	for o := it.Next(); o != nil; o = it.Next() {
		if r := o.(*adapterRow); r.Current {
			return r, it.WatchCh()
		}
	}
	return nil, it.WatchCh()
}

func rowByKey(txn *memdb.Txn, key string) (*adapterRow, <-chan struct{}) {
	w, o, err := txn.FirstWatch(tableAdapters, indexID, key)
	if err != nil {
		panic(err)
	}
	if o == nil {
		return nil, w
	}
	return o.(*adapterRow), w
}

func mustInsert(txn *memdb.Txn, r *adapterRow) {
	if err := txn.Insert(tableAdapters, r.fix()); err != nil {
		panic(err)
	}
}

// observe records that the store held id at version at time seen (when
// the request that learned it started) and returns the current row. An
// observation older than the current row's last check is ignored.
func (m *Manager) observe(id, version string, size int64, seen time.Time) *adapterRow {
	txn := m.db.Txn(true)
	defer txn.Abort()
	cur, _ := currentRow(txn, id)
	if cur != nil && cur.Version != version && cur.CheckedAt.After(seen) {
		return cur // stale news
	}
	if cur != nil && cur.Version == version {
		c := cur.copy()
		if seen.After(c.CheckedAt) {
			c.CheckedAt = seen
		}
		if size > 0 {
			c.StoreBytes = size
		}
		mustInsert(txn, c)
		txn.Commit()
		return c
	}
	superseded := false
	if cur != nil {
		c := cur.copy()
		c.Current = false
		mustInsert(txn, c)
		superseded = true
	}
	r, _ := rowByKey(txn, rowKey(id, version))
	if r != nil { // an older row came back (same content re-uploaded)
		r = r.copy()
		r.Current, r.Deleted, r.CheckedAt = true, false, seen
	} else {
		r = &adapterRow{Key: rowKey(id, version), ID: id, Version: version, Current: true, Slot: -1,
			StoreBytes: size, CheckedAt: seen, Pinned: m.isPinned(id)}
		r.OnDisk = m.disk != nil && m.disk.has(id, version)
	}
	mustInsert(txn, r)
	txn.Commit()
	if superseded {
		m.kickJanitor()
	}
	return r
}

func (m *Manager) markDeleted(id string) {
	m.updateRows(id, func(c *adapterRow) { c.Current, c.Deleted = false, true })
	m.kickJanitor()
}

// updateRows replaces every row (version) of id with a copy changed by edit,
// in one write transaction.
func (m *Manager) updateRows(id string, edit func(c *adapterRow)) {
	txn := m.db.Txn(true)
	defer txn.Abort()
	it, err := txn.Get(tableAdapters, indexAdapter, id)
	if err != nil {
		panic(err)
	}
	var rows []*adapterRow
	for o := it.Next(); o != nil; o = it.Next() {
		rows = append(rows, o.(*adapterRow))
	}
	for _, r := range rows {
		c := r.copy()
		edit(c)
		mustInsert(txn, c)
	}
	txn.Commit()
}

func (m *Manager) isPinned(id string) bool {
	m.pinMu.Lock()
	defer m.pinMu.Unlock()
	return m.pinned[id]
}

// resolve returns id's current row, asking the store when the last check
// is older than RecheckInterval.
func (m *Manager) resolve(ctx context.Context, id string) (*adapterRow, error) {
	now := m.now()
	cur, _ := currentRow(m.db.Txn(false), id)
	if cur != nil && m.opts.RecheckInterval > 0 && now.Sub(cur.CheckedAt) < m.opts.RecheckInterval {
		return cur, nil
	}
	// While the store is failing, a known version serves without waiting
	// on it (the store is probed in the background) and an unknown one
	// fails at once, but for one trial request at a time.
	if cur != nil && m.storeDown.Load() != nil {
		m.probe(id)
		return cur, nil
	}
	release, err := m.storeBackingOff()
	if err != nil {
		return nil, fmt.Errorf("loader: adapter %s: %w", id, storeErr(err))
	}
	sctx, cancel := context.WithTimeout(ctx, m.opts.StatTimeout)
	o, err := m.opts.Store.Stat(sctx, id)
	cancel()
	release()
	took := m.now().Sub(now)
	if err != nil && ctx.Err() == nil && errors.Is(err, context.DeadlineExceeded) {
		// The store's timeout, not the request's: not a context error.
		err = fmt.Errorf("store: no answer within %v (%v)", m.opts.StatTimeout, err)
	}
	switch {
	case errors.Is(err, store.ErrNotFound):
		m.markDeleted(id)
		return nil, fmt.Errorf("loader: adapter %s: %w", id, err)
	case err != nil && ctx.Err() != nil:
		return nil, ctx.Err() // the request ended, not the store
	case err != nil:
		m.storeFailed(err, took)
		if cur != nil {
			m.storeWarn.log(m.log, "loader: store check failed; serving the known version", "id", id, "err", err)
			return cur, nil
		}
		return nil, fmt.Errorf("loader: adapter %s: %w", id, storeErr(err))
	}
	m.storeDown.Store(nil)
	return m.observe(id, o.ETag, o.Size, now), nil
}

// Lease holds an adapter version in a device slot until Release.
type Lease struct {
	m        *Manager
	key      string
	id, ver  string
	slot     int
	adapter  *lora.Adapter
	released atomic.Bool
}

// ID is the adapter id.
func (l *Lease) ID() string { return l.id }

// Slot is the device slot holding the adapter.
func (l *Lease) Slot() int { return l.slot }

// Version is the adapter's store ETag.
func (l *Lease) Version() string { return l.ver }

// Adapter is the parsed adapter in the slot (nil if host memory has
// dropped it since; the device copy is unaffected).
func (l *Lease) Adapter() *lora.Adapter { return l.adapter }

// Release gives the slot back; later calls do nothing.
func (l *Lease) Release() {
	if l.released.Swap(true) {
		return
	}
	m := l.m
	txn := m.db.Txn(true)
	defer txn.Abort()
	r, _ := rowByKey(txn, l.key)
	if r == nil {
		return
	}
	c := r.copy()
	c.Refs--
	c.LastUsed = m.now()
	mustInsert(txn, c)
	txn.Commit()
	if c.Refs == 0 && !c.Current {
		m.kickJanitor()
	}
}

var errRetry = errors.New("loader: retry")

// Acquire makes adapter id resident on the device and holds it there
// until the Lease is released. Concurrent Acquires of one adapter share
// one fetch and one device load. When every slot is held it waits for a
// Release (or ctx). Call it from request goroutines, never from the
// goroutine that runs Device calls.
func (m *Manager) Acquire(ctx context.Context, id string) (*Lease, error) {
	if err := store.ValidateID(id); err != nil {
		return nil, err
	}
	if m.opts.Slots == 0 {
		return nil, ErrNoSlots
	}
	var (
		a      *lora.Adapter // parsed copy of key's version, once fetched
		aKey   string
		source Tier
		start  time.Time // when a load became necessary
	)
	for {
		if m.closed.Load() {
			return nil, ErrClosed
		}
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		cur, err := m.resolve(ctx, id)
		if err != nil {
			return nil, err
		}
		if cur.Err != "" {
			return nil, &InvalidError{ID: id, Version: cur.Version, Reason: cur.Err}
		}
		if aKey != cur.Key {
			a, aKey, source, start = nil, cur.Key, TierNone, time.Time{}
		}

		txn := m.db.Txn(true)
		r, rowWatch := rowByKey(txn, cur.Key)
		if r == nil || !r.Current {
			txn.Abort()
			continue // replaced or deleted meanwhile
		}
		switch r.Dev {
		case devLoaded:
			c := r.copy()
			c.Refs++
			c.Invocations++
			c.LastUsed = m.now()
			mustInsert(txn, c)
			txn.Commit()
			return &Lease{m: m, key: c.Key, id: id, ver: c.Version, slot: c.Slot, adapter: r.Host}, nil
		case devLoading, devUnloading:
			txn.Abort()
			if err := m.wait(ctx, rowWatch); err != nil {
				return nil, err
			}
			continue
		}
		if start.IsZero() {
			start = m.now()
		}
		if a == nil && r.Host != nil {
			a = r.Host
			if source == TierNone { // else it came from there before a wait for a slot
				source = TierHost
			}
		}
		if a == nil {
			txn.Abort()
			got, src, err := m.ensureHost(ctx, r)
			if errors.Is(err, errRetry) {
				continue
			}
			if err != nil {
				return nil, err
			}
			a, source = got, src
			continue // re-read the row: someone else may have loaded it
		}
		slot, victim, ws := m.pickSlot(txn)
		if slot < 0 {
			txn.Abort()
			// Waiting, hold no parsed copy the host budget does not see: take
			// the row's again (or fetch it, from disk) once a slot frees.
			a = nil
			ws.Add(rowWatch)
			if err := m.wait(ctx, ws...); err != nil {
				return nil, fmt.Errorf("loader: waiting for a free slot for %s: %w", id, err)
			}
			continue
		}
		if victim != nil {
			v := victim.copy()
			v.Dev = devNone
			mustInsert(txn, v)
			m.deviceEvictions.Add(1)
		}
		c := r.copy()
		c.Dev, c.Slot = devLoading, slot
		if c.Host == nil { // budget evicted it meanwhile: keep ours while loading
			c.Host, c.Bytes, c.Rank, c.HostAt = a, adapterBytes(a), a.MaxRank(), m.now()
		}
		mustInsert(txn, c)
		m.evictHost(txn, c.Key) // the victim may leave host memory too
		txn.Commit()

		lerr := m.opts.Device.Load(ctx, slot, a)

		if lerr != nil {
			// Clear the slot while it is still ours (devLoading), then free it.
			if uerr := m.opts.Device.Unload(m.ctx, slot); uerr != nil {
				m.log.Warn("loader: unloading a slot after a failed load", "slot", slot, "err", uerr)
			}
		}
		txn = m.db.Txn(true)
		r, _ = rowByKey(txn, c.Key)
		c = r.copy()
		if lerr != nil {
			c.Dev = devNone
			mustInsert(txn, c)
			txn.Commit()
			return nil, fmt.Errorf("loader: load %s into slot %d: %w", id, slot, lerr)
		}
		now := m.now()
		c.Dev = devLoaded
		c.Refs++
		c.Invocations++
		c.LastUsed = now
		c.LoadLatency, c.LoadSource = now.Sub(start), source
		mustInsert(txn, c)
		m.deviceLoads.Add(1)
		txn.Commit()
		m.log.Debug("loader: adapter loaded", "id", id, "version", c.Version, "slot", slot, "source", source, "latency", c.LoadLatency)
		if m.opts.OnLoad != nil {
			m.opts.OnLoad(id, source, c.LoadLatency)
		}
		return &Lease{m: m, key: c.Key, id: id, ver: c.Version, slot: slot, adapter: a}, nil
	}
}

type watchList []<-chan struct{}

func (w *watchList) Add(ch <-chan struct{}) { *w = append(*w, ch) }

// wait blocks until a channel in chs fires (index change), ctx ends or the
// Manager closes.
func (m *Manager) wait(ctx context.Context, chs ...<-chan struct{}) error {
	ws := memdb.NewWatchSet()
	for _, ch := range chs {
		ws.Add(ch)
	}
	ws.Add(m.ctx.Done())
	if err := ws.WatchCtx(ctx); err != nil {
		return err
	}
	if m.closed.Load() {
		return ErrClosed
	}
	return nil
}

// pickSlot chooses a free slot, else the least recently used unheld,
// unpinned one (replaced versions first). It returns -1 and the watch
// channels of every slot when all are held.
func (m *Manager) pickSlot(txn *memdb.Txn) (int, *adapterRow, watchList) {
	var ws watchList
	var best *adapterRow
	better := func(r *adapterRow) bool {
		if best == nil {
			return true
		}
		if r.Current != best.Current {
			return !r.Current
		}
		return r.LastUsed.Before(best.LastUsed)
	}
	for s := 0; s < m.opts.Slots; s++ {
		w, o, err := txn.FirstWatch(tableAdapters, indexSlot, s)
		if err != nil {
			panic(err)
		}
		ws.Add(w)
		if o == nil {
			return s, nil, nil
		}
		r := o.(*adapterRow)
		if r.Dev == devLoaded && r.Refs == 0 && !r.Pinned && better(r) {
			best = r
		}
	}
	if best == nil {
		return -1, nil, ws
	}
	return best.Slot, best, nil
}

func adapterBytes(a *lora.Adapter) int64 { return a.Params * 4 }

// ensureHost makes r's version resident in host memory: one fetch per
// version however many callers (singleflight), from the disk cache when it
// holds this ETag, else from the store. Validation happens before caching.
func (m *Manager) ensureHost(ctx context.Context, r *adapterRow) (*lora.Adapter, Tier, error) {
	type result struct {
		a   *lora.Adapter
		src Tier
	}
	ch := m.sf.DoChan(r.Key, func() (any, error) {
		a, src, err := m.fetch(r.ID, r.Version)
		return result{a, src}, err
	})
	select {
	case res := <-ch:
		if res.Err != nil {
			return nil, 0, res.Err
		}
		v := res.Val.(result)
		return v.a, v.src, nil
	case <-ctx.Done():
		return nil, 0, ctx.Err()
	case <-m.ctx.Done():
		return nil, 0, ErrClosed
	}
}

func (m *Manager) setFetch(key string, on bool) {
	txn := m.db.Txn(true)
	defer txn.Abort()
	if r, _ := rowByKey(txn, key); r != nil {
		c := r.copy()
		c.Fetch = on
		mustInsert(txn, c)
		txn.Commit()
	}
}

// fetch runs under singleflight with the Manager's context (a caller
// giving up does not cancel it for the others).
func (m *Manager) fetch(id, version string) (*lora.Adapter, Tier, error) {
	key := rowKey(id, version)
	r, _ := rowByKey(m.db.Txn(false), key)
	if r == nil {
		return nil, 0, errRetry
	}
	if r.Host != nil {
		return r.Host, TierHost, nil
	}
	if r.Err != "" {
		return nil, 0, &InvalidError{ID: id, Version: version, Reason: r.Err}
	}
	m.setFetch(key, true)
	defer m.setFetch(key, false)

	var cfg, w []byte
	src := TierStore
	if m.disk != nil {
		if c, wb, ok := m.disk.get(id, version, m.opts.MaxAdapterBytes); ok {
			cfg, w, src = c, wb, TierDisk
			m.diskHits.Add(1)
		}
	}
	if src == TierStore {
		release, err := m.storeBackingOff()
		if err != nil {
			return nil, 0, fmt.Errorf("loader: fetch %s: %w", id, storeErr(err))
		}
		defer release()
		seen := m.now()
		gctx, progressed, stop := m.stallGuard()
		prog := func(done, total int64) {
			progressed()
			if p := m.opts.Progress; p != nil {
				p(id, done, total)
			}
		}
		c, wb, etag, err := m.opts.Store.Get(gctx, id, store.GetOptions{MaxBytes: m.opts.MaxAdapterBytes, Progress: prog})
		if cause := context.Cause(gctx); err != nil && cause != nil && m.ctx.Err() == nil {
			err = cause
		}
		stop()
		m.storeFetches.Add(1)
		if errors.Is(err, store.ErrNotFound) {
			m.markDeleted(id)
			return nil, 0, fmt.Errorf("loader: adapter %s: %w", id, err)
		}
		if err != nil {
			if m.ctx.Err() == nil && !errors.Is(err, store.ErrTooLarge) {
				m.storeFailed(err, m.now().Sub(seen))
			}
			return nil, 0, fmt.Errorf("loader: fetch %s: %w", id, storeErr(err))
		}
		cfg, w = c, wb
		if etag != version {
			// The store moved on between Stat and Get: what we hold is etag.
			m.setFetch(key, false)
			nr := m.observe(id, etag, int64(len(c)+len(wb)), seen)
			if nr.Version != etag {
				return nil, 0, errRetry
			}
			version, key = etag, nr.Key
			m.setFetch(key, true)
			defer m.setFetch(key, false)
		}
	}
	a, err := lora.Parse(id, cfg, w, m.opts.Base)
	if err != nil {
		m.invalid.Add(1)
		m.recordInvalid(key, err)
		if src == TierDisk && m.disk != nil {
			_ = m.disk.remove(id)
		}
		m.log.Warn("loader: adapter refused", "id", id, "version", version, "err", err)
		return nil, 0, &InvalidError{ID: id, Version: version, Reason: err.Error(), Err: err}
	}
	onDisk := src == TierDisk
	if src == TierStore && m.disk != nil {
		if err := m.disk.put(id, version, cfg, w); err != nil {
			m.log.Warn("loader: disk cache write failed", "id", id, "err", err)
		} else {
			onDisk = true
		}
	}
	m.attachHost(key, a, onDisk, int64(len(cfg)+len(w)))
	if key != rowKey(id, r.Version) {
		return nil, 0, errRetry // fetched a newer version; the caller re-resolves
	}
	return a, src, nil
}

func (m *Manager) recordInvalid(key string, err error) {
	txn := m.db.Txn(true)
	defer txn.Abort()
	if r, _ := rowByKey(txn, key); r != nil {
		c := r.copy()
		c.Err = err.Error()
		mustInsert(txn, c)
		txn.Commit()
	}
}

// attachHost puts a parsed adapter in host memory, evicting the least
// recently used others beyond HostBytes (see evictHost).
func (m *Manager) attachHost(key string, a *lora.Adapter, onDisk bool, storeBytes int64) {
	txn := m.db.Txn(true)
	defer txn.Abort()
	r, _ := rowByKey(txn, key)
	if r == nil {
		return
	}
	c := r.copy()
	c.Host, c.Bytes, c.Rank, c.HostAt = a, adapterBytes(a), a.MaxRank(), m.now()
	// onDisk says the fetch wrote the entry, but the disk bound may have
	// declined or removed it since: the disk cache's index is the truth.
	c.OnDisk = m.disk != nil && m.disk.has(c.ID, c.Version)
	c.StoreBytes = storeBytes
	mustInsert(txn, c)
	m.evictHost(txn, key)
	txn.Commit()
}

// hostEvictable reports whether the host budget may drop r's parsed copy:
// not while it is on the device (or moving there or back), pinned, leased
// or being fetched. (On the CPU backend a device slot is the host copy.)
func hostEvictable(r *adapterRow) bool {
	return r.Host != nil && r.Dev == devNone && r.Refs == 0 && !r.Pinned && !r.Fetch
}

// hostLRU orders host copies for eviction: replaced versions first, then
// by last use (an adapter fetched but not used yet counts from its fetch).
func hostLRU(a, b *adapterRow) int {
	if a.Current != b.Current {
		if !a.Current {
			return -1
		}
		return 1
	}
	ta, tb := a.LastUsed, b.LastUsed
	if a.HostAt.After(ta) {
		ta = a.HostAt
	}
	if b.HostAt.After(tb) {
		tb = b.HostAt
	}
	return ta.Compare(tb)
}

// evictHost drops least recently used parsed adapters (hostEvictable ones,
// never keep) from host memory until the total fits HostBytes. When the
// rest cannot be dropped the total overshoots (logged, at Warn at most once
// a minute) until the next attach, device replacement or janitor pass.
func (m *Manager) evictHost(txn *memdb.Txn, keep string) {
	if m.opts.HostBytes <= 0 {
		return
	}
	it, err := txn.Get(tableAdapters, indexID)
	if err != nil {
		panic(err)
	}
	var total int64
	var cands []*adapterRow
	for o := it.Next(); o != nil; o = it.Next() {
		r := o.(*adapterRow)
		if r.Host == nil {
			continue
		}
		total += r.Bytes
		if r.Key != keep && hostEvictable(r) {
			cands = append(cands, r)
		}
	}
	if total > m.opts.HostBytes {
		slices.SortFunc(cands, hostLRU)
		for _, r := range cands {
			if total <= m.opts.HostBytes {
				break
			}
			c := r.copy()
			c.Host = nil
			mustInsert(txn, c)
			m.hostEvictions.Add(1)
			total -= r.Bytes
			m.log.Debug("loader: host budget evicted", "id", r.ID, "version", r.Version, "bytes", r.Bytes)
		}
	}
	if total > m.opts.HostBytes {
		m.hostOver.log(m.log, "loader: host adapter cache over its bound for now: every other adapter held is on the device, pinned, leased or loading",
			"bytes", total, "limit", m.opts.HostBytes, "adding", keep)
	}
}

// trimHost applies the host budget outside an attach (the janitor): copies
// that became evictable since an overshoot leave.
func (m *Manager) trimHost() {
	if m.opts.HostBytes <= 0 {
		return
	}
	txn := m.db.Txn(true)
	defer txn.Abort()
	m.evictHost(txn, "")
	txn.Commit()
}

// diskEvicted is the disk cache's onEvict: the rows of ids learn that
// their entry is gone.
func (m *Manager) diskEvicted(ids []string) {
	for _, id := range ids {
		m.updateRows(id, func(c *adapterRow) { c.OnDisk = m.disk.has(c.ID, c.Version) })
	}
}

// CountInvalidUpload counts an upload refused before it reached the store
// (Stats.InvalidUploads counts these and store versions that failed
// validation).
func (m *Manager) CountInvalidUpload() { m.invalid.Add(1) }

// Offer records that the store now holds id at version (as returned by the
// store's Put) and keeps a, the parsed copy of those bytes, in host memory,
// so the first Acquire needs no fetch. The caller must have parsed exactly
// the bytes it stored.
func (m *Manager) Offer(id, version string, a *lora.Adapter, storeBytes int64) {
	r := m.observe(id, version, storeBytes, m.now())
	if r.Version != version || r.Host != nil || r.Err != "" {
		return
	}
	m.attachHost(r.Key, a, r.OnDisk, storeBytes)
}

// Pin makes id resident and keeps it on the device (and in host memory)
// until Unpin; at most Slots-1 adapters may be pinned.
func (m *Manager) Pin(ctx context.Context, id string) error {
	if err := store.ValidateID(id); err != nil {
		return err
	}
	m.pinMu.Lock()
	if !m.pinned[id] {
		if len(m.pinned)+1 >= m.opts.Slots {
			m.pinMu.Unlock()
			return fmt.Errorf("%w: %d slots, %d pinned", ErrTooManyPinned, m.opts.Slots, len(m.pinned))
		}
		m.pinned[id] = true
	}
	m.pinMu.Unlock()
	l, err := m.Acquire(ctx, id)
	if err != nil {
		m.Unpin(id)
		return err
	}
	m.setPinned(id, true)
	l.Release()
	return nil
}

// Unpin lets id leave the device and host memory again.
func (m *Manager) Unpin(id string) {
	m.pinMu.Lock()
	delete(m.pinned, id)
	m.pinMu.Unlock()
	m.setPinned(id, false)
}

func (m *Manager) setPinned(id string, on bool) {
	m.updateRows(id, func(c *adapterRow) { c.Pinned = on && c.Current })
}

// List returns every adapter version the Manager knows, by id then version.
func (m *Manager) List() []AdapterInfo {
	it, err := m.db.Txn(false).Get(tableAdapters, indexID)
	if err != nil {
		panic(err)
	}
	var out []AdapterInfo
	for o := it.Next(); o != nil; o = it.Next() {
		out = append(out, o.(*adapterRow).info())
	}
	return out
}

// Get returns id's current version.
func (m *Manager) Get(id string) (AdapterInfo, bool) {
	r, _ := currentRow(m.db.Txn(false), id)
	if r == nil {
		return AdapterInfo{}, false
	}
	return r.info(), true
}

// WatchResidency blocks until id's current version is exactly at tier
// (TierNone: deleted and gone), or ctx ends. It does not load anything.
func (m *Manager) WatchResidency(ctx context.Context, id string, tier Tier) (AdapterInfo, error) {
	for {
		txn := m.db.Txn(false)
		r, w := currentRow(txn, id)
		var info AdapterInfo
		if r != nil {
			info = r.info()
			if r.Tier == tier {
				return info, nil
			}
		} else if tier == TierNone {
			return AdapterInfo{ID: id, Tier: TierNone, Slot: -1}, nil
		}
		if err := m.wait(ctx, w); err != nil {
			return info, err
		}
	}
}

// Idle reports that no adapter is held, loading, on the device or in host memory.
func (m *Manager) Idle() bool {
	it, err := m.db.Txn(false).Get(tableAdapters, indexID)
	if err != nil {
		panic(err)
	}
	for o := it.Next(); o != nil; o = it.Next() {
		r := o.(*adapterRow)
		if r.Refs > 0 || r.Dev != devNone || r.Host != nil || r.Fetch {
			return false
		}
	}
	return true
}

// Stats snapshots the Manager for metrics.
func (m *Manager) Stats() Stats {
	s := Stats{Slots: m.opts.Slots,
		DeviceEvictions: m.deviceEvictions.Load(), HostEvictions: m.hostEvictions.Load(),
		StoreFetches: m.storeFetches.Load(), DiskHits: m.diskHits.Load(),
		DeviceLoads: m.deviceLoads.Load(), InvalidUploads: m.invalid.Load()}
	it, err := m.db.Txn(false).Get(tableAdapters, indexID)
	if err != nil {
		panic(err)
	}
	for o := it.Next(); o != nil; o = it.Next() {
		r := o.(*adapterRow)
		s.Adapters = append(s.Adapters, r.info())
		if r.Dev != devNone {
			s.SlotsUsed++
			s.DeviceBytes += r.Bytes
		}
		if r.Host != nil {
			s.HostBytes += r.Bytes
		}
	}
	if m.disk != nil {
		s.DiskBytes = m.disk.bytes()
	}
	s.HostLimit, s.DiskLimit = max(m.opts.HostBytes, 0), max(m.opts.DiskBytes, 0)
	return s
}
