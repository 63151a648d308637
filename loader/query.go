package loader

import (
	"fmt"
	"time"

	"github.com/hashicorp/go-memdb"
)

// schemaBug panics on an error from go-memdb. It is the only place the
// loader panics on one, and the only thing it does with one, because here
// an error can only be a bug in this package: every call below names a
// table and index that stateSchema declares, passes arguments of the types
// their indexers take, and inserts or deletes *adapterRow and *pinRow values
// whose indexers cannot fail (the sparse ones leave rows out rather than
// erring; Delete is given a row read in the same transaction). None depends
// on input, the store or timing, so a returned error would be a branch that
// cannot run, in every caller, with half-applied write transactions to
// reason about; the panic names the schema so the bug is found at once.
func schemaBug(err error) {
	if err != nil {
		panic(fmt.Sprintf("loader: residency index schema bug (schema.go and the query disagree): %v", err))
	}
}

func get(txn *memdb.Txn, table, index string, args ...any) memdb.ResultIterator {
	it, err := txn.Get(table, index, args...)
	schemaBug(err)
	return it
}

func firstWatch(txn *memdb.Txn, table, index string, args ...any) (<-chan struct{}, any) {
	w, o, err := txn.FirstWatch(table, index, args...)
	schemaBug(err)
	return w, o
}

func mustInsert(txn *memdb.Txn, r *adapterRow) {
	schemaBug(txn.Insert(tableAdapters, r.fix()))
}

// rows collects what an iterator yields (before the caller writes: an
// iterator must not run across writes in its own transaction).
func rows(it memdb.ResultIterator) []*adapterRow {
	var out []*adapterRow
	for o := it.Next(); o != nil; o = it.Next() {
		out = append(out, o.(*adapterRow))
	}
	return out
}

// rowByKey: one version, by id@version.
func rowByKey(txn *memdb.Txn, key string) (*adapterRow, <-chan struct{}) {
	w, o := firstWatch(txn, tableAdapters, indexID, key)
	if o == nil {
		return nil, w
	}
	return o.(*adapterRow), w
}

// currentRow: id's current version, and a channel that fires when it
// changes or another version becomes current.
func currentRow(txn *memdb.Txn, id string) (*adapterRow, <-chan struct{}) {
	w, o := firstWatch(txn, tableAdapters, indexCurrent, true, id)
	if o == nil {
		return nil, w
	}
	return o.(*adapterRow), w
}

// currentRows: every adapter's current version.
func currentRows(txn *memdb.Txn) []*adapterRow {
	return rows(get(txn, tableAdapters, indexCurrent+"_prefix", true, ""))
}

// versions: every version of id.
func versions(txn *memdb.Txn, id string) []*adapterRow {
	return rows(get(txn, tableAdapters, indexAdapter, id))
}

// hasVersion: whether any version of id is left.
func hasVersion(txn *memdb.Txn, id string) bool {
	_, o := firstWatch(txn, tableAdapters, indexAdapter, id)
	return o != nil
}

// inSlot: the row in device slot s, and a channel that fires when it
// changes or the slot fills.
func inSlot(txn *memdb.Txn, s int) (*adapterRow, <-chan struct{}) {
	w, o := firstWatch(txn, tableAdapters, indexSlot, s)
	if o == nil {
		return nil, w
	}
	return o.(*adapterRow), w
}

// deviceVictim: the slot a load may take when none is free: the least
// recently used loaded, unleased, unpinned version, replaced versions
// first, ties to the lowest slot. nil when every slot is held or pinned.
func deviceVictim(txn *memdb.Txn) *adapterRow {
	it := get(txn, tableAdapters, indexDeviceLRU)
	for o := it.Next(); o != nil; o = it.Next() {
		if r := o.(*adapterRow); !pinned(txn, r) {
			return r
		}
	}
	return nil
}

// hostVictims: the parsed copies to drop, in host LRU order (replaced
// versions first, then by the later of last use and fetch), so that
// total, the bytes in host memory, falls to limit; never keep's, nor a
// pinned adapter's. It returns what total becomes.
func hostVictims(txn *memdb.Txn, total, limit int64, keep string) ([]*adapterRow, int64) {
	var out []*adapterRow
	it := get(txn, tableAdapters, indexHostLRU)
	for o := it.Next(); o != nil && total > limit; o = it.Next() {
		r := o.(*adapterRow)
		if r.Key == keep || pinned(txn, r) {
			continue
		}
		out = append(out, r)
		total -= r.Bytes
	}
	return out, total
}

// hostBytes: the parsed copies' bytes in host memory.
func hostBytes(txn *memdb.Txn) int64 {
	var total int64
	it := get(txn, tableAdapters, indexInHost, true)
	for o := it.Next(); o != nil; o = it.Next() {
		total += o.(*adapterRow).Bytes
	}
	return total
}

// idleRows: the current, unpinned versions in index (an lruIndex ordered
// by LastUsed: indexDeviceLRU or indexHostIdle) unused for ttl at now.
// The scan stops at the first one used since.
func idleRows(txn *memdb.Txn, index string, now time.Time, ttl time.Duration) []*adapterRow {
	var out []*adapterRow
	it := get(txn, tableAdapters, index, true)
	for o := it.Next(); o != nil; o = it.Next() {
		r := o.(*adapterRow)
		if now.Sub(r.LastUsed) < ttl {
			break
		}
		if !pinned(txn, r) {
			out = append(out, r)
		}
	}
	return out
}

// reapableRows: replaced or deleted versions no lease holds.
func reapableRows(txn *memdb.Txn) []*adapterRow {
	return rows(get(txn, tableAdapters, indexReapable, true))
}

// anyActive: whether any version is held, loading, on the device or in
// host memory.
func anyActive(txn *memdb.Txn) bool {
	_, o := firstWatch(txn, tableAdapters, indexActive, true)
	return o != nil
}
