package cpu

import (
	"math"
	"math/rand/v2"
	"testing"
)

// TestDot checks dot and dot4 against a float64 reference for lengths around
// the vector width, and that dot4's rows equal dot bit for bit.
func TestDot(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	vec := func(n int) []float32 {
		v := make([]float32, n)
		for i := range v {
			v[i] = float32(rng.NormFloat64())
		}
		return v
	}
	for _, n := range []int{1, 3, 7, 8, 9, 15, 16, 17, 31, 64, 100, 172, 4096, 4099} {
		w := vec(n)
		rows := [4][]float32{vec(n), vec(n), vec(n), vec(n)}
		r := [4]float32{}
		r[0], r[1], r[2], r[3] = dot4(rows[0], rows[1], rows[2], rows[3], w)
		for k, a := range rows {
			var ref, mag float64
			for i := range a {
				ref += float64(a[i]) * float64(w[i])
				mag += math.Abs(float64(a[i]) * float64(w[i]))
			}
			d := dot(a, w)
			if d != r[k] {
				t.Fatalf("n=%d row %d: dot %v != dot4 %v (batch variance)", n, k, d, r[k])
			}
			if err := math.Abs(float64(d) - ref); err > 1e-5*mag+1e-6 {
				t.Errorf("n=%d: dot %v, float64 %v (error %g, magnitude %g)", n, d, ref, err, mag)
			}
		}
	}
	t.Logf("AVX2+FMA path: %v", useAVX)
}

func BenchmarkDot4(b *testing.B) {
	w := make([]float32, 4096)
	a := [4][]float32{make([]float32, 4096), make([]float32, 4096), make([]float32, 4096), make([]float32, 4096)}
	for i := range w {
		w[i] = float32(i % 7)
		for k := range a {
			a[k][i] = float32((i + k) % 5)
		}
	}
	b.SetBytes(5 * 4096 * 4)
	for b.Loop() {
		dot4(a[0], a[1], a[2], a[3], w)
	}
}
