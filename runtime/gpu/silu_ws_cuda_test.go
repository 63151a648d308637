//go:build cuda

package gpu

import (
	"fmt"
	"math"
	"slices"
	"testing"

	"github.com/peftd/peftd/runtime/cuda"
	"github.com/peftd/peftd/runtime/engine"
)

// TestBF16WsSiLU checks gemm_ws_silu (the gate/up product and silu_mul
// in one launch) against gemm_ws's product then silu_mul, for every
// one-wave plan with a fused kernel of six shapes (17-64 rows, the 8B
// model's gate/up and small ones with one to eight blocks): bit for bit
// with every block walking K from its start, and within 1/64 (four bf16
// steps) of it with the default stagger (a column's K walk then starts where its
// fused block's does); rows past M are left alone (rowsProduct), and the
// two-kernel reference itself lies within a rounding step of silu computed
// in float64 from its product. The 8B gate/up product's automatic plan at
// 17-64 rows has a fused kernel.
func TestBF16WsSiLU(t *testing.T) {
	r, g := bwsRig(t)
	defer func() { g.noStagger = false }()
	mod, _ := forwardLimit(t, r)
	silu, err := mod.Function("silu_mul")
	if err != nil {
		t.Fatal(err)
	}
	sms := r.ctx.Device().SMs
	tested := 0
	for _, sz := range []struct{ M, N, K int }{
		{17, 28672, 4096}, {32, 28672, 4096}, {64, 28672, 4096}, {48, 448, 256}, {64, 512, 384}, {33, 1792, 1024},
	} {
		M, N, K, I := sz.M, sz.N, sz.K, sz.N/2
		x, w := r.up(r.bf16Rand(M*K, 1)), r.up(r.bf16Rand(N*K, 0.02))
		gu, ref, act := r.alloc(2*M*N), r.alloc(2*(M+1)*I), r.alloc(2*(M+1)*I)
		for i := range wsWidths {
			p := wsPlan{i: i, split: 1}
			if !g.valid(p, M, N, K) || N/wsWidths[i] > sms || !g.siluFits(p, N) {
				continue
			}
			tested++
			g.noStagger = true // the reference and the bit-for-bit check walk K from its start
			want := rowsProduct(t, r, ref, M, I, func() error {
				if err := g.launch(r.s, p, gu.Ptr(), x.Ptr(), 0, w.Ptr(), 0, M, N, K, nil); err != nil {
					return err
				}
				words := M * I / 8
				return silu.Launch(r.s, cuda.Dim3{X: max(1, min((words+255)/256, 8192)), Y: 1, Z: 1}, cuda.Dim3{X: 256, Y: 1, Z: 1}, 0,
					uint64(ref.Ptr()), uint64(gu.Ptr()), uint64(gu.Ptr()+2*uint64(I)), uint64(0), uint64(0), uint64(0), M, I, N, 0, uint64(0), uint64(0))
			})
			prod := rowsCopy(t, r, gu, M, N)
			fused := func() []uint16 {
				return rowsProduct(t, r, act, M, I, func() error { return g.launchSiLU(r.s, p, act.Ptr(), x.Ptr(), w.Ptr(), M, N, K) })
			}
			what := fmt.Sprintf("gemm_ws_silu %v %d x %d x %d", p, M, N, K)
			got := fused()
			for j := range got {
				if got[j] != want[j] {
					t.Fatalf("%s, unstaggered: output %d (row %d, column %d) %#04x, gemm_ws then silu_mul %#04x", what, j, j/I, j%I, got[j], want[j])
				}
			}
			g.noStagger = false
			got, again := fused(), fused()
			if !slices.Equal(got, again) {
				t.Fatalf("%s: a second launch differs from the first", what)
			}
			// the reference is silu(g) * u of the stored product, and the
			// staggered outputs are within 1/64 of it
			worst, scale, off := 0.0, 0.0, 0
			for j, v := range want {
				m, c := j/I, j%I
				gv, uv := float64(bf16f(prod[m*N+c])), float64(bf16f(prod[m*N+I+c]))
				e := gv / (1 + math.Exp(-gv)) * uv
				scale = max(scale, math.Abs(e))
				worst = max(worst, math.Abs(float64(bf16f(v))-e)/max(math.Abs(e), 1e-30))
			}
			if worst > 1.0/128 || scale == 0 {
				t.Fatalf("%s: silu_mul's reference is %.3g off silu(g) * u in float64 (largest %g)", what, worst, scale)
			}
			for j, v := range got {
				a, b := float64(bf16f(v)), float64(bf16f(want[j]))
				if math.IsNaN(a) || math.Abs(a-b) > max(math.Abs(a), math.Abs(b))/64+1e-4*scale {
					t.Fatalf("%s, staggered: output %d (row %d, column %d) %g, gemm_ws then silu_mul %g", what, j, j/I, j%I, a, b)
				}
				if v != want[j] {
					off++
				}
			}
			t.Logf("%s: equal to gemm_ws then silu_mul unstaggered; staggered %d of %d outputs differ in their last bits", what, off, len(got))
		}
	}
	if tested == 0 {
		t.Fatal("no gemm_ws plan with a fused gate/up kernel")
	}
	for _, T := range []int{17, 32, 48, 64} {
		if p, ok := g.plan(T, 28672, 4096); !ok || !g.siluFits(p, 28672) {
			t.Errorf("%d x 28672 x 4096: plan %v (ok %v) has no fused gate/up kernel", T, p, ok)
		}
	}
}

// rowsCopy reads buffer b's first M rows of N bf16 values.
func rowsCopy(t *testing.T, r *fp8Rig, b *cuda.DeviceBuffer, M, N int) []uint16 {
	t.Helper()
	h := make([]uint16, M*N)
	if err := cuda.CopyDtoH(r.s, h, b.Ptr()); err != nil {
		t.Fatal(err)
	}
	r.sync()
	return h
}

func bf16f(v uint16) float32 { return math.Float32frombits(uint32(v) << 16) }

// TestOpLinearSiLU: Backend.LinearSiLU (on: kernelForce.wsSiLU 1) takes a
// bf16 gate/up product of 17-64 rows that gemm_ws plans on a fused width
// (here forced to n224), and writes silu(x . gate^T) * (x . up^T); 16 and
// 65 rows, and kernelForce.wsSiLU -1, are left to Linear and SiLUMul
// (false, act as it was); with wsSiLU 0 it does as wsSiLUAuto says.
func TestOpLinearSiLU(t *testing.T) {
	const I, K = 448, 256
	for _, c := range []struct {
		T, force int
		want     bool
	}{{16, 1, false}, {17, 1, true}, {40, 1, true}, {64, 1, true}, {65, 1, false}, {40, -1, false}, {40, 0, wsSiLUAuto}} {
		r := newRig(t, testConfig(K, I, 4, 2, 64, 32, 1), c.T, engine.KVSpec{Layers: 1, Blocks: 4, BlockSize: 16, KVHeads: 2, HeadDim: 64})
		if r.b.bws == nil {
			t.Skip("gemm_ws is compiled only for sm_90a")
		}
		r.b.bws.force = wsPlan{i: slices.Index(wsWidths[:], 224), split: 1}
		r.b.force.wsSiLU = c.force
		w, wv := r.weight(2*I, K, 0.5)
		xv := r.rnd(c.T*K, 1)
		x, act := r.buffer(c.T, K), r.buffer(c.T, I)
		r.fill(x, xv)
		r.poison(act)
		r.begin(oneSeq(c.T, 16, zeros(c.T)))
		took := r.b.LinearSiLU(act, x, w)
		got := r.read(act, c.T)
		r.end()
		if took != c.want {
			t.Fatalf("T=%d (wsSiLU %d): LinearSiLU took the product: %v, want %v", c.T, c.force, took, c.want)
		}
		if !took {
			for i, v := range got {
				if !math.IsNaN(float64(v)) {
					t.Fatalf("T=%d: LinearSiLU declined but wrote act[%d] = %v", c.T, i, v)
				}
			}
			continue
		}
		want := make([]float64, c.T*I)
		for m := 0; m < c.T; m++ {
			for n := 0; n < I; n++ {
				var gs, us float64
				for k := 0; k < K; k++ {
					xk := float64(xv[m*K+k])
					gs += xk * float64(wv[n*K+k])
					us += xk * float64(wv[(I+n)*K+k])
				}
				want[m*I+n] = gs / (1 + math.Exp(-gs)) * us
			}
		}
		r.compare("linear_silu", got, want, opTol)
	}
}
