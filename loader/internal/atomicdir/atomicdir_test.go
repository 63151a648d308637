package atomicdir

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

func pattern(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*31 + i>>16)
	}
	return b
}

// TestWriteRead round-trips folders whose files take the sequential path
// (small) and the parallel one (>= parallelMin, not a multiple of the
// chunk), checks the progress reports, and the size limit.
func TestWriteRead(t *testing.T) {
	dir := t.TempDir()
	for _, n := range []int{0, 1, 5 << 20, parallelMin, parallelMin + 3, 3*parallelMin + chunk/2} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			want := pattern(n)
			if err := Write(dir, "a", map[string][]byte{"w": want, "c": []byte("{}")}); err != nil {
				t.Fatal(err)
			}
			var last, calls int64
			mono := true
			got, infos, err := Read(dir, "a", Limit{Name: "c", Max: 10}, Limit{Name: "w", Max: -1, Progress: func(done, total int64) {
				if done < last || total != int64(n) {
					mono = false
				}
				last = done
				calls++
			}})
			if err != nil {
				t.Fatal(err)
			}
			if string(got[0]) != "{}" || !bytes.Equal(got[1], want) || infos[1].Size() != int64(n) {
				t.Fatalf("read back %d bytes (want %d), config %q", len(got[1]), n, got[0])
			}
			if n > 0 && (!mono || last != int64(n) || calls == 0) {
				t.Errorf("progress: %d calls, last %d of %d, monotonic %v", calls, last, n, mono)
			}
			if _, _, err := Read(dir, "a", Limit{Name: "w", Max: int64(n) - 1}); n > 0 && !errors.Is(err, ErrTooLarge) {
				t.Errorf("a limit one byte short: %v, want ErrTooLarge", err)
			}
		})
	}
}

// TestReadGrown reads files that are larger than their stated size (they
// grew after the stat): both paths return every byte.
func TestReadGrown(t *testing.T) {
	for _, n := range []int{100, parallelMin + 5000} {
		p := filepath.Join(t.TempDir(), "f")
		want := pattern(n)
		if err := os.WriteFile(p, want, 0o644); err != nil {
			t.Fatal(err)
		}
		for _, stated := range []int64{int64(n) - 1, int64(n) / 2, int64(n)} {
			f, err := os.Open(p)
			if err != nil {
				t.Fatal(err)
			}
			got, err := readFile(f, stated, nil)
			f.Close()
			if err != nil || !bytes.Equal(got, want) {
				t.Errorf("%d bytes stated as %d: got %d bytes, err %v", n, stated, len(got), err)
			}
		}
	}
}

// TestWriteOverLink: writing a folder whose name is a symbolic link to a
// folder elsewhere replaces the link with the new folder and leaves what
// it pointed to as it was.
func TestWriteOverLink(t *testing.T) {
	dir, elsewhere := t.TempDir(), filepath.Join(t.TempDir(), "linked")
	if err := Write(filepath.Dir(elsewhere), "linked", map[string][]byte{"w": []byte("old")}); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(elsewhere, filepath.Join(dir, "a")); err != nil {
		t.Fatal(err)
	}
	if err := Write(dir, "a", map[string][]byte{"w": []byte("new")}); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Lstat(filepath.Join(dir, "a")); err != nil || !fi.IsDir() {
		t.Fatalf("after the write: %v, %v; want a folder", fi, err)
	}
	if b, err := os.ReadFile(filepath.Join(dir, "a", "w")); err != nil || string(b) != "new" {
		t.Errorf("new folder: %q, %v", b, err)
	}
	if b, err := os.ReadFile(filepath.Join(elsewhere, "w")); err != nil || string(b) != "old" {
		t.Errorf("the linked folder: %q, %v; want it untouched", b, err)
	}
}
