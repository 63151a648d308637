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

// sweep runs one janitor pass: replaced and deleted versions no lease
// holds leave every tier; then current versions unused for DeviceTTL leave
// the device, then (read again, so that those just unloaded count) those
// unused for HostTTL leave host memory; then the host budget applies.
// Pinned adapters stay. Each step asks its index for its rows alone.
func (m *Manager) sweep() {
	now := m.now()
	idle := func(r *adapterRow, ttl time.Duration) bool {
		return r.Refs == 0 && now.Sub(r.LastUsed) >= ttl
	}
	for _, r := range reapableRows(m.db.Txn(false)) {
		if m.ctx.Err() != nil {
			return
		}
		m.reap(r)
	}
	if ttl := m.opts.DeviceTTL; ttl > 0 {
		for _, r := range idleRows(m.db.Txn(false), indexDeviceLRU, now, ttl) {
			if m.ctx.Err() != nil {
				return
			}
			m.unload(r.Key, func(txn *memdb.Txn, r *adapterRow) bool {
				return r.Dev == devLoaded && idle(r, ttl) && !pinned(txn, r)
			})
		}
	}
	if ttl := m.opts.HostTTL; ttl > 0 {
		for _, r := range idleRows(m.db.Txn(false), indexHostIdle, now, ttl) {
			if m.ctx.Err() != nil {
				return
			}
			m.dropHost(r.Key, func(txn *memdb.Txn, r *adapterRow) bool {
				return hostEvictable(r) && idle(r, ttl) && !pinned(txn, r)
			})
		}
	}
	m.trimHost()
}

// unload takes a version off the device if still(txn, r) holds: the slot is
// marked unloading (not free, not servable) during the Device call.
func (m *Manager) unload(key string, still func(*memdb.Txn, *adapterRow) bool) bool {
	txn := m.db.Txn(true)
	r, _ := rowByKey(txn, key)
	if r == nil || !still(txn, r) {
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

func (m *Manager) dropHost(key string, still func(*memdb.Txn, *adapterRow) bool) {
	txn := m.db.Txn(true)
	defer txn.Abort()
	r, _ := rowByKey(txn, key)
	if r == nil || !still(txn, r) {
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
	if r.Dev == devLoaded {
		m.unload(r.Key, func(_ *memdb.Txn, r *adapterRow) bool { return reapable(r) && r.Dev == devLoaded })
	}
	txn := m.db.Txn(true)
	defer txn.Abort()
	cur, _ := rowByKey(txn, r.Key)
	if cur == nil || !reapable(cur) || cur.Dev != devNone || cur.Fetch {
		return
	}
	schemaBug(txn.Delete(tableAdapters, cur))
	remaining := hasVersion(txn, cur.ID)
	txn.Commit()
	if m.disk != nil && cur.Deleted && !remaining {
		if err := m.disk.remove(cur.ID); err != nil {
			m.log.Warn("loader: disk cache remove failed", "id", cur.ID, "err", err)
		}
	}
}
