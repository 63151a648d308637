package gpu

import (
	"encoding/binary"
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/peftd/peftd/runtime/safetensors"
)

// TestEncodeBF16Parallel: split over goroutines, the conversion gives what
// the serial one gives, for every dtype, and a size mismatch still fails.
func TestEncodeBF16Parallel(t *testing.T) {
	n := 3<<20 + 5
	rng := rand.New(rand.NewPCG(1, 2))
	for _, dt := range []safetensors.DType{safetensors.BF16, safetensors.F16, safetensors.F32} {
		raw := make([]byte, n*dt.Size())
		for i := 0; i < n; i++ {
			v := float32(rng.NormFloat64())
			switch dt {
			case safetensors.F32:
				binary.LittleEndian.PutUint32(raw[4*i:], math.Float32bits(v))
			default: // any 16-bit pattern is a value of either
				binary.LittleEndian.PutUint16(raw[2*i:], uint16(rng.Uint32()))
			}
		}
		want, got := make([]uint16, n), make([]uint16, n)
		if err := encodeBF16(want, raw, dt); err != nil {
			t.Fatal(err)
		}
		if err := encodeBF16Parallel(got, raw, dt); err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(got, want) {
			t.Errorf("%s: the parallel conversion differs", dt)
		}
		if err := encodeBF16Parallel(got[:n-1], raw, dt); err == nil {
			t.Errorf("%s: a size mismatch was converted", dt)
		}
	}
}
