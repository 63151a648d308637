package safetensors

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
)

// Set is a checkpoint spread over one or more files (a sharded checkpoint
// has model.safetensors.index.json mapping each tensor to its shard).
type Set struct {
	files  []*File
	byName map[string]*File
}

// OpenDir opens dir/model.safetensors, or the shards listed by
// dir/model.safetensors.index.json.
func OpenDir(dir string) (*Set, error) {
	idx := filepath.Join(dir, "model.safetensors.index.json")
	if b, err := os.ReadFile(idx); err == nil {
		return openIndexed(dir, idx, b)
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("safetensors: %w", err)
	}
	single := filepath.Join(dir, "model.safetensors")
	if _, err := os.Stat(single); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			if _, e2 := os.Stat(filepath.Join(dir, "pytorch_model.bin")); e2 == nil {
				return nil, fmt.Errorf("safetensors: %s holds pytorch_model.bin (pickle), which is not supported: convert it to safetensors", dir)
			}
			return nil, fmt.Errorf("safetensors: %s has neither model.safetensors nor model.safetensors.index.json: %w", dir, os.ErrNotExist)
		}
		return nil, fmt.Errorf("safetensors: %w", err)
	}
	f, err := Open(single)
	if err != nil {
		return nil, err
	}
	return NewSet(f), nil
}

// NewSet groups already opened files; a name found in several files is an error
// only when looked up ambiguously, so the first file wins.
func NewSet(files ...*File) *Set {
	s := &Set{files: files, byName: map[string]*File{}}
	for _, f := range files {
		for _, n := range f.Names() {
			if _, dup := s.byName[n]; !dup {
				s.byName[n] = f
			}
		}
	}
	return s
}

func openIndexed(dir, idxPath string, b []byte) (*Set, error) {
	var idx struct {
		WeightMap map[string]string `json:"weight_map"`
	}
	if err := json.Unmarshal(b, &idx); err != nil {
		return nil, fmt.Errorf("safetensors: %s: %w", idxPath, err)
	}
	if len(idx.WeightMap) == 0 {
		return nil, fmt.Errorf("safetensors: %s has an empty weight_map", idxPath)
	}
	shards := map[string]*File{}
	s := &Set{byName: map[string]*File{}}
	names := make([]string, 0, len(idx.WeightMap))
	for n := range idx.WeightMap {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		shard := idx.WeightMap[n]
		if shard != filepath.Base(shard) {
			s.Close()
			return nil, fmt.Errorf("safetensors: %s: shard name %q for %q must be a plain file name", idxPath, shard, n)
		}
		f, ok := shards[shard]
		if !ok {
			var err error
			f, err = Open(filepath.Join(dir, shard))
			if err != nil {
				s.Close()
				return nil, err
			}
			shards[shard] = f
			s.files = append(s.files, f)
		}
		if _, ok := f.Info(n); !ok {
			s.Close()
			return nil, fmt.Errorf("safetensors: index says %q is in %s, but it is not: %w", n, shard, ErrNotFound)
		}
		s.byName[n] = f
	}
	return s, nil
}

// Close closes every file.
func (s *Set) Close() error {
	var first error
	for _, f := range s.files {
		if err := f.Close(); err != nil && first == nil {
			first = err
		}
	}
	return first
}

// Names lists every tensor, sorted.
func (s *Set) Names() []string {
	out := make([]string, 0, len(s.byName))
	for n := range s.byName {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

// Info describes the named tensor.
func (s *Set) Info(name string) (Info, bool) {
	f, ok := s.byName[name]
	if !ok {
		return Info{}, false
	}
	return f.Info(name)
}

// Float32 returns the named tensor converted to float32.
func (s *Set) Float32(name string) ([]float32, Info, error) {
	f, ok := s.byName[name]
	if !ok {
		return nil, Info{}, fmt.Errorf("%w: %q", ErrNotFound, name)
	}
	return f.Float32(name)
}

// Bytes returns the raw data of the named tensor.
func (s *Set) Bytes(name string) ([]byte, Info, error) {
	f, ok := s.byName[name]
	if !ok {
		return nil, Info{}, fmt.Errorf("%w: %q", ErrNotFound, name)
	}
	return f.Bytes(name)
}
