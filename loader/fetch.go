package loader

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/peftd/peftd/loader/store"
	"github.com/peftd/peftd/runtime/lora"
)

// Fetching: an adapter version into host memory, from the disk cache when
// it holds the ETag, else from the store (validated before any cache).

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

func adapterBytes(a *lora.Adapter) int64 { return a.HostBytes() }

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
		t0 := m.now()
		if c, wb, ok := m.disk.get(id, version, m.opts.MaxAdapterBytes); ok {
			cfg, w, src = c, wb, TierDisk
			m.diskHits.Add(1)
			m.phase(id, "fetch_disk", t0)
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
		m.phase(id, "fetch_store", seen)
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
	t0 := m.now()
	a, err := lora.ParseOwned(id, cfg, w, m.opts.Base) // cfg and w are this fetch's own
	m.phase(id, "validate", t0)
	if err != nil {
		m.invalid.Add(1)
		m.recordInvalid(key, err)
		if src == TierDisk && m.disk != nil {
			_ = m.disk.remove(id)
		}
		m.log.Warn("loader: adapter refused", "id", id, "version", version, "err", err)
		return nil, 0, &InvalidError{ID: id, Version: version, Reason: err.Error(), Err: err}
	}
	if src == TierStore && m.disk != nil {
		// The disk tier is written off the load's path: the adapter goes
		// on to the device while its bytes go to disk; the row learns it
		// is on disk when the write is done.
		m.background(func() {
			t0 := m.now()
			err := m.disk.put(id, version, cfg, w)
			m.phase(id, "disk_write", t0)
			if err != nil {
				m.log.Warn("loader: disk cache write failed", "id", id, "err", err)
				return
			}
			m.updateRows(id, func(c *adapterRow) { c.OnDisk = m.disk.has(c.ID, c.Version) })
		})
	}
	m.attachHost(key, a, src == TierDisk, int64(len(cfg)+len(w)))
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
	// The fetch is over once its copy is attached: from here the copy is
	// evictable like any other (the fetch's caller holds it). Left set until
	// fetch returned, a second fetch attaching meanwhile could evict
	// neither and overshoot the budget until the next attach.
	c.Fetch = false
	// onDisk says the fetch wrote the entry, but the disk bound may have
	// declined or removed it since: the disk cache's index is the truth.
	c.OnDisk = m.disk != nil && m.disk.has(c.ID, c.Version)
	c.StoreBytes = storeBytes
	mustInsert(txn, c)
	m.evictHost(txn, key)
	txn.Commit()
}

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
