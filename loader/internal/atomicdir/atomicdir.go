// Package atomicdir writes a folder of files so that readers see either the
// old folder or the new one, never a mix, and reads a folder consistently.
package atomicdir

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/peftd/peftd/internal/parallel"
)

// TempPrefix starts the names of the temporary folders Write makes next to
// the target; scanners skip names with it.
const TempPrefix = ".peftd-tmp-"

// Write replaces parent/name with a folder holding files (name -> content).
// On Linux the swap is one renameat2(RENAME_EXCHANGE); elsewhere the old
// folder is moved aside first, leaving a short window where name is missing.
func Write(parent, name string, files map[string][]byte) error {
	if err := os.MkdirAll(parent, 0o755); err != nil {
		return err
	}
	tmp, err := os.MkdirTemp(parent, TempPrefix+name+"-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp) // after a swap it holds the old folder
	for fn, b := range files {
		if err := writeFile(filepath.Join(tmp, fn), b); err != nil {
			return err
		}
	}
	if err := syncDir(tmp); err != nil {
		return err
	}
	dst := filepath.Join(parent, name)
	if fi, err := os.Lstat(dst); err == nil && fi.Mode()&os.ModeSymlink != 0 {
		// a link to a folder elsewhere (a folder store's adapter linked in):
		// the new folder replaces the link; what it pointed to stays
		if err := os.Remove(dst); err != nil {
			return err
		}
	}
	if err := os.Rename(tmp, dst); err == nil {
		return syncDir(parent)
	} else if !errors.Is(err, os.ErrExist) && !isNotEmpty(err) {
		return err
	}
	if err := exchange(tmp, dst); err != nil {
		return fmt.Errorf("atomicdir: replace %s: %w", dst, err)
	}
	return syncDir(parent)
}

func writeFile(path string, b []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	_ = d.Sync() // not every file system supports it
	return nil
}

// fallbackExchange moves dst aside, then tmp into place; tmp ends up holding
// the old folder so the caller's cleanup removes it.
func fallbackExchange(tmp, dst string) error {
	old := tmp + ".old"
	if err := os.Rename(dst, old); err != nil {
		return err
	}
	if err := os.Rename(tmp, dst); err != nil {
		_ = os.Rename(old, dst)
		return err
	}
	return os.Rename(old, tmp)
}

// Remove deletes parent/name by first renaming it aside (atomic for readers).
func Remove(parent, name string) error {
	dst := filepath.Join(parent, name)
	tmp := filepath.Join(parent, TempPrefix+name+"-del-"+randHex())
	if err := os.Rename(dst, tmp); err != nil {
		return err
	}
	return os.RemoveAll(tmp)
}

func randHex() string {
	var b [6]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// IsTemp reports whether a folder entry is one of Write's temporaries.
func IsTemp(name string) bool { return strings.HasPrefix(name, TempPrefix) }

// Limit bounds one file in Read; Max < 0 means no bound.
type Limit struct {
	Name string
	Max  int64
	// Progress, if set, is called as the file is read.
	Progress func(done, total int64)
}

// ErrTooLarge is returned (wrapped) when a file exceeds its Limit.
var ErrTooLarge = errors.New("file exceeds the size limit")

// Read opens parent/name once and reads files relative to that handle, so
// a concurrent Write (which swaps folders) cannot mix old and new files.
// It also returns the os.FileInfo of each file as read.
func Read(parent, name string, files ...Limit) ([][]byte, []os.FileInfo, error) {
	return retrySwapped(func() ([][]byte, []os.FileInfo, error) { return readOnce(parent, name, files) })
}

// swapRetries bounds how often a read restarts because a concurrent Write
// swapped the folder away and removed it while it was being read.
const swapRetries = 8

// retrySwapped reruns fn when it fails with a missing file: the folder it had
// opened may have been replaced and deleted meanwhile (the new one is then in
// place). A folder that is really gone fails on the open of the folder itself.
func retrySwapped(fn func() ([][]byte, []os.FileInfo, error)) ([][]byte, []os.FileInfo, error) {
	for i := 0; ; i++ {
		b, fi, err := fn()
		var swapped *swappedError
		if !errors.As(err, &swapped) || i == swapRetries {
			if swapped != nil {
				err = swapped.err
			}
			return b, fi, err
		}
	}
}

// swappedError marks a file missing from a folder that was opened fine.
type swappedError struct{ err error }

func (e *swappedError) Error() string { return e.err.Error() }
func (e *swappedError) Unwrap() error { return e.err }

func readOnce(parent, name string, files []Limit) ([][]byte, []os.FileInfo, error) {
	root, err := os.OpenRoot(filepath.Join(parent, name))
	if err != nil {
		return nil, nil, err
	}
	defer root.Close()
	out := make([][]byte, len(files))
	infos := make([]os.FileInfo, len(files))
	for i, l := range files {
		f, err := root.Open(l.Name)
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				err = &swappedError{err}
			}
			return nil, nil, err
		}
		fi, err := f.Stat()
		if err != nil {
			f.Close()
			return nil, nil, err
		}
		if l.Max >= 0 && fi.Size() > l.Max {
			f.Close()
			return nil, nil, fmt.Errorf("%w: %s is %d bytes, limit %d", ErrTooLarge, l.Name, fi.Size(), l.Max)
		}
		b, err := readFile(f, fi.Size(), l.Progress)
		f.Close()
		if err != nil {
			return nil, nil, fmt.Errorf("%s: %w", l.Name, err)
		}
		out[i], infos[i] = b, fi
	}
	return out, infos, nil
}

// Stat stats files in parent/name through one folder handle.
func Stat(parent, name string, files ...string) ([]os.FileInfo, error) {
	_, out, err := retrySwapped(func() ([][]byte, []os.FileInfo, error) {
		root, err := os.OpenRoot(filepath.Join(parent, name))
		if err != nil {
			return nil, nil, err
		}
		defer root.Close()
		out := make([]os.FileInfo, len(files))
		for i, fn := range files {
			if out[i], err = root.Stat(fn); err != nil {
				if errors.Is(err, os.ErrNotExist) {
					err = &swappedError{err}
				}
				return nil, nil, err
			}
		}
		return nil, out, nil
	})
	return out, err
}

const chunk = 4 << 20

// parallelMin is the size from which a file is read by positional reads on
// several goroutines: a cold adapter's load waits on the read, which is
// mostly copying from the page cache and faulting in the new buffer's
// pages, both of which scale with cores.
const parallelMin = 16 << 20

// readFile reads f, stated to be size bytes: in parallel ranges when large,
// then on to the end (a file that grew while being read is read whole).
func readFile(f *os.File, size int64, progress func(done, total int64)) ([]byte, error) {
	if size < parallelMin {
		return readAll(f, size, progress)
	}
	b := make([]byte, size)
	var done int64
	var mu sync.Mutex // guards done; progress is called by one goroutine at a time
	err := parallel.Ranges(int(size/chunk)+1, 1, func(lo, hi int) error {
		for c := lo; c < hi; c++ {
			off := int64(c) * chunk
			end := min(size, off+chunk)
			if off >= end {
				continue
			}
			n, err := f.ReadAt(b[off:end], off)
			if err != nil && !(errors.Is(err, io.EOF) && int64(n) == end-off) {
				return err
			}
			if progress != nil { // in order: the count and the call under one lock
				mu.Lock()
				done += int64(n)
				progress(done, size)
				mu.Unlock()
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	// anything past the stated size: a file that grew while we read
	if _, err := f.Seek(size, io.SeekStart); err != nil {
		return nil, err
	}
	rest, err := readAll(f, 0, nil)
	if err != nil {
		return nil, err
	}
	if len(rest) > 0 {
		b = append(b, rest...)
		if progress != nil {
			progress(int64(len(b)), size)
		}
	}
	return b, nil
}

func readAll(r io.Reader, size int64, progress func(done, total int64)) ([]byte, error) {
	b := make([]byte, 0, size)
	for {
		if len(b) == cap(b) {
			// The stated size is read: one small read tells the end from a
			// file that grew while we read (only then does b grow; growing
			// it to look would copy the whole file).
			var probe [512]byte
			n, err := r.Read(probe[:])
			if n > 0 {
				b = append(b, probe[:n]...)
				if progress != nil {
					progress(int64(len(b)), size)
				}
			}
			if err == io.EOF {
				return b, nil
			}
			if err != nil {
				return b, err
			}
			continue
		}
		end := min(cap(b), len(b)+chunk)
		n, err := r.Read(b[len(b):end])
		b = b[:len(b)+n]
		if progress != nil && n > 0 {
			progress(int64(len(b)), size)
		}
		if err == io.EOF {
			return b, nil
		}
		if err != nil {
			return b, err
		}
	}
}
