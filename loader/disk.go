package loader

import (
	"errors"
	"io/fs"
	"os"

	"github.com/peftd/peftd/loader/internal/atomicdir"
	"github.com/peftd/peftd/loader/store"
)

// diskCache keeps the newest fetched version of each adapter in
// <dir>/<id>/ with the store ETag it came from; an entry is used only
// when that ETag is the one asked for.
type diskCache struct{ dir string }

const etagFile = "etag"

func newDiskCache(dir string) (*diskCache, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	return &diskCache{dir: dir}, nil
}

// has reports whether the entry for id is at version.
func (d *diskCache) has(id, version string) bool {
	b, _, err := atomicdir.Read(d.dir, id, atomicdir.Limit{Name: etagFile, Max: 1024})
	return err == nil && string(b[0]) == version
}

func (d *diskCache) get(id, version string, maxBytes int64) (cfg, weights []byte, ok bool) {
	if maxBytes <= 0 {
		maxBytes = -1
	}
	bs, _, err := atomicdir.Read(d.dir, id,
		atomicdir.Limit{Name: etagFile, Max: 1024},
		atomicdir.Limit{Name: store.ConfigFile, Max: store.MaxConfigSize},
		atomicdir.Limit{Name: store.WeightsFile, Max: maxBytes})
	if err != nil || string(bs[0]) != version {
		return nil, nil, false
	}
	return bs[1], bs[2], true
}

func (d *diskCache) put(id, version string, cfg, weights []byte) error {
	return atomicdir.Write(d.dir, id, map[string][]byte{
		etagFile: []byte(version), store.ConfigFile: cfg, store.WeightsFile: weights,
	})
}

func (d *diskCache) remove(id string) error {
	if err := atomicdir.Remove(d.dir, id); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}
