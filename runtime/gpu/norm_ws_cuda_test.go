//go:build cuda

package gpu

import (
	"encoding/binary"
	"fmt"
	"maps"
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/peftd/peftd/runtime/cuda"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/safetensors"
)

// TestWsNorm checks gemm_ws_norm and fp8_ws_norm (the o or down product
// and add_rmsnorm of its rows in one launch, met at a grid-wide barrier)
// against gemm_ws / fp8_ws's product then add_rmsnorm: with every block
// walking K from its start the product's rows, the residual rows and the
// normalized rows (FP8: also their e4m3 bytes and scales) bit for bit, and
// the add alone (no norm output) too; with the default stagger a second
// launch gives the same bits (the barrier's words left at zero), the
// product lies as near the two kernels' as compareOrder allows sums in
// another K order, the residual as near as the products' difference and a
// rounding step, and the norm rows are rmsnorm of their own residual rows
// within a rounding step; for every one-wave
// plan with a NORM kernel (K splits 1-8) of six shapes (17-64 rows, the 8B
// model's o and down, small ones), rows past M untouched. The 8B o and
// down products' automatic plans at 17-64 rows have a NORM kernel.
func TestWsNorm(t *testing.T) { eachWsFormat(t, wsNormCheck) }

// eachWsFormat runs check as subtests bf16 and fp8 (its fp8 true).
func eachWsFormat(t *testing.T, check func(t *testing.T, fp8 bool)) {
	for _, format := range []string{"bf16", "fp8"} {
		t.Run(format, func(t *testing.T) { check(t, format == "fp8") })
	}
}

// wsNormOut is one run's rows: the product (d), the residual (x), the
// normalized rows (o) and, with FP8, o quantized (q, s).
type wsNormOut struct {
	d, x, o []uint16
	q       []byte
	s       []float32
}

// wsRigFor is a rig and its ws products of one format: fp8_ws (FP8) or
// gemm_ws (bf16), or a skip where they are not compiled in.
func wsRigFor(t *testing.T, fp8 bool) (*fp8Rig, *wsProduct) {
	t.Helper()
	if !fp8 {
		return bwsRig(t)
	}
	r := newFP8Rig(t)
	if r.f.ws == nil {
		t.Skip("fp8_ws is compiled only in the wgmma build, for sm_90a")
	}
	return r, r.f.ws
}

// wsOperands are an M x N x K ws product's operands: x's M random bf16
// rows as they are (bf16) or quantized per row (x, sx), and a random N x K
// weight (w, and with FP8 its row scales sw and w8, dropped by drop).
type wsOperands struct {
	x, sx, w, sw cuda.DevicePtr
	w8           *fp8Weight
	xb           cuda.DevicePtr // x's bf16 rows (FP8: before the quantization)
}

func newWsOperands(t *testing.T, r *fp8Rig, fp8 bool, M, N, K int) wsOperands {
	t.Helper()
	x := r.up(r.bf16Rand(M*K, 1))
	if !fp8 {
		return wsOperands{x: x.Ptr(), w: r.up(r.bf16Rand(N*K, 0.02)).Ptr(), xb: x.Ptr()}
	}
	w8, err := r.f.upload(r.bf16Rand(N*K, 0.02), N, K)
	if err != nil {
		t.Fatal(err)
	}
	qx, sx := r.alloc(M*K), r.alloc(4*M)
	if err := r.f.quantRows(qx.Ptr(), sx.Ptr(), x.Ptr(), M, K, K); err != nil {
		t.Fatal(err)
	}
	return wsOperands{x: qx.Ptr(), sx: sx.Ptr(), w: w8.q.Ptr(), sw: w8.scale.Ptr(), w8: w8, xb: x.Ptr()}
}

func (o wsOperands) drop(r *fp8Rig) {
	if o.w8 != nil {
		r.dropWeight(o.w8)
	}
}

func wsNormCheck(t *testing.T, fp8 bool) {
	r, g := wsRigFor(t, fp8)
	if g.nsync == nil {
		t.Fatal("no ws kernel with add_rmsnorm loaded")
	}
	defer func() { g.noStagger = false }()
	mod, _ := forwardLimit(t, r)
	addNorm, err := mod.Function("add_rmsnorm")
	if err != nil {
		t.Fatal(err)
	}
	const eps = 1e-5
	sms := r.ctx.Device().SMs
	tested := 0
	for _, sz := range []struct{ M, N, K int }{
		{17, 4096, 4096}, {64, 4096, 4096}, {64, 4096, 14336}, {32, 4096, 14336}, {48, 256, 512}, {33, 512, 1024},
	} {
		M, N, K := sz.M, sz.N, sz.K
		ops := newWsOperands(t, r, fp8, M, N, K)
		xin, sx, wq, ws := ops.x, ops.sx, ops.w, ops.sw
		res, nwh := r.bf16Rand(M*N, 1), r.bf16Rand(N, 1)
		nw := r.up(nwh)
		d, xr, o := r.alloc(2*(M+1)*N), r.alloc(2*(M+1)*N), r.alloc(2*(M+1)*N)
		q, qs := r.alloc(M*N), r.alloc(4*M)
		// run is one launch pair (mode 0: the product, then add_rmsnorm)
		// or one NORM launch (1) with plan p on fresh residual rows; norm
		// false: the add alone
		run := func(p wsPlan, mode int, norm bool) wsNormOut {
			poison := make([]uint16, (M+1)*N)
			for i := range poison {
				poison[i] = poisonBF16
			}
			for _, b := range []*cuda.DeviceBuffer{d, o, xr} {
				if err := cuda.CopyHtoD(r.s, b.Ptr(), poison); err != nil {
					t.Fatal(err)
				}
			}
			if err := cuda.CopyHtoD(r.s, xr.Ptr(), res); err != nil {
				t.Fatal(err)
			}
			var op, np, qp, sp cuda.DevicePtr
			if norm {
				op, np = o.Ptr(), nw.Ptr()
				if fp8 {
					qp, sp = q.Ptr(), qs.Ptr()
				}
			}
			switch mode {
			case 0:
				if err = g.launch(r.s, p, d.Ptr(), xin, sx, wq, ws, M, N, K); err == nil {
					err = addNorm.Launch(r.s, cuda.Dim3{X: M, Y: 1, Z: 1}, cuda.Dim3{X: 256, Y: 1, Z: 1}, 0,
						uint64(xr.Ptr()), uint64(d.Ptr()), uint64(0), uint64(0), uint64(op), uint64(np), float32(eps), N, uint64(qp), uint64(sp))
				}
			case 1:
				err = g.launchNorm(r.s, p, d.Ptr(), xin, sx, wq, ws, xr.Ptr(), op, np, qp, sp, eps, M, N, K)
			}
			if err != nil {
				t.Fatal(err)
			}
			var out wsNormOut
			for _, c := range []struct {
				b *cuda.DeviceBuffer
				h *[]uint16
			}{{d, &out.d}, {xr, &out.x}, {o, &out.o}} {
				h := readBack[uint16](t, r, c.b, (M+1)*N)
				for i := M * N; i < len(h); i++ {
					if h[i] != poisonBF16 {
						t.Fatalf("row %d (past M) written at column %d", M, i-M*N)
					}
				}
				*c.h = h[:M*N]
			}
			if fp8 && norm {
				out.q, out.s = readBack[byte](t, r, q, M*N), readBack[float32](t, r, qs, M)
			}
			return out
		}
		for _, p := range normPlans(g, M, N, K, sms) {
			tested++
			what := fmt.Sprintf("%s %v %d x %d x %d", map[bool]string{false: "gemm_ws_norm", true: "fp8_ws_norm"}[fp8], p, M, N, K)
			g.noStagger = true
			for _, norm := range []bool{true, false} {
				want := run(p, 0, norm)
				got := run(p, 1, norm) // the fused kernel against the two
				for _, c := range []struct {
					name      string
					got, want []uint16
				}{{"product", got.d, want.d}, {"residual", got.x, want.x}, {"norm", got.o, want.o}} {
					if i := firstDiff(c.got, c.want); i >= 0 {
						t.Fatalf("%s (norm %v), unstaggered: %s %d (row %d, column %d) %#04x, the two kernels' %#04x", what, norm, c.name, i, i/N, i%N, c.got[i], c.want[i])
					}
				}
				if i := firstDiff(got.q, want.q); i >= 0 {
					t.Fatalf("%s, unstaggered: e4m3 %d (row %d) %#02x, add_rmsnorm's %#02x", what, i, i/N, got.q[i], want.q[i])
				}
				for m := range got.s {
					if math.Float32bits(got.s[m]) != math.Float32bits(want.s[m]) {
						t.Fatalf("%s, unstaggered: row %d scale %g, add_rmsnorm's %g", what, m, got.s[m], want.s[m])
					}
				}
			}
			want := run(p, 0, true)
			g.noStagger = false
			got, again := run(p, 1, true), run(p, 1, true)
			if !slices.Equal(got.d, again.d) || !slices.Equal(got.x, again.x) || !slices.Equal(got.o, again.o) || !slices.Equal(got.q, again.q) || !slices.Equal(got.s, again.s) {
				t.Fatalf("%s: a second launch differs from the first (the barrier's words not left at zero?)", what)
			}
			syncWordsZero(t, r.s, g, what)
			// staggered: the product's sums in another K order; the residual
			// carries the product's difference (res + d may cancel to far
			// less than d), and the norm rows are rmsnorm of their own
			// residual rows
			rms := compareOrder(t, what+" staggered product", want.d, got.d, N, fp8, 128)
			residualFollows(t, what+" staggered residual", want, got, N)
			worst := compareRows(t, what+" staggered norm", hostRMSNorm(got.x, nwh, eps, N), got.o, N)
			t.Logf("%s: bit for bit the two kernels' unstaggered (norm and add alone); staggered product RMS %.3g apart, norm within %.3g of its residual's", what, rms, worst)
		}
		ops.drop(r)
	}
	if tested == 0 {
		t.Fatal("no ws plan with a NORM kernel")
	}
	for _, K := range []int{4096, 14336} {
		autoPlansFit(t, g, 4096, K, "NORM", func(p wsPlan) bool { return g.normFits(p, 4096) })
	}
}

// residualFollows checks two runs' residual rows x = bf16(res + d): each
// output apart by at most the products' difference there plus a bf16 step
// of the larger (each run rounds its own sum) and 1e-4 of the largest.
func residualFollows(t *testing.T, what string, want, got wsNormOut, N int) {
	t.Helper()
	scale := 0.0
	for _, v := range want.x {
		scale = max(scale, math.Abs(float64(fromBF16(v))))
	}
	for i := range want.x {
		a, b := float64(fromBF16(want.x[i])), float64(fromBF16(got.x[i]))
		dd := math.Abs(float64(fromBF16(want.d[i])) - float64(fromBF16(got.d[i])))
		if math.IsNaN(b) || math.Abs(a-b) > dd+math.Max(math.Abs(a), math.Abs(b))/128+scale*1e-4 {
			t.Fatalf("%s: output [%d,%d] is %g, want %g (the products %g apart)", what, i/N, i%N, b, a, dd)
		}
	}
}

// hostRMSNorm is rmsnorm(x) * w of each row of x (N wide), in float64,
// rounded to bf16.
func hostRMSNorm(x, w []uint16, eps float64, N int) []uint16 {
	out := make([]uint16, len(x))
	for r := 0; r < len(x)/N; r++ {
		row := x[r*N : (r+1)*N]
		ss := 0.0
		for _, v := range row {
			f := float64(fromBF16(v))
			ss += f * f
		}
		inv := 1 / math.Sqrt(ss/float64(N)+eps)
		for j, v := range row {
			out[r*N+j] = safetensors.Float32ToBF16(float32(float64(fromBF16(v)) * inv * float64(fromBF16(w[j]))))
		}
	}
	return out
}

// firstDiff is the first index where a and b differ (-1: none; they are
// the same length).
func firstDiff[T comparable](a, b []T) int {
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

// normPlans are g's one-wave plans of an M x N x K product (at most sms
// blocks, K splits 1-8) that have a NORM kernel.
func normPlans(g *wsProduct, M, N, K, sms int) []wsPlan {
	var ps []wsPlan
	for i := range wsWidths {
		for _, S := range []int{1, 2, 4, 8} {
			if p := (wsPlan{i: i, split: S}); g.valid(p, M, N, K) && g.normFits(p, N) && N/wsWidths[i]*S <= sms {
				ps = append(ps, p)
			}
		}
	}
	return ps
}

// TestOpLinearAddRMSNorm: Backend.LinearAddRMSNorm (kernelForce.wsNorm
// 1) takes an o product of 17-64 rows (FP8: from wsLoneFrom rows, 9 by
// default) that the ws kernels plan (bf16: a split of two, FP8: one), and gives bit for bit what Linear then
// AddRMSNorm give: the product, the residual, the normalized rows and
// (FP8) the gate/up product after it, which reads the normalized rows'
// quantized copy LinearAddRMSNorm left in the scratch; also the add alone
// (no norm: the last layer's); 16 and 65 rows, and kernelForce.wsNorm -1,
// are declined with nothing written.
func TestOpLinearAddRMSNorm(t *testing.T) {
	const H, I = 256, 448
	cfg := testConfig(H, I, 4, 2, 64, 32, 1)
	for _, format := range []string{"bf16", "fp8"} {
		for _, c := range []struct {
			T, force int
			want     bool
		}{{16, 1, false}, {17, 1, true}, {40, 1, true}, {64, 1, true}, {65, 1, false}, {40, -1, false}} {
			r := newRigWith(t, cfg, c.T, engine.KVSpec{Layers: 1, Blocks: 8, BlockSize: 16, KVHeads: 2, HeadDim: 64}, Options{WeightFormat: format})
			if format == "bf16" && r.b.bws == nil || format == "fp8" && (r.b.f8 == nil || r.b.f8.ws == nil) {
				t.Skip("the ws kernels are compiled only for sm_90a")
			}
			wo, wgu := r.projection("model.layers.0.self_attn.o_proj.weight", H, H, format), r.projection("model.layers.0.mlp.up_proj.weight", 2*I, H, format)
			nw, _ := r.weight(1, H, 1)
			a, res := r.buffer(c.T, H), r.rnd(c.T*H, 1)
			r.fill(a, r.rnd(c.T*H, 1))
			// run is the op (fused; where it declines, nothing more) or
			// Linear then AddRMSNorm, then the gate/up product of the
			// normalized rows: the product's, the residual's, the norm's and
			// gate/up's rows
			run := func(fused, norm bool) (took bool, rows [4][]float32) {
				d, x, o, gu := r.buffer(c.T, H), r.buffer(c.T, H), r.buffer(c.T, H), r.buffer(c.T, 2*I)
				r.poison(d)
				r.poison(o)
				r.poison(gu)
				r.fill(x, res)
				var out engine.Buffer
				var w engine.Weight
				if norm {
					out, w = o, nw
				}
				r.begin(oneSeq(c.T, 16, zeros(c.T)))
				if fused {
					r.b.force.wsNorm = c.force
					took = r.b.LinearAddRMSNorm(d, a, wo, x, out, w, 1e-5)
					if took && norm && r.b.f8 != nil && !(r.b.f8.cValid && r.b.f8.cIn == o.mem.Ptr() && r.b.f8.cRows == c.T && r.b.f8.cCols == H) {
						t.Errorf("%s T=%d: after LinearAddRMSNorm the scratch does not hold the normalized rows", format, c.T)
					}
				} else {
					r.b.force.wsNorm = -1
					r.b.Linear(d, a, wo)
					r.b.AddRMSNorm(x, d, out, w, 1e-5)
				}
				if norm && (took || !fused) {
					r.b.Linear(gu, o, wgu)
				}
				rows = [4][]float32{r.read(d, c.T), r.read(x, c.T), r.read(o, c.T), r.read(gu, c.T)}
				r.end()
				return took, rows
			}
			want := c.want
			if format == "fp8" && c.T < wsMinRows && c.force > 0 {
				// FP8 products of fewer rows with no LoRA update beside go to
				// fp8_ws from wsLoneFrom rows (v0.81): the fused op with them
				from := r.b.f8.wsBelowFrom(true)
				want = from > 0 && c.T >= from
			}
			for _, norm := range []bool{true, false} {
				what := fmt.Sprintf("%s T=%d wsNorm %d norm %v", format, c.T, c.force, norm)
				took, got := run(true, norm)
				if took != want {
					t.Fatalf("%s: LinearAddRMSNorm took the product: %v, want %v", what, took, want)
				}
				if !took { // nothing written: the outputs still poison, the residual as it was
					for i, v := range slices.Concat(got[0], got[2], got[3]) {
						if !math.IsNaN(float64(v)) {
							t.Fatalf("%s: declined but wrote output %d = %v", what, i, v)
						}
					}
					if !slices.Equal(got[1], res) {
						t.Fatalf("%s: declined but changed the residual rows", what)
					}
					continue
				}
				_, want := run(false, norm)
				n := 2
				if norm {
					n = 4
				}
				for i, name := range []string{"product", "residual", "norm", "gate/up after it"}[:n] {
					for j := range want[i] {
						if math.Float32bits(got[i][j]) != math.Float32bits(want[i][j]) {
							t.Fatalf("%s: %s %d is %g, Linear then AddRMSNorm's %g", what, name, j, got[i][j], want[i][j])
						}
					}
				}
				t.Logf("%s: bit for bit Linear then AddRMSNorm", what)
				if norm {
					d, x, o, gu := r.buffer(c.T, H), r.buffer(c.T, H), r.buffer(c.T, H), r.buffer(c.T, 2*I)
					replayed(t, r, c.T, what, func() bool {
						r.b.force.wsNorm = c.force
						took := r.b.LinearAddRMSNorm(d, a, wo, x, o, nw, 1e-5)
						r.b.Linear(gu, o, wgu)
						return took
					}, func() {
						r.poison(d)
						r.poison(o)
						r.poison(gu)
						r.fill(x, res)
					}, []*Buffer{d, x, o, gu}, got[:])
				}
			}
		}
	}
}

// replayed captures op (a fused op and what reads its output, on buffers
// allocated before) into a CUDA graph on r's stream and replays it three
// times, refill() before each (the inputs it changes in place, outputs
// poisoned): each replay must leave outs holding want's rows (the ops run
// eagerly) bit for bit, and the ws products' barrier words at zero (a grid
// barrier inside a recording, PDL edges included, as a step's replay runs
// it).
func replayed(t *testing.T, r *rig, T int, what string, op func() bool, refill func(), outs []*Buffer, want [][]float32) {
	t.Helper()
	r.begin(oneSeq(T, 16, zeros(T)))
	defer r.end()
	if err := r.b.s.BeginCapture(); err != nil {
		t.Fatal(err)
	}
	took := op()
	g, err := r.b.s.EndCapture()
	if err != nil {
		t.Fatal(err)
	}
	defer g.Destroy()
	if r.b.err != nil {
		t.Fatalf("%s, recorded: %v", what, r.b.err)
	}
	if !took {
		t.Fatalf("%s, recorded: the fused op declined", what)
	}
	ge, err := g.Instantiate()
	if err != nil {
		t.Fatal(err)
	}
	defer ge.Destroy()
	for rep := range 3 {
		refill()
		if err := ge.Launch(r.b.s); err != nil {
			t.Fatal(err)
		}
		for i, o := range outs {
			got := r.read(o, T)
			if j := firstDiff(f32bits(got), f32bits(want[i])); j >= 0 {
				t.Fatalf("%s, replay %d: output %d's value %d is %g, the eager ops' %g", what, rep, i, j, got[j], want[i][j])
			}
		}
		for _, ws := range []*wsProduct{r.b.bws, fp8WS(r.b)} {
			if ws != nil {
				syncWordsZero(t, r.b.s, ws, fmt.Sprintf("%s, replay %d", what, rep))
			}
		}
	}
	t.Logf("%s: recorded and replayed three times, bit for bit", what)
}

// fp8WS is b's fp8_ws products (nil with bf16 weights).
func fp8WS(b *Backend) *wsProduct {
	if b.f8 == nil {
		return nil
	}
	return b.f8.ws
}

// projection uploads a rows x cols projection weight under name (FP8 with
// format fp8: the backend quantizes the projections it names).
func (r *rig) projection(name string, rows, cols int, format string) engine.Weight {
	r.t.Helper()
	v := r.rnd(rows*cols, 0.5)
	raw := make([]byte, 4*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint32(raw[4*i:], math.Float32bits(x))
	}
	w, err := r.b.Upload(name, safetensors.F32, []int{rows, cols}, raw)
	if err != nil {
		r.t.Fatal(err)
	}
	if _, ok := w.(*fp8Weight); ok != (format == "fp8") {
		r.t.Fatalf("%s uploaded as %T with %s weights", name, w, format)
	}
	return w
}

// TestFusedForwardBits: the tiny fixture's forward with LinearAddRMSNorm
// on (kernelForce.wsNorm 1) gives the logits it gives with it off, bit
// for bit (the NORM kernel walks K as gemm_ws / fp8_ws's plan does, and its
// end sums as add_rmsnorm does), in bf16 and FP8, through recorded decode
// and mixed steps of 17-64 rows and eager ones, base rows alone and beside
// adapters (whose o updates make the engine issue the two ops); in bf16
// the fused op took products (the o projection: the fixture's down, K
// 352, has no ws plan) and declined the rest.
func TestFusedForwardBits(t *testing.T) {
	m, adapters, _ := loadFixture(t)
	names := slices.Sorted(maps.Keys(adapters))
	opts := engine.Options{MaxTokens: 512, KVBlocks: 2048, BlockSize: 16, AdapterSlots: len(names)}
	for _, format := range []string{"bf16", "fp8"} {
		t.Run(format, func(t *testing.T) {
			mk := func(force int) (*engine.Engine, *Backend) {
				e, b := newEngineBackend(t, m, opts, Options{WeightFormat: format})
				if format == "bf16" && b.bws == nil || format == "fp8" && (b.f8 == nil || b.f8.ws == nil) {
					t.Skip("the ws kernels are compiled only for sm_90a")
				}
				b.force.wsNorm = force
				for i, n := range names {
					if err := e.LoadAdapter(i, adapters[n]); err != nil {
						t.Fatal(err)
					}
				}
				if err := e.Warmup(); err != nil {
					t.Fatal(err)
				}
				return e, b
			}
			eOn, bOn := mk(1)
			eOff, bOff := mk(-1)
			V := m.Config.VocabSize
			rng := rand.New(rand.NewPCG(5, 6))
			const nSeq = 64
			on, off := make([]*engine.Sequence, nSeq), make([]*engine.Sequence, nSeq)
			slot := make([]int, nSeq)
			for i := range nSeq {
				on[i], off[i] = &engine.Sequence{}, &engine.Sequence{}
				slot[i] = -1 // the first half base rows alone, the rest with adapters too
				if i >= nSeq/2 {
					slot[i] = i%(len(names)+1) - 1
				}
			}
			steps := 0
			// step runs the same rows (sequence, tokens) on both engines and
			// compares every logit
			step := func(what string, rows []int, toks [][]int32) {
				var in1, in2 []engine.Input
				for k, i := range rows {
					in1 = append(in1, engine.Input{Seq: on[i], Tokens: toks[k], Slot: slot[i]})
					in2 = append(in2, engine.Input{Seq: off[i], Tokens: toks[k], Slot: slot[i]})
				}
				sameLogits(t, eOn, eOff, in1, in2, what+", the fused op on and off")
				steps++
			}
			tokens := func(n int) []int32 {
				v := make([]int32, n)
				for k := range v {
					v[k] = int32(rng.IntN(V))
				}
				return v
			}
			// prefill: base prompts of 1-3 tokens 16 at a time (17-48 rows),
			// then the adapters' sequences
			for lo := 0; lo < nSeq; lo += 16 {
				var rows []int
				var toks [][]int32
				for i := lo; i < lo+16; i++ {
					rows, toks = append(rows, i), append(toks, tokens(1+rng.IntN(3)))
				}
				step(fmt.Sprintf("prefill %d-%d", lo, lo+15), rows, toks)
			}
			for _, c := range []struct {
				n    int
				base bool
			}{{17, true}, {32, true}, {48, true}, {64, false}, {24, false}, {40, true}, {16, true}, {65, false}} {
				pool := rng.Perm(nSeq)
				if c.base {
					pool = rng.Perm(nSeq / 2)
				}
				var rows []int
				var toks [][]int32
				for _, i := range pool[:min(c.n, len(pool))] {
					rows, toks = append(rows, i), append(toks, tokens(1))
				}
				step(fmt.Sprintf("decode %d rows (base only %v)", len(rows), c.base), rows, toks)
			}
			// FP8: the fixture's o (128 bytes of K) is less than a stage of
			// fp8_ws (two 128-byte atoms), so no ws plan takes it and the op
			// declines every product (TestOpLinearAddRMSNorm covers FP8)
			if (bOn.fused.norm == 0) != (format == "fp8") || bOff.fused.norm != 0 {
				t.Fatalf("fused launches: %d with the op on (want some in bf16, none in FP8), %d with it off (want none)", bOn.fused.norm, bOff.fused.norm)
			}
			t.Logf("%s: %d steps bit for bit; %d fused o/down launches enqueued or recorded", format, steps, bOn.fused.norm)
		})
	}
}

func f32bits(v []float32) []uint32 {
	o := make([]uint32, len(v))
	for i, x := range v {
		o[i] = math.Float32bits(x)
	}
	return o
}
