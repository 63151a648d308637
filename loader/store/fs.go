package store

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/peftd/peftd/loader/internal/atomicdir"
)

// FSOptions configure a folder store.
type FSOptions struct {
	// PollInterval is Watch's scan period (default 1s).
	PollInterval time.Duration
	Logger       *slog.Logger
}

// FS is a Store on a local folder: <root>/<id>/adapter_config.json and
// <root>/<id>/adapter_model.safetensors. Puts replace an adapter's folder
// atomically. ETags derive from each file's size, mtime and inode.
type FS struct {
	root   string
	opts   FSOptions
	badIDs sync.Map // folder names already reported as not adapter IDs
}

var _ Store = (*FS)(nil)

// NewFS opens (creating if needed) a folder store.
func NewFS(root string, opts FSOptions) (*FS, error) {
	if root == "" {
		return nil, errors.New("store: empty folder path")
	}
	if err := os.MkdirAll(root, 0o755); err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	if opts.PollInterval <= 0 {
		opts.PollInterval = time.Second
	}
	opts.Logger = orDefault(opts.Logger)
	return &FS{root: root, opts: opts}, nil
}

// Root is the store's folder.
func (s *FS) Root() string { return s.root }

func fileETag(fi os.FileInfo) string {
	return fmt.Sprintf("%x.%x.%x", fi.Size(), fi.ModTime().UnixNano(), inode(fi))
}

func objectOf(id string, cfg, w os.FileInfo) Object {
	mod := cfg.ModTime()
	if w.ModTime().After(mod) {
		mod = w.ModTime()
	}
	return Object{ID: id, ETag: CombineETag(fileETag(cfg), fileETag(w)), Size: cfg.Size() + w.Size(), Modified: mod}
}

// notFound maps a failed read of adapter id: missing files are
// ErrNotFound, unless the store's folder itself is gone or unreadable (an
// unmounted volume, a renamed folder): that is the store failing, not the
// adapter missing, and adapters must not be forgotten for it.
func (s *FS) notFound(id string, err error) error {
	if errors.Is(err, fs.ErrNotExist) {
		if rerr := s.rootErr(); rerr != nil {
			return rerr
		}
		return fmt.Errorf("%w: %s", ErrNotFound, id)
	}
	return fmt.Errorf("store: %s: %w", id, err)
}

// rootErr reports the store's folder missing, unreadable or not a folder.
func (s *FS) rootErr() error {
	f, err := os.Open(s.root)
	if err == nil {
		var fi os.FileInfo
		if fi, err = f.Stat(); err == nil && !fi.IsDir() {
			err = errors.New("not a folder")
		}
		f.Close()
	}
	if err != nil {
		return fmt.Errorf("store: the folder %s is unavailable: %w", s.root, err)
	}
	return nil
}

// listedHook, where set (tests), runs in List between reading the folder
// and reading its adapters' files.
var listedHook func(root string)

// List implements Store. A listing is whole or an error: where an adapter
// listed in the folder cannot be read and the folder itself is gone or
// unreadable by then (an unmounted volume, a renamed folder, between the
// folder's read and its adapters'), List reports the folder unavailable
// instead of the adapters it could still read, so that a watch or a
// loader's Sync does not take the rest for deleted.
func (s *FS) List(ctx context.Context) ([]Object, error) {
	ents, err := os.ReadDir(s.root)
	if err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	if listedHook != nil {
		listedHook(s.root)
	}
	var out []Object
	vanished := false
	for _, e := range ents {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		if !isFolder(s.root, e) || atomicdir.IsTemp(e.Name()) {
			continue
		}
		if err := ValidateID(e.Name()); err != nil {
			if _, seen := s.badIDs.LoadOrStore(e.Name(), true); !seen {
				s.opts.Logger.Warn("store: folder skipped: its name is not an adapter ID", "folder", filepath.Join(s.root, e.Name()), "err", err)
			}
			continue
		}
		fis, err := atomicdir.Stat(s.root, e.Name(), ConfigFile, WeightsFile)
		if err != nil {
			vanished = true
			continue // incomplete or vanished
		}
		out = append(out, objectOf(e.Name(), fis[0], fis[1]))
	}
	if vanished {
		if err := s.rootErr(); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// isFolder reports whether the entry e of root is a folder or a symbolic
// link to one (an adapter folder linked into the store counts).
func isFolder(root string, e os.DirEntry) bool {
	if e.IsDir() {
		return true
	}
	if e.Type()&os.ModeSymlink == 0 {
		return false
	}
	fi, err := os.Stat(filepath.Join(root, e.Name()))
	return err == nil && fi.IsDir()
}

// Stat implements Store.
func (s *FS) Stat(ctx context.Context, id string) (Object, error) {
	if err := ValidateID(id); err != nil {
		return Object{}, err
	}
	fis, err := atomicdir.Stat(s.root, id, ConfigFile, WeightsFile)
	if err != nil {
		return Object{}, s.notFound(id, err)
	}
	return objectOf(id, fis[0], fis[1]), nil
}

// Get implements Store.
func (s *FS) Get(ctx context.Context, id string, opts GetOptions) ([]byte, []byte, string, error) {
	if err := ValidateID(id); err != nil {
		return nil, nil, "", err
	}
	max := opts.MaxBytes
	if max <= 0 {
		max = -1
	}
	bs, fis, err := atomicdir.Read(s.root, id,
		atomicdir.Limit{Name: ConfigFile, Max: MaxConfigSize},
		atomicdir.Limit{Name: WeightsFile, Max: max, Progress: opts.Progress})
	if errors.Is(err, atomicdir.ErrTooLarge) {
		return nil, nil, "", fmt.Errorf("%w: %s: %v", ErrTooLarge, id, err)
	}
	if err != nil {
		return nil, nil, "", s.notFound(id, err)
	}
	return bs[0], bs[1], objectOf(id, fis[0], fis[1]).ETag, nil
}

// Put implements Store.
func (s *FS) Put(ctx context.Context, id string, config, weights []byte) (string, error) {
	if err := ValidateID(id); err != nil {
		return "", err
	}
	if err := atomicdir.Write(s.root, id, map[string][]byte{ConfigFile: config, WeightsFile: weights}); err != nil {
		return "", fmt.Errorf("store: put %s: %w", id, err)
	}
	o, err := s.Stat(ctx, id)
	return o.ETag, err
}

// Delete implements Store.
func (s *FS) Delete(ctx context.Context, id string) error {
	if err := ValidateID(id); err != nil {
		return err
	}
	if err := atomicdir.Remove(s.root, id); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("store: delete %s: %w", id, err)
	}
	return nil
}

// Watch implements Store by scanning the folder every PollInterval.
func (s *FS) Watch(ctx context.Context) <-chan Event {
	return pollWatch(ctx, s.opts.PollInterval, s.List, s.opts.Logger)
}

// Path is the folder of adapter id (for tools and tests).
func (s *FS) Path(id string) string { return filepath.Join(s.root, id) }
