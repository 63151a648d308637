//go:build cuda

package gpu

import (
	"math"
	"testing"

	"github.com/peftd/peftd/runtime/cuda"
)

// TestFP8Stream checks fp8_stream against fp8_gemv on the same quantized
// activations and weights (both sum sx sw qx qw in float32, in different
// orders, so outputs may differ by a bf16 rounding step) on the 8B shapes
// (every variant) at 1-16 rows: every output written, row M never, early
// and late weight tiles the same bits.
func TestFP8Stream(t *testing.T) {
	r := newFP8Rig(t)
	if d := r.ctx.Device(); d.Major*10+d.Minor < 89 {
		t.Skipf("%s has no FP8 tensor cores", d.Arch())
	}
	if r.f.stream == nil {
		t.Skip("fp8_stream does not fit this card's shared memory")
	}
	shapes := [][2]int{{6144, 4096}, {4096, 4096}, {28672, 4096}, {4096, 14336}}
	if testing.Short() {
		shapes = shapes[1:2]
	}
	for _, sh := range shapes {
		N, K := sh[0], sh[1]
		w, err := r.f.upload(r.bf16Rand(N*K, 0.02), N, K)
		if err != nil {
			t.Fatal(err)
		}
		x := r.up(r.bf16Rand(fp8StreamMaxRows*K, 1))
		out := r.alloc(2 * (fp8StreamMaxRows + 1) * N)
		for _, M := range []int{1, 2, 7, 15, 16} {
			p, ok := r.f.stream.plan(M, N, K)
			if !ok {
				t.Fatalf("%d x %d x %d: no plan", M, N, K)
			}
			run := func(on, late bool) []uint16 {
				poison := make([]uint16, (M+1)*N)
				for i := range poison {
					poison[i] = 0x7fc1
				}
				if err := cuda.CopyHtoD(r.s, out.Ptr(), poison); err != nil {
					t.Fatal(err)
				}
				r.f.streamOn, r.f.streamOff, r.f.streamLate = on, !on, late
				defer func() { r.f.streamOn, r.f.streamOff, r.f.streamLate = false, false, false }()
				r.f.invalidate()
				if err := r.f.linear(out.Ptr(), x.Ptr(), M, w, 1); err != nil {
					t.Fatal(err)
				}
				got := make([]uint16, (M+1)*N)
				if err := cuda.CopyDtoH(r.s, got, out.Ptr()); err != nil {
					t.Fatal(err)
				}
				r.sync()
				for i := M * N; i < len(got); i++ {
					if got[i] != 0x7fc1 {
						t.Fatalf("%d x %d x %d (stream %v): row M written at column %d", M, N, K, on, i-M*N)
					}
				}
				return got[:M*N]
			}
			want, got, late := run(false, false), run(true, false), run(true, true)
			scale, worst := 0.0, 0.0
			for _, v := range want {
				scale = max(scale, math.Abs(float64(fromBF16(v))))
			}
			for i := range want {
				a, b := float64(fromBF16(want[i])), float64(fromBF16(got[i]))
				if math.IsNaN(b) {
					t.Fatalf("%d x %d x %d (%d columns a block): output %d not written", M, N, K, fp8StreamBN[p.i], i)
				}
				if d := math.Abs(a - b); d > math.Max(math.Abs(a), math.Abs(b))/128+scale*1e-4 {
					t.Fatalf("%d x %d x %d (%d columns a block): output [%d,%d] is %g, fp8_gemv %g", M, N, K, fp8StreamBN[p.i], i/N, i%N, b, a)
				} else if a != 0 {
					worst = max(worst, d/math.Abs(a))
				}
				if late[i] != got[i] {
					t.Fatalf("%d x %d x %d: output %d differs without the early weight tiles", M, N, K, i)
				}
			}
			t.Logf("%d x %d x %d (%d columns a block): worst relative difference from fp8_gemv %.2g", M, N, K, fp8StreamBN[p.i], worst)
		}
	}
}
