package safetensors

import (
	"math"
	"math/rand/v2"
	"testing"
)

func TestBF16(t *testing.T) {
	for _, c := range []struct {
		in   float32
		want uint16
	}{{1, 0x3f80}, {-2, 0xc000}, {0, 0}, {1.00390625, 0x3f80}, {1.01171875, 0x3f82}, {3.4028235e38, 0x7f80}} {
		if got := Float32ToBF16(c.in); got != c.want {
			t.Errorf("Float32ToBF16(%v) = %#x, want %#x", c.in, got, c.want)
		}
	}
}

// The e4m3 codec: every finite code round-trips; rounding, saturation, NaN.
func TestE4M3Codec(t *testing.T) {
	for c := 0; c < 256; c++ {
		v := E4M3ToFloat32(byte(c))
		if c&0x7f == 0x7f {
			if !math.IsNaN(float64(v)) {
				t.Errorf("code %#x: %v, want NaN", c, v)
			}
			continue
		}
		if got := Float32ToE4M3(v); got != byte(c) && !(v == 0 && got&0x7f == 0) {
			t.Errorf("code %#x (%v) re-encodes to %#x", c, v, got)
		}
	}
	for _, x := range []struct {
		v    float32
		want byte
	}{{448, 0x7e}, {460, 0x7e}, {1000, 0x7e}, {-1000, 0xfe}, {1.0625, 0x38}, {1.1875, 0x3a}, {0.5 / 512, 0}, {0.51 / 512, 1}, {float32(math.NaN()), 0x7f}} {
		if got := Float32ToE4M3(x.v); got != x.want {
			t.Errorf("%v -> %#x, want %#x", x.v, got, x.want)
		}
	}
}

// TestRoundE4M3 compares the bit-twiddling rounding with the search-based
// codec on every e4m3 value, every midpoint between neighbours (the ties)
// and the values a float32 step either side, and on random values over the
// whole range, saturation and subnormals included.
func TestRoundE4M3(t *testing.T) {
	check := func(v float32) {
		t.Helper()
		want := E4M3ToFloat32(Float32ToE4M3(v))
		if got := RoundE4M3(v); got != want && !(got != got && want != want) {
			t.Fatalf("RoundE4M3(%g) = %g, want %g", v, got, want)
		}
	}
	var vals []float32
	for c := 0; c < 127; c++ {
		vals = append(vals, E4M3ToFloat32(byte(c)))
	}
	vals = append(vals, 480, 464, 500, 1e30, float32(math.Inf(1)), float32(math.NaN()), 1e-30, 0)
	for i, v := range vals {
		for _, x := range []float32{v, math.Nextafter32(v, 0), math.Nextafter32(v, 1e38)} {
			check(x)
			check(-x)
		}
		if i+1 < 127 {
			m := (v + vals[i+1]) / 2
			for _, x := range []float32{m, math.Nextafter32(m, 0), math.Nextafter32(m, 1e38)} {
				check(x)
				check(-x)
			}
		}
	}
	r := rand.New(rand.NewPCG(5, 6))
	for range 200_000 {
		check(float32(math.Ldexp(r.Float64()*2-1, r.IntN(24)-14)))
	}
}
