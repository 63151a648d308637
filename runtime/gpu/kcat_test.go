package gpu

import (
	"math"
	"math/rand/v2"
	"testing"

	"github.com/peftd/peftd/runtime/safetensors"
)

func TestKCatFactor(t *testing.T) {
	for _, tc := range []struct {
		name    string
		b, sw   []float32
		rank    int
		want    float32
		wantErr bool
	}{
		{"at the bound", []float32{256, -1}, []float32{1}, 2, 1, false},
		{"just over", []float32{257, 0}, []float32{1}, 2, 2, false},
		{"small B", []float32{0.01, 0.002, -0.003, 0.001}, []float32{0.001, 0.0001}, 2, 1.0 / 8, false},  // max 30: 30/256 = 2^-3.1, up to 2^-3
		{"smaller B", []float32{0.001, 0.002, -0.003, 0.001}, []float32{0.1, 0.01}, 2, 1.0 / 512, false}, // max 0.3: 0.3/256 = 2^-9.7, up to 2^-9
		{"zero B", []float32{0, 0}, []float32{1, 2}, 1, 1, false},
		{"row scale 0", []float32{1}, []float32{0}, 1, 0, true},
		{"NaN B", []float32{float32(math.NaN())}, []float32{1}, 1, 0, true},
		{"shape", []float32{1, 2, 3}, []float32{1}, 2, 0, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f, err := kcatFactor(tc.b, tc.rank, tc.sw)
			if (err != nil) != tc.wantErr {
				t.Fatalf("error %v, want error %v", err, tc.wantErr)
			}
			if !tc.wantErr && f != tc.want {
				t.Fatalf("factor %g, want %g", f, tc.want)
			}
		})
	}
}

// TestKCatExtension: B' dequantized (times sw[n] * f) is B within e4m3's
// rounding, columns past the rank and outside the slice's are untouched
// or 0, and no value saturates.
func TestKCatExtension(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	const out, rank, R, ld, col = 64, 24, 32, 200, 96
	b := make([]float32, out*rank)
	sw := make([]float32, out)
	for n := range sw {
		sw[n] = float32(0.0002 + 0.001*rng.Float64())
		for j := 0; j < rank; j++ {
			b[n*rank+j] = float32(rng.NormFloat64() * 0.02)
		}
	}
	f, err := kcatFactor(b, rank, sw)
	if err != nil {
		t.Fatal(err)
	}
	ext := make([]byte, out*ld)
	for i := range ext {
		ext[i] = 0x55
	}
	if err := kcatExtension(ext, ld, col, R, b, rank, sw, f); err != nil {
		t.Fatal(err)
	}
	var top float64
	for n := 0; n < out; n++ {
		for j := 0; j < ld; j++ {
			v := ext[n*ld+j]
			switch {
			case j < col || j >= col+R:
				if v != 0x55 {
					t.Fatalf("row %d column %d outside the slice written: %#x", n, j, v)
				}
			case j >= col+rank:
				if v != 0 {
					t.Fatalf("row %d column %d past the rank: %#x, want 0", n, j, v)
				}
			default:
				d := float64(safetensors.E4M3ToFloat32(v))
				top = max(top, math.Abs(d))
				got := d * float64(sw[n]) * float64(f)
				want := float64(b[n*rank+j-col])
				// e4m3: 3 mantissa bits (half an ulp 2^-4 relative) for
				// normal values, 2^-10 absolute below 2^-6
				if math.Abs(got-want) > math.Abs(want)/16+math.Exp2(-10)*float64(sw[n])*float64(f) {
					t.Fatalf("row %d rank %d: %g from %#x, want %g", n, j-col, got, v, want)
				}
			}
		}
	}
	if top > kcatBMax || top <= kcatBMax/2 {
		t.Fatalf("largest |B'| %g, want (%d, %d]", top, kcatBMax/2, kcatBMax)
	}
	if err := kcatExtension(ext, ld, ld-R+1, R, b, rank, sw, f); err == nil {
		t.Fatal("an extension past the row: no error")
	}
}
