//go:build cuda

package gpu

import (
	"fmt"
	"testing"

	"github.com/peftd/peftd/runtime/cuda"
	"github.com/peftd/peftd/runtime/engine"
)

// TestWsQX checks fp8_ws_qx (the FP8 product quantizing its own bf16
// activation rows, the blocks meeting at a grid-wide barrier before any
// reads them) against quant_rows_e4m3 then fp8_ws: the quantized rows and
// scales it leaves in its scratch are quant_rows_e4m3's byte for byte, and
// the product is fp8_ws's bit for bit, staggered or not (the same body
// walking the same K), for every one-wave plan with a QX kernel (K splits
// 1-8) of four shapes; a second launch the same (the barrier's words left
// at zero); rows past M untouched. The 8B o product's automatic plan at
// 17-64 rows has a QX kernel.
func TestWsQX(t *testing.T) {
	r, g := wsRigFor(t, true)
	if g.qfn == [len(wsWidths)]*cuda.Function{} {
		t.Fatal("no fp8_ws_qx kernel loaded")
	}
	defer func() { g.noStagger = false }()
	tested := 0
	for _, sz := range []struct{ M, N, K int }{{17, 4096, 4096}, {64, 4096, 4096}, {40, 4096, 14336}, {33, 512, 1024}} {
		M, N, K := sz.M, sz.N, sz.K
		ops := newWsOperands(t, r, true, M, N, K)
		wantQX, wantSX := readAt[byte](t, r, ops.x, M*K), readAt[float32](t, r, ops.sx, M)
		out := r.alloc(2 * (M + 1) * N)
		qx, sx := r.alloc(M*K), r.alloc(4*M)
		for _, p := range normPlans(g, M, N, K, r.ctx.Device().SMs) {
			if !g.qxFits(p, N, K) {
				continue
			}
			tested++
			what := fmt.Sprintf("fp8_ws_qx %v %d x %d x %d", p, M, N, K)
			for _, stagger := range []bool{false, true} {
				g.noStagger = !stagger
				want := rowsProduct(t, r, out, M, N, func() error { return g.launch(r.s, p, out.Ptr(), ops.x, ops.sx, ops.w, ops.sw, M, N, K, nil) })
				for range 2 {
					poisonBytes(t, r, qx, M*K)
					poisonBytes(t, r, sx, 4*M)
					got := rowsProduct(t, r, out, M, N, func() error {
						return g.launchQX(r.s, p, out.Ptr(), ops.xb, qx.Ptr(), sx.Ptr(), ops.w, ops.sw, M, N, K)
					})
					if i := firstDiff(got, want); i >= 0 {
						t.Fatalf("%s (stagger %v): output %d (row %d) %#04x, quant_rows_e4m3 then fp8_ws %#04x", what, stagger, i, i/N, got[i], want[i])
					}
					if i := firstDiff(readBack[byte](t, r, qx, M*K), wantQX); i >= 0 {
						t.Fatalf("%s: e4m3 activation %d (row %d) differs from quant_rows_e4m3's", what, i, i/K)
					}
					if i := firstDiff(f32bits(readBack[float32](t, r, sx, M)), f32bits(wantSX)); i >= 0 {
						t.Fatalf("%s: row %d's scale differs from quant_rows_e4m3's", what, i)
					}
				}
			}
			syncWordsZero(t, r.s, g, what)
			t.Logf("%s: quant_rows_e4m3 then fp8_ws bit for bit, staggered and not, twice", what)
		}
		ops.drop(r)
	}
	if tested == 0 {
		t.Fatal("no plan with a QX kernel")
	}
	autoPlansFit(t, g, 4096, 4096, "QX", func(p wsPlan) bool { return g.qxFits(p, 4096, 4096) })
}

// TestOpLinearQX: with FP8 weights and kernelForce.wsQX 1, Linear of rows
// the scratch does not hold quantized (o's input) at 17-64 rows runs the
// QX kernel, gives bit for bit what quant_rows_e4m3 then fp8_ws give, and
// leaves the rows held, so a second projection of them quantizes nothing
// and matches too; at 16 and 65 rows, and with wsQX -1, no QX launch.
func TestOpLinearQX(t *testing.T) {
	const H = 256
	cfg := testConfig(H, 448, 4, 2, 64, 32, 1)
	for _, T := range []int{16, 17, 40, 64, 65} {
		r := newRigWith(t, cfg, T, engine.KVSpec{Layers: 1, Blocks: 8, BlockSize: 16, KVHeads: 2, HeadDim: 64}, Options{WeightFormat: "fp8"})
		if r.b.f8 == nil || r.b.f8.ws == nil {
			t.Skip("fp8_ws is compiled only in the wgmma build, for sm_90a")
		}
		wo, wq := r.projection("model.layers.0.self_attn.o_proj.weight", H, H, "fp8"), r.projection("model.layers.0.self_attn.q_proj.weight", H, H, "fp8")
		x := r.buffer(T, H)
		r.fill(x, r.rnd(T*H, 1))
		run := func(force int) (qxes int, rows [2][]float32) {
			r.b.force.wsQX = force
			o1, o2 := r.buffer(T, H), r.buffer(T, H)
			r.begin(oneSeq(T, 16, zeros(T)))
			before := r.b.f8.qxes
			r.b.Linear(o1, x, wo)
			if force > 0 && r.b.f8.qxes > before && !(r.b.f8.cValid && r.b.f8.cIn == x.mem.Ptr() && r.b.f8.cRows == T && r.b.f8.cCols == H) {
				t.Errorf("T=%d: after the QX product the scratch does not hold x's rows", T)
			}
			r.b.Linear(o2, x, wq) // the same input: no quantization, no QX
			qxes = r.b.f8.qxes - before
			rows = [2][]float32{r.read(o1, T), r.read(o2, T)}
			r.end()
			return qxes, rows
		}
		n, got := run(1)
		if want := map[bool]int{true: 1, false: 0}[T >= 17 && T <= 64]; n != want {
			t.Fatalf("T=%d: %d QX launches for two products of one input, want %d", T, n, want)
		}
		m, want := run(-1)
		if m != 0 {
			t.Fatalf("T=%d: %d QX launches with wsQX -1", T, m)
		}
		for i, name := range []string{"o", "q after it"} {
			if j := firstDiff(f32bits(got[i]), f32bits(want[i])); j >= 0 {
				t.Fatalf("T=%d: %s output %d is %g with QX, %g without", T, name, j, got[i][j], want[i][j])
			}
		}
		t.Logf("T=%d: %d QX launches; bit for bit quant_rows_e4m3 then fp8_ws", T, n)
	}
}
