package llama

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"strings"
	"sync/atomic"

	"github.com/peftd/peftd/internal/parallel"
	"github.com/peftd/peftd/runtime/safetensors"
)

// Quantization is config.json's quantization_config, as far as peftd reads
// it: FP8 (e4m3) projection weights with a float scale per output row or
// per tensor, as published for Llama 3.1 8B Instruct ("compressed-tensors",
// format float-quantized: the "FP8 dynamic" checkpoints), by Meta
// ("fbgemm_fp8") and by vLLM's tools ("fp8"). Each such weight W is stored
// as Q (F8_E4M3) with W = Q * weight_scale; activations are peftd's own
// concern (bf16, or quantized per token by --weights fp8).
type Quantization struct {
	QuantMethod  string                `json:"quant_method"`
	Format       string                `json:"format"`
	ConfigGroups map[string]quantGroup `json:"config_groups"`
}

type quantGroup struct {
	Weights *struct {
		NumBits  int    `json:"num_bits"`
		Type     string `json:"type"`
		Strategy string `json:"strategy"`
	} `json:"weights"`
}

// check refuses what peftd cannot load, saying what it is.
func (q *Quantization) check() error {
	switch q.QuantMethod {
	case "fbgemm_fp8", "fp8":
		return nil
	case "compressed-tensors":
		if q.Format != "float-quantized" {
			return fmt.Errorf("%w: quantization_config: compressed-tensors format %q is not supported (float-quantized: FP8 weights)", ErrConfig, q.Format)
		}
		for name, g := range q.ConfigGroups {
			w := g.Weights
			if w == nil {
				continue
			}
			if w.NumBits != 8 || w.Type != "float" || (w.Strategy != "channel" && w.Strategy != "tensor") {
				return fmt.Errorf("%w: quantization_config group %s: weights of %d-bit %s by %s are not supported (8-bit float by channel or tensor)",
					ErrConfig, name, w.NumBits, w.Type, w.Strategy)
			}
		}
		return nil
	}
	return fmt.Errorf("%w: quantization_config quant_method %q is not supported (FP8: compressed-tensors float-quantized, fbgemm_fp8, fp8)", ErrConfig, q.QuantMethod)
}

// ScaleName is the name of the scale tensor of an FP8 weight.
func ScaleName(weight string) string { return weight + "_scale" }

// checkFP8 verifies an F8_E4M3 weight of shape [rows, cols]: the config
// declares FP8 weights and its scale is there, one per row or one in all,
// in a float dtype.
func (c *Config) checkFP8(ts Tensors, name string, shape []int) error {
	if c.Quantization == nil {
		return fmt.Errorf("%w: %s is F8_E4M3 but config.json has no quantization_config", safetensors.ErrDType, name)
	}
	if len(shape) != 2 {
		return fmt.Errorf("%w: %s is F8_E4M3 with shape %v (FP8 is read for matrices only)", safetensors.ErrDType, name, shape)
	}
	info, ok := ts.Info(ScaleName(name))
	if !ok {
		return fmt.Errorf("%w: %s is F8_E4M3 but the checkpoint lacks %s", ErrShape, name, ScaleName(name))
	}
	switch info.DType {
	case safetensors.F32, safetensors.BF16, safetensors.F16:
	default:
		return fmt.Errorf("%w: %s has dtype %s (want F32, BF16 or F16)", safetensors.ErrDType, ScaleName(name), info.DType)
	}
	if n := info.NumElements(); n != 1 && n != int64(shape[0]) {
		return fmt.Errorf("%w: %s has shape %v: want one scale per row of %s (%d) or one in all", ErrShape, ScaleName(name), info.Shape, name, shape[0])
	}
	return nil
}

// ErrWeights: a weight holds values that cannot be computed with (a NaN
// e4m3 byte, a scale that is not finite).
var ErrWeights = errors.New("llama: bad weight values")

// Weight returns a tensor's bytes for a backend's Upload: as stored, or
// for an FP8 weight, dequantized (Q * scale, rounded to bf16) on several
// goroutines into a new buffer, with its Info saying BF16.
func (m *Model) Weight(name string) ([]byte, safetensors.Info, error) {
	raw, info, err := m.Tensors.Bytes(name)
	if err != nil || info.DType != safetensors.F8E4 {
		return raw, info, err
	}
	q, scale, err := m.fp8(name, raw, info)
	if err != nil {
		return nil, info, err
	}
	rows, cols := info.Shape[0], info.Shape[1]
	out := make([]byte, 2*len(q))
	dequantFP8(out, q, scale, rows, cols)
	info.DType = safetensors.BF16
	return out, info, nil
}

// FP8Weight returns an FP8 weight as stored, for a backend that computes
// with it in FP8: the e4m3 bytes q [rows, cols] and one scale per row (a
// per-tensor scale repeated), W = q * scale[row]. ok is false (and nothing
// is read) when the tensor is not F8_E4M3.
func (m *Model) FP8Weight(name string) (q []byte, scale []float32, rows, cols int, ok bool, err error) {
	info, found := m.Tensors.Info(name)
	if !found || info.DType != safetensors.F8E4 {
		return nil, nil, 0, 0, false, nil
	}
	raw, info, err := m.Tensors.Bytes(name)
	if err != nil {
		return nil, nil, 0, 0, false, err
	}
	if q, scale, err = m.fp8(name, raw, info); err != nil {
		return nil, nil, 0, 0, false, err
	}
	rows, cols = info.Shape[0], info.Shape[1]
	if len(scale) == 1 && rows > 1 {
		s := scale[0]
		scale = make([]float32, rows)
		for i := range scale {
			scale[i] = s
		}
	}
	return q, scale, rows, cols, true, nil
}

// fp8 checks an F8_E4M3 weight's bytes and reads its scales (one per row,
// or one in all): no NaN byte (0x7f, 0xff: e4m3 has no infinities), every
// scale finite.
func (m *Model) fp8(name string, raw []byte, info safetensors.Info) ([]byte, []float32, error) {
	scale, _, err := m.Tensors.Float32(ScaleName(name))
	if err != nil {
		return nil, nil, err
	}
	for i, s := range scale {
		if math.IsNaN(float64(s)) || math.IsInf(float64(s), 0) {
			return nil, nil, fmt.Errorf("%w: %s[%d] is %g", ErrWeights, ScaleName(name), i, s)
		}
	}
	var bad atomic.Int64
	bad.Store(-1)
	parallel.Ranges(len(raw), 1<<22, func(lo, hi int) error {
		for _, nan := range []byte{0x7f, 0xff} {
			if i := bytes.IndexByte(raw[lo:hi], nan); i >= 0 {
				bad.CompareAndSwap(-1, int64(lo+i))
			}
		}
		return nil
	})
	if i := bad.Load(); i >= 0 {
		return nil, nil, fmt.Errorf("%w: %s holds a NaN e4m3 byte (0x%02x) at element %d", ErrWeights, name, raw[i], i)
	}
	return raw, scale, nil
}

// dequantFP8 writes bf16(e4m3(q) * scale[row]) (or scale[0] for all rows)
// for q of rows x cols.
func dequantFP8(out, q []byte, scale []float32, rows, cols int) {
	parallel.Ranges(rows, 1, func(r0, r1 int) error {
		for r := r0; r < r1; r++ {
			s := scale[0]
			if len(scale) > 1 {
				s = scale[r]
			}
			for i := r * cols; i < (r+1)*cols; i++ {
				binary.LittleEndian.PutUint16(out[2*i:], safetensors.Float32ToBF16(e4m3[q[i]]*s))
			}
		}
		return nil
	})
}

// e4m3 is safetensors.E4M3ToFloat32 by code, for the dequantizing loop.
var e4m3 = func() (t [256]float32) {
	for b := range 256 {
		t[b] = safetensors.E4M3ToFloat32(byte(b))
	}
	return t
}()

// FP8Projection reports whether a backend running FP8 projections
// (--weights fp8) stores this uploaded tensor in e4m3: a decoder layer's
// 2-D projection weight whose input width is a multiple of 16 and output
// width a multiple of 8 (cuBLASLt 13.1 on the H100 refuses the FP8 product
// otherwise: K = 272, N = 1000 run; N = 100 and 97 are NOT_SUPPORTED).
// Everything else stays in the backend's own format. The CUDA backend and
// the CPU backend's emulation of the scheme share this choice, so that
// both quantize the same tensors.
func FP8Projection(name string, shape []int) bool {
	return len(shape) == 2 && strings.HasSuffix(name, "_proj.weight") && strings.Contains(name, "layers.") &&
		shape[0] > 0 && shape[1] > 0 && shape[1]%16 == 0 && shape[0]%8 == 0
}

// isProjection: FP8 is read for the projection weights only.
func isProjection(name string) bool {
	return strings.HasSuffix(name, "_proj.weight")
}
