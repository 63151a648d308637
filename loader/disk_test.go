package loader

import (
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

func quietLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// entrySize is what put counts for an entry of version "v1" and n weight bytes.
func entrySize(n int) int64 { return int64(len("v1") + len("{}") + n) }

func mustPut(t *testing.T, d *diskCache, id string, n int) {
	t.Helper()
	if err := d.put(id, "v1", []byte("{}"), make([]byte, n)); err != nil {
		t.Fatal(err)
	}
}

func cachedIDs(d *diskCache) []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	var ids []string
	for id, e := range d.entries {
		if e.size > 0 {
			ids = append(ids, id)
		}
	}
	slices.Sort(ids)
	return ids
}

// TestDiskCacheLRU: the bound removes the least recently used entries that
// are not in use, declines what cannot fit, and is applied again at start.
func TestDiskCacheLRU(t *testing.T) {
	dir := t.TempDir()
	var evicted []string
	d, err := newDiskCache(dir, 3*entrySize(1000), quietLog(), func(ids []string) { evicted = append(evicted, ids...) })
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"a", "b", "c"} {
		mustPut(t, d, id, 1000)
		time.Sleep(2 * time.Millisecond) // distinct LRU times
	}
	if _, _, ok := d.get("a", "v1", 0); !ok { // a is now the most recent
		t.Fatal("get a: miss")
	}
	mustPut(t, d, "d", 1000)
	if got := cachedIDs(d); !slices.Equal(got, []string{"a", "c", "d"}) || !slices.Equal(evicted, []string{"b"}) {
		t.Errorf("after d: cached %v evicted %v, want a c d, b", got, evicted)
	}
	if _, err := os.Stat(filepath.Join(dir, "b")); !os.IsNotExist(err) {
		t.Errorf("b still on disk: %v", err)
	}

	// Entries in use (read or written) stay: c is the LRU but busy, a goes.
	d.entries["c"].busy++
	mustPut(t, d, "e", 1000)
	if got := cachedIDs(d); !slices.Equal(got, []string{"c", "d", "e"}) {
		t.Errorf("with c in use: cached %v, want c d e", got)
	}
	// Everything in use: nothing is evicted and f is not cached.
	d.entries["d"].busy++
	d.entries["e"].busy++
	mustPut(t, d, "f", 1000)
	if got := cachedIDs(d); !slices.Equal(got, []string{"c", "d", "e"}) || d.has("f", "v1") {
		t.Errorf("all in use: cached %v (f cached: %v)", got, d.has("f", "v1"))
	}
	for _, id := range []string{"c", "d", "e"} {
		d.entries[id].busy--
	}
	// Larger than the bound: not cached, nothing evicted.
	mustPut(t, d, "huge", 4000)
	if got := cachedIDs(d); !slices.Equal(got, []string{"c", "d", "e"}) {
		t.Errorf("after huge: cached %v", got)
	}
	if b, want := d.bytes(), 3*entrySize(1000); b != want || dirBytes(dir) != want {
		t.Errorf("accounted %d, on disk %d, want %d", b, dirBytes(dir), want)
	}
	// Replacing an entry counts the new size only.
	if err := d.put("d", "v2", []byte("{}"), make([]byte, 500)); err != nil {
		t.Fatal(err)
	}
	if b, disk := d.bytes(), dirBytes(dir); b != disk || d.has("d", "v1") || !d.has("d", "v2") {
		t.Errorf("after replacing d: accounted %d, on disk %d", b, disk)
	}
	if err := d.remove("c"); err != nil {
		t.Fatal(err)
	}
	if b, disk := d.bytes(), dirBytes(dir); b != disk {
		t.Errorf("after removing c: accounted %d, on disk %d", b, disk)
	}

	// At start, a smaller bound trims the oldest entries (folder times).
	old := time.Now().Add(-time.Hour)
	if err := os.Chtimes(filepath.Join(dir, "e"), old, old); err != nil {
		t.Fatal(err)
	}
	d2, err := newDiskCache(dir, entrySize(1000), quietLog(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := cachedIDs(d2); !slices.Equal(got, []string{"d"}) || !d2.has("d", "v2") {
		t.Errorf("restart with a smaller bound: cached %v, want d", got)
	}
	if b, disk := d2.bytes(), dirBytes(dir); b != disk || b > entrySize(1000) {
		t.Errorf("restart: accounted %d, on disk %d", b, disk)
	}
}
