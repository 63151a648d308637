package atomicfile

import (
	"os"
	"path/filepath"
	"testing"
)

// TestWrite: a new file in a folder that does not exist yet, then the same
// path overwritten, no temporary file left beside it; a path that is a
// folder fails and leaves nothing behind.
func TestWrite(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "a", "b", "f.json")
	for _, data := range []string{"first", "second, longer"} {
		if err := Write(p, []byte(data)); err != nil {
			t.Fatalf("Write %q: %v", data, err)
		}
		got, err := os.ReadFile(p)
		if err != nil || string(got) != data {
			t.Fatalf("read back %q, %v; want %q", got, err, data)
		}
	}
	if err := Write(filepath.Join(dir, "a"), []byte("x")); err == nil {
		t.Error("Write over a folder: no error")
	}
	for _, d := range []string{dir, filepath.Join(dir, "a"), filepath.Join(dir, "a", "b")} {
		ents, err := os.ReadDir(d)
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range ents {
			if e.Name() != "a" && e.Name() != "b" && e.Name() != "f.json" {
				t.Errorf("%s: left behind %s", d, e.Name())
			}
		}
	}
}
