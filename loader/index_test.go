package loader

import (
	"slices"
	"testing"
	"time"

	"github.com/hashicorp/go-memdb"

	"github.com/peftd/peftd/runtime/lora"
)

// Tests of the residency index's queries (schema.go, query.go, pins.go) on
// hand-made rows.

var t0 = time.Date(2025, 6, 1, 12, 0, 0, 0, time.UTC)

// at is t0 plus s seconds.
func at(s int) time.Time { return t0.Add(time.Duration(s) * time.Second) }

// row is id@ver, current, in the store only, changed by edits.
func row(id, ver string, edits ...func(*adapterRow)) *adapterRow {
	r := &adapterRow{Key: rowKey(id, ver), ID: id, Version: ver, Current: true, Slot: -1}
	for _, e := range edits {
		e(r)
	}
	return r
}

// Row edits.
func loaded(slot int, used time.Time) func(*adapterRow) {
	return func(r *adapterRow) {
		r.Dev, r.Slot, r.LastUsed = devLoaded, slot, used
		r.Host, r.Bytes = &lora.Adapter{}, 100
	}
}
func dev(d devState) func(*adapterRow) { return func(r *adapterRow) { r.Dev = d } }
func refs(n int) func(*adapterRow)     { return func(r *adapterRow) { r.Refs = n } }
func replaced(r *adapterRow)           { r.Current = false }
func fetching(r *adapterRow)           { r.Fetch = true }
func inHostMem(bytes int64, used, fetched time.Time) func(*adapterRow) {
	return func(r *adapterRow) {
		r.Host, r.Bytes, r.LastUsed, r.HostAt = &lora.Adapter{}, bytes, used, fetched
	}
}

// newIndex builds the schema and inserts rows and pins.
func newIndex(t *testing.T, rows []*adapterRow, pins ...string) *memdb.MemDB {
	t.Helper()
	db, err := memdb.NewMemDB(stateSchema())
	if err != nil {
		t.Fatal(err)
	}
	txn := db.Txn(true)
	for _, r := range rows {
		if err := txn.Insert(tableAdapters, r.fix()); err != nil {
			t.Fatal(err)
		}
	}
	for _, id := range pins {
		if err := txn.Insert(tablePins, &pinRow{ID: id}); err != nil {
			t.Fatal(err)
		}
	}
	txn.Commit()
	return db
}

func keys(rs []*adapterRow) []string {
	out := []string{}
	for _, r := range rs {
		out = append(out, r.Key)
	}
	return out
}

func TestDeviceVictim(t *testing.T) {
	for _, tc := range []struct {
		name string
		rows []*adapterRow
		pins []string
		want string // "": none
	}{
		{"empty", nil, nil, ""},
		{"least recently used", []*adapterRow{
			row("a", "1", loaded(0, at(30))),
			row("b", "1", loaded(1, at(10))),
			row("c", "1", loaded(2, at(20))),
		}, nil, "b@1"},
		{"skips leased, loading, unloading", []*adapterRow{
			row("a", "1", loaded(0, at(1)), refs(1)),
			row("b", "1", loaded(1, at(2)), dev(devLoading)),
			row("c", "1", loaded(2, at(3)), dev(devUnloading)),
			row("d", "1", loaded(3, at(40))),
		}, nil, "d@1"},
		{"skips pinned", []*adapterRow{
			row("a", "1", loaded(0, at(1))),
			row("b", "1", loaded(1, at(2))),
		}, []string{"a"}, "b@1"},
		{"all held or pinned", []*adapterRow{
			row("a", "1", loaded(0, at(1))),
			row("b", "1", loaded(1, at(2)), refs(2)),
		}, []string{"a"}, ""},
		{"replaced versions first", []*adapterRow{
			row("a", "1", loaded(0, at(1))),
			row("b", "1", loaded(1, at(50)), replaced),
		}, nil, "b@1"},
		{"a pin holds the current version only", []*adapterRow{
			row("a", "1", loaded(0, at(10)), replaced),
			row("a", "2", loaded(1, at(1))),
			row("b", "1", loaded(2, at(5))),
		}, []string{"a"}, "a@1"},
		{"ties go to the lowest slot", []*adapterRow{
			row("a", "1", loaded(2, at(5))),
			row("z", "1", loaded(0, at(5))),
			row("m", "1", loaded(1, at(5))),
		}, nil, "z@1"},
		{"never used is oldest", []*adapterRow{
			row("a", "1", loaded(0, at(1))),
			row("b", "1", loaded(1, time.Time{})),
		}, nil, "b@1"},
		{"host-only rows are not candidates", []*adapterRow{
			row("a", "1", inHostMem(10, time.Time{}, at(0))),
			row("b", "1", loaded(1, at(9))),
		}, nil, "b@1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			db := newIndex(t, tc.rows, tc.pins...)
			got := ""
			if v := deviceVictim(db.Txn(false)); v != nil {
				got = v.Key
			}
			if got != tc.want {
				t.Errorf("victim %q, want %q", got, tc.want)
			}
		})
	}
}

func TestHostVictims(t *testing.T) {
	for _, tc := range []struct {
		name         string
		rows         []*adapterRow
		pins         []string
		limit        int64
		keep         string
		want         []string
		wantTotal    int64
		wantInMemory int64
	}{
		{"under the limit", []*adapterRow{
			row("a", "1", inHostMem(10, at(1), at(1))),
		}, nil, 100, "", []string{}, 10, 10},
		{"LRU until it fits", []*adapterRow{
			row("a", "1", inHostMem(10, at(3), at(0))),
			row("b", "1", inHostMem(10, at(1), at(0))),
			row("c", "1", inHostMem(10, at(2), at(0))),
		}, nil, 15, "", []string{"b@1", "c@1"}, 10, 30},
		{"a fetch unused since counts from the fetch", []*adapterRow{
			row("a", "1", inHostMem(10, at(1), at(9))),
			row("b", "1", inHostMem(10, at(5), at(0))),
		}, nil, 10, "", []string{"b@1"}, 10, 20},
		{"replaced versions first", []*adapterRow{
			row("a", "1", inHostMem(10, at(1), at(1))),
			row("a", "0", inHostMem(10, at(9), at(9)), replaced),
		}, nil, 10, "", []string{"a@0"}, 10, 20},
		{"spares device, leased, fetching, pinned and keep", []*adapterRow{
			row("d", "1", loaded(0, at(1))),
			row("l", "1", inHostMem(10, at(1), at(1)), refs(1)),
			row("f", "1", inHostMem(10, at(1), at(1)), fetching),
			row("p", "1", inHostMem(10, at(1), at(1))),
			row("k", "1", inHostMem(10, at(1), at(1))),
			row("x", "1", inHostMem(10, at(2), at(2))),
		}, []string{"p"}, 0, "k@1", []string{"x@1"}, 140, 150},
		{"store and disk rows hold no bytes", []*adapterRow{
			row("a", "1", func(r *adapterRow) { r.OnDisk, r.Bytes = true, 99 }),
			row("b", "1", inHostMem(10, at(1), at(1))),
		}, nil, 10, "", []string{}, 10, 10},
	} {
		t.Run(tc.name, func(t *testing.T) {
			txn := newIndex(t, tc.rows, tc.pins...).Txn(false)
			total := hostBytes(txn)
			if total != tc.wantInMemory {
				t.Errorf("host bytes %d, want %d", total, tc.wantInMemory)
			}
			got, left := hostVictims(txn, total, tc.limit, tc.keep)
			if !slices.Equal(keys(got), tc.want) || left != tc.wantTotal {
				t.Errorf("victims %v (total then %d), want %v (%d)", keys(got), left, tc.want, tc.wantTotal)
			}
		})
	}
}

func TestIdleRows(t *testing.T) {
	now, ttl := at(100), 30*time.Second // idle: last used at or before at(70)
	for _, tc := range []struct {
		name  string
		index string
		rows  []*adapterRow
		pins  []string
		want  []string
	}{
		{"device: oldest first, stops at the first in use since", indexDeviceLRU, []*adapterRow{
			row("a", "1", loaded(0, at(60))),
			row("b", "1", loaded(1, at(70))),
			row("c", "1", loaded(2, at(71))),
			row("d", "1", loaded(3, at(10))),
		}, nil, []string{"d@1", "a@1", "b@1"}},
		{"device: skips pinned, leased, replaced", indexDeviceLRU, []*adapterRow{
			row("a", "1", loaded(0, at(1))),
			row("b", "1", loaded(1, at(2)), refs(1)),
			row("c", "1", loaded(2, at(3)), replaced),
			row("d", "1", loaded(3, at(4))),
		}, []string{"a"}, []string{"d@1"}},
		{"host: by last use, not by fetch", indexHostIdle, []*adapterRow{
			row("a", "1", inHostMem(10, time.Time{}, at(99))), // fetched, never used
			row("b", "1", inHostMem(10, at(50), at(90))),
			row("c", "1", inHostMem(10, at(80), at(0))),
		}, nil, []string{"a@1", "b@1"}},
		{"host: not on the device, leased, fetching, pinned or replaced", indexHostIdle, []*adapterRow{
			row("a", "1", loaded(0, at(1))),
			row("b", "1", inHostMem(10, at(1), at(1)), refs(1)),
			row("c", "1", inHostMem(10, at(1), at(1)), fetching),
			row("d", "1", inHostMem(10, at(1), at(1))),
			row("e", "1", inHostMem(10, at(1), at(1)), replaced),
			row("f", "1", inHostMem(10, at(2), at(1))),
		}, []string{"d"}, []string{"f@1"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			txn := newIndex(t, tc.rows, tc.pins...).Txn(false)
			if got := keys(idleRows(txn, tc.index, now, ttl)); !slices.Equal(got, tc.want) {
				t.Errorf("idle %v, want %v", got, tc.want)
			}
		})
	}
}

func TestCurrentAndVersions(t *testing.T) {
	db := newIndex(t, []*adapterRow{
		row("a", "1", replaced),
		row("a", "2"),
		row("ab", "1"),
		row("b", "1", replaced, func(r *adapterRow) { r.Deleted = true }),
		row("c", "1", replaced, refs(1)),
		row("c", "2"),
	})
	txn := db.Txn(false)
	for _, tc := range []struct{ id, want string }{{"a", "a@2"}, {"ab", "ab@1"}, {"b", ""}, {"c", "c@2"}, {"x", ""}} {
		got := ""
		if r, _ := currentRow(txn, tc.id); r != nil {
			got = r.Key
		}
		if got != tc.want {
			t.Errorf("currentRow(%q) = %q, want %q", tc.id, got, tc.want)
		}
	}
	for _, tc := range []struct {
		what string
		got  []*adapterRow
		want []string
	}{
		{"current rows", currentRows(txn), []string{"a@2", "ab@1", "c@2"}},
		{"versions of a", versions(txn, "a"), []string{"a@1", "a@2"}},
		{"reapable", reapableRows(txn), []string{"a@1", "b@1"}},
	} {
		if got := keys(tc.got); !slices.Equal(got, tc.want) {
			t.Errorf("%s: %v, want %v", tc.what, got, tc.want)
		}
	}
	if !hasVersion(txn, "b") || hasVersion(txn, "x") {
		t.Error("hasVersion")
	}
}

func TestActive(t *testing.T) {
	for _, tc := range []struct {
		name string
		rows []*adapterRow
		want bool
	}{
		{"none", nil, false},
		{"store and disk only", []*adapterRow{row("a", "1"), row("b", "1", func(r *adapterRow) { r.OnDisk = true })}, false},
		{"in host memory", []*adapterRow{row("a", "1", inHostMem(1, at(1), at(1)))}, true},
		{"fetching", []*adapterRow{row("a", "1", fetching)}, true},
		{"loading", []*adapterRow{row("a", "1", dev(devLoading), func(r *adapterRow) { r.Slot = 0 })}, true},
		{"on the device", []*adapterRow{row("a", "1", loaded(0, at(1)))}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := anyActive(newIndex(t, tc.rows).Txn(false)); got != tc.want {
				t.Errorf("anyActive = %v, want %v", got, tc.want)
			}
		})
	}
}

// TestIndexUpdates: rows move in and out of the sparse indexes as they
// are re-inserted, and watchers wake.
func TestIndexUpdates(t *testing.T) {
	db := newIndex(t, []*adapterRow{row("a", "1", loaded(0, at(1))), row("b", "1", loaded(1, at(2)))})
	victim := func() string {
		if v := deviceVictim(db.Txn(false)); v != nil {
			return v.Key
		}
		return ""
	}
	set := func(key string, edit func(*adapterRow)) {
		txn := db.Txn(true)
		r, _ := rowByKey(txn, key)
		c := r.copy()
		edit(c)
		mustInsert(txn, c)
		txn.Commit()
	}
	if v := victim(); v != "a@1" {
		t.Fatalf("victim %q", v)
	}
	set("a@1", refs(1))
	if v := victim(); v != "b@1" {
		t.Fatalf("leased a: victim %q", v)
	}
	set("a@1", func(r *adapterRow) { r.Refs, r.LastUsed = 0, at(3) })
	if v := victim(); v != "b@1" {
		t.Fatalf("a used last: victim %q", v)
	}

	// A new version becoming current wakes currentRow's watcher.
	_, w := currentRow(db.Txn(false), "a")
	set("a@1", replaced)
	txn := db.Txn(true)
	mustInsert(txn, row("a", "2"))
	txn.Commit()
	select {
	case <-w:
	default:
		t.Error("currentRow's watch did not fire")
	}
	if r, _ := currentRow(db.Txn(false), "a"); r == nil || r.Key != "a@2" {
		t.Errorf("current a = %v", r)
	}

	// pinnedIDs' watch (part of pickSlot's) fires on a pin change.
	_, pw := pinnedIDs(db.Txn(false))
	txn = db.Txn(true)
	if err := txn.Insert(tablePins, &pinRow{ID: "b"}); err != nil {
		t.Fatal(err)
	}
	txn.Commit()
	select {
	case <-pw:
	default:
		t.Error("pins watch did not fire")
	}
	if v := victim(); v != "a@1" { // b is pinned, a@1 replaced
		t.Errorf("victim %q", v)
	}
}

func TestPickSlot(t *testing.T) {
	m := &Manager{opts: Options{Slots: 3}}
	for _, tc := range []struct {
		name       string
		rows       []*adapterRow
		pins       []string
		slot       int
		victim     string
		watchSlots bool
	}{
		{"first free", []*adapterRow{row("a", "1", loaded(0, at(1))), row("b", "1", loaded(2, at(1)))}, nil, 1, "", false},
		{"LRU victim", []*adapterRow{row("a", "1", loaded(0, at(3))), row("b", "1", loaded(1, at(1))), row("c", "1", loaded(2, at(2)))}, nil, 1, "b@1", false},
		{"all held", []*adapterRow{row("a", "1", loaded(0, at(3)), refs(1)), row("b", "1", loaded(1, at(1))), row("c", "1", loaded(2, at(2)), dev(devLoading))}, []string{"b"}, -1, "", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			slot, v, ws := m.pickSlot(newIndex(t, tc.rows, tc.pins...).Txn(false))
			got := ""
			if v != nil {
				got = v.Key
			}
			if slot != tc.slot || got != tc.victim || (len(ws) == 3+1) != tc.watchSlots {
				t.Errorf("pickSlot = %d, %q, %d watches; want %d, %q, watches %v", slot, got, len(ws), tc.slot, tc.victim, tc.watchSlots)
			}
		})
	}
}
