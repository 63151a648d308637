package lora

import (
	"encoding/binary"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/peftd/peftd/runtime/safetensors"
)

// TestNonFinite: the word-at-a-time scan finds the first NaN or infinity
// of F32, F16 and BF16 data where converting every value finds it.
func TestNonFinite(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	exps := map[safetensors.DType]uint64{safetensors.F32: 0x7f800000_7f800000, safetensors.F16: 0x7c00_7c00_7c00_7c00, safetensors.BF16: 0x7f80_7f80_7f80_7f80}
	for dt, exp := range exps {
		size := dt.Size()
		for trial := range 2000 {
			n := rng.IntN(40)
			b := make([]byte, n*size)
			for i := range n {
				x := float32(rng.NormFloat64())
				if rng.IntN(4) == 0 {
					x = math.Float32frombits(rng.Uint32()) // any bits, finite or not
				}
				switch dt {
				case safetensors.F32:
					binary.LittleEndian.PutUint32(b[i*4:], math.Float32bits(x))
				case safetensors.BF16:
					binary.LittleEndian.PutUint16(b[i*2:], uint16(math.Float32bits(x)>>16))
				default:
					binary.LittleEndian.PutUint16(b[i*2:], uint16(rng.Uint32()))
				}
			}
			if n > 0 && trial%3 == 0 { // a NaN or an infinity at a random place
				bits := []uint64{exp, exp | 1, exp | 0x8000_0000_8000_8000}[rng.IntN(3)]
				k := rng.IntN(n)
				if size == 2 {
					binary.LittleEndian.PutUint16(b[k*2:], uint16(bits))
				} else {
					binary.LittleEndian.PutUint32(b[k*4:], uint32(bits))
				}
			}
			want := -1
			v := make([]float32, n)
			if err := safetensors.DecodeFloat32(v, b, dt); err != nil {
				t.Fatal(err)
			}
			for i, x := range v {
				if math.IsNaN(float64(x)) || math.IsInf(float64(x), 0) {
					want = i * size
					break
				}
			}
			if got := nonFinite(b, size, exp); got != want {
				t.Fatalf("%s %x: nonFinite %d, want %d", dt, b, got, want)
			}
		}
	}
}
