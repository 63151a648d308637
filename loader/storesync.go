package loader

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/peftd/peftd/loader/store"
)

// The store side of the index: listing and watching the store, rechecking
// an adapter's ETag on the request path, and serving known versions while
// the store is down.

// storeErr marks a store failure other than a missing adapter, a bad id or
// a size limit as ErrStoreUnavailable.
func storeErr(err error) error {
	if err == nil || errors.Is(err, store.ErrNotFound) || errors.Is(err, store.ErrBadID) || errors.Is(err, store.ErrTooLarge) ||
		errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	return fmt.Errorf("%w: %w", ErrStoreUnavailable, err)
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
	var gone []string
	for _, r := range currentRows(m.db.Txn(false)) {
		if !seen[r.ID] && r.CheckedAt.Before(start) {
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
		if ev.Type == store.EventSync {
			if err := m.Sync(m.ctx); err != nil && m.ctx.Err() == nil {
				m.log.Warn("loader: store listing after the watch began failed", "err", err)
			}
			continue
		}
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
			StoreBytes: size, CheckedAt: seen}
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
	for _, r := range versions(txn, id) {
		c := r.copy()
		edit(c)
		mustInsert(txn, c)
	}
	txn.Commit()
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
