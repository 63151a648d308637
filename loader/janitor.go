package loader

import (
	"time"

	"github.com/hashicorp/go-memdb"
)

// janitor applies the idle TTLs and drops replaced or deleted versions
// once no lease holds them. It exits when the Manager closes.
func (m *Manager) janitor() {
	defer m.wg.Done()
	t := time.NewTicker(m.opts.JanitorInterval)
	defer t.Stop()
	for {
		select {
		case <-m.ctx.Done():
			return
		case <-t.C:
		case <-m.kick:
		}
		m.sweep()
	}
}

// sweep runs one janitor pass.
func (m *Manager) sweep() {
	now := m.now()
	var rows []*adapterRow
	it, err := m.db.Txn(false).Get(tableAdapters, indexID)
	if err != nil {
		panic(err)
	}
	for o := it.Next(); o != nil; o = it.Next() {
		rows = append(rows, o.(*adapterRow))
	}
	idle := func(r *adapterRow, ttl time.Duration) bool {
		return ttl > 0 && r.Refs == 0 && !r.Pinned && now.Sub(r.LastUsed) >= ttl
	}
	for _, r := range rows {
		if m.ctx.Err() != nil {
			return
		}
		switch {
		case !r.Current && r.Refs == 0:
			m.reap(r)
		case r.Dev == devLoaded && idle(r, m.opts.DeviceTTL):
			m.unload(r.Key, func(r *adapterRow) bool { return r.Dev == devLoaded && idle(r, m.opts.DeviceTTL) })
		}
		if r.Current && r.Host != nil && idle(r, m.opts.HostTTL) {
			m.dropHost(r.Key, func(r *adapterRow) bool { return hostEvictable(r) && idle(r, m.opts.HostTTL) })
		}
	}
	m.trimHost()
}

// unload takes a version off the device if still(r) holds: the slot is
// marked unloading (not free, not servable) during the Device call.
func (m *Manager) unload(key string, still func(*adapterRow) bool) bool {
	txn := m.db.Txn(true)
	r, _ := rowByKey(txn, key)
	if r == nil || !still(r) {
		txn.Abort()
		return false
	}
	c := r.copy()
	c.Dev = devUnloading
	mustInsert(txn, c)
	txn.Commit()

	err := m.opts.Device.Unload(m.ctx, c.Slot)
	if err != nil {
		m.log.Warn("loader: device unload failed; the slot is reused anyway (Load replaces)", "id", c.ID, "slot", c.Slot, "err", err)
	}
	txn = m.db.Txn(true)
	defer txn.Abort()
	r, _ = rowByKey(txn, key)
	c = r.copy()
	c.Dev = devNone
	mustInsert(txn, c)
	m.deviceEvictions.Add(1) // before Commit wakes watchers
	txn.Commit()
	return true
}

func (m *Manager) dropHost(key string, still func(*adapterRow) bool) {
	txn := m.db.Txn(true)
	defer txn.Abort()
	r, _ := rowByKey(txn, key)
	if r == nil || !still(r) {
		return
	}
	c := r.copy()
	c.Host = nil
	mustInsert(txn, c)
	m.hostEvictions.Add(1) // before Commit wakes watchers
	txn.Commit()
}

// reap removes a replaced or deleted version from every tier once unused.
func (m *Manager) reap(r *adapterRow) {
	unused := func(r *adapterRow) bool { return !r.Current && r.Refs == 0 }
	if r.Dev == devLoaded {
		m.unload(r.Key, func(r *adapterRow) bool { return unused(r) && r.Dev == devLoaded })
	}
	txn := m.db.Txn(true)
	defer txn.Abort()
	cur, _ := rowByKey(txn, r.Key)
	if cur == nil || !unused(cur) || cur.Dev != devNone || cur.Fetch {
		return
	}
	if err := txn.Delete(tableAdapters, cur); err != nil {
		panic(err)
	}
	remaining := first(txn, cur.ID)
	txn.Commit()
	if m.disk != nil && cur.Deleted && remaining == nil {
		if err := m.disk.remove(cur.ID); err != nil {
			m.log.Warn("loader: disk cache remove failed", "id", cur.ID, "err", err)
		}
	}
}

func first(txn *memdb.Txn, id string) any {
	o, err := txn.First(tableAdapters, indexAdapter, id)
	if err != nil {
		panic(err)
	}
	return o
}
