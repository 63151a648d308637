//go:build cuda

package gpu

import (
	"fmt"
	"slices"
	"testing"

	"github.com/peftd/peftd/runtime/cuda"
)

// TestWsHalf checks the half-row kernels (gemm_wsh_n*, fp8_wsh_n*: two
// atoms of half the block's weight rows a stage, the halves alternating)
// and their SILU twins against the one-atom kernels of the same widths
// (224, 256), bf16 and FP8, for every one-wave plan (K splits 1-8) of six
// shapes (17-64 rows, the 8B gate/up, small ones): unstaggered, each
// product and silu(g) * u row within a rounding step of the one-atom
// kernel's (the same K steps in the same order, so equal unless the
// tensor cores' sums differ with the instruction's width: the count of
// differing outputs is logged); staggered, a second launch the same bits
// and the rows as near the unstaggered ones as compareOrder allows sums in
// another K order (silu(g) * u rows 1/64: g or u may round the other way,
// two steps); FP8 SILU's
// row scales within 1/64; rows past M untouched. The 8B gate/up's
// automatic plan at 17-64 rows has a half-row kernel.
func TestWsHalf(t *testing.T) { eachWsFormat(t, wsHalfCheck) }

func wsHalfCheck(t *testing.T, fp8 bool) {
	r, g := wsRigFor(t, fp8)
	for _, bn := range []int{224, 256} {
		if g.hfn[slices.Index(wsWidths[:], bn)] == nil {
			t.Fatalf("no half-row kernel of width %d loaded (its shared memory %d bytes, the card's limit %d)", bn, wshShared(bn), r.ctx.Device().MaxShared)
		}
	}
	defer func() { g.half, g.noStagger = false, false }()
	sms := r.ctx.Device().SMs
	tested := 0
	for _, sz := range []struct{ M, N, K int }{
		{17, 28672, 4096}, {40, 28672, 4096}, {64, 28672, 4096}, {64, 1792, 1024}, {33, 3584, 2048}, {20, 448, 768},
	} {
		M, N, K, I := sz.M, sz.N, sz.K, sz.N/2
		ops := newWsOperands(t, r, fp8, M, N, K)
		xin, sx, wq, ws := ops.x, ops.sx, ops.w, ops.sw
		out, act := r.alloc(2*(M+1)*N), r.alloc(2*(M+1)*I)
		q, qs := r.alloc(M*I), r.alloc(4*M)
		product := func(p wsPlan, half bool) []uint16 {
			g.half = half
			return rowsProduct(t, r, out, M, N, func() error { return g.launch(r.s, p, out.Ptr(), xin, sx, wq, ws, M, N, K) })
		}
		silu := func(p wsPlan, half bool) ([]uint16, []float32) {
			g.half = half
			var qp, sp cuda.DevicePtr
			if fp8 {
				qp, sp = q.Ptr(), qs.Ptr()
			}
			rows := rowsProduct(t, r, act, M, I, func() error { return g.launchSiLU(r.s, p, act.Ptr(), xin, sx, wq, ws, qp, sp, M, N, K) })
			if !fp8 {
				return rows, nil
			}
			return rows, readBack[float32](t, r, qs, M)
		}
		for _, bn := range []int{224, 256} {
			i := slices.Index(wsWidths[:], bn)
			for _, S := range []int{1, 2, 4, 8} {
				p := wsPlan{i: i, split: S}
				g.half = true
				if N%bn != 0 || !g.valid(p, M, N, K) || N/bn*S > sms {
					continue
				}
				tested++
				what := fmt.Sprintf("%s %v %d x %d x %d", map[bool]string{false: "gemm_wsh", true: "fp8_wsh"}[fp8], p, M, N, K)
				g.noStagger = true
				one, half := product(p, false), product(p, true)
				compareRows(t, what+" unstaggered", one, half, N)
				t.Logf("%s: unstaggered, %d of %d outputs differ from the one-atom kernel's", what, countDiff(one, half), len(one))
				g.noStagger = false
				h1, h2 := product(p, true), product(p, true)
				if !slices.Equal(h1, h2) {
					t.Fatalf("%s: a second launch differs from the first", what)
				}
				rms := compareOrder(t, what+" staggered", one, h1, N, fp8, 128)
				t.Logf("%s: staggered, RMS %.3g apart from the one-atom kernel's", what, rms)
				if S != 1 || !g.siluFits(p, N) || g.hsfn[i] == nil {
					continue
				}
				g.noStagger = true
				oneA, oneS := silu(p, false)
				halfA, halfS := silu(p, true)
				compareRows(t, what+" silu unstaggered", oneA, halfA, I)
				for m := range oneS {
					if !siluScaleNear(halfS[m], oneS[m]) {
						t.Fatalf("%s silu: row %d scale %g, the one-atom kernel's %g", what, m, halfS[m], oneS[m])
					}
				}
				g.noStagger = false
				a1, s1 := silu(p, true)
				a2, s2 := silu(p, true)
				if !slices.Equal(a1, a2) || !slices.Equal(s1, s2) {
					t.Fatalf("%s silu: a second launch differs from the first", what)
				}
				compareOrder(t, what+" silu staggered", oneA, a1, I, fp8, 64) // g and u summed in another order: two bf16 steps
				t.Logf("%s silu: unstaggered, %d of %d outputs differ from the one-atom kernel's", what, countDiff(oneA, halfA), len(oneA))
			}
		}
		ops.drop(r)
	}
	if tested == 0 {
		t.Fatal("no plan with a half-row kernel")
	}
	g.half = true
	autoPlansFit(t, g, 28672, 4096, "half-row", func(p wsPlan) bool { return g.halfOn(p.i) })
}

// countDiff is how many of a and b's values differ (the same length).
func countDiff[T comparable](a, b []T) int {
	n := 0
	for i := range a {
		if a[i] != b[i] {
			n++
		}
	}
	return n
}
