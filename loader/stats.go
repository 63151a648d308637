package loader

import (
	"context"
	"time"
)

// What callers read: adapter info, Stats, Idle, and residency watches.

// AdapterInfo describes one adapter version, for APIs and metrics.
type AdapterInfo struct {
	ID      string
	Version string // the store ETag
	Current bool   // false: replaced or deleted, kept while leases hold it
	Deleted bool
	Tier    Tier
	Slot    int // -1 unless Tier is TierDevice
	Refs    int
	Pinned  bool // a pin holds this version (the current one of a pinned adapter)
	Loading bool // a fetch or device load is running
	OnDisk  bool
	// Bytes is the parsed size (lora.Adapter.HostBytes); StoreBytes the files.
	Bytes, StoreBytes int64
	Rank              int
	LastUsed          time.Time
	Invocations       uint64
	LastLoadLatency   time.Duration
	LastLoadSource    Tier
	Error             string // validation failure of this version
}

func (r *adapterRow) info(pinned bool) AdapterInfo {
	return AdapterInfo{ID: r.ID, Version: r.Version, Current: r.Current, Deleted: r.Deleted, Tier: r.Tier, Slot: r.Slot,
		Refs: r.Refs, Pinned: pinned, Loading: r.Fetch || r.Dev == devLoading, OnDisk: r.OnDisk,
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

// CountInvalidUpload counts an upload refused before it reached the store
// (Stats.InvalidUploads counts these and store versions that failed
// validation).
func (m *Manager) CountInvalidUpload() { m.invalid.Add(1) }

// List returns every adapter version the Manager knows, by id then version.
func (m *Manager) List() []AdapterInfo {
	txn := m.db.Txn(false)
	pins, _ := pinnedIDs(txn)
	var out []AdapterInfo
	it := get(txn, tableAdapters, indexID)
	for o := it.Next(); o != nil; o = it.Next() {
		r := o.(*adapterRow)
		out = append(out, r.info(r.Current && pins[r.ID]))
	}
	return out
}

// Get returns id's current version.
func (m *Manager) Get(id string) (AdapterInfo, bool) {
	txn := m.db.Txn(false)
	r, _ := currentRow(txn, id)
	if r == nil {
		return AdapterInfo{}, false
	}
	return r.info(pinned(txn, r)), true
}

// WatchResidency blocks until id's current version is exactly at tier
// (TierNone: deleted and gone), or ctx ends. It does not load anything.
func (m *Manager) WatchResidency(ctx context.Context, id string, tier Tier) (AdapterInfo, error) {
	for {
		txn := m.db.Txn(false)
		r, w := currentRow(txn, id)
		var info AdapterInfo
		if r != nil {
			info = r.info(pinned(txn, r))
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
	return !anyActive(m.db.Txn(false))
}

// Stats snapshots the Manager for metrics.
func (m *Manager) Stats() Stats {
	s := Stats{Slots: m.opts.Slots,
		DeviceEvictions: m.deviceEvictions.Load(), HostEvictions: m.hostEvictions.Load(),
		StoreFetches: m.storeFetches.Load(), DiskHits: m.diskHits.Load(),
		DeviceLoads: m.deviceLoads.Load(), InvalidUploads: m.invalid.Load()}
	// Every row: Stats lists them all.
	txn := m.db.Txn(false)
	pins, _ := pinnedIDs(txn)
	it := get(txn, tableAdapters, indexID)
	for o := it.Next(); o != nil; o = it.Next() {
		r := o.(*adapterRow)
		s.Adapters = append(s.Adapters, r.info(r.Current && pins[r.ID]))
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
