package safetensors

import (
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func header(json string, data int) []byte {
	b := make([]byte, 8+len(json)+data)
	binary.LittleEndian.PutUint64(b, uint64(len(json)))
	copy(b[8:], json)
	return b
}

func TestRoundTrip(t *testing.T) {
	enc, err := Encode([]Tensor{
		F32Tensor("b", []int{2, 2}, []float32{1, 2, 3, 4}),
		{Name: "a", DType: BF16, Shape: []int{3}, Data: []byte{0x80, 0x3f, 0x00, 0xc0, 0x49, 0x40}},
		{Name: "h", DType: F16, Shape: []int{2}, Data: []byte{0x00, 0x3c, 0x01, 0x00}},
	}, map[string]string{"format": "pt"})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	p := filepath.Join(dir, "model.safetensors")
	if err := os.WriteFile(p, enc, 0o644); err != nil {
		t.Fatal(err)
	}
	s, err := OpenDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if got := strings.Join(s.Names(), ","); got != "a,b,h" {
		t.Fatalf("names %s", got)
	}
	for _, tc := range []struct {
		name string
		want []float32
	}{
		{"b", []float32{1, 2, 3, 4}},
		{"a", []float32{1, -2, 3.140625}},
		{"h", []float32{1, 5.960464477539063e-08}},
	} {
		got, _, err := s.Float32(tc.name)
		if err != nil {
			t.Fatal(err)
		}
		for i := range tc.want {
			if got[i] != tc.want[i] {
				t.Errorf("%s[%d] = %g, want %g", tc.name, i, got[i], tc.want[i])
			}
		}
	}
	if _, _, err := s.Float32("missing"); !errors.Is(err, ErrNotFound) {
		t.Errorf("missing tensor: %v", err)
	}
}

func TestSharded(t *testing.T) {
	dir := t.TempDir()
	for i, name := range []string{"x", "y"} {
		enc, _ := Encode([]Tensor{F32Tensor(name, []int{1}, []float32{float32(i)})}, nil)
		os.WriteFile(filepath.Join(dir, name+".safetensors"), enc, 0o644)
	}
	os.WriteFile(filepath.Join(dir, "model.safetensors.index.json"), []byte(`{"weight_map":{"x":"x.safetensors","y":"y.safetensors"}}`), 0o644)
	s, err := OpenDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	v, _, err := s.Float32("y")
	if err != nil || v[0] != 1 {
		t.Fatalf("y = %v, %v", v, err)
	}
	os.WriteFile(filepath.Join(dir, "model.safetensors.index.json"), []byte(`{"weight_map":{"x":"y.safetensors"}}`), 0o644)
	if _, err := OpenDir(dir); !errors.Is(err, ErrNotFound) {
		t.Fatalf("wrong shard: %v", err)
	}
	os.WriteFile(filepath.Join(dir, "model.safetensors.index.json"), []byte(`{"weight_map":{"x":"../x.safetensors"}}`), 0o644)
	if _, err := OpenDir(dir); err == nil {
		t.Fatal("path traversal in shard name accepted")
	}
}

func TestMalformed(t *testing.T) {
	for _, tc := range []struct {
		name string
		buf  []byte
		want string
	}{
		{"short", []byte{1, 2}, "shorter than"},
		{"huge header", func() []byte { b := make([]byte, 16); binary.LittleEndian.PutUint64(b, 1<<60); return b }(), "exceeds"},
		{"header past end", func() []byte { b := make([]byte, 16); binary.LittleEndian.PutUint64(b, 100); return b }(), "past the end"},
		{"bad json", header(`{"a":`, 0), "header JSON"},
		{"offsets past end", header(`{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}`, 4), "truncated"},
		{"size mismatch", header(`{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}`, 8), "needs 3 elements"},
		{"huge shape", header(`{"a":{"dtype":"F32","shape":[1152921504606846976,16],"data_offsets":[0,8]}}`, 8), "dimension"},
		{"overflow shape", header(`{"a":{"dtype":"F32","shape":[2147483647,2147483647,2147483647],"data_offsets":[0,8]}}`, 8), "overflows"},
		{"overlap", header(`{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}`, 12), "overlap"},
		{"dtype", header(`{"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}}`, 8), "dtype"},
		{"reversed", header(`{"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}}`, 8), "reversed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse(tc.buf)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want it to mention %q", err, tc.want)
			}
		})
	}
}

func TestOpenErrors(t *testing.T) {
	dir := t.TempDir()
	if _, err := OpenDir(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("empty dir: %v", err)
	}
	os.WriteFile(filepath.Join(dir, "pytorch_model.bin"), []byte("x"), 0o644)
	if _, err := OpenDir(dir); err == nil || !strings.Contains(err.Error(), "pickle") {
		t.Errorf("pickle: %v", err)
	}
	enc, _ := Encode([]Tensor{F32Tensor("a", []int{4}, make([]float32, 4))}, nil)
	p := filepath.Join(dir, "model.safetensors")
	os.WriteFile(p, enc[:len(enc)-3], 0o644)
	if _, err := Open(p); !errors.Is(err, ErrFormat) {
		t.Errorf("truncated: %v", err)
	}
}

func FuzzParse(f *testing.F) {
	enc, _ := Encode([]Tensor{F32Tensor("a", []int{2}, []float32{1, 2}), F32Tensor("b", []int{1, 1}, []float32{3})}, map[string]string{"k": "v"})
	f.Add(enc)
	f.Add(header(`{"a":{"dtype":"F32","shape":[1152921504606846976],"data_offsets":[0,8]}}`, 8))
	f.Add(header(`{"a":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]},"b":{"dtype":"F16","shape":[2],"data_offsets":[2,6]}}`, 6))
	f.Fuzz(func(t *testing.T, b []byte) {
		file, err := Parse(b)
		if err != nil {
			return
		}
		for _, n := range file.Names() {
			info, _ := file.Info(n)
			if info.End > int64(len(b)) {
				t.Fatalf("tensor %q ends past the buffer", n)
			}
			if info.DType == F32 || info.DType == F16 || info.DType == BF16 {
				if _, _, err := file.Float32(n); err != nil {
					t.Fatal(err)
				}
			}
		}
	})
}
