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

// TryAcquire leases id when its current version is loaded on the device
// and was checked against the store within RecheckInterval (as Acquire
// would lease it, without waiting and without calling the store); else it
// reports whether a load would need a free slot. It is safe to call from
// any goroutine, also the one that runs Device calls.
func (m *Manager) TryAcquire(id string) (*Lease, Admission) {
	if m.closed.Load() || m.opts.Slots == 0 || m.opts.RecheckInterval <= 0 {
		return nil, AcquireNow
	}
	now := m.now()
	txn := m.db.Txn(true)
	defer txn.Abort()
	cur, _ := currentRow(txn, id)
	if cur == nil || cur.Err != "" || now.Sub(cur.CheckedAt) >= m.opts.RecheckInterval || m.storeDown.Load() != nil {
		return nil, AcquireNow
	}
	switch cur.Dev {
	case devLoaded:
		c := cur.copy()
		c.Refs++
		c.Invocations++
		c.LastUsed = now
		mustInsert(txn, c)
		txn.Commit()
		return &Lease{m: m, key: c.Key, id: id, ver: c.Version, slot: c.Slot, adapter: cur.Host}, Leased
	case devNone:
		return nil, NeedsSlot
	}
	return nil, AcquireNow // loading or unloading: Acquire waits for it
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
