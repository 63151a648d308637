package loader

import (
	"context"
	"fmt"

	"github.com/hashicorp/go-memdb"

	"github.com/peftd/peftd/loader/store"
)

// Pins: one record per pinned adapter ID, in tablePins (see pinRow for why
// a table and not a row field). A pin holds the current version only:
// replaced versions are on their way out, and must not take a second slot
// from the Slots-1 that pins may hold.

// idPinned reports whether id is pinned.
func idPinned(txn *memdb.Txn, id string) bool {
	_, o := firstWatch(txn, tablePins, indexPinID, id)
	return o != nil
}

// pinned reports whether a pin holds r: r is its adapter's current version
// and the adapter is pinned.
func pinned(txn *memdb.Txn, r *adapterRow) bool {
	return r.Current && idPinned(txn, r.ID)
}

// pinnedIDs returns the pinned adapter IDs, and a channel that fires when
// a pin is taken or dropped.
func pinnedIDs(txn *memdb.Txn) (map[string]bool, <-chan struct{}) {
	it := get(txn, tablePins, indexPinID)
	ids := map[string]bool{}
	for o := it.Next(); o != nil; o = it.Next() {
		ids[o.(*pinRow).ID] = true
	}
	return ids, it.WatchCh()
}

// Pin makes id resident and keeps it on the device (and in host memory)
// until Unpin; at most Slots-1 adapters may be pinned.
func (m *Manager) Pin(ctx context.Context, id string) error {
	if err := store.ValidateID(id); err != nil {
		return err
	}
	// One write transaction checks the bound and takes the pin: two Pins
	// cannot both pass the check.
	txn := m.db.Txn(true)
	if idPinned(txn, id) {
		txn.Abort()
	} else {
		ids, _ := pinnedIDs(txn)
		if len(ids)+1 >= m.opts.Slots {
			txn.Abort()
			return fmt.Errorf("%w: %d slots, %d pinned", ErrTooManyPinned, m.opts.Slots, len(ids))
		}
		schemaBug(txn.Insert(tablePins, &pinRow{ID: id}))
		txn.Commit()
	}
	l, err := m.Acquire(ctx, id)
	if err != nil {
		m.Unpin(id)
		return err
	}
	l.Release()
	return nil
}

// Unpin lets id leave the device and host memory again. Acquires waiting
// for a slot wake (their pickSlot watches the pins).
func (m *Manager) Unpin(id string) {
	txn := m.db.Txn(true)
	defer txn.Abort()
	_, o := firstWatch(txn, tablePins, indexPinID, id)
	if o == nil {
		return
	}
	schemaBug(txn.Delete(tablePins, o))
	txn.Commit()
}
