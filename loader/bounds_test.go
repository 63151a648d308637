package loader_test

import (
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"testing/fstest"

	"github.com/peftd/peftd/loader"
)

const gib = int64(1) << 30

func files(kv ...string) fstest.MapFS {
	m := fstest.MapFS{}
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i]] = &fstest.MapFile{Data: []byte(kv[i+1])}
	}
	return m
}

func meminfo(availKB int64) string {
	return "MemTotal:       65536000 kB\nMemFree:         1000000 kB\nMemAvailable:   " +
		strconv.FormatInt(availKB, 10) + " kB\nBuffers:          100000 kB\n"
}

func TestHostMemory(t *testing.T) {
	const v1Unlimited = "9223372036854771712"
	for _, tc := range []struct {
		name   string
		fs     fstest.MapFS
		bytes  int64
		source string
		ok     bool
	}{
		{"v2 limit at the namespace root",
			files("proc/self/cgroup", "0::/\n", "sys/fs/cgroup/memory.max", "4294967296\n", "proc/meminfo", meminfo(32<<20)),
			4 * gib, loader.SourceCgroup, true},
		{"v2 max: meminfo",
			files("proc/self/cgroup", "0::/\n", "sys/fs/cgroup/memory.max", "max\n", "proc/meminfo", meminfo(8<<20)),
			8 * gib, loader.SourceMeminfo, true},
		{"v2 nested: the smallest limit up the path",
			files("proc/self/cgroup", "0::/kubepods/pod1/ctr\n",
				"sys/fs/cgroup/kubepods/pod1/ctr/memory.max", "max\n",
				"sys/fs/cgroup/kubepods/pod1/memory.max", "2147483648\n",
				"sys/fs/cgroup/kubepods/memory.max", "8589934592\n",
				"proc/meminfo", meminfo(32<<20)),
			2 * gib, loader.SourceCgroup, true},
		{"v2 path not mounted (container without cgroupns): the mount's root",
			files("proc/self/cgroup", "0::/system.slice/docker-abc.scope\n", "sys/fs/cgroup/memory.max", "1073741824", "proc/meminfo", meminfo(32<<20)),
			1 * gib, loader.SourceCgroup, true},
		{"limit above MemAvailable: meminfo",
			files("proc/self/cgroup", "0::/\n", "sys/fs/cgroup/memory.max", "68719476736\n", "proc/meminfo", meminfo(4<<20)),
			4 * gib, loader.SourceMeminfo, true},
		{"v1 limit",
			files("proc/self/cgroup", "12:cpu,cpuacct:/docker/x\n5:memory:/docker/x\n0::/\n",
				"sys/fs/cgroup/memory/docker/x/memory.limit_in_bytes", "3221225472\n", "proc/meminfo", meminfo(32<<20)),
			3 * gib, loader.SourceCgroup, true},
		{"v1 unlimited: meminfo",
			files("proc/self/cgroup", "5:memory:/\n", "sys/fs/cgroup/memory/memory.limit_in_bytes", v1Unlimited, "proc/meminfo", meminfo(6<<20)),
			6 * gib, loader.SourceMeminfo, true},
		{"no /proc/self/cgroup: root files still read",
			files("sys/fs/cgroup/memory/memory.limit_in_bytes", "536870912", "proc/meminfo", meminfo(6<<20)),
			512 << 20, loader.SourceCgroup, true},
		{"meminfo only", files("proc/meminfo", meminfo(1<<20)), 1 * gib, loader.SourceMeminfo, true},
		{"garbage", files("sys/fs/cgroup/memory.max", "lots", "proc/meminfo", "MemAvailable: many kB\n"), 0, loader.SourceUnknown, false},
		{"nothing", files(), 0, loader.SourceUnknown, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, src, ok := loader.HostMemory(tc.fs)
			if b != tc.bytes || src != tc.source || ok != tc.ok {
				t.Errorf("HostMemory = %d %s %v, want %d %s %v", b, src, ok, tc.bytes, tc.source, tc.ok)
			}
		})
	}
}

func TestHostCacheBound(t *testing.T) {
	v2 := func(limit string) fstest.MapFS {
		return files("proc/self/cgroup", "0::/\n", "sys/fs/cgroup/memory.max", limit, "proc/meminfo", meminfo(64<<20))
	}
	for _, tc := range []struct {
		name        string
		fs          fstest.MapFS
		base, floor int64
		want        loader.Bound
	}{
		// 10 GiB - 2 GiB base - 1 GiB margin = 7 GiB; half is 3.5 GiB.
		{"cgroup", v2("10737418240"), 2 * gib, 0,
			loader.Bound{Bytes: 7 * gib / 2, Source: loader.SourceCgroup, Avail: 10 * gib, Reserved: 3 * gib}},
		{"meminfo, no base", files("proc/meminfo", meminfo(10<<20)), 0, 0,
			loader.Bound{Bytes: 9 * gib / 2, Source: loader.SourceMeminfo, Avail: 10 * gib, Reserved: gib}},
		{"base larger than memory: floor", v2("1073741824"), 4 * gib, 0,
			loader.Bound{Bytes: loader.MinHostCacheBytes, Source: loader.SourceCgroup, Avail: gib, Reserved: 4*gib + gib/10, Floor: true}},
		{"given floor", v2("1073741824"), 0, gib,
			loader.Bound{Bytes: gib, Source: loader.SourceCgroup, Avail: gib, Reserved: gib / 10, Floor: true}},
		{"unknown: floor", files(), gib, 0,
			loader.Bound{Bytes: loader.MinHostCacheBytes, Source: loader.SourceUnknown, Floor: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := loader.HostCacheBound(tc.fs, tc.base, tc.floor)
			// The margin is a float fraction: allow rounding.
			if d := got.Bytes - tc.want.Bytes; d < -1 || d > 1 || got.Source != tc.want.Source || got.Avail != tc.want.Avail ||
				got.Floor != tc.want.Floor || abs(got.Reserved-tc.want.Reserved) > 1 {
				t.Errorf("HostCacheBound = %+v, want %+v", got, tc.want)
			}
		})
	}
}

func abs(n int64) int64 {
	if n < 0 {
		return -n
	}
	return n
}

func TestDiskCacheBound(t *testing.T) {
	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, "a"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "a", "w"), make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{dir, filepath.Join(dir, "not", "yet")} { // a missing folder: its parent's file system
		b := loader.DiskCacheBound(d, 0)
		if b.Source != loader.SourceStatfs || b.Avail <= 0 {
			t.Fatalf("DiskCacheBound(%s) = %+v", d, b)
		}
		want := max(int64(float64(b.Avail)*loader.CacheFraction), min(loader.MinDiskCacheBytes, b.Avail))
		if b.Bytes != want || b.Floor != (want > int64(float64(b.Avail)*loader.CacheFraction)) {
			t.Errorf("DiskCacheBound(%s) = %+v, want %d bytes", d, b, want)
		}
		t.Logf("%s: %+v", d, b)
	}
	// A floor larger than the file system: the space it has.
	b := loader.DiskCacheBound(dir, 1<<62)
	if !b.Floor || b.Bytes != b.Avail {
		t.Errorf("huge floor: %+v", b)
	}
}
