// Package atomicfile writes files that a reader sees whole or not at all.
package atomicfile

import (
	"os"
	"path/filepath"
)

// Write puts data at path through a temporary file in the same folder
// (made if missing) renamed over it, so a reader never sees half a file;
// on failure the temporary file is removed and path is left as it was.
func Write(path string, data []byte) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	f, err := os.CreateTemp(dir, ".tmp-*")
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), path)
	}
	if err != nil {
		os.Remove(f.Name())
	}
	return err
}
