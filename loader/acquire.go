package loader

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-memdb"

	"github.com/peftd/peftd/loader/store"
	"github.com/peftd/peftd/runtime/lora"
)

// Lease holds an adapter version in a device slot until Release.
type Lease struct {
	m        *Manager
	key      string
	id, ver  string
	slot     int
	adapter  *lora.Adapter
	from     Tier // where taking the lease loaded the adapter from; TierNone: it was on the device
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

// LoadSource is where taking this lease loaded the adapter from into its
// slot (store, disk or host), or "" when it was on the device already
// (scheduler.LoadReporter).
func (l *Lease) LoadSource() string {
	if l.from == TierNone {
		return ""
	}
	return l.from.String()
}

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
			return m.leaseLoaded(txn, r, m.now()), nil
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

		t0 := m.now()
		lerr := m.opts.Device.Load(ctx, slot, a)
		if lerr == nil {
			m.phase(id, "device", t0)
		}

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
		lvl := slog.LevelDebug
		if source == TierStore {
			lvl = slog.LevelInfo // a cold load: say where its time went (phases in peftd_adapter_load_phase_seconds)
		}
		m.log.Log(ctx, lvl, "adapter loaded", "id", id, "version", c.Version, "slot", slot, "source", source.String(),
			"ms", float64(c.LoadLatency.Microseconds())/1000)
		if m.opts.OnLoad != nil {
			m.opts.OnLoad(id, source, c.LoadLatency)
		}
		return &Lease{m: m, key: c.Key, id: id, ver: c.Version, slot: slot, adapter: a, from: source}, nil
	}
}

// leaseLoaded takes a lease on r, a version on the device, in txn and
// commits it.
func (m *Manager) leaseLoaded(txn *memdb.Txn, r *adapterRow, now time.Time) *Lease {
	c := r.copy()
	c.Refs++
	c.Invocations++
	c.LastUsed = now
	mustInsert(txn, c)
	txn.Commit()
	return &Lease{m: m, key: c.Key, id: c.ID, ver: c.Version, slot: c.Slot, adapter: r.Host}
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
