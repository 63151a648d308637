package loader

import (
	"github.com/hashicorp/go-memdb"
)

// Eviction by LRU: which slot a load takes, and which parsed copies leave
// host memory past its byte budget. (The TTLs are the janitor's.)

// pickSlot chooses a free slot, else the least recently used unheld,
// unpinned one (replaced versions first; see deviceVictim). It returns -1
// and watch channels when all are held: every slot's, and the pins' (an
// Unpin frees a candidate).
func (m *Manager) pickSlot(txn *memdb.Txn) (int, *adapterRow, watchList) {
	var ws watchList
	for s := 0; s < m.opts.Slots; s++ {
		r, w := inSlot(txn, s)
		if r == nil {
			return s, nil, nil
		}
		ws.Add(w)
	}
	if v := deviceVictim(txn); v != nil {
		return v.Slot, v, nil
	}
	_, pw := pinnedIDs(txn)
	ws.Add(pw)
	return -1, nil, ws
}

// evictHost drops least recently used parsed adapters (hostEvictable ones,
// unpinned, never keep) from host memory until the total fits HostBytes.
// When the rest cannot be dropped the total overshoots (logged, at Warn at
// most once a minute) until the next attach, device replacement or janitor
// pass.
func (m *Manager) evictHost(txn *memdb.Txn, keep string) {
	if m.opts.HostBytes <= 0 {
		return
	}
	total := hostBytes(txn)
	var drop []*adapterRow
	if total > m.opts.HostBytes {
		drop, total = hostVictims(txn, total, m.opts.HostBytes, keep)
	}
	for _, r := range drop {
		c := r.copy()
		c.Host = nil
		mustInsert(txn, c)
		m.hostEvictions.Add(1)
		m.log.Debug("loader: host budget evicted", "id", r.ID, "version", r.Version, "bytes", r.Bytes)
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
