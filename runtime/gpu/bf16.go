package gpu

import (
	"encoding/binary"
	"fmt"
	"math"

	"github.com/peftd/peftd/runtime/safetensors"
)

func fromBF16(h uint16) float32 { return math.Float32frombits(uint32(h) << 16) }

// encodeBF16 converts a raw little-endian tensor to bf16 values.
func encodeBF16(dst []uint16, raw []byte, dt safetensors.DType) error {
	n := len(dst)
	if len(raw) != n*dt.Size() || dt.Size() == 0 {
		return fmt.Errorf("%w: %d bytes of %s for %d values", safetensors.ErrDType, len(raw), dt, n)
	}
	switch dt {
	case safetensors.BF16:
		if littleEndian {
			copy(asBytes(dst), raw)
			break
		}
		for i := range dst {
			dst[i] = binary.LittleEndian.Uint16(raw[2*i:])
		}
	case safetensors.F16:
		for i := range dst {
			dst[i] = safetensors.Float32ToBF16(safetensors.HalfToFloat32(binary.LittleEndian.Uint16(raw[2*i:])))
		}
	case safetensors.F32:
		for i := range dst {
			dst[i] = safetensors.Float32ToBF16(math.Float32frombits(binary.LittleEndian.Uint32(raw[4*i:])))
		}
	default:
		return fmt.Errorf("%w: %s (want F32, F16 or BF16)", safetensors.ErrDType, dt)
	}
	return nil
}

func f32ToBF16(dst []uint16, src []float32) {
	for i, v := range src {
		dst[i] = safetensors.Float32ToBF16(v)
	}
}
