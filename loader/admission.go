package loader

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
