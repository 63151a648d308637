//go:build cuda

package gpu

import (
	"fmt"
	"testing"
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
	// the 8B shapes, then short K ranges at the edges of the stage ring
	// (fewer tiles than the prologue issues, as many, one more): n48 (ST
	// 5) with 2, 4 and 5 tiles, n32 (ST 7) with 3, 6 and 7, n224 (ST 6)
	// with 2, 5 and 6
	shapes := [][2]int{{6144, 4096}, {4096, 4096}, {28672, 4096}, {4096, 14336},
		{6144, 1024}, {6144, 2048}, {6144, 2560}, {4096, 1536}, {4096, 3072}, {4096, 3584}, {28672, 256}, {28672, 640}, {28672, 768}}
	if testing.Short() {
		shapes = shapes[1:2]
	}
	defer func() {
		r.f.streamOn, r.f.streamOff, r.f.streamLate = false, false, false
	}()
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
				r.f.streamOn, r.f.streamOff, r.f.streamLate = on, !on, late
				r.f.invalidate()
				return rowsProduct(t, r, out, M, N, func() error { return r.f.linear(out.Ptr(), x.Ptr(), M, w, 1) })
			}
			want, got, late := run(false, false), run(true, false), run(true, true)
			what := fmt.Sprintf("fp8_stream %d x %d x %d (%d columns a block)", M, N, K, r.f.stream.vs[p.i].bn)
			worst := compareRows(t, what, want, got, N)
			for i := range got {
				if late[i] != got[i] {
					t.Fatalf("%s: output %d differs without the early weight tile (%#04x) from %#04x", what, i, late[i], got[i])
				}
			}
			t.Logf("%s: worst difference from fp8_gemv %.2g of the largest output", what, worst)
		}
	}
}
