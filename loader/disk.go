package loader

import (
	"errors"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/peftd/peftd/loader/internal/atomicdir"
	"github.com/peftd/peftd/loader/store"
)

// diskCache keeps the newest fetched version of each adapter in
// <dir>/<id>/ with the store ETag it came from; an entry is used only
// when that ETag is the one asked for. With a limit it keeps the bytes of
// its entries (and of writes under way) within it, removing the least
// recently used entries that no read or write is using; an entry it cannot
// make room for is not cached.
type diskCache struct {
	dir   string
	limit int64 // 0: none
	log   *slog.Logger
	// onEvict is told (without mu held) the ids whose entries the limit
	// removed.
	onEvict func(ids []string)

	mu      sync.Mutex
	entries map[string]*diskEntry
	total   int64 // bytes of the entries plus those of writes under way
	full    warnEvery
}

type diskEntry struct {
	version string    // "" while the first write is under way, or unreadable
	size    int64     // bytes on disk (the three files)
	used    time.Time // last write or hit
	busy    int       // reads and writes under way
}

const etagFile = "etag"

// staleTemp is the age past which a leftover temporary folder (a write cut
// short by a crash) is removed at start.
const staleTemp = time.Hour

func newDiskCache(dir string, limit int64, log *slog.Logger, onEvict func([]string)) (*diskCache, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	d := &diskCache{dir: dir, limit: max(limit, 0), log: log, onEvict: onEvict, entries: map[string]*diskEntry{}}
	d.full.interval = time.Minute
	des, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	for _, de := range des {
		if !de.IsDir() {
			continue
		}
		fi, err := de.Info()
		if err != nil {
			continue
		}
		p := filepath.Join(dir, de.Name())
		if atomicdir.IsTemp(de.Name()) {
			if time.Since(fi.ModTime()) > staleTemp {
				_ = os.RemoveAll(p)
			}
			continue
		}
		e := &diskEntry{size: dirBytes(p), used: fi.ModTime()}
		if b, _, err := atomicdir.Read(dir, de.Name(), atomicdir.Limit{Name: etagFile, Max: 1024}); err == nil {
			e.version = string(b[0])
		}
		d.entries[de.Name()] = e
		d.total += e.size
	}
	d.mu.Lock()
	evicted, _ := d.makeRoom(0, "")
	d.mu.Unlock()
	if len(evicted) > 0 {
		log.Info("loader: disk cache trimmed to its bound", "dir", dir, "removed", len(evicted), "bytes", d.bytes(), "limit", limit)
	}
	return d, nil
}

// bytes is what the cache holds now (writes under way included).
func (d *diskCache) bytes() int64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.total
}

// has reports whether the entry for id is at version.
func (d *diskCache) has(id, version string) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	e := d.entries[id]
	return e != nil && e.version == version && e.size > 0
}

func (d *diskCache) get(id, version string, maxBytes int64) (cfg, weights []byte, ok bool) {
	if maxBytes <= 0 {
		maxBytes = -1
	}
	d.mu.Lock()
	e := d.entries[id]
	if e == nil || e.version != version {
		d.mu.Unlock()
		return nil, nil, false
	}
	e.busy++
	d.mu.Unlock()
	bs, _, err := atomicdir.Read(d.dir, id,
		atomicdir.Limit{Name: etagFile, Max: 1024},
		atomicdir.Limit{Name: store.ConfigFile, Max: store.MaxConfigSize},
		atomicdir.Limit{Name: store.WeightsFile, Max: maxBytes})
	ok = err == nil && string(bs[0]) == version
	now := time.Now()
	d.mu.Lock()
	e.busy--
	if ok {
		e.used = now
	}
	d.mu.Unlock()
	if !ok {
		return nil, nil, false
	}
	// The folder's time keeps the LRU order across restarts.
	_ = os.Chtimes(filepath.Join(d.dir, id), now, now)
	return bs[1], bs[2], true
}

// put writes id's entry at version. When the limit leaves no room even
// after removing every unused entry, it caches nothing and returns nil.
func (d *diskCache) put(id, version string, cfg, weights []byte) error {
	size := int64(len(version) + len(cfg) + len(weights))
	d.mu.Lock()
	evicted, ok := d.makeRoom(size, id)
	if !ok {
		total := d.total
		d.mu.Unlock()
		d.evicted(evicted)
		d.full.log(d.log, "loader: disk cache bound leaves no room (the entries are in use, or the adapter is larger): not caching it",
			"id", id, "bytes", size, "cached_bytes", total, "limit", d.limit)
		return nil
	}
	e := d.entries[id]
	if e == nil {
		e = &diskEntry{}
		d.entries[id] = e
	}
	e.busy++
	d.total += size // reserved while writing
	d.mu.Unlock()
	d.evicted(evicted)

	err := atomicdir.Write(d.dir, id, map[string][]byte{
		etagFile: []byte(version), store.ConfigFile: cfg, store.WeightsFile: weights,
	})

	d.mu.Lock()
	defer d.mu.Unlock()
	e.busy--
	if d.entries[id] != e { // removed meanwhile: the old bytes were already let go
		if err != nil {
			d.total -= size
			return err
		}
		d.entries[id] = e
		e.size = 0
	}
	if err != nil {
		d.total -= size
		if e.size == 0 && e.busy == 0 {
			delete(d.entries, id)
		}
		return err
	}
	d.total -= e.size // the old version's files are gone
	e.version, e.size, e.used = version, size, time.Now()
	return nil
}

// makeRoom removes least recently used entries not in use (and not id)
// until need more bytes fit the limit. ok is false when they cannot.
// d.mu is held.
func (d *diskCache) makeRoom(need int64, id string) (evicted []string, ok bool) {
	if d.limit <= 0 || d.total+need <= d.limit {
		return nil, true
	}
	var free int64 // what removing every unused entry would give back
	for k, e := range d.entries {
		if k != id && e.busy == 0 {
			free += e.size
		}
	}
	if d.total-free+need > d.limit {
		return nil, false // evicting would not be enough: keep them
	}
	for d.total+need > d.limit {
		var lruID string
		var lru *diskEntry
		for k, e := range d.entries {
			if k == id || e.busy > 0 {
				continue
			}
			if lru == nil || e.used.Before(lru.used) {
				lruID, lru = k, e
			}
		}
		if lru == nil {
			return evicted, false
		}
		if err := atomicdir.Remove(d.dir, lruID); err != nil && !errors.Is(err, fs.ErrNotExist) {
			d.log.Warn("loader: disk cache eviction failed", "id", lruID, "err", err)
			return evicted, false
		}
		delete(d.entries, lruID)
		d.total -= lru.size
		evicted = append(evicted, lruID)
		d.log.Debug("loader: disk cache evicted", "id", lruID, "bytes", lru.size, "cached_bytes", d.total, "limit", d.limit)
	}
	return evicted, true
}

func (d *diskCache) evicted(ids []string) {
	if len(ids) > 0 && d.onEvict != nil {
		d.onEvict(ids)
	}
}

func (d *diskCache) remove(id string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if e := d.entries[id]; e != nil {
		delete(d.entries, id)
		d.total -= e.size
	}
	if err := atomicdir.Remove(d.dir, id); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}
