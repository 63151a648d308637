//go:build cuda

package gpu

import (
	"fmt"
	"math"
	"os"
	"slices"
	"testing"

	"github.com/peftd/peftd/kernels"
	"github.com/peftd/peftd/runtime/cuda"
)

// forwardModule loads the forward module (llama.cu) on r's context for the
// rest of the test.
func forwardModule(t testing.TB, r *fp8Rig) *cuda.Module {
	var o kernels.Options
	if bf16WS(WeightsBF16, false, r.ctx.Device().Arch()) { // the build a bf16 Backend loads there (gemm_ws)
		o.Extra = kernels.BF16Wgmma
	}
	mod, _, err := kernels.Load(r.ctx, kernels.Llama, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mod.Unload() })
	return mod
}

// skinnyRig is fp8Rig's context, stream and cuBLASLt handle with the
// forward module's gemm_skinny variants, and the module.
func skinnyRig(t testing.TB) (*fp8Rig, *bfSkinny, *cuda.Module) {
	r := newFP8Rig(t)
	mod := forwardModule(t, r)
	g, err := newBFSkinny(mod, r.ctx.Device())
	if err != nil {
		t.Fatal(err)
	}
	if g == nil {
		t.Skip("gemm_skinny does not fit this card's shared memory")
	}
	return r, g, mod
}

// poisonBF16 is a NaN no product writes: rowsProduct fills its output with
// it first.
const poisonBF16 = 0x7fc1

// rowsProduct fills out's first M+1 rows of N with poisonBF16, runs the
// product, and returns its M rows; row M must be left as it was.
func rowsProduct(t *testing.T, r *fp8Rig, out *cuda.DeviceBuffer, M, N int, run func() error) []uint16 {
	t.Helper()
	h := make([]uint16, (M+1)*N)
	for i := range h {
		h[i] = poisonBF16
	}
	if err := cuda.CopyHtoD(r.s, out.Ptr(), h); err != nil {
		t.Fatal(err)
	}
	if err := run(); err != nil {
		t.Fatal(err)
	}
	if err := cuda.CopyDtoH(r.s, h, out.Ptr()); err != nil {
		t.Fatal(err)
	}
	r.sync()
	for i := M * N; i < len(h); i++ {
		if h[i] != poisonBF16 {
			t.Fatalf("row %d (past M) written at column %d", M, i-M*N)
		}
	}
	return h[:M*N]
}

// compareRows fails unless every output of got was written and lies within
// a bf16 rounding step of the larger of it and want (plus 1e-4 of want's
// largest magnitude: float32 sums in another order); it returns the worst
// difference relative to want's largest magnitude.
func compareRows(t *testing.T, what string, want, got []uint16, N int) float64 {
	t.Helper()
	return compareRowsTol(t, what, want, got, N, 128)
}

// compareRowsTol is compareRows with each output within 1/div of the
// larger of the two (plus 1e-4 of the largest wanted value): div 64 for
// silu(g) * u rows whose g and u were summed in another order (either may
// round to a neighbouring bf16 value, which moves the product two steps).
func compareRowsTol(t *testing.T, what string, want, got []uint16, N int, div float64) float64 {
	t.Helper()
	return compareRowsAbs(t, what, want, got, N, div, 1e-4)
}

// compareRowsAbs is compareRowsTol with the absolute term abs of the
// largest wanted value in place of 1e-4.
func compareRowsAbs(t *testing.T, what string, want, got []uint16, N int, div, abs float64) float64 {
	t.Helper()
	scale, worst := 0.0, 0.0
	for _, v := range want {
		scale = max(scale, math.Abs(float64(fromBF16(v))))
	}
	for i := range want {
		a, b := float64(fromBF16(want[i])), float64(fromBF16(got[i]))
		if math.IsNaN(b) {
			t.Fatalf("%s: output [%d,%d] not written", what, i/N, i%N)
		}
		d := math.Abs(a - b)
		if d > math.Max(math.Abs(a), math.Abs(b))/div+scale*abs {
			t.Fatalf("%s: output [%d,%d] is %g, want %g", what, i/N, i%N, b, a)
		}
		worst = max(worst, d/scale)
	}
	return worst
}

// compareOrder checks two runs of one product whose K sums ran in
// different orders (a staggered ws walk against an unstaggered one):
// elementwise within a bf16 step of the larger (each run rounds its own
// sum) plus an absolute term of the rows' largest value, 1e-4 with bf16
// operands (float32 sums: the order moves them by far less) and 1/128
// with FP8 (wgmma's FP8 accumulator keeps about 14 bits in each add, and
// a sum takes K/32 of them: ~1e-3 of the running sum apart at K 4096,
// 2^-7 at worst), then div more for outputs one step further on (64: the
// silu(g) * u rows); and the RMS of the differences within 1/128 of the
// rows' RMS, which an atom of K skipped or summed twice moves by ~1/8.
// It returns that RMS ratio.
func compareOrder(t *testing.T, what string, want, got []uint16, N int, fp8 bool, div float64) float64 {
	t.Helper()
	abs := 1e-4
	if fp8 {
		abs = 1.0 / 128
	}
	compareRowsAbs(t, what, want, got, N, div, abs)
	var dd, ww float64
	for i := range want {
		a, b := float64(fromBF16(want[i])), float64(fromBF16(got[i]))
		dd += (a - b) * (a - b)
		ww += a * a
	}
	ratio := math.Sqrt(dd / max(ww, 1e-30))
	if ratio > 1.0/128 {
		t.Fatalf("%s: the differences' RMS is %.3g of the rows' (bound 1/128: a K atom skipped or summed twice?)", what, ratio)
	}
	return ratio
}

// TestSkinnyGemm checks gemm_skinny against cuBLASLt's bf16 product (both
// accumulate in float32; the sums differ in order, so outputs may differ by
// a bf16 rounding step) on the 8B shapes (every variant) and a 3B's o, at
// 1-16 rows (rows past M must not
// be written), with and without the early weight tiles (the same bits
// required).
func TestSkinnyGemm(t *testing.T) {
	r, g, _ := skinnyRig(t)
	shapes := [][2]int{{6144, 4096}, {4096, 4096}, {28672, 4096}, {4096, 14336}, {3072, 3072}}
	if testing.Short() {
		shapes = shapes[1:2]
	}
	for _, sh := range shapes {
		N, K := sh[0], sh[1]
		w := r.up(r.bf16Rand(N*K, 0.02))
		x := r.up(r.bf16Rand(64*K, 1))
		ref, out := r.alloc(2*64*N), r.alloc(2*65*N)
		for _, M := range []int{1, 2, 7, 15, 16} {
			p, ok := g.plan(M, N, K)
			if !ok {
				t.Fatalf("%d x %d x %d: no plan", M, N, K)
			}
			if err := r.mm.GemmTN(r.s, ref.Ptr(), cuda.R16BF, x.Ptr(), cuda.R16BF, w.Ptr(), cuda.R16BF, M, N, K, 1, 0); err != nil {
				t.Fatal(err)
			}
			want := make([]uint16, M*N)
			if err := cuda.CopyDtoH(r.s, want, ref.Ptr()); err != nil {
				t.Fatal(err)
			}
			run := func(opts int) []uint16 {
				return rowsProduct(t, r, out, M, N, func() error { return g.launch(r.s, p, out.Ptr(), x.Ptr(), w.Ptr(), M, N, K, opts) })
			}
			got, late := run(bfSkinnyEarly), run(0)
			what := fmt.Sprintf("gemm_skinny %d x %d x %d (%d columns a block, %d threads)", M, N, K, p.bn, p.threads)
			worst := compareRows(t, what, want, got, N)
			for i := range got {
				if late[i] != got[i] {
					t.Fatalf("%s: output %d differs without the early weight tiles", what, i)
				}
			}
			t.Logf("%s: worst difference from cuBLASLt %.2g of the largest output", what, worst)
		}
	}
}

// TestSkinnyBench (PEFTD_SKINNY_BENCH=1) times gemm_skinny against
// cuBLASLt's bf16 product on the 8B shapes at 1-16 rows, and gemm_ws at
// 17-64 (PEFTD_SKINNY_T: other rows): median of 15 replays of a graph of
// 20 calls, the weights rotated over >= 150 MB so that none is in L2;
// floor = the weight bytes at the measured copy rate.
func TestSkinnyBench(t *testing.T) {
	if os.Getenv("PEFTD_SKINNY_BENCH") == "" {
		t.Skip("PEFTD_SKINNY_BENCH is not set")
	}
	r, g, mod := skinnyRig(t)
	bws, err := loadWS(r.ctx, r.s, mod, "gemm_ws", 2, math.MaxInt) // nil without the wgmma build (sm_90a)
	if err != nil {
		t.Fatal(err)
	}
	defer bws.free()
	bw := r.copyBW()
	bench("skinny device %s; copy bandwidth %.0f GB/s; median of 15 replays of 20 calls recorded as a graph, weights rotated over >= 150 MB", r.ctx.Device().Name, bw/1e9)
	bench("skinny %-8s %4s %9s %9s %9s %9s %8s %8s %6s", "shape", "T", "lt_us", "sk_us", "late_us", "floor_us", "frac_lt", "frac_sk", "bn")
	for _, sh := range envShapes(t, "PEFTD_BENCH_SHAPES", shapes8B) {
		N, K := sh.N, sh.K
		n := max(2, (150<<20)/(2*N*K)+1)
		ws := make([]*cuda.DeviceBuffer, n)
		ws[0] = r.up(r.bf16Rand(N*K, 0.02))
		for i := 1; i < n; i++ {
			ws[i] = r.alloc(2 * N * K)
			r.s.CopyDtoD(ws[i].Ptr(), ws[0].Ptr(), 2*N*K)
		}
		x := r.up(r.bf16Rand(128*K, 1))
		out := r.alloc(2 * 128 * N)
		r.sync()
		floor := float64(2*N*K) / bw * 1e6
		for _, T := range envBatches(t, "PEFTD_SKINNY_T", []int{1, 4, 8, 16, 32, 64, 128}) {
			p, ok := g.plan(T, N, K)
			wp, wsOK := bws.plan(T, N, K)
			if T > 128 || !ok && !wsOK { // gemm_skinny takes 1-16 rows (in one wave), gemm_ws 17-64
				continue
			}
			lt := graphMedianUs(t, r.s, 20, 15, func(i int) error {
				return r.mm.GemmTN(r.s, out.Ptr(), cuda.R16BF, x.Ptr(), cuda.R16BF, ws[i%n].Ptr(), cuda.R16BF, T, N, K, 1, 0)
			})
			sk, late := math.NaN(), math.NaN()
			if ok {
				sk = graphMedianUs(t, r.s, 20, 15, func(i int) error {
					return g.launch(r.s, p, out.Ptr(), x.Ptr(), ws[i%n].Ptr(), T, N, K, bfSkinnyEarly)
				})
				late = graphMedianUs(t, r.s, 20, 15, func(i int) error {
					return g.launch(r.s, p, out.Ptr(), x.Ptr(), ws[i%n].Ptr(), T, N, K, 0)
				})
			}
			bench("skinny %-8s %4d %9.1f %9.1f %9.1f %9.1f %8.2f %8.2f %6d", sh.name, T, lt, sk, late, floor, floor/lt, floor/sk, p.bn)
			if !wsOK {
				continue
			}
			wsTimed := func() float64 {
				p, _ := bws.plan(T, N, K) // the sweep's forced plan, or the automatic one
				return graphMedianUs(t, r.s, 20, 15, func(i int) error {
					return bws.launch(r.s, p, out.Ptr(), x.Ptr(), 0, ws[i%n].Ptr(), 0, T, N, K)
				})
			}
			us := wsTimed()
			bench("skinnyws %-8s %4d plan %-7v %8.1f us %6.2f of floor (cuBLASLt %8.1f us %6.2f)", sh.name, T, wp, us, floor/us, lt, floor/lt)
			for _, w := range wsSweep(bws, T, N, K, wsTimed, func(bool) {}) {
				bench("skinnyws %-8s %4d plan %-7v %8.1f us %6.2f of floor (early %d, stagger %v)", sh.name, T, w.p, w.us, floor/w.us, w.early, w.stagger)
			}
		}
	}
}

// forwardLimit is the forward module (forwardModule) on r's context and
// the shared memory a block may opt into on the card (any size where it
// is not reported).
func forwardLimit(t testing.TB, r *fp8Rig) (*cuda.Module, int) {
	limit := r.ctx.Device().MaxShared
	if limit <= 0 {
		limit = math.MaxInt
	}
	return forwardModule(t, r), limit
}

// bwsRig is fp8Rig's context, stream and cuBLASLt handle with the forward
// module's gemm_ws kernels (ws_body on bf16; PEFTD_WS or PEFTD_WG,
// sm_90a), or a skip.
func bwsRig(t testing.TB) (*fp8Rig, *wsProduct) {
	r := newFP8Rig(t)
	mod, limit := forwardLimit(t, r)
	g, err := loadWS(r.ctx, r.s, mod, "gemm_ws", 2, limit)
	if err != nil {
		t.Fatal(err)
	}
	if g == nil {
		if r.ctx.Device().Arch() == "sm_90a" {
			t.Fatal("no gemm_ws kernel loaded on an sm_90a card (the forward module's build for it has them)")
		}
		t.Skip("gemm_ws is compiled only for sm_90a")
	}
	t.Cleanup(func() { g.free() })
	return r, g
}

// TestBF16WgStream checks gemm_ws (ws_body with bf16 operands: the
// activation rows the wgmma's M, BN weight rows a block, the K split met
// in the kernel) against cuBLASLt's bf16 product: every one-wave plan of
// eight shapes (17-64 rows, K splits 1-8, widths that leave most blocks a
// few weight rows), the automatic plan also with every block walking K
// from its start. Every output is written and row M is left alone
// (rowsProduct); a second launch gives the same bits. The automatic plan
// of each 8B shape at 64 rows is one wave.
func TestBF16WgStream(t *testing.T) {
	r, g := bwsRig(t)
	defer func() { g.noStagger = false }()
	sms := r.ctx.Device().SMs
	for _, sz := range []struct{ M, N, K int }{
		{17, 4096, 4096}, {32, 6144, 4096}, {64, 28672, 4096}, {64, 4096, 14336}, {48, 4096, 4096},
		{33, 96, 256}, {64, 224, 384}, {20, 672, 1024},
	} {
		M, N, K := sz.M, sz.N, sz.K
		x, w := r.up(r.bf16Rand(M*K, 1)), r.up(r.bf16Rand(N*K, 0.02))
		out := r.alloc(2 * (M + 1) * N)
		want := rowsProduct(t, r, out, M, N, func() error {
			return r.mm.GemmTN(r.s, out.Ptr(), cuda.R16BF, x.Ptr(), cuda.R16BF, w.Ptr(), cuda.R16BF, M, N, K, 1, 0)
		})
		check := func(p wsPlan) {
			run := func() []uint16 {
				return rowsProduct(t, r, out, M, N, func() error {
					return g.launch(r.s, p, out.Ptr(), x.Ptr(), 0, w.Ptr(), 0, M, N, K)
				})
			}
			got, again := run(), run()
			what := fmt.Sprintf("gemm_ws %v %d x %d x %d (stagger %v)", p, M, N, K, !g.noStagger)
			worst := compareRows(t, what, want, got, N)
			if !slices.Equal(got, again) {
				t.Fatalf("%s: a second product differs from the first", what)
			}
			t.Logf("%s: worst difference from cuBLASLt %.2g of the largest output", what, worst)
		}
		n := 0
		for i := range wsWidths {
			for _, S := range []int{1, 2, 4, 8} {
				p := wsPlan{i: i, split: S}
				if g.valid(p, M, N, K) && N/wsWidths[i]*S <= sms {
					check(p)
					n++
				}
			}
		}
		if n == 0 {
			t.Fatalf("no gemm_ws plan takes %d x %d x %d", M, N, K)
		}
		if p, ok := g.plan(M, N, K); ok {
			g.noStagger = true
			check(p)
			g.noStagger = false
		}
	}
	for _, sh := range [][2]int{{6144, 4096}, {4096, 4096}, {28672, 4096}, {4096, 14336}} {
		p, ok := g.plan(64, sh[0], sh[1])
		if !ok || sh[0]/wsWidths[p.i]*p.split > sms {
			t.Errorf("64 x %d x %d: plan %v (ok %v) is not one wave", sh[0], sh[1], p, ok)
		}
	}
}
