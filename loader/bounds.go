package loader

import (
	"bufio"
	"bytes"
	"errors"
	"io/fs"
	"log/slog"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

// Defaults of the host and disk cache bounds derived from the machine
// (HostCacheBound, DiskCacheBound).
const (
	// CacheFraction of the memory (or disk space) left for adapters is
	// what a cache may take by default.
	CacheFraction = 0.5
	// HostMargin of the memory is kept for the rest of the process (Go
	// runtime, activations, request buffers) before the fraction applies.
	HostMargin = 0.1
	// MinHostCacheBytes and MinDiskCacheBytes are the floors: a small
	// machine still holds a few adapters.
	MinHostCacheBytes = 256 << 20
	MinDiskCacheBytes = 1 << 30
)

// Sources of a cache bound.
const (
	SourceFlag      = "flag"      // given explicitly
	SourceUnbounded = "unbounded" // explicitly no bound
	SourceCgroup    = "cgroup"    // the cgroup's memory limit (v2 memory.max or v1 memory.limit_in_bytes)
	SourceMeminfo   = "meminfo"   // MemAvailable in /proc/meminfo
	SourceStatfs    = "statfs"    // free space on the cache's file system
	SourceUnknown   = "unknown"   // nothing readable: the floor
)

// Bound is a cache bound and where it came from.
type Bound struct {
	Bytes  int64  // the bound; 0: none
	Source string // one of the Source* names
	// Avail is what the bound was derived from: the memory limit or
	// available memory, or the cache's disk space (free plus already cached).
	Avail int64
	// Reserved is what was set aside before the fraction applied: the base
	// model's host needs and the margin (host), or nothing (disk).
	Reserved int64
	// Floor reports that the floor applied.
	Floor bool
}

// cgroupUnlimited: cgroup v1 reports "no limit" as a huge number
// (PAGE_COUNTER_MAX pages, about 2^63).
const cgroupUnlimited = 1 << 62

// HostMemory returns the memory the process may use: the smallest cgroup
// memory limit on its cgroup's path (v2 memory.max, v1
// memory.limit_in_bytes; "max" is none), or MemAvailable from
// /proc/meminfo when that is smaller or there is no limit. root is the
// file system root (os.DirFS("/"); tests give another). ok is false when
// neither could be read.
func HostMemory(root fs.FS) (bytes int64, source string, ok bool) {
	limit, hasLimit := cgroupLimit(root)
	avail, hasAvail := memAvailable(root)
	switch {
	case hasLimit && (!hasAvail || limit <= avail):
		return limit, SourceCgroup, true
	case hasAvail:
		return avail, SourceMeminfo, true
	}
	return 0, SourceUnknown, false
}

// cgroupLimit reads the process's cgroup memory limit, v2 then v1: the
// smallest limit from its cgroup up to the root of the mounted hierarchy
// (in a container /proc/self/cgroup may name a path that is not mounted;
// the walk then reaches the mount's root, the container's own cgroup).
func cgroupLimit(root fs.FS) (int64, bool) {
	v2Path, v1Path := "/", "/"
	if b, err := fs.ReadFile(root, "proc/self/cgroup"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			parts := strings.SplitN(strings.TrimSpace(line), ":", 3)
			if len(parts) != 3 {
				continue
			}
			if parts[0] == "0" && parts[1] == "" {
				v2Path = parts[2]
			}
			for _, c := range strings.Split(parts[1], ",") {
				if c == "memory" {
					v1Path = parts[2]
				}
			}
		}
	}
	if v, ok := walkLimit(root, "sys/fs/cgroup", v2Path, "memory.max"); ok {
		return v, true
	}
	return walkLimit(root, "sys/fs/cgroup/memory", v1Path, "memory.limit_in_bytes")
}

func walkLimit(root fs.FS, mount, cg, file string) (int64, bool) {
	best, found := int64(0), false
	p := path.Clean("/" + cg)
	for {
		if b, err := fs.ReadFile(root, path.Join(mount, p, file)); err == nil {
			s := strings.TrimSpace(string(b))
			if v, err := strconv.ParseInt(s, 10, 64); err == nil && v > 0 && v < cgroupUnlimited && (!found || v < best) {
				best, found = v, true
			}
		}
		if p == "/" {
			return best, found
		}
		p = path.Dir(p)
	}
}

// memAvailable reads MemAvailable (kB) from /proc/meminfo.
func memAvailable(root fs.FS) (int64, bool) {
	b, err := fs.ReadFile(root, "proc/meminfo")
	if err != nil {
		return 0, false
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		name, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok || name != "MemAvailable" {
			continue
		}
		f := strings.Fields(rest)
		if len(f) == 0 {
			return 0, false
		}
		v, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil || v <= 0 {
			return 0, false
		}
		if len(f) > 1 && strings.EqualFold(f[1], "kB") {
			v *= 1024
		}
		return v, true
	}
	return 0, false
}

// HostCacheBound derives the host adapter cache bound from the machine:
// CacheFraction of what is left of HostMemory after baseHost (the base
// model's host needs) and HostMargin, at least floor (MinHostCacheBytes
// when floor <= 0).
func HostCacheBound(root fs.FS, baseHost, floor int64) Bound {
	if floor <= 0 {
		floor = MinHostCacheBytes
	}
	mem, src, ok := HostMemory(root)
	if !ok {
		return Bound{Bytes: floor, Source: SourceUnknown, Floor: true}
	}
	b := Bound{Source: src, Avail: mem, Reserved: max(baseHost, 0) + int64(float64(mem)*HostMargin)}
	b.Bytes = int64(float64(mem-b.Reserved) * CacheFraction)
	if b.Bytes < floor {
		b.Bytes, b.Floor = floor, true
	}
	return b
}

// DiskCacheBound derives the disk cache bound for dir: CacheFraction of
// the file system's free space plus what dir already holds, at least floor
// (MinDiskCacheBytes when floor <= 0) unless the space is smaller still.
func DiskCacheBound(dir string, floor int64) Bound {
	if floor <= 0 {
		floor = MinDiskCacheBytes
	}
	free, err := freeSpace(dir)
	if err != nil {
		return Bound{Bytes: floor, Source: SourceUnknown, Floor: true}
	}
	space := free + dirBytes(dir)
	b := Bound{Source: SourceStatfs, Avail: space, Bytes: int64(float64(space) * CacheFraction)}
	if f := min(floor, space); b.Bytes < f {
		b.Bytes, b.Floor = f, true
	}
	b.Bytes = max(b.Bytes, 1) // 0 would mean no bound
	return b
}

// freeSpace is the space available to unprivileged users on dir's file
// system (dir, else its nearest existing parent).
func freeSpace(dir string) (int64, error) {
	d := filepath.Clean(dir)
	for {
		n, err := statfsAvail(d)
		if err == nil || !errors.Is(err, fs.ErrNotExist) {
			return n, err
		}
		p := filepath.Dir(d)
		if p == d {
			return 0, err
		}
		d = p
	}
}

// dirBytes sums the regular files under dir (0 if it does not exist).
func dirBytes(dir string) int64 {
	var n int64
	_ = filepath.WalkDir(dir, func(_ string, e fs.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		if e.Type().IsRegular() {
			if fi, err := e.Info(); err == nil {
				n += fi.Size()
			}
		}
		return nil
	})
	return n
}

// warnEvery logs at Warn at most once per interval and at Debug between:
// a bound that is too small for the load says so without flooding the log.
type warnEvery struct {
	interval time.Duration
	last     atomic.Int64 // UnixNano of the last Warn
}

func (w *warnEvery) log(l *slog.Logger, msg string, args ...any) {
	now, last := time.Now().UnixNano(), w.last.Load()
	if (last == 0 || now-last >= int64(w.interval)) && w.last.CompareAndSwap(last, now) {
		l.Warn(msg, args...)
		return
	}
	l.Debug(msg, args...)
}
