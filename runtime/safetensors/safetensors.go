// Package safetensors reads the safetensors format: an 8-byte little-endian
// header length, a JSON header describing each tensor, then the raw data.
// Files are memory-mapped where possible; every offset is validated before use.
package safetensors

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"sort"
)

// DType is a tensor element type as spelled in the header.
type DType string

// Element types this package understands.
const (
	F32  DType = "F32"
	F16  DType = "F16"
	BF16 DType = "BF16"
	F64  DType = "F64"
	I64  DType = "I64"
	I32  DType = "I32"
	I16  DType = "I16"
	I8   DType = "I8"
	U8   DType = "U8"
	BOOL DType = "BOOL"
	F8E4 DType = "F8_E4M3"
	F8E5 DType = "F8_E5M2"
)

// Size is the element size in bytes, or 0 for an unknown type.
func (d DType) Size() int {
	switch d {
	case F64, I64:
		return 8
	case F32, I32:
		return 4
	case F16, BF16, I16:
		return 2
	case I8, U8, BOOL, F8E4, F8E5:
		return 1
	}
	return 0
}

// Errors returned (wrapped) by this package.
var (
	ErrFormat = errors.New("safetensors: malformed file")
	// ErrTruncated: the file ends before the data its header describes
	// (errors matching it match ErrFormat too).
	ErrTruncated = errors.New("safetensors: truncated file")
	ErrNotFound  = errors.New("safetensors: tensor not found")
	ErrDType     = errors.New("safetensors: unsupported dtype")
)

// MaxHeaderSize bounds the JSON header (the reference implementation uses 100 MB).
const MaxHeaderSize = 100 << 20

// Info describes one tensor.
type Info struct {
	Name  string
	DType DType
	Shape []int
	Begin int64 // offset of the first byte within the data section
	End   int64
}

// NumElements is the product of the shape.
func (i Info) NumElements() int64 {
	n := int64(1)
	for _, d := range i.Shape {
		n *= int64(d)
	}
	return n
}

// File is an opened safetensors file.
type File struct {
	Path     string
	Metadata map[string]string
	tensors  map[string]Info
	names    []string
	data     []byte // the data section
	dataSize int64  // the end of the last tensor in the data section
	unmap    func() error
}

// Open memory-maps path and parses its header.
func Open(path string) (*File, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("safetensors: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("safetensors: %w", err)
	}
	buf, unmap, err := mapFile(f, st.Size())
	if err != nil {
		return nil, fmt.Errorf("safetensors: map %s: %w", path, err)
	}
	sf, err := Parse(buf)
	if err != nil {
		_ = unmap()
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	sf.Path = path
	sf.unmap = unmap
	return sf, nil
}

// FormatError is a malformed or truncated file. It matches ErrFormat, and
// ErrTruncated when the file ends before what its header describes.
type FormatError struct {
	Truncated bool
	Detail    string // what is wrong, without the package's prefix
}

func (e *FormatError) Error() string {
	if e.Truncated {
		return ErrTruncated.Error() + ": " + e.Detail
	}
	return ErrFormat.Error() + ": " + e.Detail
}

// Is matches ErrFormat, and ErrTruncated for a truncated file.
func (e *FormatError) Is(target error) bool {
	return target == ErrFormat || (e.Truncated && target == ErrTruncated)
}

func malformed(format string, args ...any) error {
	return &FormatError{Detail: fmt.Sprintf(format, args...)}
}

func truncated(format string, args ...any) error {
	return &FormatError{Truncated: true, Detail: fmt.Sprintf(format, args...)}
}

// Parse reads a safetensors file held in memory. The returned File aliases buf.
func Parse(buf []byte) (*File, error) {
	if len(buf) < 8 {
		return nil, truncated("%d bytes is shorter than the 8-byte header length", len(buf))
	}
	n := binary.LittleEndian.Uint64(buf)
	if n > MaxHeaderSize {
		return nil, malformed("header length %d exceeds the %d-byte limit", n, MaxHeaderSize)
	}
	if n > uint64(len(buf)-8) {
		return nil, truncated("header length %d runs past the end of the file (%d bytes)", n, len(buf))
	}
	f, err := parseHeader(buf[8 : 8+n])
	if err != nil {
		return nil, err
	}
	data := buf[8+n:]
	if f.dataSize > int64(len(data)) {
		return nil, truncated("the header describes %d bytes of tensor data, the file holds %d", f.dataSize, len(data))
	}
	f.data = data
	return f, nil
}

// ReadHeader reads the header length and the JSON header from r, refusing a
// header longer than maxHeader bytes (and MaxHeaderSize) before reading it.
// The File describes the tensors but holds no data: DataSize bytes of
// tensor data follow the header. prefix is what was read (the length and
// the header), the start of the file.
func ReadHeader(r io.Reader, maxHeader int64) (f *File, prefix []byte, err error) {
	var lb [8]byte
	if k, err := io.ReadFull(r, lb[:]); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, nil, truncated("%d bytes is shorter than the 8-byte header length", k)
		}
		return nil, nil, err
	}
	n := binary.LittleEndian.Uint64(lb[:])
	if limit := uint64(min(maxHeader, MaxHeaderSize)); n > limit {
		return nil, nil, malformed("header length %d exceeds the %d-byte limit", n, limit)
	}
	prefix = make([]byte, 8+n)
	copy(prefix, lb[:])
	if k, err := io.ReadFull(r, prefix[8:]); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, nil, truncated("header length %d runs past the end of the file (%d bytes)", n, 8+k)
		}
		return nil, nil, err
	}
	f, err = parseHeader(prefix[8:])
	if err != nil {
		return nil, nil, err
	}
	return f, prefix, nil
}

// DataSize is the length of the tensor data the header describes (the end
// of the last tensor).
func (f *File) DataSize() int64 { return f.dataSize }

// parseHeader checks the JSON header; the data section is not looked at.
func parseHeader(hdr []byte) (*File, error) {
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(hdr, &raw); err != nil {
		return nil, malformed("header JSON: %v", err)
	}
	f := &File{tensors: make(map[string]Info, len(raw))}
	type entry struct {
		DType   DType     `json:"dtype"`
		Shape   []int64   `json:"shape"`
		Offsets [2]uint64 `json:"data_offsets"`
	}
	for name, msg := range raw {
		if name == "__metadata__" {
			if err := json.Unmarshal(msg, &f.Metadata); err != nil {
				return nil, malformed("__metadata__: %v", err)
			}
			continue
		}
		var e entry
		if err := json.Unmarshal(msg, &e); err != nil {
			return nil, malformed("tensor %q: %v", name, err)
		}
		sz := e.DType.Size()
		if sz == 0 {
			return nil, fmt.Errorf("%w: tensor %q has dtype %q", ErrDType, name, e.DType)
		}
		begin, end := e.Offsets[0], e.Offsets[1]
		if begin > end {
			return nil, malformed("tensor %q has reversed offsets [%d,%d)", name, begin, end)
		}
		if end > math.MaxInt64 {
			return nil, malformed("tensor %q ends at byte %d", name, end)
		}
		elems := uint64(1)
		shape := make([]int, len(e.Shape))
		for i, d := range e.Shape {
			if d < 0 || d > math.MaxInt32 {
				return nil, malformed("tensor %q has dimension %d", name, d)
			}
			shape[i] = int(d)
			if d != 0 && elems > math.MaxInt64/uint64(d) {
				return nil, malformed("tensor %q shape %v overflows", name, e.Shape)
			}
			elems *= uint64(d)
		}
		if span := end - begin; span%uint64(sz) != 0 || elems != span/uint64(sz) {
			return nil, malformed("tensor %q shape %v of %s needs %d elements, offsets give %d bytes", name, e.Shape, e.DType, elems, span)
		}
		f.tensors[name] = Info{Name: name, DType: e.DType, Shape: shape, Begin: int64(begin), End: int64(end)}
		f.names = append(f.names, name)
		f.dataSize = max(f.dataSize, int64(end))
	}
	sort.Strings(f.names)
	// Tensors must not overlap.
	byOff := make([]Info, 0, len(f.tensors))
	for _, t := range f.tensors {
		if t.End > t.Begin {
			byOff = append(byOff, t)
		}
	}
	sort.Slice(byOff, func(i, j int) bool { return byOff[i].Begin < byOff[j].Begin })
	for i := 1; i < len(byOff); i++ {
		if byOff[i].Begin < byOff[i-1].End {
			return nil, malformed("tensors %q and %q overlap", byOff[i-1].Name, byOff[i].Name)
		}
	}
	return f, nil
}

// Close releases the mapping. Slices returned by Bytes are invalid afterwards.
func (f *File) Close() error {
	if f.unmap == nil {
		return nil
	}
	u := f.unmap
	f.unmap = nil
	f.data = nil
	return u()
}

// Names lists the tensors, sorted.
func (f *File) Names() []string { return f.names }

// Info describes the named tensor.
func (f *File) Info(name string) (Info, bool) {
	t, ok := f.tensors[name]
	return t, ok
}

// Bytes is the raw little-endian data of a tensor (aliases the mapping).
func (f *File) Bytes(name string) ([]byte, Info, error) {
	t, ok := f.tensors[name]
	if !ok {
		return nil, Info{}, fmt.Errorf("%w: %q", ErrNotFound, name)
	}
	return f.data[t.Begin:t.End], t, nil
}

// Float32 returns the tensor converted to float32 (F32, F16 and BF16 are accepted).
func (f *File) Float32(name string) ([]float32, Info, error) {
	b, t, err := f.Bytes(name)
	if err != nil {
		return nil, t, err
	}
	out := make([]float32, t.NumElements())
	if err := DecodeFloat32(out, b, t.DType); err != nil {
		return nil, t, fmt.Errorf("tensor %q: %w", name, err)
	}
	return out, t, nil
}

// Int64 returns an integer tensor (I64 or I32) as int64.
func (f *File) Int64(name string) ([]int64, Info, error) {
	b, t, err := f.Bytes(name)
	if err != nil {
		return nil, t, err
	}
	n := t.NumElements()
	out := make([]int64, n)
	switch t.DType {
	case I64:
		for i := range out {
			out[i] = int64(binary.LittleEndian.Uint64(b[8*i:]))
		}
	case I32:
		for i := range out {
			out[i] = int64(int32(binary.LittleEndian.Uint32(b[4*i:])))
		}
	default:
		return nil, t, fmt.Errorf("%w: tensor %q is %s, want I64 or I32", ErrDType, name, t.DType)
	}
	return out, t, nil
}

// DecodeFloat32 converts raw little-endian data of dtype dt into dst.
func DecodeFloat32(dst []float32, b []byte, dt DType) error {
	switch dt {
	case F32:
		for i := range dst {
			dst[i] = math.Float32frombits(binary.LittleEndian.Uint32(b[4*i:]))
		}
	case BF16:
		for i := range dst {
			dst[i] = math.Float32frombits(uint32(binary.LittleEndian.Uint16(b[2*i:])) << 16)
		}
	case F16:
		for i := range dst {
			dst[i] = HalfToFloat32(binary.LittleEndian.Uint16(b[2*i:]))
		}
	default:
		return fmt.Errorf("%w: %s (want F32, F16 or BF16)", ErrDType, dt)
	}
	return nil
}

// HalfToFloat32 converts an IEEE 754 binary16 value.
func HalfToFloat32(h uint16) float32 {
	sign := uint32(h>>15) << 31
	exp := uint32(h>>10) & 0x1f
	mant := uint32(h) & 0x3ff
	switch {
	case exp == 0 && mant == 0:
		return math.Float32frombits(sign)
	case exp == 0: // subnormal
		e := uint32(127 - 15 + 1)
		for mant&0x400 == 0 {
			mant <<= 1
			e--
		}
		mant &= 0x3ff
		return math.Float32frombits(sign | e<<23 | mant<<13)
	case exp == 0x1f:
		return math.Float32frombits(sign | 0xff<<23 | mant<<13)
	}
	return math.Float32frombits(sign | (exp+127-15)<<23 | mant<<13)
}
