//go:build cuda

package gpu

import (
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/peftd/peftd/runtime/cuda"
)

// TestWsPlanBench times every one-wave plan of the ws products (gemm_ws
// for bf16, fp8_ws for FP8) at the 8B shapes, against the one the planner
// takes (oneWave: the most blocks, then the fewest K splits), at SM
// targets of the whole card and of what the LoRA stream leaves. A plan's
// blocks each copy all the activation rows of their K range every stage,
// so the activations a product reads from L2 are N / BN x T x K x the
// element size whatever the split (x_MB below): as many bytes as the
// weights at BN 64 rows and 64 activation rows. Wider blocks with more
// splits read fewer; this measures whether that pays against the split's
// float partials (S x T x N x 4 bytes written and summed). Opt-in
// (PEFTD_WSPLAN_BENCH=1; gpu-check phase wsplanbench);
// PEFTD_WSPLAN_FORMATS (bf16,fp8), PEFTD_WSPLAN_BENCH_T (32,64) and
// PEFTD_BENCH_SHAPES choose.
func TestWsPlanBench(t *testing.T) {
	if os.Getenv("PEFTD_WSPLAN_BENCH") == "" {
		t.Skip("PEFTD_WSPLAN_BENCH is not set")
	}
	formats := os.Getenv("PEFTD_WSPLAN_FORMATS")
	if formats == "" {
		formats = "bf16,fp8"
	}
	Ts := envBatches(t, "PEFTD_WSPLAN_BENCH_T", []int{32, 64})
	shapes := envShapes(t, "PEFTD_BENCH_SHAPES", shapes8B)
	r := newFP8Rig(t)
	for _, format := range strings.Split(formats, ",") {
		switch format {
		case "bf16":
			mod, limit := forwardLimit(t, r)
			g, err := loadWS(r.ctx, r.s, mod, "gemm_ws", 2, limit)
			if err != nil {
				t.Fatal(err)
			}
			if g == nil {
				t.Log("no gemm_ws kernel loaded (sm_90a only): bf16 left out")
				continue
			}
			t.Cleanup(func() { g.free() })
			wsPlanBench(t, r, g, "bf16", 2, Ts, shapes, func(sh benchShape) (func(p wsPlan, T, i int) error, func()) {
				n := max(2, (150<<20)/(2*sh.N*sh.K)+1)
				ws := make([]*cuda.DeviceBuffer, n)
				ws[0] = r.up(r.bf16Rand(sh.N*sh.K, 0.02))
				for i := 1; i < n; i++ {
					ws[i] = r.alloc(2 * sh.N * sh.K)
					r.s.CopyDtoD(ws[i].Ptr(), ws[0].Ptr(), 2*sh.N*sh.K)
				}
				x := r.up(r.bf16Rand(slices.Max(Ts)*sh.K, 1))
				out := r.alloc(2 * slices.Max(Ts) * sh.N)
				r.sync()
				return func(p wsPlan, T, i int) error { // the buffers go with the test (alloc)
					return g.launch(r.s, p, out.Ptr(), x.Ptr(), 0, ws[i%n].Ptr(), 0, T, sh.N, sh.K)
				}, nil
			})
		case "fp8":
			if r.f.ws == nil {
				t.Log("no fp8_ws kernel loaded (sm_90a only): FP8 left out")
				continue
			}
			g := r.f.ws
			wsPlanBench(t, r, g, "fp8", 1, Ts, shapes, func(sh benchShape) (func(p wsPlan, T, i int) error, func()) {
				w8 := r.weightCopies(sh.N, sh.K)
				n := len(w8)
				x := r.up(r.bf16Rand(slices.Max(Ts)*sh.K, 1))
				out := r.alloc(2 * slices.Max(Ts) * sh.N)
				r.sync()
				r.f.wsOn = true
				r.f.invalidate()
				return func(p wsPlan, T, i int) error {
						g.force = p
						return r.f.linear(out.Ptr(), x.Ptr(), T, w8[i%n], uint64(T)) // quantizes x's T rows once (cached by generation)
					}, func() {
						g.force, r.f.wsOn = wsPlan{}, false
						r.dropWeight(w8[0]) // the copies go with the test (alloc)
					}
			})
		default:
			t.Fatalf("PEFTD_WSPLAN_FORMATS: %q is not bf16 or fp8", format)
		}
	}
}

// wsPlanBench is TestWsPlanBench for one format (esize bytes a value):
// setup makes a shape's weights and scratch and returns the launch of a
// plan at T rows on the i-th weight copy, and the cleanup (nil: none).
func wsPlanBench(t *testing.T, r *fp8Rig, g *wsProduct, format string, esize int, Ts []int, shapes []benchShape, setup func(sh benchShape) (func(p wsPlan, T, i int) error, func())) {
	sms := r.ctx.Device().SMs
	bench("wsplan %s device %s; copy bandwidth %.0f GB/s; median of 15 replays of 20 calls as a graph; * the planner's", format, r.ctx.Device().Name, r.copyBW()/1e9)
	bench("wsplan %-4s %-8s %3s %4s %9s %6s %8s %7s %7s %7s", "fmt", "shape", "T", "sms", "plan", "blocks", "us", "GB/s", "x_MB", "part_MB")
	for _, sh := range shapes {
		launch, done := setup(sh)
		for _, T := range Ts {
			for _, target := range []int{sms, sms - 16, sms - 32, 84} {
				chosen, cb := g.oneWave(T, sh.N, sh.K, target)
				if cb == 0 {
					continue
				}
				for i := range wsWidths {
					for _, S := range []int{1, 2, 4, 8} {
						p := wsPlan{i: i, split: S}
						blocks := sh.N / wsWidths[i] * S
						// one wave, at least three quarters full
						if !g.valid(p, T, sh.N, sh.K) || blocks > target || 4*blocks < 3*target {
							continue
						}
						if err := launch(p, T, 0); err != nil {
							t.Fatal(err)
						}
						us := graphMedianUs(t, r.s, 20, 15, func(i int) error { return launch(p, T, i) })
						mark := " "
						if p == chosen {
							mark = "*"
						}
						xMB := float64(sh.N/wsWidths[i]) * float64(T*sh.K*esize) / 1e6
						partMB := 0.0
						if S > 1 {
							partMB = float64(S*T*sh.N*4) / 1e6
						}
						bench("wsplan %-4s %-8s %3d %4d %8v%s %6d %8.2f %7.0f %7.1f %7.1f", format, sh.name, T, target, p, mark, blocks, us, float64(sh.N*sh.K*esize)/(us*1e3), xMB, partMB)
					}
				}
			}
		}
		if done != nil {
			done()
		}
	}
}
