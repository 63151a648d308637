package safetensors

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
	"sort"
)

// Tensor is one tensor to encode.
type Tensor struct {
	Name  string
	DType DType
	Shape []int
	Data  []byte
}

// F32Tensor builds a float32 Tensor.
func F32Tensor(name string, shape []int, v []float32) Tensor {
	b := make([]byte, 4*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(x))
	}
	return Tensor{Name: name, DType: F32, Shape: shape, Data: b}
}

// Encode serializes tensors (sorted by name) into the safetensors format.
func Encode(tensors []Tensor, metadata map[string]string) ([]byte, error) {
	ts := append([]Tensor(nil), tensors...)
	sort.Slice(ts, func(i, j int) bool { return ts[i].Name < ts[j].Name })
	hdr := map[string]any{}
	if len(metadata) > 0 {
		hdr["__metadata__"] = metadata
	}
	var off int
	for _, t := range ts {
		n := 1
		for _, d := range t.Shape {
			n *= d
		}
		if n*t.DType.Size() != len(t.Data) {
			return nil, fmt.Errorf("safetensors: tensor %q: shape %v of %s needs %d bytes, have %d", t.Name, t.Shape, t.DType, n*t.DType.Size(), len(t.Data))
		}
		shape := t.Shape
		if shape == nil {
			shape = []int{}
		}
		hdr[t.Name] = map[string]any{"dtype": t.DType, "shape": shape, "data_offsets": []int{off, off + len(t.Data)}}
		off += len(t.Data)
	}
	h, err := json.Marshal(hdr)
	if err != nil {
		return nil, err
	}
	for len(h)%8 != 0 {
		h = append(h, ' ')
	}
	out := make([]byte, 8, 8+len(h)+off)
	binary.LittleEndian.PutUint64(out, uint64(len(h)))
	out = append(out, h...)
	for _, t := range ts {
		out = append(out, t.Data...)
	}
	return out, nil
}
