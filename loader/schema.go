package loader

import (
	"encoding/binary"
	"fmt"
	"time"

	"github.com/hashicorp/go-memdb"

	"github.com/peftd/peftd/runtime/lora"
)

// Tables and indexes of the residency index. Each index answers one
// question the Manager asks; none is scanned and filtered.
const (
	tableAdapters = "adapters"
	tablePins     = "pins"

	// adapters
	indexID      = "id"      // unique: Key (id@version). List and Stats read all rows through it.
	indexAdapter = "adapter" // every version of an adapter: ID
	indexCurrent = "current" // (Current, ID): the current version of id; with the _prefix suffix and (true, ""), every current version
	indexSlot    = "slot"    // who is in device slot s (-1: none)
	// Sparse LRU indexes (lruIndex): only the rows that may leave a tier,
	// replaced versions first, then oldest first. The argument true
	// selects the current versions alone, oldest first.
	indexDeviceLRU = "device_lru" // deviceEvictable rows by LastUsed: the slot to replace, device TTL
	indexHostLRU   = "host_lru"   // hostEvictable rows by the later of LastUsed and HostAt: the host byte budget
	indexHostIdle  = "host_idle"  // hostEvictable rows by LastUsed: host TTL
	// Conditional indexes, queried with true.
	indexReapable = "reapable" // replaced or deleted versions no lease holds (the janitor removes them)
	indexInHost   = "in_host"  // rows with a parsed copy in host memory (the budget's total)
	indexActive   = "active"   // rows held, loading, on the device or in host memory (Idle)

	// pins
	indexPinID = "id" // unique: ID
)

// schemaFactories lists one factory per table.
var schemaFactories = []func() *memdb.TableSchema{
	adaptersTableSchema,
	pinsTableSchema,
}

// stateSchema builds the residency index schema.
func stateSchema() *memdb.DBSchema {
	db := &memdb.DBSchema{Tables: make(map[string]*memdb.TableSchema)}
	for _, f := range schemaFactories {
		t := f()
		if _, dup := db.Tables[t.Name]; dup {
			panic(fmt.Sprintf("loader: duplicate table %q", t.Name))
		}
		db.Tables[t.Name] = t
	}
	return db
}

type devState int

const (
	devNone devState = iota
	devLoading
	devLoaded
	devUnloading
)

// adapterRow is one adapter version in the index. Rows are immutable once
// inserted: writers copy, change and re-insert. Whether it is pinned is
// not a field: pins live in their own table (see pinRow).
type adapterRow struct {
	Key     string // ID@Version
	ID      string
	Version string
	Current bool // the store's current version: serves new Acquires
	Deleted bool
	Tier    Tier
	Slot    int // -1 unless on (or moving to/from) the device
	Dev     devState
	Refs    int
	OnDisk  bool
	Host    *lora.Adapter
	HostAt  time.Time // when Host was set (the host LRU orders by this or LastUsed)
	Fetch   bool      // a fetch into host memory is running

	Bytes       int64 // weights in host memory (lora.Adapter.HostBytes)
	StoreBytes  int64 // the two files
	Rank        int
	LastUsed    time.Time
	Invocations uint64
	LoadLatency time.Duration
	LoadSource  Tier
	CheckedAt   time.Time // last time the store confirmed the ETag
	Err         string    // why this version is invalid
}

func (r *adapterRow) copy() *adapterRow { c := *r; return &c }

func (r *adapterRow) fix() *adapterRow {
	switch {
	case r.Dev == devLoaded || r.Dev == devUnloading:
		r.Tier = TierDevice
	case r.Host != nil:
		r.Tier = TierHost
	case r.OnDisk:
		r.Tier = TierDisk
	case r.Deleted:
		r.Tier = TierNone
	default:
		r.Tier = TierStore
	}
	if r.Dev == devNone {
		r.Slot = -1
	}
	return r
}

func rowKey(id, version string) string { return id + "@" + version }

// deviceEvictable: a version in a slot that a load may replace or the
// device TTL unload, unless its adapter is pinned: loaded and not leased.
func deviceEvictable(r *adapterRow) bool { return r.Dev == devLoaded && r.Refs == 0 }

// hostEvictable reports whether the host budget or TTL may drop r's parsed
// copy, unless its adapter is pinned: not while it is on the device (or
// moving there or back), leased or being fetched. (On the CPU backend a
// device slot is the host copy.)
func hostEvictable(r *adapterRow) bool {
	return r.Host != nil && r.Dev == devNone && r.Refs == 0 && !r.Fetch
}

// reapable: a replaced or deleted version that no lease holds.
func reapable(r *adapterRow) bool { return !r.Current && r.Refs == 0 }

// inHost: a parsed copy counts against the host budget.
func inHost(r *adapterRow) bool { return r.Host != nil }

// active: anything that keeps the replica from being idle.
func active(r *adapterRow) bool { return r.Refs > 0 || r.Dev != devNone || r.Host != nil || r.Fetch }

// hostLRUTime is what the host budget orders by: the last use, or the
// fetch for an adapter fetched and not used since.
func hostLRUTime(r *adapterRow) time.Time {
	if r.HostAt.After(r.LastUsed) {
		return r.HostAt
	}
	return r.LastUsed
}

func lastUsed(r *adapterRow) time.Time { return r.LastUsed }

// adaptersTableSchema: one row per adapter version the Manager knows of
// (the store's current version, and replaced or deleted versions that
// leases still hold).
func adaptersTableSchema() *memdb.TableSchema {
	return &memdb.TableSchema{
		Name: tableAdapters,
		Indexes: map[string]*memdb.IndexSchema{
			indexID: {
				Name:    indexID,
				Unique:  true,
				Indexer: &memdb.StringFieldIndex{Field: "Key"},
			},
			indexAdapter: {
				Name:    indexAdapter,
				Indexer: &memdb.StringFieldIndex{Field: "ID"},
			},
			// Not unique although one version per adapter is current: a
			// unique index silently overwrites, a bug here must not hide a row.
			indexCurrent: {
				Name: indexCurrent,
				Indexer: &memdb.CompoundIndex{Indexes: []memdb.Indexer{
					&memdb.BoolFieldIndex{Field: "Current"},
					&memdb.StringFieldIndex{Field: "ID"},
				}},
			},
			indexSlot: {
				Name:    indexSlot,
				Indexer: &memdb.IntFieldIndex{Field: "Slot"},
			},
			indexDeviceLRU: {
				Name:         indexDeviceLRU,
				AllowMissing: true,
				Indexer:      &lruIndex{member: deviceEvictable, at: lastUsed},
			},
			indexHostLRU: {
				Name:         indexHostLRU,
				AllowMissing: true,
				Indexer:      &lruIndex{member: hostEvictable, at: hostLRUTime},
			},
			indexHostIdle: {
				Name:         indexHostIdle,
				AllowMissing: true,
				Indexer:      &lruIndex{member: hostEvictable, at: lastUsed},
			},
			indexReapable: {
				Name:    indexReapable,
				Indexer: &memdb.ConditionalIndex{Conditional: rowCond(reapable)},
			},
			indexInHost: {
				Name:    indexInHost,
				Indexer: &memdb.ConditionalIndex{Conditional: rowCond(inHost)},
			},
			indexActive: {
				Name:    indexActive,
				Indexer: &memdb.ConditionalIndex{Conditional: rowCond(active)},
			},
		},
	}
}

// pinRow is a pinned adapter. A pin belongs to the adapter ID, not to a
// version: it is taken before the adapter is resolved (the Slots-1 bound is
// checked and reserved at once), holds whichever version is current,
// survives replacement and deletion (a re-upload comes back pinned) and
// lasts until Unpin. So it cannot live on a version's row; this table is
// its only record, and pinned(txn, r) joins it.
type pinRow struct {
	ID string
}

func pinsTableSchema() *memdb.TableSchema {
	return &memdb.TableSchema{
		Name: tablePins,
		Indexes: map[string]*memdb.IndexSchema{
			indexPinID: {
				Name:    indexPinID,
				Unique:  true,
				Indexer: &memdb.StringFieldIndex{Field: "ID"},
			},
		},
	}
}

// rowCond adapts a predicate on rows to memdb.ConditionalIndexFunc.
func rowCond(f func(*adapterRow) bool) memdb.ConditionalIndexFunc {
	return func(obj any) (bool, error) {
		r, ok := obj.(*adapterRow)
		if !ok {
			return false, fmt.Errorf("%T is not an adapter row", obj)
		}
		return f(r), nil
	}
}

// lruIndex is a sparse index of the rows for which member holds, in
// eviction order: replaced versions first, then by at (oldest first), then
// by slot, then by key. Other rows are not in it (its IndexSchema has
// AllowMissing). FromArgs takes one bool, Current: Get(table, index, true)
// iterates the current versions alone, oldest first.
//
// Times are keyed by their wall clock reading (a key cannot hold the
// monotonic one that time.Time comparisons prefer); the two agree unless
// the system clock is stepped.
type lruIndex struct {
	member func(*adapterRow) bool
	at     func(*adapterRow) time.Time
}

func (x *lruIndex) FromObject(obj any) (bool, []byte, error) {
	r, ok := obj.(*adapterRow)
	if !ok {
		return false, nil, fmt.Errorf("%T is not an adapter row", obj)
	}
	if !x.member(r) {
		return false, nil, nil
	}
	t := x.at(r)
	key := make([]byte, 0, 1+8+4+8)
	key = append(key, boolKey(r.Current))
	key = binary.BigEndian.AppendUint64(key, uint64(t.Unix())^1<<63) // sign flipped: ordered as signed
	key = binary.BigEndian.AppendUint32(key, uint32(t.Nanosecond()))
	key = binary.BigEndian.AppendUint64(key, uint64(int64(r.Slot))^1<<63)
	return true, key, nil
}

func (x *lruIndex) FromArgs(args ...any) ([]byte, error) {
	if len(args) != 1 {
		return nil, fmt.Errorf("lru index: want one argument (Current), got %d", len(args))
	}
	current, ok := args[0].(bool)
	if !ok {
		return nil, fmt.Errorf("lru index: argument %T is not a bool", args[0])
	}
	return []byte{boolKey(current)}, nil
}

func boolKey(b bool) byte {
	if b {
		return 1
	}
	return 0
}
