//go:build cuda

package gpu

import (
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"testing"

	fx "github.com/peftd/peftd/internal/fixture"
	"github.com/peftd/peftd/kernels"
	"github.com/peftd/peftd/runtime/cuda"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/lora"
	"github.com/peftd/peftd/runtime/safetensors"
	"github.com/peftd/peftd/runtime/sample"
)

// fp8Rig is a context, stream, cuBLASLt handle and FP8 state without a model.
type fp8Rig struct {
	t   testing.TB
	ctx *cuda.Context
	s   *cuda.Stream
	mm  *cuda.Matmul
	f   *fp8State
	rng *rand.Rand
}

func newFP8Rig(t testing.TB) *fp8Rig {
	t.Helper()
	if err := Available(); err != nil {
		t.Skipf("no GPU: %v", err)
	}
	ctx, err := cuda.NewContext(0)
	if err != nil {
		t.Fatal(err)
	}
	r := &fp8Rig{t: t, ctx: ctx, rng: rand.New(rand.NewPCG(testSeed(t), 8))}
	t.Cleanup(func() {
		r.f.close()
		r.mm.Close()
		if r.s != nil {
			r.s.Destroy()
		}
		ctx.Close()
	})
	if r.s, err = ctx.NewStream(); err != nil {
		t.Fatal(err)
	}
	// launches as the backend makes them: programmatic (PDL), so that a
	// kernel reading its input before griddepcontrol.wait shows up here
	if err := r.s.SetProgrammaticLaunch(true); err != nil && !errors.Is(err, cuda.ErrNoPDL) {
		t.Fatal(err)
	}
	if r.mm, err = ctx.NewMatmul(32 << 20); err != nil {
		t.Fatal(err)
	}
	// cuBLASLt's FP8 products accumulate as the Backend's do: fast by
	// default, with float32 promotion under PEFTD_FP8_PRECISE_ACCUM=1
	// (Options.FP8PreciseAccum; the tolerances judge either)
	r.mm.SetFastAccum(os.Getenv("PEFTD_FP8_PRECISE_ACCUM") != "1")
	// the module the Backend loads: on sm_90a the wgmma build (fp8_wg,
	// fp8_ws; Backend.init), so that their tests run by default
	if ctx.Device().Arch() == "sm_90a" && !kernels.Defined("PEFTD_WG") {
		r.f, _ = newFP8(ctx, r.s, r.mm, kernels.Options{Extra: kernels.FP8Wgmma})
	}
	if r.f == nil {
		r.f, err = newFP8(ctx, r.s, r.mm, kernels.Options{})
	}
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func (r *fp8Rig) alloc(n int) *cuda.DeviceBuffer {
	b, err := r.ctx.Alloc(n)
	if err != nil {
		r.t.Fatal(err)
	}
	r.t.Cleanup(func() { b.Free() })
	return b
}

// bf16Rand is n bf16 values ~ N(0, std^2) (never all zeros).
func (r *fp8Rig) bf16Rand(n int, std float64) []uint16 {
	h := make([]uint16, n)
	for i := range h {
		h[i] = safetensors.Float32ToBF16(float32(r.rng.NormFloat64() * std))
	}
	return h
}

func (r *fp8Rig) up(h []uint16) *cuda.DeviceBuffer {
	b := r.alloc(2 * len(h))
	if err := cuda.CopyHtoD(r.s, b.Ptr(), h); err != nil {
		r.t.Fatal(err)
	}
	return b
}

func (r *fp8Rig) sync() {
	if err := r.s.Synchronize(); err != nil {
		r.t.Fatal(err)
	}
}

// dropWeight frees a weight the rig uploaded and forgets it.
func (r *fp8Rig) dropWeight(w *fp8Weight) {
	r.f.weights = slices.DeleteFunc(r.f.weights, func(x *fp8Weight) bool { return x == w })
	w.q.Free()
	w.scale.Free()
}

// operands reads back the quantized activation rows (T of K values) and
// w's quantized rows with their scales, after the copies queued before
// (it synchronizes).
func (r *fp8Rig) operands(T, K int, w *fp8Weight) (qx []byte, sx []float32, qw []byte, sw []float32) {
	qx, sx = make([]byte, T*K), make([]float32, T)
	qw, sw = make([]byte, w.rows*w.cols), make([]float32, w.rows)
	cuda.CopyDtoH(r.s, qx, r.f.actQ.Ptr())
	cuda.CopyDtoH(r.s, sx, r.f.actS.Ptr())
	cuda.CopyDtoH(r.s, qw, w.q.Ptr())
	cuda.CopyDtoH(r.s, sw, w.scale.Ptr())
	r.sync()
	return qx, sx, qw, sw
}

// refQuant is quant_rows_e4m3 on the host: the same float32 operations.
func refQuant(x []uint16, rows, cols int) ([]byte, []float32) {
	q := make([]byte, rows*cols)
	s := make([]float32, rows)
	for i := range rows {
		row := x[i*cols : (i+1)*cols]
		var m float32
		bad := false
		for _, h := range row {
			a := float32(math.Abs(float64(fromBF16(h))))
			if !(a <= 3.4e38) {
				bad = true
			}
			m = max(m, a)
		}
		var inv float32
		switch {
		case bad:
			s[i], inv = float32(math.NaN()), 0
		case m == 0:
			s[i], inv = 1, 0
		default:
			s[i], inv = m/448, 448/m
		}
		for k, h := range row {
			q[i*cols+k] = safetensors.Float32ToE4M3(fromBF16(h) * inv)
		}
	}
	return q, s
}

// TestFP8Enums checks the cuBLASLt and CUDA enum values the FP8 path hard-codes
// against the headers of the toolkit on this machine.
func TestFP8Enums(t *testing.T) {
	inc := kernels.IncludeDir()
	var src []byte
	for _, f := range []string{"cublasLt.h", "library_types.h"} {
		b, err := os.ReadFile(filepath.Join(inc, f))
		if err != nil {
			t.Skipf("no CUDA headers: %v", err)
		}
		src = append(src, b...)
	}
	for name, want := range cuda.FP8Enums() {
		m := regexp.MustCompile(`\b` + name + `\s*=\s*(\d+)`).FindSubmatch(src)
		if m == nil {
			t.Errorf("%s not found in %s", name, inc)
			continue
		}
		got, _ := strconv.Atoi(string(m[1]))
		if got != want {
			t.Errorf("%s = %d in the headers, the bindings use %d", name, got, want)
		}
	}
}

// TestFP8Quant compares quant_rows_e4m3 bit for bit with the host encoder:
// vector and scalar paths, a zero row, a row with a NaN, a strided input.
func TestFP8Quant(t *testing.T) {
	r := newFP8Rig(t)
	for _, sz := range []struct{ rows, cols, ld int }{{1, 4096, 4096}, {7, 14336, 14336}, {33, 96, 96}, {5, 100, 100}, {3, 37, 40}, {4, 64, 72}} {
		x := r.bf16Rand(sz.rows*sz.ld, 1)
		for k := range sz.cols {
			x[k] = 0 // row 0 is zero
		}
		if sz.rows > 2 {
			x[2*sz.ld+sz.cols/2] = safetensors.Float32ToBF16(float32(math.NaN()))
			x[sz.ld+1] = safetensors.Float32ToBF16(-3e4) // a large outlier sets row 1's scale
		}
		dx := r.up(x)
		dq, ds := r.alloc(sz.rows*sz.cols+16), r.alloc(4*sz.rows)
		r.s.Memset8(dq.Ptr(), 0xAA, sz.rows*sz.cols)
		if err := r.f.quantRows(dq.Ptr(), ds.Ptr(), dx.Ptr(), sz.rows, sz.cols, sz.ld); err != nil {
			t.Fatal(err)
		}
		q := make([]byte, sz.rows*sz.cols)
		s := make([]float32, sz.rows)
		cuda.CopyDtoH(r.s, q, dq.Ptr())
		cuda.CopyDtoH(r.s, s, ds.Ptr())
		r.sync()
		packed := make([]uint16, sz.rows*sz.cols)
		for i := range sz.rows {
			copy(packed[i*sz.cols:], x[i*sz.ld:i*sz.ld+sz.cols])
		}
		wq, ws := refQuant(packed, sz.rows, sz.cols)
		bad := 0
		for i := range q {
			if q[i] != wq[i] {
				if bad < 3 {
					t.Errorf("%v: q[%d] = %#x, want %#x (x %v, scale %v)", sz, i, q[i], wq[i], fromBF16(packed[i]), ws[i/sz.cols])
				}
				bad++
			}
		}
		for i := range s {
			if math.Float32bits(s[i]) != math.Float32bits(ws[i]) && !(s[i] != s[i] && ws[i] != ws[i]) {
				t.Errorf("%v: scale[%d] = %v, want %v", sz, i, s[i], ws[i])
			}
		}
		// dequantized error: within half an e4m3 step (2^-4 relative) of x for normals
		var d, n float64
		for i, h := range packed {
			if s[i/sz.cols] != s[i/sz.cols] {
				continue
			}
			v := float64(fromBF16(h))
			e := float64(safetensors.E4M3ToFloat32(q[i])) * float64(s[i/sz.cols])
			d += (e - v) * (e - v)
			n += v * v
		}
		t.Logf("rows %d cols %d ld %d: %d/%d codes differ from the host encoder; dequantized relative error %.3g (finite non-zero rows)", sz.rows, sz.cols, sz.ld, bad, len(q), math.Sqrt(d/max(n, 1e-30)))
	}
}

// gemmRef computes out[t,n] = sum_k a(t,k) * b(n,k) in float64 over all cores.
func gemmRef(T, N, K int, a, b func(i, k int) float64) []float64 {
	out := make([]float64, T*N)
	A := make([]float64, T*K)
	B := make([]float64, N*K)
	for i := range T {
		for k := range K {
			A[i*K+k] = a(i, k)
		}
	}
	for j := range N {
		for k := range K {
			B[j*K+k] = b(j, k)
		}
	}
	var wg sync.WaitGroup
	workers := runtime.GOMAXPROCS(0)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := w; j < N; j += workers {
				bj := B[j*K : (j+1)*K]
				for i := range T {
					ai := A[i*K : (i+1)*K]
					s := 0.0
					for k, v := range ai {
						s += v * bj[k]
					}
					out[i*N+j] = s
				}
			}
		}()
	}
	wg.Wait()
	return out
}

func relErr64(got []float32, want []float64) float64 {
	var d, n float64
	for i, w := range want {
		x := float64(got[i]) - w
		if math.IsNaN(x) {
			return math.Inf(1)
		}
		d += x * x
		n += w * w
	}
	return math.Sqrt(d / n)
}

// TestFP8Gemm checks the FP8 GEMM (activation rows quantized on the GPU,
// weight rows quantized on the GPU, cuBLASLt outer-vector scaled product,
// bf16 out) against a float64 product of the dequantized operands (tight:
// only the bf16 output rounding and float32 accumulation remain), and
// reports how far it and the bf16 GEMM are from the float64 product of the
// original bf16 operands, and from each other. Odd T and widths included.
func TestFP8Gemm(t *testing.T) {
	r := newFP8Rig(t)
	const tight = 4e-3 // bf16 output rounding (unit roundoff 2^-9 after rounding to nearest)
	// fp8_gemv_seg takes 1-4 rows where planSeg divides K and N and fp8_stream
	// (from fp8StreamMinRows rows) has no plan (the first
	// and fourth, and the last ten but K = 18944), fp8_gemv the rest of T <= 16 with
	// K % 64 == 0 and N % 16 == 0 (the first seven); fp8_gemm_skinny 17-64 rows with N % 64 == 0 and K % 64 == 0
	// (split K over 2-8 blocks per weight tile, or not: 28672 rows, one
	// span); cuBLASLt the rest. The last four again with skinny taking up
	// to 128 rows (fp8_gemm_skinny_n128, which benchmarks compare).
	// split: a forced K split (cuBLASLt's batch and fp8_splitk_reduce);
	// 0: splitFor's, which splits several of the rest (17-256 rows)
	sizes := []struct{ T, N, K, top, split int }{{1, 4096, 4096, 0, 0}, {16, 6144, 4096, 0, 0}, {9, 28672, 4096, 0, 0}, {2, 4096, 14336, 0, 0}, {8, 48, 128, 0, 0}, {11, 32, 64, 0, 0}, {4, 16, 64, 0, 0},
		{17, 4096, 4096, 0, 0}, {64, 1024, 14336, 0, 0}, {33, 6144, 4096, 0, 0}, {48, 4096, 14336, 0, 0}, {32, 28672, 4096, 0, 0}, {20, 256, 4096, 0, 0}, {40, 128, 64, 0, 0}, {64, 192, 512, 0, 0},
		{7, 96, 272, 0, 0}, {33, 1000, 528, 0, 0}, {3, 100, 4096, 0, 0}, {129, 6144, 4096, 0, 0}, {300, 512, 4096, 0, 0}, {5, 97, 64, 0, 0}, {65, 4096, 4096, 0, 0},
		{65, 4096, 4096, skinnyMaxRows, 0}, {128, 6144, 4096, skinnyMaxRows, 0}, {100, 4096, 14336, skinnyMaxRows, 0}, {97, 192, 512, skinnyMaxRows, 0},
		{64, 4096, 14336, 0, 8}, {100, 4096, 4096, 0, 2}, {256, 6144, 4096, 0, 4}, {17, 1000, 528, 0, 3}, {64, 4096, 14336, 0, 1},
		// fp8_gemv_seg (1-4 rows, planSeg): every variant S x CH, and K no chunk divides (fp8_gemv)
		{1, 28672, 4096, 0, 0}, {1, 6144, 3072, 0, 0}, {2, 4096, 4096, 0, 0}, {2, 64, 2048, 0, 0}, {3, 6144, 4096, 0, 0}, {3, 4096, 14336, 0, 0},
		{3, 32, 3584, 0, 0}, {4, 48, 512, 0, 0}, {1, 4096, 18944, 0, 0}, {1, 6, 1024, 0, 0}}
	defer func() { r.f.skTop, r.f.splitForce = 0, 0 }()
	for _, sz := range sizes {
		r.f.skTop, r.f.splitForce = sz.top, sz.split
		xh, wh := r.bf16Rand(sz.T*sz.K, 1), r.bf16Rand(sz.N*sz.K, 0.02)
		dx, dw := r.up(xh), r.up(wh)
		w, err := r.f.upload(wh, sz.N, sz.K)
		if err != nil {
			t.Fatal(err)
		}
		out8, out16 := r.alloc(2*sz.T*sz.N), r.alloc(2*sz.T*sz.N)
		r.s.Memset8(out8.Ptr(), 0xFF, 2*sz.T*sz.N) // NaN poison: every element must be written
		r.s.Memset8(out16.Ptr(), 0xFF, 2*sz.T*sz.N)
		r.f.invalidate()
		err = r.f.linear(out8.Ptr(), dx.Ptr(), sz.T, w, 1)
		if err != nil {
			r.sync()
			t.Logf("T=%d N=%d K=%d: FP8 GEMM not available: %v", sz.T, sz.N, sz.K, err)
			if sz.N%8 == 0 { // fp8Projection's rule: these must work
				t.Errorf("T=%d N=%d K=%d: %v", sz.T, sz.N, sz.K, err)
			}
			continue
		}
		if err := r.mm.GemmTN(r.s, out16.Ptr(), cuda.R16BF, dx.Ptr(), cuda.R16BF, dw.Ptr(), cuda.R16BF, sz.T, sz.N, sz.K, 1, 0); err != nil {
			t.Fatal(err)
		}
		g8, g16 := make([]uint16, sz.T*sz.N), make([]uint16, sz.T*sz.N)
		cuda.CopyDtoH(r.s, g8, out8.Ptr())
		cuda.CopyDtoH(r.s, g16, out16.Ptr())
		qx, sx, qw, sw := r.operands(sz.T, sz.K, w)
		f8, f16 := make([]float32, len(g8)), make([]float32, len(g16))
		for i := range g8 {
			f8[i], f16[i] = fromBF16(g8[i]), fromBF16(g16[i])
		}
		deq := gemmRef(sz.T, sz.N, sz.K,
			func(i, k int) float64 { return float64(safetensors.E4M3ToFloat32(qx[i*sz.K+k])) * float64(sx[i]) },
			func(j, k int) float64 { return float64(safetensors.E4M3ToFloat32(qw[j*sz.K+k])) * float64(sw[j]) })
		exact := gemmRef(sz.T, sz.N, sz.K,
			func(i, k int) float64 { return float64(fromBF16(xh[i*sz.K+k])) },
			func(j, k int) float64 { return float64(fromBF16(wh[j*sz.K+k])) })
		eDeq, e8, e16 := relErr64(f8, deq), relErr64(f8, exact), relErr64(f16, exact)
		f16d := make([]float64, len(f16))
		for i, v := range f16 {
			f16d[i] = float64(v)
		}
		e816 := relErr64(f8, f16d)
		path := "cuBLASLt"
		p, seg := planSeg(sz.T, sz.N, sz.K)
		switch {
		case seg:
			path = fmt.Sprintf("fp8_gemv_seg_s%d_c%d, %d warps a block", p.k.S, p.k.CH, p.KS*p.G)
			// the twin that loads its weights early (steps with no LoRA update) gives the same bits
			path += ", and its early twin"
			again := r.alloc(2 * sz.T * sz.N)
			r.s.Memset8(again.Ptr(), 0xFF, 2*sz.T*sz.N)
			r.f.plain = true
			err := r.f.linear(again.Ptr(), dx.Ptr(), sz.T, w, 1)
			r.f.plain = false
			if err != nil {
				t.Fatal(err)
			}
			g2 := make([]uint16, sz.T*sz.N)
			cuda.CopyDtoH(r.s, g2, again.Ptr())
			r.sync()
			if !slices.Equal(g2, g8) {
				t.Errorf("T=%d N=%d K=%d: fp8_gemv_seg_e_s%d_c%d differs from fp8_gemv_seg_s%d_c%d", sz.T, sz.N, sz.K, p.k.S, p.k.CH, p.k.S, p.k.CH)
			}
			again.Free()
		case gemvFits(sz.T, sz.N, sz.K):
			path = "fp8_gemv"
		case r.f.splitNo[[3]int{sz.T, sz.N, sz.K}]:
			t.Errorf("T=%d N=%d K=%d: cuBLASLt has no plan for the K-split product", sz.T, sz.N, sz.K)
		case !skinnyFits(sz.T, sz.N, sz.K, r.f.skinnyTop()) && r.f.split(sz.T, sz.N, sz.K) > 1:
			path = fmt.Sprintf("cuBLASLt, K split %d ways", r.f.split(sz.T, sz.N, sz.K))
		case skinnyFits(sz.T, sz.N, sz.K, r.f.skinnyTop()):
			path = fmt.Sprintf("fp8_gemm_skinny, K split %d ways", skinnySplit(sz.N, sz.K, r.ctx.Device().SMs, skinnyPerSM(sz.T)))
			// again: the split's counters were left at zero, and the sum
			// is the same whichever block finishes last
			again := r.alloc(2 * sz.T * sz.N)
			if err := r.f.linear(again.Ptr(), dx.Ptr(), sz.T, w, 1); err != nil {
				t.Fatal(err)
			}
			g2 := make([]uint16, sz.T*sz.N)
			cuda.CopyDtoH(r.s, g2, again.Ptr())
			r.sync()
			if !slices.Equal(g2, g8) {
				t.Errorf("T=%d N=%d K=%d: a second fp8_gemm_skinny product differs from the first", sz.T, sz.N, sz.K)
			}
			again.Free()
		}
		t.Logf("T=%4d N=%5d K=%5d (%s): fp8 vs float64(dequantized) maxrel=%.3g; vs float64(bf16 operands): fp8 %.3g, bf16 GEMM %.3g; fp8 vs bf16 GEMM %.3g",
			sz.T, sz.N, sz.K, path, eDeq, e8, e16, e816)
		if !(eDeq <= tight) {
			t.Errorf("T=%d N=%d K=%d: FP8 GEMM vs dequantized float64 reference %.3g > %.0e", sz.T, sz.N, sz.K, eDeq, tight)
		}
		if !(e8 <= 0.1) {
			t.Errorf("T=%d N=%d K=%d: FP8 GEMM vs float64 of the bf16 operands %.3g > 0.1", sz.T, sz.N, sz.K, e8)
		}
		r.dropWeight(w)
	}
}

// TestFP8GemmBench times the FP8 GEMM (with and without the activation
// quantization) against the bf16 GEMM at Llama-3.1-8B projection shapes,
// rotating among weight copies that together exceed L2, timed as replays of
// a recorded graph (graphMedianUs). PEFTD_FP8_BENCH=1 runs it.
func TestFP8GemmBench(t *testing.T) {
	if os.Getenv("PEFTD_FP8_BENCH") == "" {
		t.Skip("PEFTD_FP8_BENCH is not set")
	}
	r := newFP8Rig(t)
	bw := r.copyBW()
	const peak16, peak8 = 989e12, 1979e12 // H100 SXM dense bf16 / fp8 tensor FLOP/s (datasheet)
	bench("fp8gemm device %s; copy bandwidth %.0f GB/s; peaks bf16 %.0f, fp8 %.0f TFLOP/s (datasheet); median of 15 replays of 20 calls recorded as a graph, weights rotated over >= 150 MB",
		r.ctx.Device().Name, bw/1e9, peak16/1e12, peak8/1e12)
	bench("fp8gemm %-8s %5s %9s %9s %9s %9s %9s %9s %9s %8s %9s %9s %7s %7s %7s %5s %8s %8s %8s %8s %8s %8s %8s %8s", "shape", "T", "bf16_us", "fp8_us", "gvalt_us", "skinny_us", "lt8_us", "quant_us", "fp8+q_us", "speedup", "floor16", "floor8", "frac16", "frac8", "TF/s8", "split", "sp2_us", "sp4_us", "sp8_us", "fs_us", "fsfrac8", "wg_us", "wgfrac8", "gv_us")
	// PEFTD_BENCH_SHAPES: other weight shapes, e.g. g8k:28672x8192
	shapes := envShapes(t, "PEFTD_BENCH_SHAPES", shapes8B)
	Ts := envBatches(t, "PEFTD_FP8_BENCH_T", []int{1, 4, 16, 32, 48, 64, 96, 128, 192, 256, 2048}) // e.g. 1,4,8,16 for the few-row kernels alone
	// 20 calls per recorded graph (rotating the weights), median of 15 replays
	timeIt := func(_ int, fn func(i int) error) float64 { return graphMedianUs(t, r.s, 20, 15, fn) }
	maxT := slices.Max(Ts)
	for _, sh := range shapes {
		N, K := sh.N, sh.K
		wh := r.bf16Rand(N*K, 0.02)
		n16 := max(2, (150<<20)/(2*N*K)+1)
		n8 := max(2, (150<<20)/(N*K)+1)
		w16 := make([]*cuda.DeviceBuffer, n16)
		w16[0] = r.up(wh)
		for i := 1; i < n16; i++ {
			w16[i] = r.alloc(2 * N * K)
			r.s.CopyDtoD(w16[i].Ptr(), w16[0].Ptr(), 2*N*K)
		}
		w8 := make([]*fp8Weight, n8)
		var err error
		if w8[0], err = r.f.upload(wh, N, K); err != nil {
			t.Fatal(err)
		}
		for i := 1; i < n8; i++ {
			w8[i] = &fp8Weight{q: r.alloc(N * K), scale: r.alloc(4 * N), rows: N, cols: K}
			r.s.CopyDtoD(w8[i].q.Ptr(), w8[0].q.Ptr(), N*K)
			r.s.CopyDtoD(w8[i].scale.Ptr(), w8[0].scale.Ptr(), 4*N)
		}
		x := r.up(r.bf16Rand(maxT*K, 1))
		out := r.alloc(2 * maxT * N)
		r.sync()
		for _, T := range Ts {
			t16 := timeIt(30, func(i int) error {
				return r.mm.GemmTN(r.s, out.Ptr(), cuda.R16BF, x.Ptr(), cuda.R16BF, w16[i%n16].Ptr(), cuda.R16BF, T, N, K, 1, 0)
			})
			r.f.invalidate()
			if err := r.f.linear(out.Ptr(), x.Ptr(), T, w8[0], 7); err != nil { // quantizes x once (cached below)
				t.Fatal(err)
			}
			t8 := timeIt(30, func(i int) error { return r.f.linear(out.Ptr(), x.Ptr(), T, w8[i%n8], 7) })
			// fp8_gemv with gemvWarpsFor's block size (gv: fp8_gemv_seg's
			// alternative at 1-4 rows) and with the other (gv8: 8 or 16 warps)
			gv, gv8 := math.NaN(), math.NaN()
			if gemvFits(T, N, K) {
				r.f.segOff, r.f.streamOff = true, true
				gv = timeIt(30, func(i int) error { return r.f.linear(out.Ptr(), x.Ptr(), T, w8[i%n8], 7) })
				r.f.gvWarps = 24 - gemvWarpsFor(N, r.ctx.Device().SMs)
				gv8 = timeIt(30, func(i int) error { return r.f.linear(out.Ptr(), x.Ptr(), T, w8[i%n8], 7) })
				r.f.gvWarps, r.f.streamOff, r.f.segOff = 0, false, false
			}
			sk := math.NaN() // fp8_gemm_skinny (n32, n64 or n128 by rows) where the automatic choice is cuBLASLt (17-128 rows)
			if !skinnyFits(T, N, K, skinnyAutoRows) && skinnyFits(T, N, K, skinnyMaxRows) {
				r.f.skTop = skinnyMaxRows
				// one call outside the capture sizes its K-split buffers
				if err := r.f.linear(out.Ptr(), x.Ptr(), T, w8[0], 7); err != nil {
					t.Fatal(err)
				}
				sk = timeIt(30, func(i int) error { return r.f.linear(out.Ptr(), x.Ptr(), T, w8[i%n8], 7) })
				r.f.skTop = 0
			}
			lt := timeIt(30, func(i int) error { // cuBLASLt's FP8 product whatever T (fp8_gemv's alternative)
				w := w8[i%n8]
				return r.mm.GemmTNScaled(r.s, out.Ptr(), cuda.R16BF, r.f.actQ.Ptr(), r.f.actS.Ptr(), w.q.Ptr(), w.scale.Ptr(), T, N, K)
			})
			// the K-split product forced 2, 4 and 8 ways (fp8_gemv's rows: not taken)
			sp := [3]float64{math.NaN(), math.NaN(), math.NaN()}
			for j, S := range []int{2, 4, 8} {
				if T <= gemvMaxRows || T > splitMaxRows || K%(16*S) != 0 {
					continue
				}
				r.f.splitForce = S
				if err := r.f.linear(out.Ptr(), x.Ptr(), T, w8[0], 7); err != nil { // sizes the partials outside the capture
					t.Fatal(err)
				}
				sp[j] = timeIt(30, func(i int) error { return r.f.linear(out.Ptr(), x.Ptr(), T, w8[i%n8], 7) })
				r.f.splitForce = 0
			}
			fs := math.NaN() // fp8_stream where it plans the shape (at 1-8 rows not the automatic choice: streamOn)
			if _, ok := r.f.stream.plan(T, N, K); ok {
				r.f.streamOn = true
				fs = timeIt(30, func(i int) error { return r.f.linear(out.Ptr(), x.Ptr(), T, w8[i%n8], 7) })
				r.f.streamOn = false
			}
			wg := math.NaN() // fp8_wg (wgmma, PEFTD_WG) where it takes the shape (17-128 rows)
			if r.f.wg != nil && r.f.wg.fits(T, N, K) {
				r.f.wgOn = true
				wg = timeIt(30, func(i int) error { return r.f.linear(out.Ptr(), x.Ptr(), T, w8[i%n8], 7) })
				r.f.wgOn = false
			}
			ws := math.NaN() // fp8_ws (ws.go) with its own plan, where it plans the shape (17-64 rows)
			var wsp wsPlan
			if p, ok := r.f.ws.plan(T, N, K); ok {
				wsp, r.f.wsOn = p, true
				ws = timeIt(30, func(i int) error { return r.f.linear(out.Ptr(), x.Ptr(), T, w8[i%n8], 7) })
				r.f.wsOn = false
			}
			wsPlans := wsSweep(r.f.ws, T, N, K, func() float64 { // PEFTD_WS_SWEEP: every plan of one wave
				return timeIt(30, func(i int) error { return r.f.linear(out.Ptr(), x.Ptr(), T, w8[i%n8], 7) })
			}, func(on bool) { r.f.wsOn = on })
			wgGrids := wgSweep(t, r.f.wg, T, N, K, func() float64 { // PEFTD_WG_GRIDS
				return timeIt(30, func(i int) error { return r.f.linear(out.Ptr(), x.Ptr(), T, w8[i%n8], 7) })
			}, func(on bool) { r.f.wgOn = on })
			tq := timeIt(30, func(i int) error {
				return r.f.quantRows(r.f.actQ.Ptr(), r.f.actS.Ptr(), x.Ptr(), T, K, K)
			})
			tt := timeIt(30, func(i int) error {
				r.f.invalidate()
				return r.f.linear(out.Ptr(), x.Ptr(), T, w8[i%n8], 7)
			})
			fl := 2 * float64(T) * float64(N) * float64(K)
			b16 := 2*float64(N*K) + 2*float64(T*K) + 2*float64(T*N)
			b8 := float64(N*K) + 4*float64(N) + float64(T*K) + 4*float64(T) + 2*float64(T*N)
			fl16 := max(b16/bw, fl/peak16) * 1e6
			fl8 := max(b8/bw, fl/peak8) * 1e6
			auto := 1
			if !gemvFits(T, N, K) {
				auto = r.f.split(T, N, K)
			}
			bench("fp8gemm %-8s %5d %9.1f %9.1f %9.1f %9.1f %9.1f %9.1f %9.1f %8.2f %9.1f %9.1f %7.2f %7.2f %7.0f %5d %8.1f %8.1f %8.1f %8.1f %8.2f %8.1f %8.2f %8.1f", sh.name, T, t16, t8, gv8, sk, lt, tq, tt, t16/tt, fl16, fl8, fl16/t16, fl8/t8, fl/(t8*1e-6)/1e12, auto, sp[0], sp[1], sp[2], fs, fl8/fs, wg, fl8/wg, gv)
			for _, w := range wgGrids {
				bench("fp8wg %-8s %5d grid %3d %8.1f us %6.2f of floor8", sh.name, T, w.G, w.us, fl8/w.us)
			}
			// fp8_wgsk (wgsk.go) where it takes the shape (65-256 rows): on
			// every SM, and on the 84 a 48-SM LoRA hold leaves against the
			// default product there (v0.96: o and down beside the LoRA stream)
			if g := r.f.wgsk; g != nil && T >= wgskMinRows && g.fits(T, N, K) {
				prod := func(i int) error { return r.f.linear(out.Ptr(), x.Ptr(), T, w8[i%n8], 7) }
				const held = 84
				r.f.wgskOn = true
				wk := timeIt(30, prod)
				g.SetSMTarget(held)
				wk84 := timeIt(30, prod)
				g.SetSMTarget(0)
				r.f.wgskOn = false
				r.f.mm.SetSMTarget(held)
				def84 := timeIt(30, prod)
				r.f.mm.SetSMTarget(0)
				bench("fp8wgsk %-8s %5d all SMs %8.1f us (default %8.1f, %5.2f of floor8) | %d SMs %8.1f us (default %8.1f)", sh.name, T, wk, t8, fl8/wk, held, wk84, def84)
				// where a launch's time goes, block by block (wgskPhases:
				// the stamps of a second eager launch)
				for _, target := range []int{0, held} {
					g.SetSMTarget(target)
					G := g.grid(N, K)
					buf := r.alloc(8 * wgskTimes * G)
					g.times, r.f.wgskOn = buf.Ptr(), true
					for i := range 2 {
						if err := prod(i); err != nil {
							t.Fatal(err)
						}
					}
					g.times, r.f.wgskOn = 0, false
					g.SetSMTarget(0)
					h := make([]uint64, wgskTimes*G)
					if err := cuda.CopyDtoH(r.s, h, buf.Ptr()); err != nil {
						t.Fatal(err)
					}
					r.sync()
					ph, err := wgskPhases(h)
					if err != nil {
						t.Fatalf("%s at %d rows on %d blocks: %v", sh.name, T, G, err)
					}
					bench("fp8wgsk phases %-8s %5d grid %3d: %v", sh.name, T, G, ph)
				}
			}
			if !math.IsNaN(ws) {
				bench("fp8ws %-8s %5d plan %-7v %8.1f us %6.2f of floor8 (default product %8.1f us %6.2f)", sh.name, T, wsp, ws, fl8/ws, t8, fl8/t8)
			}
			for _, w := range wsPlans {
				bench("fp8ws %-8s %5d plan %-7v %8.1f us %6.2f of floor8 (early %d, stagger %v)", sh.name, T, w.p, w.us, fl8/w.us, w.early, w.stagger)
			}
		}
		r.sync()
		for i := 1; i < n8; i++ {
			w8[i].q.Free()
			w8[i].scale.Free()
		}
		for i := 1; i < n16; i++ {
			w16[i].Free()
		}
		r.dropWeight(w8[0])
	}
}

// copyBW is device-to-device copy bandwidth (bytes read + written per second).
func (r *fp8Rig) copyBW() float64 { return deviceCopyBW(r.t, r.ctx, r.s) }

// quality is how far an engine's logits are from the float32 reference over
// the fixture's cases (no limits applied: the FP8 tests report it).
type quality struct {
	perCase             []float64 // relative error over all of a case's rows
	worstRow            float64
	kl                  float64 // mean KL(reference || engine) of the softmaxes, nats per row
	rows                int
	match, ties, misses int // greedy: same token, reference near-tie (<= tieTol), other
	worstMissGap        float64
}

func (q quality) worst() float64 { return slices.Max(q.perCase) }

func klRow(ref, got []float32) float64 {
	lse := func(v []float32) float64 {
		m := float64(v[sample.Argmax(v)])
		s := 0.0
		for _, x := range v {
			s += math.Exp(float64(x) - m)
		}
		return m + math.Log(s)
	}
	lr, lg := lse(ref), lse(got)
	kl := 0.0
	for i := range ref {
		pr := float64(ref[i]) - lr
		kl += math.Exp(pr) * (pr - (float64(got[i]) - lg))
	}
	return kl
}

// measureCases runs the fixture's cases co-batched and teacher-forced
// (fx.Run, as runCases), measuring every row instead of asserting.
func measureCases(t *testing.T, e *engine.Engine, slots map[string]int, cases []refCase) quality {
	t.Helper()
	V := e.Config().VocabSize
	var q quality
	agg := make([]fx.ErrAcc, len(cases))
	fx.Run(t, e, slots, cases, func(r fx.Row) {
		for o := 0; o < len(r.Got); o += V {
			got, ref := r.Got[o:o+V], r.Ref[o:o+V]
			q.worstRow = max(q.worstRow, fx.RelErr(got, ref))
			agg[r.Case].Add(got, ref)
			q.kl += klRow(ref, got)
			q.rows++
		}
		if !r.Check {
			return
		}
		got, ref := r.Got[len(r.Got)-V:], r.Ref[len(r.Ref)-V:]
		g := sample.Argmax(got)
		gap := float64(ref[sample.Argmax(ref)] - ref[g])
		switch {
		case g == r.Want:
			q.match++
		case gap <= tieTol:
			q.ties++
		default:
			q.misses++
			q.worstMissGap = max(q.worstMissGap, gap)
		}
	})
	for i := range cases {
		q.perCase = append(q.perCase, agg[i].Rel())
	}
	q.kl /= float64(q.rows)
	return q
}

// measureFormat runs the fixture's cases (co-batched, every adapter
// loaded) on an engine with weights in format wf and measures them.
func measureFormat(t *testing.T, m *llama.Model, adapters map[string]*lora.Adapter, cases []refCase, opts engine.Options, wf string) quality {
	t.Helper()
	return measureWith(t, m, adapters, cases, opts, Options{WeightFormat: wf})
}

// measureWith is measureFormat on a backend made with bo.
func measureWith(t *testing.T, m *llama.Model, adapters map[string]*lora.Adapter, cases []refCase, opts engine.Options, bo Options) quality {
	t.Helper()
	wf := bo.WeightFormat
	e := newEngineWith(t, m, opts, bo)
	b := e.Backend().(*Backend)
	slots := map[string]int{}
	for n := range adapters {
		slots[n] = len(slots)
	}
	for n, sl := range slots {
		if err := e.LoadAdapter(sl, adapters[n]); err != nil {
			t.Fatal(err)
		}
	}
	if wf == WeightsFP8 {
		t.Logf("fp8: %d projection weights, %.1f MB in e4m3 + scales", len(b.f8.weights), float64(fp8Bytes(b.f8))/1e6)
	}
	return measureCases(t, e, slots, cases)
}

// compareFormats runs the fixture with bf16 and then fp8 weights (same
// cases, co-batched, every adapter loaded) and logs both side by side.
func compareFormats(t *testing.T, m *llama.Model, adapters map[string]*lora.Adapter, cases []refCase, opts engine.Options) map[string]quality {
	res := map[string]quality{}
	for _, wf := range []string{WeightsBF16, WeightsFP8} {
		res[wf] = measureFormat(t, m, adapters, cases, opts, wf)
	}
	t.Logf("%-4s %-18s %9s %9s", "case", "adapter", "bf16_rel", "fp8_rel")
	for i, c := range cases {
		t.Logf("%-4d %-18s %9.4f %9.4f", c.ID, name(c), res[WeightsBF16].perCase[i], res[WeightsFP8].perCase[i])
	}
	for _, wf := range []string{WeightsBF16, WeightsFP8} {
		q := res[wf]
		t.Logf("%s maxrel=%.4g (worst case, all rows); worst row %.4g; mean KL(ref||%s) %.3g nats over %d rows; greedy %d/%d exact, %d near-ties, %d misses (worst reference gap %.3g)",
			wf, q.worst(), q.worstRow, wf, q.kl, q.rows, q.match, q.match+q.ties+q.misses, q.ties, q.misses, q.worstMissGap)
	}
	return res
}

// TestFP8Fixture: the tiny fixture (hidden 128) with bf16 and fp8 weights.
// The bf16 run must meet the usual limits; the fp8 run is reported, with
// only a gross-error bound (a broken FP8 path, e.g. scales applied to the
// wrong axis, gives errors near 1). Measured on the H100: worst case 0.099
// here, 0.176 on the 8B-shape fixture (bf16: 0.014, 0.015); e4m3's 3
// mantissa bits cost 0.037 per GEMM (TestFP8Gemm), so this is the format's
// error, not a kernel's.
func TestFP8Fixture(t *testing.T) {
	if err := Available(); err != nil {
		t.Skipf("no GPU: %v", err)
	}
	m, adapters, cases := loadFixture(t)
	opts := engine.DefaultOptions()
	opts.AdapterSlots = len(adapters)
	res := compareFormats(t, m, adapters, cases, opts)
	if w := res[WeightsBF16].worst(); !(w <= fixtureTol) {
		t.Errorf("bf16: worst case %.3g > %.0e", w, fixtureTol)
	}
	if w := res[WeightsFP8].worst(); !(w <= fp8GrossTol) {
		t.Errorf("fp8: worst case %.3g > %.2g", w, fp8GrossTol)
	}
}

// TestHalfUpdates: the fixture co-batched with LoRA updates beside their
// products written as bf16, against the same engine with float32 updates,
// with bf16 and FP8 weights: the gate/up updates read by silu_mul_h /
// _o2h / _clh (kernelForce.guHalf 1 against -1), the o and down updates
// read by add_rmsnorm_h (kernelForce.outHalf 1 against -1), and the q/k/v
// update read by rope_store_rows_h (kernelForce.qkvHalf; the 151-row
// prefill: at 8 rows rope_store_lora expands it itself). The
// co-batched prefill (151 rows: silu_mul_o2 with FP8 weights) and the
// 8-row decode steps (silu_mul_cl with FP8 on sm_90, silu_mul with bf16;
// add_rmsnorm_h in place of add_rmsnorm_cl) take them. The reference
// error may grow by at most halfSlack in any case (each update is rounded
// to bf16 once more: a few parts in 1,000 of an update that is itself a
// small part of its output); bf16 must still meet fixtureTol.
func TestHalfUpdates(t *testing.T) {
	if err := Available(); err != nil {
		t.Skipf("no GPU: %v", err)
	}
	const halfSlack = 0.01
	m, adapters, cases := loadFixture(t)
	opts := engine.DefaultOptions()
	opts.AdapterSlots = len(adapters)
	for _, h := range []struct {
		name   string
		set    func(f *kernelForce, on int)
		kernel string
		runs   func(b *Backend) int
	}{
		{"gate_up", func(f *kernelForce, on int) { f.guHalf, f.outHalf, f.qkvHalf = on, -1, -1 }, "silu_mul_*h", func(b *Backend) int { return b.siluHalfs }},
		{"o_down", func(f *kernelForce, on int) { f.outHalf, f.qkvHalf = on, -1 }, "add_rmsnorm_h", func(b *Backend) int { return b.normHalfs }},
		{"qkv", func(f *kernelForce, on int) { f.qkvHalf, f.outHalf = on, -1 }, "rope_store*_h", func(b *Backend) int { return b.ropeHalfs }},
	} {
		for _, wf := range []string{WeightsBF16, WeightsFP8} {
			t.Run(h.name+"/"+wf, func(t *testing.T) {
				var q [2]quality
				for i, on := range []int{-1, 1} {
					e := newEngineWith(t, m, opts, Options{WeightFormat: wf})
					b := e.Backend().(*Backend)
					if wf == WeightsFP8 && b.f8 == nil {
						t.Skip("no FP8 weights on this GPU")
					}
					h.set(&b.force, on)
					if err := b.dropGraphs(); err != nil {
						t.Fatal(err)
					}
					slots := map[string]int{}
					for _, n := range slices.Sorted(maps.Keys(adapters)) {
						slots[n] = len(slots)
						if err := e.LoadAdapter(slots[n], adapters[n]); err != nil {
							t.Fatal(err)
						}
					}
					q[i] = measureCases(t, e, slots, cases)
					if (h.runs(b) > 0) != (on > 0) {
						t.Errorf("%s %d: %d %s launches", h.name, on, h.runs(b), h.kernel)
					}
					t.Logf("%s %d: worst case %.4g, worst row %.4g, mean KL %.3g, %s launches %d", h.name, on, q[i].worst(), q[i].worstRow, q[i].kl, h.kernel, h.runs(b))
				}
				for c := range cases {
					if d := q[1].perCase[c] - q[0].perCase[c]; !(d <= halfSlack) {
						t.Errorf("case %d: relative error %.4g with bf16 %s updates, %.4g with float32", cases[c].ID, q[1].perCase[c], h.name, q[0].perCase[c])
					}
				}
				tol := fp8GrossTol
				if wf == WeightsBF16 {
					tol = fixtureTol
				}
				if w := q[1].worst(); !(w <= tol) {
					t.Errorf("worst case %.3g > %.2g", w, tol)
				}
			})
		}
	}
}

// fp8GrossTol bounds the FP8 fixtures' worst case: it catches a broken FP8
// path, it does not say FP8 matches bf16 (it does not: see TestFP8Fixture).
const fp8GrossTol = 0.3

// TestFP8Fixture8BShape: the 8B-shape fixture (PEFTD_FIXTURE_8B) with bf16
// and fp8 weights, same cases.
func TestFP8Fixture8BShape(t *testing.T) {
	dir := os.Getenv("PEFTD_FIXTURE_8B")
	if dir == "" {
		t.Skip("PEFTD_FIXTURE_8B is not set")
	}
	m, adapters, cases := loadFixtureDir(t, dir)
	opts := engine.Options{MaxTokens: 1024, KVBlocks: 512, BlockSize: 16, AdapterSlots: len(adapters)}
	res := compareFormats(t, m, adapters, cases, opts)
	if w := res[WeightsBF16].worst(); !(w <= fixtureTol) {
		t.Errorf("bf16: worst case %.3g > %.0e", w, fixtureTol)
	}
	if w := res[WeightsFP8].worst(); !(w <= fp8GrossTol) {
		t.Errorf("fp8: worst case %.3g > %.2g", w, fp8GrossTol)
	}
}

// TestFP8ActivationCache: consecutive projections of one input quantize it
// once; a write to the input (here a LoRA-free Linear into it, then a
// host copy) makes the next projection quantize again.
func TestFP8ActivationCache(t *testing.T) {
	cfg := testConfig(256, 512, 4, 2, 64, 64, 1)
	r := newRig(t, cfg, 8, engine.KVSpec{Layers: 1, Blocks: 4, BlockSize: 16, KVHeads: 2, HeadDim: 64})
	var err error
	if r.b.f8, err = newFP8(r.b.ctx, r.b.s, r.b.mm, kernels.Options{}); err != nil {
		t.Fatal(err)
	}
	T, K, N := 5, 256, 512
	w := r.rnd(N*K, 0.05)
	raw := make([]byte, 4*len(w))
	for i, v := range w {
		u := math.Float32bits(v)
		raw[4*i], raw[4*i+1], raw[4*i+2], raw[4*i+3] = byte(u), byte(u>>8), byte(u>>16), byte(u>>24)
	}
	fw, err := r.b.Upload("model.layers.0.mlp.up_proj.weight", safetensors.F32, []int{N, K}, raw)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := fw.(*fp8Weight); !ok {
		t.Fatalf("projection uploaded as %T, want *fp8Weight", fw)
	}
	x, o1, o2 := r.buffer(T, K), r.buffer(T, N), r.buffer(T, N)
	run := func(v []float32) ([]float32, []float32) {
		r.fill(x, v)
		r.begin(oneSeq(T, 16, zeros(T)))
		r.b.Linear(o1, x, fw)
		r.b.Linear(o2, x, fw) // cached quantization
		g1, g2 := r.read(o1, T), r.read(o2, T)
		r.end()
		return g1, g2
	}
	a1, a2 := run(r.rnd(T*K, 1))
	b1, b2 := run(r.rnd(T*K, 1))
	if !slices.Equal(a1, a2) || !slices.Equal(b1, b2) {
		t.Error("two projections of one input differ")
	}
	if slices.Equal(a1, b1) {
		t.Error("a new input gave the old result: stale quantized activations")
	}
}

// fp8Bytes is the device memory of the FP8 weights (values and scales).
func fp8Bytes(f *fp8State) int {
	n := 0
	for _, w := range f.weights {
		n += w.q.Size() + w.scale.Size()
	}
	return n
}

// newFP8NormRig is a rig of hidden width H with the FP8 path (its
// activation scratch sized for T rows), for the fused quantization tests.
func newFP8NormRig(t *testing.T, T, H int) (*rig, *fp8State) {
	t.Helper()
	r := newRig(t, testConfig(H, 512, 4, 2, 64, 64, 1), 8, engine.KVSpec{Layers: 1, Blocks: 4, BlockSize: 16, KVHeads: 2, HeadDim: 64})
	f8, err := newFP8(r.b.ctx, r.b.s, r.b.mm, kernels.Options{})
	if err != nil {
		t.Fatal(err)
	}
	r.b.f8 = f8
	if err := f8.reserve(T, H); err != nil {
		t.Fatal(err)
	}
	return r, f8
}

// TestFP8FusedQuant: with FP8 projections add_rmsnorm quantizes the rows it
// normalizes into the activation scratch, byte for byte what
// quant_rows_e4m3 makes of them (16-byte words at H = 256, one value at a
// time at H = 264; a zero row gets scale 1), and marks the scratch as
// holding them, so the next FP8 projection quantizes nothing; that
// projection equals the one after a fresh quantization.
func TestFP8FusedQuant(t *testing.T) {
	for _, H := range []int{256, 264} {
		t.Run(fmt.Sprint(H), func(t *testing.T) {
			const T = 5
			r, f8 := newFP8NormRig(t, T, H)
			xv := r.rnd(T*H, 1)
			clear(xv[2*H : 3*H]) // a zero row
			x, out := r.buffer(T, H), r.buffer(T, H)
			nw, _ := r.weight(1, H, 1)
			r.fill(x, xv)
			r.begin(oneSeq(T, 16, zeros(T)))
			r.b.AddRMSNorm(x, nil, out, nw, 1e-5)
			sF := checkFusedQuant(t, r, f8, out, T, H)
			r.end()
			if sF[2] != 1 {
				t.Errorf("zero row: scale %g, want 1", sF[2])
			}
			if H%16 != 0 {
				return
			}
			// the next projection uses the fused copy; a fresh quantization gives the same
			const N = 128
			w := r.rnd(N*H, 0.05)
			raw := make([]byte, 4*len(w))
			for i, v := range w {
				binary.LittleEndian.PutUint32(raw[4*i:], math.Float32bits(v))
			}
			fw, err := r.b.Upload("model.layers.0.mlp.up_proj.weight", safetensors.F32, []int{N, H}, raw)
			if err != nil {
				t.Fatal(err)
			}
			o1, o2 := r.buffer(T, N), r.buffer(T, N)
			r.begin(oneSeq(T, 16, zeros(T)))
			r.b.AddRMSNorm(x, nil, out, nw, 1e-5)
			r.b.Linear(o1, out, fw)
			f8.invalidate()
			r.b.Linear(o2, out, fw)
			g1, g2 := r.read(o1, T), r.read(o2, T)
			r.end()
			if !slices.Equal(g1, g2) {
				t.Error("the projection of the fused copy differs from the one after a fresh quantization")
			}
		})
	}
}

// checkFusedQuant compares the e4m3 rows and scales a fused kernel left in
// f8's activation scratch with what quant_rows_e4m3 makes of out (T rows of
// H values) and returns the fused scales.
func checkFusedQuant(t *testing.T, r *rig, f8 *fp8State, out engine.Buffer, T, H int) []float32 {
	t.Helper()
	o := buf(out)
	if !f8.cValid || f8.cIn != o.mem.Ptr() || f8.cRows != T || f8.cCols != H {
		t.Fatalf("the scratch is not marked as holding the rows: %+v", f8)
	}
	scratch := func() ([]byte, []float32) {
		q, sc := make([]byte, T*H), make([]float32, T)
		if err := cuda.CopyDtoH(r.b.s, q, f8.actQ.Ptr()); err != nil {
			t.Fatal(err)
		}
		if err := cuda.CopyDtoH(r.b.s, sc, f8.actS.Ptr()); err != nil {
			t.Fatal(err)
		}
		return q, sc
	}
	qF, sF := scratch()
	if err := f8.quantRows(f8.actQ.Ptr(), f8.actS.Ptr(), o.mem.Ptr(), T, H, H); err != nil {
		t.Fatal(err)
	}
	qU, sU := scratch()
	if !slices.Equal(qF, qU) {
		t.Error("fused e4m3 values differ from quant_rows_e4m3's")
	}
	for i := range sF {
		if math.Float32bits(sF[i]) != math.Float32bits(sU[i]) {
			t.Errorf("row %d: fused scale %g, quant_rows_e4m3 %g", i, sF[i], sU[i])
		}
	}
	return sF
}

// TestFP8FusedQuantSiLU: with FP8 projections silu_mul quantizes its rows
// for the down projection (one block per row); the bf16 product is the
// same as without the fusion and the e4m3 rows and scales are
// quant_rows_e4m3's. A width that is not a multiple of 8 takes the unfused
// kernel.
func TestFP8FusedQuantSiLU(t *testing.T) {
	// each width with one block a row (silu_mul; o2: silu_mul_o2) and, on
	// sm_90+, a cluster of blocks a row (silu_mul_cl, the default up to
	// siluClRows rows): 20000 gives some threads of silu_mul_cl two words
	for _, c := range []struct{ H, cl, o2 int }{{256, -1, 0}, {1032, -1, 0}, {260, -1, 0}, {256, 0, 0}, {1032, 0, 0}, {14344, 0, 0}, {20000, 0, 0}, {20000, -1, 0},
		{14344, -1, 1}, {20000, -1, 1}, {1032, -1, 1}} {
		H := c.H
		t.Run(fmt.Sprintf("%d-cl%d-o2%d", H, c.cl, c.o2), func(t *testing.T) {
			cfg := testConfig(128, H, 4, 2, 32, 64, 1)
			r := newRig(t, cfg, 8, engine.KVSpec{Layers: 1, Blocks: 4, BlockSize: 16, KVHeads: 2, HeadDim: 32})
			f8, err := newFP8(r.b.ctx, r.b.s, r.b.mm, kernels.Options{})
			if err != nil {
				t.Fatal(err)
			}
			const T = 5
			if err := f8.reserve(T, H); err != nil {
				t.Fatal(err)
			}
			gv, uv := r.rnd(T*H, 3), r.rnd(T*H, 2)
			clear(gv[2*H : 3*H]) // a zero row
			g, u, out := r.buffer(T, H), r.buffer(T, H), r.buffer(T, H)
			r.fill(g, gv)
			r.fill(u, uv)
			r.begin(oneSeq(T, 16, zeros(T)))
			r.b.SiLUMul(out, g, u)
			plain := r.read(out, T)
			r.end()
			r.b.f8 = f8
			r.b.force.siluCl, r.b.force.siluO2 = c.cl, c.o2
			if c.cl == 0 && !r.b.siluClFits(H) && r.b.ctx.Device().Major >= 9 {
				t.Fatalf("silu_mul_cl does not take %d columns", H)
			}
			r.begin(oneSeq(T, 16, zeros(T)))
			r.b.SiLUMul(out, g, u)
			fused := r.read(out, T)
			if H%8 != 0 {
				if f8.cValid {
					t.Error("a width that is not a multiple of 8 marked the scratch as holding the rows")
				}
				r.end()
				return
			}
			sF := checkFusedQuant(t, r, f8, out, T, H)
			r.end()
			if !slices.Equal(plain, fused) {
				t.Error("the fused kernel's bf16 product differs from the unfused one's")
			}
			if sF[2] != 1 {
				t.Errorf("zero row: scale %g, want 1", sF[2])
			}
		})
	}
}

// TestFP8SchemeFidelity (issue 14, scheme fidelity): peftd's fp8 path
// against a torch reference of exactly its scheme (tools/make_fp8_reference.py
// made PEFTD_FP8_REF from the fixture PEFTD_FP8_REF_EXACT), case by case
// (relative logit error over the case's rows, teacher-forced, every adapter
// loaded and co-batched), measured in units of the scheme's own error (the
// reference's distance from the exact float32 model):
//   - the fp8 path must be at most schemeFidelityMax of it from the reference;
//   - peftd's bf16 path, which has none of the scheme, must be at least
//     schemeControlMin of it away (median over the cases): the reference
//     tells the scheme from its absence, so the first bound can fail.
//
// Why not closer than ~0.6: peftd computes everything around the FP8
// products in bf16, the reference in float32. The inputs to each e4m3
// rounding differ by ~2^-8 relative, e4m3's step is 2^-3, so ~1/32 of the
// roundings land one step apart: an RMS of sqrt(1/32) ~ 0.18 step against the
// rounding's own 0.29 step, ~0.6 of the scheme's error. v0.16 (H200) measured
// 0.43-0.63 with FP8 weights, up to 0.64 with FP8 keys too; the bf16 path ~1.
// scripts/gpu-check.sh's fp8ref phase makes the references (tiny, and the
// 8B shape when fixture8b made it) and runs this.
func TestFP8SchemeFidelity(t *testing.T) {
	ref, exact := os.Getenv("PEFTD_FP8_REF"), os.Getenv("PEFTD_FP8_REF_EXACT")
	if ref == "" || exact == "" {
		t.Skip("PEFTD_FP8_REF and PEFTD_FP8_REF_EXACT are not both set")
	}
	const schemeFidelityMax, schemeControlMin = 0.75, 0.9
	m, adapters, scheme := loadFixtureDir(t, ref)
	_, _, ex := loadFixtureDir(t, exact)
	if len(ex) != len(scheme) {
		t.Fatalf("%d cases in the reference, %d in the fixture", len(scheme), len(ex))
	}
	opts := engine.DefaultOptions()
	if m.Config.Hidden > 1024 { // the 8B shape: longer cases
		opts = engine.Options{MaxTokens: 1024, KVBlocks: 512, BlockSize: 16}
	}
	opts.AdapterSlots = len(adapters)
	// the scheme the reference was made for (make_fp8_reference.py --weights, --kv)
	bo := Options{WeightFormat: WeightsFP8, KVFormat: os.Getenv("PEFTD_FP8_REF_KV")}
	if w := os.Getenv("PEFTD_FP8_REF_WEIGHTS"); w != "" {
		bo.WeightFormat = w
	}
	// PEFTD_FP8_PRECISE_ACCUM=1: cuBLASLt's FP8 products with their float32
	// promotion (Options.FP8PreciseAccum), the default's A/B
	bo.FP8PreciseAccum = os.Getenv("PEFTD_FP8_PRECISE_ACCUM") == "1"
	t.Logf("scheme: weights %s, KV cache %s, cuBLASLt fast accumulation %v", bo.WeightFormat, cmp.Or(bo.KVFormat, KVBF16), !bo.FP8PreciseAccum)
	q := measureWith(t, m, adapters, scheme, opts, bo)
	ctl := measureWith(t, m, adapters, scheme, opts, Options{WeightFormat: WeightsBF16})
	t.Logf("%-4s %-18s %12s %12s %6s %8s", "case", "adapter", "peftd_vs_ref", "ref_vs_exact", "ratio", "bf16_ctl")
	worst, ctlRatios := 0.0, make([]float64, len(scheme))
	for i, c := range scheme {
		var acc fx.ErrAcc
		acc.Add(c.Prefill, ex[i].Prefill)
		acc.Add(c.DecodeLogits, ex[i].DecodeLogits)
		se := acc.Rel()
		ratio := q.perCase[i] / se
		ctlRatios[i] = ctl.perCase[i] / se
		worst = max(worst, ratio)
		t.Logf("%-4d %-18s %12.4f %12.4f %6.2f %8.2f", c.ID, name(c), q.perCase[i], se, ratio, ctlRatios[i])
		if !(ratio <= schemeFidelityMax) {
			t.Errorf("case %d (%s): peftd's fp8 path is %.4g from the scheme's reference, %.2f of the scheme's own error %.4g (at most %.2f)", c.ID, name(c), q.perCase[i], ratio, se, schemeFidelityMax)
		}
	}
	slices.Sort(ctlRatios)
	if med := ctlRatios[len(ctlRatios)/2]; !(med >= schemeControlMin) {
		t.Errorf("the bf16 path is only %.2f of the scheme's error from its reference (median; want at least %.2f): the reference does not tell the scheme apart", med, schemeControlMin)
	}
	t.Logf("worst ratio %.2f, bf16 control median %.2f; vs the reference: mean KL %.3g nats over %d rows, greedy %d/%d exact, %d near-ties, %d misses",
		worst, ctlRatios[len(ctlRatios)/2], q.kl, q.rows, q.match, q.match+q.ties+q.misses, q.ties, q.misses)
}

// TestFP8Wgmma checks fp8_wg (fp8_gemm_skinny on Hopper's wgmma; compiled
// only with PEFTD_KERNEL_DEFINES=-DPEFTD_WG, on sm_90a) against the
// float64 product of the same e4m3
// operands and scales, and against fp8_gemm_skinny's mma.sync product of
// them, at 17-128 rows: the 8B projections (tiles whole in a block or
// shared by several, and the n32, n64 and n128 variants with their
// zero-filled rows) and a K whose last stage holds one 64-byte span (N =
// 192). A second product gives the same bits
// (shared tiles' partials summed in block order).
func TestFP8Wgmma(t *testing.T) {
	r := newFP8Rig(t)
	if r.f.wg == nil {
		if kernels.Defined("PEFTD_WG") && r.ctx.Device().Arch() == "sm_90a" {
			t.Fatal("PEFTD_WG is defined on an sm_90a card but no fp8_wg kernel loaded")
		}
		t.Skip("fp8_wg is compiled only with PEFTD_KERNEL_DEFINES=-DPEFTD_WG, for sm_90a")
	}
	defer func() { r.f.wgOn, r.f.skTop = false, 0 }()
	if r.f.wg.top() == 0 {
		t.Fatal("fp8_wg: not loaded")
	}
	for _, sz := range []struct{ T, N, K int }{
		{17, 4096, 4096}, {32, 6144, 4096}, {33, 4096, 14336}, {64, 28672, 4096}, {64, 4096, 4096},
		{65, 6144, 4096}, {100, 4096, 14336}, {128, 28672, 4096}, {128, 4096, 4096}, {40, 128, 64}, {97, 192, 576},
	} {
		if !r.f.wg.fits(sz.T, sz.N, sz.K) {
			t.Fatalf("fp8_wg does not take %d x %d x %d", sz.T, sz.N, sz.K)
		}
		fp8WgmmaCase(t, r, "fp8_wg", sz.T, sz.N, sz.K)
	}
}

// TestFP8WgStream: fp8_ws (ws.go) with every plan that takes each shape
// (kernel width and K split) against the float64 product of the
// dequantized operands and fp8_gemm_skinny, and a second launch bit for
// bit; rows 17-64, splits meeting in the kernel, widths that leave most
// blocks a few weight rows.
func TestFP8WgStream(t *testing.T) {
	r := newFP8Rig(t)
	if r.f.ws == nil {
		if r.ctx.Device().Arch() == "sm_90a" {
			t.Fatal("no fp8_ws kernel loaded on an sm_90a card (the rig loads the wgmma build there)")
		}
		t.Skip("fp8_ws is compiled only in the wgmma build, for sm_90a")
	}
	rows16, half := r.f.ws.rows16, r.f.ws.half
	defer func() {
		r.f.wsOn, r.f.skTop, r.f.ws.force, r.f.ws.noStagger, r.f.wsFrom, r.f.ws.rows16 = false, 0, wsPlan{}, false, 0, rows16
		r.f.ws.half, r.f.ws.half16 = half, false
	}()
	r.f.wsFrom = 1 // the steps of 1-16 rows too (TestDecodeBench's +wsN A/Bs)
	wsOn := func(on bool) { r.f.wsOn = on }
	label := func(p wsPlan, T int) string {
		kind := "fp8_ws"
		switch {
		case r.f.ws.on16(p.i, T):
			kind = "fp8_ws16"
		case r.f.ws.half16On(p.i, T):
			kind = "fp8_wsh16"
		case r.f.ws.halfOn(p.i):
			kind = "fp8_wsh"
		}
		return fmt.Sprintf("%s %v, stagger %v", kind, p, !r.f.ws.noStagger)
	}
	ran16, ranH16 := 0, 0 // plans fp8_ws16 and fp8_wsh16 took
	for _, sz := range []struct{ T, N, K int }{
		{17, 4096, 4096}, {32, 6144, 4096}, {64, 28672, 4096}, {64, 4096, 14336}, {48, 4096, 4096},
		{33, 96, 256}, {64, 224, 384}, {20, 672, 1024},
		{1, 4096, 4096}, {9, 6144, 4096}, {16, 4096, 14336},
		{16, 4096, 4096}, {16, 6144, 4096}, {3, 96, 512}, {13, 384, 2048}, {16, 28672, 4096},
	} {
		c := newFP8Case(t, r, sz.T, sz.N, sz.K)
		n := 0
		// 1-16 rows: the 64-row kernels, then the 16-row ones (fp8_ws16_n*),
		// then with the half-row widths on fp8_wsh16_n*
		for mode := range 3 {
			if mode > 0 && sz.T > ws16Rows {
				continue
			}
			r.f.ws.rows16, r.f.ws.half, r.f.ws.half16 = mode > 0, mode == 2, mode == 2
			for i := range wsWidths {
				for _, S := range []int{1, 2, 4, 8} {
					p := wsPlan{i: i, split: S}
					if !r.f.ws.valid(p, sz.T, sz.N, sz.K) || sz.N/wsWidths[i]*S > r.ctx.Device().SMs {
						continue
					}
					r.f.ws.force = p
					c.check(label(p, sz.T), wsOn)
					if r.f.ws.on16(p.i, sz.T) {
						ran16++
					}
					if r.f.ws.half16On(p.i, sz.T) {
						ranH16++
					}
					n++
				}
			}
			// the automatic plan with every block walking K from its start
			if p, ok := r.f.ws.planFrom(sz.T, sz.N, sz.K, 1); ok {
				r.f.ws.force, r.f.ws.noStagger = p, true
				c.check(label(p, sz.T), wsOn)
				r.f.ws.noStagger = false
			}
		}
		if n == 0 {
			t.Fatalf("no fp8_ws plan takes %d x %d x %d", sz.T, sz.N, sz.K)
		}
		c.close()
	}
	if ran16 == 0 || ranH16 == 0 {
		t.Fatalf("plans on fp8_ws16: %d, on fp8_wsh16: %d (not loaded?)", ran16, ranH16)
	}
	// the automatic plan of each 8B shape at 64 rows fits one wave
	r.f.ws.force = wsPlan{}
	for _, sh := range [][2]int{{6144, 4096}, {4096, 4096}, {28672, 4096}, {4096, 14336}} {
		p, ok := r.f.ws.plan(64, sh[0], sh[1])
		if !ok || sh[0]/wsWidths[p.i]*p.split > r.ctx.Device().SMs {
			t.Errorf("64 x %d x %d: plan %v (ok %v) is not one wave", sh[0], sh[1], p, ok)
		}
	}
}

// fp8WgmmaCase is one shape of TestFP8Wgmma with the wgmma build chosen.
func fp8WgmmaCase(t *testing.T, r *fp8Rig, name string, T, N, K int) {
	c := newFP8Case(t, r, T, N, K)
	defer c.close()
	c.check(fmt.Sprintf("%s, %d blocks", name, r.f.wg.grid(T, N, K)), func(on bool) { r.f.wgOn = on })
}

// fp8Case is one T x N x K FP8 product's operands and references: the
// float64 product of the dequantized operands and fp8_gemm_skinny's.
type fp8Case struct {
	t       *testing.T
	r       *fp8Rig
	T, N, K int
	dx      *cuda.DeviceBuffer
	w       *fp8Weight
	deq     []float64
	skinny  []float64
}

func newFP8Case(t *testing.T, r *fp8Rig, T, N, K int) *fp8Case {
	c := &fp8Case{t: t, r: r, T: T, N: N, K: K}
	c.dx = r.up(r.bf16Rand(T*K, 1))
	var err error
	if c.w, err = r.f.upload(r.bf16Rand(N*K, 0.02), N, K); err != nil {
		t.Fatal(err)
	}
	gs := c.run("fp8_gemm_skinny", func(bool) {})
	c.skinny = make([]float64, len(gs))
	for i := range gs {
		c.skinny[i] = float64(fromBF16(gs[i]))
	}
	qx, sx, qw, sw := r.operands(T, K, c.w)
	c.deq = gemmRef(T, N, K,
		func(i, k int) float64 { return float64(safetensors.E4M3ToFloat32(qx[i*K+k])) * float64(sx[i]) },
		func(j, k int) float64 { return float64(safetensors.E4M3ToFloat32(qw[j*K+k])) * float64(sw[j]) })
	return c
}

func (c *fp8Case) close() { c.r.dropWeight(c.w) }

// run is the product with on(true) (fp8_gemm_skinny where on does nothing).
func (c *fp8Case) run(label string, on func(bool)) []uint16 {
	r, T, N, K := c.r, c.T, c.N, c.K
	on(true)
	r.f.skTop = skinnyMaxRows
	defer on(false)
	out := r.alloc(2 * T * N)
	r.s.Memset8(out.Ptr(), 0xFF, 2*T*N) // NaN poison: every element must be written
	r.f.invalidate()
	if err := r.f.linear(out.Ptr(), c.dx.Ptr(), T, c.w, 1); err != nil {
		c.t.Fatalf("%s T=%d N=%d K=%d: %v", label, T, N, K, err)
	}
	g := make([]uint16, T*N)
	cuda.CopyDtoH(r.s, g, out.Ptr())
	r.sync()
	return g
}

// check runs the kernel on turns on (label names it) twice: against the
// references, and the second launch bit for bit.
func (c *fp8Case) check(label string, on func(bool)) {
	const tight = 4e-3 // bf16 output rounding
	t, T, N, K := c.t, c.T, c.N, c.K
	gw, gw2 := c.run(label, on), c.run(label, on)
	fw := make([]float32, len(gw))
	for i := range gw {
		fw[i] = fromBF16(gw[i])
	}
	eDeq, eSk := relErr64(fw, c.deq), relErr64(fw, c.skinny)
	t.Logf("T=%4d N=%5d K=%5d (%s): vs float64(dequantized) maxrel=%.3g; vs fp8_gemm_skinny %.3g", T, N, K, label, eDeq, eSk)
	if !(eDeq <= tight) {
		t.Errorf("%s T=%d N=%d K=%d: vs dequantized float64 reference %.3g > %.0e", label, T, N, K, eDeq, tight)
	}
	if !(eSk <= tight) {
		t.Errorf("%s T=%d N=%d K=%d: vs fp8_gemm_skinny %.3g > %.0e", label, T, N, K, eSk, tight)
	}
	if !slices.Equal(gw, gw2) {
		t.Errorf("%s T=%d N=%d K=%d: a second product differs from the first", label, T, N, K)
	}
}

// wgGridTime is one of wgSweep's timings.
type wgGridTime struct {
	G  int
	us float64
}

// wgSweep times a T x N x K wgmma product (g: fp8_wg) at each grid
// PEFTD_WG_GRIDS lists (e.g. "132,200,264"; blocks, at most wgPerSM an
// SM, stream-K builds only; none when unset or g is nil): timed runs the
// product once set up, on turns the product's wgmma path on and off.
func wgSweep(t *testing.T, g *wgProduct, T, N, K int, timed func() float64, on func(bool)) []wgGridTime {
	if g == nil || os.Getenv("PEFTD_WG_GRIDS") == "" || !g.fits(T, N, K) {
		return nil
	}
	var res []wgGridTime
	for _, G := range envBatches(t, "PEFTD_WG_GRIDS", nil) {
		g.forceG = G
		if g.grid(T, N, K) != G {
			continue // more than the SMs or the stage units
		}
		on(true)
		res = append(res, wgGridTime{G, timed()})
		on(false)
	}
	g.forceG = 0
	return res
}

// wsPlanTime is one of wsSweep's timings.
type wsPlanTime struct {
	p       wsPlan
	early   int
	stagger bool
	us      float64
}

// wsSweep times a T x N x K ws product (fp8_ws, gemm_ws; at 9-16 rows
// fp8_ws16 where rows16 and the width have it) with every valid plan of
// one wave (at most the device's SMs blocks) and, for the automatic plan,
// 0 to 3 early stages (PEFTD_WS_SWEEP set; none otherwise): timed runs
// the product once set up, on turns fp8_ws on and off.
func wsSweep(g *wsProduct, T, N, K int, timed func() float64, on func(bool)) []wsPlanTime {
	if g == nil || os.Getenv("PEFTD_WS_SWEEP") == "" {
		return nil
	}
	var res []wsPlanTime
	auto, ok := g.planFrom(T, N, K, wsLoneFromDefault) // 9-16 rows too (lone products take fp8_ws there: fp8State.wsLoneFrom)
	if !ok {
		return nil
	}
	defer func() { g.force, g.early, g.noStagger = wsPlan{}, wsEarlyStages, false }()
	for i := range wsWidths {
		for _, S := range []int{1, 2, 4, 8} {
			p := wsPlan{i: i, split: S}
			if !g.valid(p, T, N, K) || N/wsWidths[i]*S > g.sms || N/wsWidths[i]*S < g.sms/4 {
				continue
			}
			g.force = p
			for k, c := range []struct {
				early   int
				stagger bool
			}{{1, true}, {1, false}, {0, true}, {3, true}, {15, true}} {
				if p != auto && k > 0 {
					continue
				}
				g.early, g.noStagger = c.early, !c.stagger
				on(true)
				res = append(res, wsPlanTime{p, c.early, c.stagger, timed()})
				on(false)
			}
		}
	}
	return res
}

// TestFP8WgmmaOption: by default the FP8 module is built with the wgmma
// products on an sm_90a GPU, where they take effect, and nowhere else;
// Options.NoFP8Wgmma keeps them off
// (TestFP8Wgmma checks those products against fp8_gemm_skinny and a
// float64 reference; TestWgAutoFits the rows and shapes routed to them).
func TestFP8WgmmaOption(t *testing.T) {
	if err := Available(); err != nil {
		t.Skipf("no GPU: %v", err)
	}
	for _, wf := range []string{WeightsFP8, WeightsBF16} {
		for _, off := range []bool{false, true} {
			b, err := New(Options{WeightFormat: wf, NoFP8Wgmma: off})
			if err != nil {
				t.Fatal(err)
			}
			want := !off && wf == WeightsFP8 && b.ctx.Device().Arch() == "sm_90a"
			if b.FP8Wgmma() != want {
				t.Errorf("%s weights on %s, NoFP8Wgmma %v: FP8Wgmma() = %v, want %v", wf, b.ctx.Device().Arch(), off, b.FP8Wgmma(), want)
			}
			if want && b.f8.wg.variant(64) < 0 {
				t.Errorf("%s weights: no fp8_wg variant for 64 rows", wf)
			}
			if err := b.Close(); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// TestFP8FusedQuantNormCl: add_rmsnorm_cl (kernelForce.addCl) quantizes its
// output as quant_rows_e4m3 does (checkFusedQuant: the same bytes and
// scales), a zero row with scale 1 and a row holding Inf with scale NaN;
// its x is add_rmsnorm's bit for bit (the same adds) and its output within
// a last bf16 bit of it (the row's sum of squares in another order).
func TestFP8FusedQuantNormCl(t *testing.T) {
	for _, H := range []int{256, 4096, 8192} {
		t.Run(fmt.Sprint(H), func(t *testing.T) {
			const T = 5
			r, f8 := newFP8NormRig(t, T, H)
			if r.b.ctx.Device().Major < 9 {
				t.Skip("no thread-block clusters before sm_90")
			}
			xv, dv := r.rnd(T*H, 1), r.rnd(T*H, 1)
			clear(xv[2*H : 3*H]) // a zero row
			clear(dv[2*H : 3*H])
			xv[3*H+9] = float32(math.Inf(1)) // a row holding Inf
			x, d, out := r.buffer(T, H), r.buffer(T, H), r.buffer(T, H)
			nw, _ := r.weight(1, H, 1)
			run := func(cl int) (gx, gout []float32, sc []float32) {
				r.fill(x, xv)
				r.fill(d, dv)
				r.poison(out)
				r.b.force.addCl = cl
				r.begin(oneSeq(T, 16, zeros(T)))
				if cl > 0 && !r.b.addClFits(H, false) {
					t.Fatalf("add_rmsnorm_cl does not take %d columns", H)
				}
				r.b.AddRMSNorm(x, d, out, nw, 1e-5)
				sc = checkFusedQuant(t, r, f8, out, T, H)
				gx, gout = r.read(x, T), r.read(out, T)
				r.end()
				return gx, gout, sc
			}
			x0, o0, _ := run(-1)
			x1, o1, s1 := run(1)
			bits := func(a, b float32) bool { return math.Float32bits(a) == math.Float32bits(b) }
			if !slices.EqualFunc(x0, x1, bits) {
				t.Error("add_rmsnorm_cl's x differs from add_rmsnorm's")
			}
			diff := 0
			for i := range o0 {
				if bits(o0[i], o1[i]) || o0[i] != o0[i] && o1[i] != o1[i] {
					continue
				}
				diff++
				if a, b := float64(o0[i]), float64(o1[i]); i/H == 3 || math.Abs(a-b) > 1.0/128*math.Abs(a) {
					t.Errorf("out %d (row %d): %g, add_rmsnorm %g", i, i/H, b, a)
					break
				}
			}
			t.Logf("H=%d: %d of %d outputs a last bit from add_rmsnorm's; scales %v", H, diff, len(o0), s1)
			if s1[2] != 1 || !math.IsNaN(float64(s1[3])) {
				t.Errorf("scales %v: want 1 for the zero row 2, NaN for row 3", s1)
			}
		})
	}
}

// TestFP8ScaledPadding: a scaled FP8 product of 33-511 rows whose output
// has room runs for the next multiple of 128 rows (scaledRowsFrom); its
// T rows equal the product run for T rows alone (to bf16 rounding: the
// same algorithm, other tiles), and the rows past T (scratch: ones here)
// are written only when padded.
func TestFP8ScaledPadding(t *testing.T) {
	r := newFP8Rig(t)
	const room = 512
	for _, sz := range []struct{ T, N, K, P int }{{192, 6144, 4096, 256}, {130, 28672, 4096, 256}, {176, 6144, 4096, 256}, {224, 28672, 4096, 256},
		{64, 28672, 4096, 128}, {40, 28672, 4096, 128}, {100, 28672, 4096, 128}, {320, 28672, 4096, 384}, {300, 6144, 4096, 384}, {448, 28672, 4096, 512}, {400, 4096, 14336, 512}} {
		if got := scaledRowsFrom(sz.T, room, scaledPadFrom); got != sz.P {
			t.Fatalf("scaledRowsFrom(%d, %d, %d) = %d, want %d", sz.T, room, scaledPadFrom, got, sz.P)
		}
		if s := r.f.split(sz.T, sz.N, sz.K); s != 1 {
			t.Fatalf("T=%d N=%d K=%d: the product splits K %d ways: not the scaled product", sz.T, sz.N, sz.K, s)
		}
		xh, wh := r.bf16Rand(sz.T*sz.K, 1), r.bf16Rand(sz.N*sz.K, 0.02)
		dx := r.up(xh)
		w, err := r.f.upload(wh, sz.N, sz.K)
		if err != nil {
			t.Fatal(err)
		}
		if err := r.f.grow(&r.f.actQ, room*sz.K); err != nil {
			t.Fatal(err)
		}
		if err := r.f.grow(&r.f.actS, 4*room); err != nil {
			t.Fatal(err)
		}
		// run: the product with linear told out holds told rows (out,
		// scratch and scales are room rows here)
		run := func(told int) ([]uint16, uint16) {
			out := r.alloc(2 * room * sz.N)
			defer out.Free()
			r.s.Memset8(out.Ptr(), 0xFF, 2*room*sz.N)               // NaN poison
			r.s.Memset8(r.f.actQ.Ptr(), 0x38, room*sz.K)            // e4m3 1.0
			r.s.Memset32(r.f.actS.Ptr(), math.Float32bits(1), room) // scales 1
			r.f.invalidate()
			r.f.room = told
			defer func() { r.f.room = 0 }()
			if err := r.f.linear(out.Ptr(), dx.Ptr(), sz.T, w, 1); err != nil {
				t.Fatal(err)
			}
			g := make([]uint16, (sz.T+1)*sz.N)
			cuda.CopyDtoH(r.s, g, out.Ptr())
			r.sync()
			return g[:sz.T*sz.N], g[sz.T*sz.N] // the T rows, and row T's first value
		}
		alone, past0 := run(0)
		padded, past1 := run(room)
		if past0 != 0xFFFF || past1 == 0xFFFF {
			t.Errorf("T=%d N=%d K=%d: row T's first value %#04x alone (want the poison 0xffff), %#04x padded (want a product)", sz.T, sz.N, sz.K, past0, past1)
		}
		a, p := make([]float32, len(alone)), make([]float64, len(padded))
		same := 0
		for i := range alone {
			a[i], p[i] = fromBF16(alone[i]), float64(fromBF16(padded[i]))
			if alone[i] == padded[i] {
				same++
			}
		}
		e := relErr64(a, p)
		t.Logf("T=%d N=%d K=%d: padded to %d rows vs alone maxrel %.3g, %d of %d values bit-identical", sz.T, sz.N, sz.K, sz.P, e, same, len(alone))
		if !(e <= 4e-3) {
			t.Errorf("T=%d N=%d K=%d: the padded product's rows differ from the product alone: maxrel %.3g", sz.T, sz.N, sz.K, e)
		}
		r.dropWeight(w)
	}
}

// TestFP8WideRows (PEFTD_FP8_WIDE_PROBE=1): scaled FP8 gate/up products of
// 320 and 384 rows (eager steps above the largest recording), on the rig's
// programmatic stream with a 512-row scratch, each synchronized and a
// sample of its values checked against the dequantized reference as
// TestFP8Gemm does (relErr64, 4e-3). v0.43's first TestFP8ScaledPadding
// faulted on a 320-row product padded to 384 rows: the test's own output
// held 256 rows while it told linear 512 (a test bug, since mended). This
// probe ran both unpadded products without a fault (call 7), but judged
// them by a per-element error that FP8 products' float32 sums of
// cancelling terms do not meet (0.05 / 0.12); with relErr64 it passed in
// v0.44 (0.00164 at 384 rows).
func TestFP8WideRows(t *testing.T) {
	if os.Getenv("PEFTD_FP8_WIDE_PROBE") == "" {
		t.Skip("PEFTD_FP8_WIDE_PROBE is not set")
	}
	r := newFP8Rig(t)
	const N, K, room = 28672, 4096, 512
	wh := r.bf16Rand(N*K, 0.02)
	w, err := r.f.upload(wh, N, K)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.f.grow(&r.f.actQ, room*K); err != nil {
		t.Fatal(err)
	}
	if err := r.f.grow(&r.f.actS, 4*room); err != nil {
		t.Fatal(err)
	}
	out := r.alloc(2 * room * N)
	for _, T := range []int{320, 384} {
		xh := r.bf16Rand(T*K, 1)
		dx := r.up(xh)
		r.f.invalidate()
		if err := r.f.linear(out.Ptr(), dx.Ptr(), T, w, 1); err != nil {
			t.Fatalf("T=%d: %v", T, err)
		}
		if err := r.s.Synchronize(); err != nil {
			t.Fatalf("T=%d: the product failed: %v", T, err)
		}
		g := make([]uint16, T*N)
		cuda.CopyDtoH(r.s, g, out.Ptr())
		qx, sx, qw, sw := r.operands(T, K, w)
		var got []float32
		var want []float64
		for i := 0; i < T; i += 7 {
			for j := 0; j < N; j += 997 {
				ref := 0.0
				for k := range K {
					ref += float64(safetensors.E4M3ToFloat32(qx[i*K+k])) * float64(sx[i]) * float64(safetensors.E4M3ToFloat32(qw[j*K+k])) * float64(sw[j])
				}
				got, want = append(got, fromBF16(g[i*N+j])), append(want, ref)
			}
		}
		e := relErr64(got, want)
		t.Logf("T=%d N=%d K=%d: ran; %d sampled values vs dequantized float64 rel %.3g", T, N, K, len(got), e)
		if !(e <= 4e-3) {
			t.Errorf("T=%d: sampled values off by %.3g", T, e)
		}
	}
}

// weightCopies uploads a random N x K FP8 weight and as many device
// copies of it (two at least, over 150 MB in all) as products taking them
// in turn need to read them from memory, not L2. The copies go with the
// test (alloc); the first with dropWeight.
func (r *fp8Rig) weightCopies(N, K int) []*fp8Weight {
	w8 := make([]*fp8Weight, max(2, (150<<20)/(N*K)+1))
	var err error
	if w8[0], err = r.f.upload(r.bf16Rand(N*K, 0.02), N, K); err != nil {
		r.t.Fatal(err)
	}
	for i := 1; i < len(w8); i++ {
		w8[i] = &fp8Weight{q: r.alloc(N * K), scale: r.alloc(4 * N), rows: N, cols: K}
		r.s.CopyDtoD(w8[i].q.Ptr(), w8[0].q.Ptr(), N*K)
		r.s.CopyDtoD(w8[i].scale.Ptr(), w8[0].scale.Ptr(), 4*N)
	}
	return w8
}
