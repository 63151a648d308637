package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/lora"
	"github.com/peftd/peftd/scheduler"
)

// Device places adapters in engine slots (scheduler.Scheduler implements it).
type Device interface {
	Load(ctx context.Context, slot int, a *lora.Adapter) error
	Unload(ctx context.Context, slot int) error
}

// DirCatalog is a Catalog over a local folder of PEFT adapter folders
// (root/ID/adapter_config.json + adapter_model.safetensors), and a
// scheduler.Residency that loads them into a fixed number of device slots,
// evicting the least recently used idle one. It stands in for the loader's
// tiered Manager in single-node setups and tests.
type DirCatalog struct {
	root  string
	base  *llama.Config
	slots int

	mu     sync.Mutex
	dev    Device
	slot   []*slotState // by slot
	stats  map[string]*adapterStats
	change chan struct{} // closed and replaced when a slot frees
}

type slotState struct {
	id      string
	version string
	refs    int
	loading bool
	stale   bool // the adapter changed or was deleted: no new leases
	used    time.Time
}

type adapterStats struct {
	invocations int64
	lastUsed    time.Time
}

// NewDirCatalog opens root (created if missing). SetDevice must be called
// before the first Acquire.
func NewDirCatalog(root string, base *llama.Config, slots int) (*DirCatalog, error) {
	if slots <= 0 {
		return nil, fmt.Errorf("api: %d adapter slots", slots)
	}
	if err := os.MkdirAll(root, 0o755); err != nil {
		return nil, err
	}
	return &DirCatalog{root: root, base: base, slots: slots, slot: make([]*slotState, slots),
		stats: map[string]*adapterStats{}, change: make(chan struct{})}, nil
}

// SetDevice sets where adapters are loaded (the scheduler, created after the catalog).
func (d *DirCatalog) SetDevice(dev Device) {
	d.mu.Lock()
	d.dev = dev
	d.mu.Unlock()
}

// Root is the store folder.
func (d *DirCatalog) Root() string { return d.root }

func (d *DirCatalog) dir(id string) string { return filepath.Join(d.root, id) }

func (d *DirCatalog) info(id string) (AdapterInfo, error) {
	if !ValidID(id) {
		return AdapterInfo{}, fmt.Errorf("%w: %q", ErrNotFound, id)
	}
	st, err := os.Stat(filepath.Join(d.dir(id), lora.WeightsFile))
	if err != nil {
		return AdapterInfo{}, fmt.Errorf("%w: %q", ErrNotFound, id)
	}
	cfgb, err := os.ReadFile(filepath.Join(d.dir(id), lora.ConfigFile))
	if err != nil {
		return AdapterInfo{}, fmt.Errorf("%w: %q", ErrNotFound, id)
	}
	var c struct {
		R int `json:"r"`
	}
	_ = json.Unmarshal(cfgb, &c)
	info := AdapterInfo{ID: id, Tier: "disk", Version: version(st), Rank: c.R, Bytes: st.Size(), Created: st.ModTime().UTC()}
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, s := range d.slot {
		if s != nil && s.id == id && !s.stale && !s.loading {
			info.Tier, info.Refcount = "device", s.refs
		}
	}
	if s := d.stats[id]; s != nil {
		info.Invocations, info.LastUsed = s.invocations, s.lastUsed
	}
	return info, nil
}

func version(st os.FileInfo) string {
	return fmt.Sprintf("%x-%x", st.ModTime().UnixNano(), st.Size())
}

// List returns every adapter in the folder, sorted by ID.
func (d *DirCatalog) List(ctx context.Context) ([]AdapterInfo, error) {
	ents, err := os.ReadDir(d.root)
	if err != nil {
		return nil, err
	}
	out := []AdapterInfo{}
	for _, e := range ents {
		if !e.IsDir() || !ValidID(e.Name()) {
			continue
		}
		if info, err := d.info(e.Name()); err == nil {
			out = append(out, info)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, nil
}

// Get describes one adapter.
func (d *DirCatalog) Get(ctx context.Context, id string) (AdapterInfo, error) { return d.info(id) }

// Put validates the adapter against the base model and writes it atomically.
func (d *DirCatalog) Put(ctx context.Context, id string, configJSON, weights []byte) error {
	if !ValidID(id) {
		return fmt.Errorf("%w: bad adapter ID %q", ErrInvalidAdapter, id)
	}
	if _, err := lora.Parse(id, configJSON, weights, d.base); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalidAdapter, err)
	}
	tmp, err := os.MkdirTemp(d.root, ".put-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	if err := os.WriteFile(filepath.Join(tmp, lora.ConfigFile), configJSON, 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(tmp, lora.WeightsFile), weights, 0o644); err != nil {
		return err
	}
	old := filepath.Join(d.root, fmt.Sprintf(".old-%s-%d", id, time.Now().UnixNano()))
	if err := os.Rename(d.dir(id), old); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	if err := os.Rename(tmp, d.dir(id)); err != nil {
		return err
	}
	os.RemoveAll(old)
	d.invalidate(id)
	return nil
}

// Delete removes an adapter; running requests finish on the loaded copy.
func (d *DirCatalog) Delete(ctx context.Context, id string) error {
	if _, err := d.info(id); err != nil {
		return err
	}
	if err := os.RemoveAll(d.dir(id)); err != nil {
		return err
	}
	d.invalidate(id)
	d.mu.Lock()
	delete(d.stats, id)
	d.mu.Unlock()
	return nil
}

// invalidate stops new leases on id's loaded copy; its slot frees when idle.
func (d *DirCatalog) invalidate(id string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for i, s := range d.slot {
		if s != nil && s.id == id {
			s.stale = true
			if s.refs == 0 && !s.loading {
				d.slot[i] = nil
			}
		}
	}
	d.signal()
}

func (d *DirCatalog) signal() {
	close(d.change)
	d.change = make(chan struct{})
}

type dirLease struct {
	d    *DirCatalog
	slot int
	ver  string
	once sync.Once
}

func (l *dirLease) Slot() int       { return l.slot }
func (l *dirLease) Version() string { return l.ver }
func (l *dirLease) Release() {
	l.once.Do(func() {
		d := l.d
		d.mu.Lock()
		defer d.mu.Unlock()
		s := d.slot[l.slot]
		s.refs--
		s.used = time.Now()
		if s.refs == 0 && s.stale {
			d.slot[l.slot] = nil
		}
		d.signal()
	})
}

// Acquire makes id resident in a device slot and leases it; it waits while
// every slot is in use by running requests.
func (d *DirCatalog) Acquire(ctx context.Context, id string) (scheduler.Lease, error) {
	for {
		d.mu.Lock()
		if d.dev == nil {
			d.mu.Unlock()
			return nil, errors.New("api: DirCatalog has no device")
		}
		found, free, lru := -1, -1, -1
		wait := false
		for i, s := range d.slot {
			switch {
			case s == nil:
				if free < 0 {
					free = i
				}
			case s.id == id && !s.stale:
				if s.loading {
					wait = true
				} else {
					found = i
				}
			case s.refs == 0 && !s.loading && (lru < 0 || s.used.Before(d.slot[lru].used)):
				lru = i
			}
		}
		if found >= 0 {
			s := d.slot[found]
			s.refs++
			s.used = time.Now()
			d.count(id)
			d.mu.Unlock()
			return &dirLease{d: d, slot: found, ver: s.version}, nil
		}
		if free < 0 {
			free = lru
		}
		if wait || free < 0 {
			ch := d.change
			d.mu.Unlock()
			select {
			case <-ch:
				continue
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}
		s := &slotState{id: id, refs: 1, loading: true, used: time.Now()}
		d.slot[free] = s
		dev := d.dev
		d.mu.Unlock()

		err := d.load(ctx, dev, free, id, s)
		d.mu.Lock()
		s.loading = false
		if err != nil {
			d.slot[free] = nil
			d.signal()
			d.mu.Unlock()
			return nil, err
		}
		d.count(id)
		d.signal()
		d.mu.Unlock()
		return &dirLease{d: d, slot: free, ver: s.version}, nil
	}
}

func (d *DirCatalog) count(id string) {
	st := d.stats[id]
	if st == nil {
		st = &adapterStats{}
		d.stats[id] = st
	}
	st.invocations++
	st.lastUsed = time.Now().UTC()
}

func (d *DirCatalog) load(ctx context.Context, dev Device, slot int, id string, s *slotState) error {
	if !ValidID(id) {
		return fmt.Errorf("%w %q", scheduler.ErrUnknownAdapter, id)
	}
	st, err := os.Stat(filepath.Join(d.dir(id), lora.WeightsFile))
	if err != nil {
		return fmt.Errorf("%w %q", scheduler.ErrUnknownAdapter, id)
	}
	a, err := lora.Load(d.dir(id), d.base)
	if err != nil {
		return err
	}
	s.version = version(st)
	return dev.Load(ctx, slot, a)
}
