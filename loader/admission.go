package loader

import "errors"

// What the scheduler's slot admission asks of the loader (scheduler.SlotAdmission
// through the server's residency): a lease without waiting when the adapter
// is on the device, and how many slots a load could take now.

// Admission is what TryAcquire found.
type Admission int

const (
	// Leased: the adapter's current version is on the device; the lease is taken.
	Leased Admission = iota
	// NeedsSlot: the current version is known, valid, checked against the
	// store lately and not on the device: its load takes a free slot.
	NeedsSlot
	// AcquireNow: anything else; Acquire decides (it checks the store,
	// fails, or waits for a load under way).
	AcquireNow
)

// TryAcquire leases id when its current version is loaded on the device,
// without waiting and without calling the store: as Acquire would, except
// that a version not checked within RecheckInterval is leased too while a
// check runs in the background (the next requests see what it finds), and
// while the store is failing the known version serves (as Acquire does).
// Else it reports whether a load would need a free slot. With
// RecheckInterval <= 0 (check on every Acquire) it leases nothing. It is
// safe to call from any goroutine, also the one that runs Device calls.
func (m *Manager) TryAcquire(id string) (*Lease, Admission) {
	if m.closed.Load() || m.opts.Slots == 0 || m.opts.RecheckInterval <= 0 {
		return nil, AcquireNow
	}
	now := m.now()
	txn := m.db.Txn(true)
	defer txn.Abort()
	cur, _ := currentRow(txn, id)
	if cur == nil || cur.Err != "" {
		return nil, AcquireNow
	}
	if now.Sub(cur.CheckedAt) >= m.opts.RecheckInterval {
		if m.storeDown.Load() != nil {
			m.probe(id)
		} else {
			m.recheck(id)
		}
	}
	switch cur.Dev {
	case devLoaded:
		return m.leaseLoaded(txn, cur, now), Leased
	case devNone:
		return nil, NeedsSlot
	}
	return nil, AcquireNow // loading or unloading: Acquire waits for it
}

// recheck asks the store for id's version in the background, one check per
// adapter at a time (what resolve does on Acquire's path).
func (m *Manager) recheck(id string) {
	if _, busy := m.rechecking.LoadOrStore(id, true); busy {
		return
	}
	if !m.background(func() {
		defer m.rechecking.Delete(id)
		if _, err := m.resolve(m.ctx, id); err != nil && m.ctx.Err() == nil {
			m.log.Debug("loader: background store check failed", "id", id, "err", err)
		}
	}) {
		m.rechecking.Delete(id)
	}
}

// FreeSlots is the number of device slots a load could take now: empty
// ones and ones whose adapter nobody leases or pins.
func (m *Manager) FreeSlots() int {
	txn := m.db.Txn(false)
	n := 0
	for s := 0; s < m.opts.Slots; s++ {
		if r, _ := inSlot(txn, s); r == nil {
			n++
		}
	}
	it := get(txn, tableAdapters, indexDeviceLRU)
	for o := it.Next(); o != nil; o = it.Next() {
		if !pinned(txn, o.(*adapterRow)) {
			n++
		}
	}
	return n
}

// Prefetch starts bringing id's current version into host memory (from the
// disk cache or the store) without taking a device slot, so that its load
// takes only the upload once a slot frees. It returns at once; it does
// nothing for an adapter already in host memory or on its way there, or
// one the loader does not know as valid.
func (m *Manager) Prefetch(id string) {
	if m.closed.Load() {
		return
	}
	cur, _ := currentRow(m.db.Txn(false), id)
	if cur == nil || cur.Err != "" || cur.Host != nil || cur.Fetch || cur.Dev != devNone {
		return
	}
	m.background(func() {
		if _, _, err := m.ensureHost(m.ctx, cur); err != nil && !errors.Is(err, errRetry) && m.ctx.Err() == nil {
			m.log.Debug("loader: prefetch failed", "id", id, "err", err)
		}
	})
}
