//go:build cuda

package cuda

import (
	"cmp"
	"fmt"
	"math"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// TestFP8AlgoSweep asks cuBLASLt for up to 16 algorithms of the scaled FP8
// product at Llama-3.1-8B projection shapes and 32-256 rows and times each
// (20 back-to-back products, weights rotated over >= 150 MB so they come
// from DRAM; timed as replays of a recorded graph of the 20, so no host
// launch gap counts): how far the heuristic's first choice, which the
// engine takes, is from the best one it offers. PEFTD_FP8_SWEEP=1 runs it;
// PEFTD_FP8_SWEEP=bf16 sweeps the bf16 product instead, at 1-256 rows;
// PEFTD_FP8_SWEEP_ROWS picks the rows, PEFTD_FP8_SWEEP_SMS an SM target.
func TestFP8AlgoSweep(t *testing.T) {
	if os.Getenv("PEFTD_FP8_SWEEP") == "" {
		t.Skip("PEFTD_FP8_SWEEP is not set")
	}
	c, s, m := matmulRig(t)
	// PEFTD_FP8_SWEEP_SMS=n: plan for an SM target of n, as a product
	// beside the LoRA stream does (the SMs it holds back are not counted)
	if env := os.Getenv("PEFTD_FP8_SWEEP_SMS"); env != "" {
		n, err := strconv.Atoi(env)
		if err != nil || n < 0 {
			t.Fatalf("PEFTD_FP8_SWEEP_SMS: %q is not an SM count", env)
		}
		m.SetSMTarget(n)
	}
	// PEFTD_FP8_SWEEP_FAST=1: the FP8 products with fast accumulation
	// (SetFastAccum: no periodic promotion to float32)
	m.SetFastAccum(os.Getenv("PEFTD_FP8_SWEEP_FAST") == "1")
	alloc := func(n int, fill uint8) *DeviceBuffer {
		b, err := c.Alloc(n)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Memset8(b.Ptr(), fill, n); err != nil {
			t.Fatal(err)
		}
		return b
	}
	// PEFTD_FP8_SWEEP=unscaled: the unscaled e4m3 product into float32 (the
	// K-split path's, GemmTNSplitK with one slice) instead of the
	// outer-vector-scaled one into bf16
	unscaled := os.Getenv("PEFTD_FP8_SWEEP") == "unscaled"
	// PEFTD_FP8_SWEEP_CONFIGS=1: instead of the heuristic's algorithms, its
	// first one in every tile, stage count and cluster shape cuBLASLt
	// accepts for the product (Matmul.configVariants)
	configs := os.Getenv("PEFTD_FP8_SWEEP_CONFIGS") == "1"
	// PEFTD_FP8_SWEEP_SPLITS=2,4,8: every algorithm above also with its K
	// split that many ways, in each reduction scheme cuBLASLt accepts for
	// it (splitVariants): the 256-row bf16 o and down products on nvjet's
	// 128x64 tiles ran at 458 TFLOP/s in a mixed step (PERFORMANCE v0.90),
	// and bigger tiles need a K split to fill the card
	var splits []uint32
	if env := os.Getenv("PEFTD_FP8_SWEEP_SPLITS"); env != "" {
		for _, f := range strings.Split(env, ",") {
			n, err := strconv.Atoi(f)
			if err != nil || n < 2 || n > 64 {
				t.Fatalf("PEFTD_FP8_SWEEP_SPLITS: %q is not a K split of 2 to 64", f)
			}
			splits = append(splits, uint32(n))
		}
	}
	bf16 := os.Getenv("PEFTD_FP8_SWEEP") == "bf16"
	es, rows := 1, []int{32, 64, 128, 192, 256} // bytes per operand element, the rows swept
	if bf16 {
		es, rows = 2, []int{1, 8, 16, 32, 64, 128, 256}
	}
	if env := os.Getenv("PEFTD_FP8_SWEEP_ROWS"); env != "" { // e.g. 128,160,192,224,256
		rows = nil
		for _, f := range strings.Split(env, ",") {
			n, err := strconv.Atoi(f)
			if err != nil || n <= 0 {
				t.Fatalf("PEFTD_FP8_SWEEP_ROWS: %q is not a positive row count", f)
			}
			rows = append(rows, n)
		}
	}
	planOf := func(T, N, K int, xs, ws DevicePtr) (*gemmPlan, error) {
		if bf16 {
			return m.plan(gemmKey{t: T, n: N, k: K, in: R16BF, w: R16BF, out: R16BF, beta0: true})
		}
		if unscaled {
			return m.plan(gemmKey{t: T, n: N, k: K, in: R8FE4M3, w: R8FE4M3, out: R32F, beta0: true, split: 1, fast: m.fast})
		}
		return m.planScaled(scaledKey(T, N, K, R16BF, 0, m.fast), xs, ws)
	}
	// PEFTD_FP8_SWEEP_KPLUS=q,o,gu,d: that many more columns of K for each
	// shape (qkv, o, gate_up, down), as a LoRA update carried in the
	// product's K would add (a rank-32 slot a target: 4 adapters on q/k/v
	// 384, o 128, gate/up 256, down 128)
	var kplus [4]int
	if env := os.Getenv("PEFTD_FP8_SWEEP_KPLUS"); env != "" {
		f := strings.Split(env, ",")
		if len(f) != len(kplus) {
			t.Fatalf("PEFTD_FP8_SWEEP_KPLUS: %q is not four column counts", env)
		}
		for i := range f {
			n, err := strconv.Atoi(f[i])
			if err != nil || n < 0 || n%16 != 0 {
				t.Fatalf("PEFTD_FP8_SWEEP_KPLUS: %q is not a multiple of 16", f[i])
			}
			kplus[i] = n
		}
	}
	const bw = 4.0e12 // bytes/s, H200 copy bandwidth (docs/PERFORMANCE.md)
	t.Logf("SWEEP SM target %d (0: the whole card), fast accumulation %v, K plus %v", m.SMTarget(), m.fast, kplus)
	t.Logf("SWEEP %-8s %4s %9s %9s %5s %9s %7s %s", "shape", "T", "first_us", "best_us", "best", "floor_us", "algos", "all_us")
	for si, sh := range []struct {
		name string
		N, K int
	}{{"qkv", 6144, 4096}, {"o", 4096, 4096}, {"gate_up", 28672, 4096}, {"down", 4096, 14336}} {
		N, K := sh.N, sh.K+kplus[si]
		copies := (150<<20)/(N*K*es) + 2
		w := alloc(copies*N*K*es, 0x30) // e4m3 0x30 = 0.5 (bf16 0x3030: 6.4e-10)
		ws := alloc(4*N, 0)
		if err := s.Memset32(ws.Ptr(), math.Float32bits(1), N); err != nil {
			t.Fatal(err)
		}
		for _, T := range rows {
			x := alloc(T*K*es, 0x38) // e4m3 1.0 (bf16 0x3838: 4.4e-5)
			xs := alloc(4*T, 0)
			if err := s.Memset32(xs.Ptr(), math.Float32bits(1), T); err != nil {
				t.Fatal(err)
			}
			out := alloc(4*T*N, 0)
			var algos [][heuristicResultSize]byte
			var names []string
			err := c.Do(func() error {
				p, err := planOf(T, N, K, xs.Ptr(), ws.Ptr())
				if err != nil {
					return err
				}
				if algos, err = m.candidates(p, 16); err != nil || len(algos) == 0 {
					return err
				}
				for i := range algos {
					names = append(names, fmt.Sprintf("h%d", i))
				}
				if configs {
					var cfgs []AlgoConfig
					if algos, cfgs, err = m.configVariants(p, &algos[0], true); err != nil {
						return err
					}
					names = names[:0]
					for _, cf := range cfgs {
						names = append(names, cf.String())
					}
				}
				if len(splits) > 0 {
					sa, sn := m.splitVariants(p, algos, names, splits)
					algos, names = append(algos, sa...), append(names, sn...)
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			run := func(a *[heuristicResultSize]byte, i int) error {
				return c.Do(func() error {
					p, err := planOf(T, N, K, xs.Ptr(), ws.Ptr())
					if err != nil {
						return err
					}
					return m.enqueue(s, p, a, out.Ptr(), x.Ptr(), w.Ptr()+DevicePtr((i%copies)*N*K*es), 1, 0)
				})
			}
			var us []float64
			for ai := range algos {
				a := &algos[ai]
				u, err := s.GraphMedianUs(20, 5, func(i int) error { return run(a, i) })
				if err != nil {
					t.Fatal(err)
				}
				us = append(us, u)
			}
			if len(us) == 0 {
				t.Fatalf("%s T=%d: no algorithm", sh.name, T)
			}
			best := 0
			for i := range us {
				if us[i] < us[best] {
					best = i
				}
			}
			floor := float64(N*K*es+T*K*es+2*T*N) / bw * 1e6
			all := ""
			for _, u := range us {
				all += fmt.Sprintf(" %.1f", u)
			}
			if configs || len(splits) > 0 { // the five fastest, by name
				order := make([]int, len(us))
				for i := range order {
					order[i] = i
				}
				slices.SortStableFunc(order, func(a, b int) int { return cmp.Compare(us[a], us[b]) })
				all = " first " + names[0] + ";"
				for _, i := range order[:min(5, len(order))] {
					all += fmt.Sprintf(" %s %.1f", names[i], us[i])
				}
			}
			t.Logf("SWEEP %-8s %4d %9.1f %9.1f %5d %9.1f %7d%s", sh.name, T, us[0], us[best], best, floor, len(us), all)
			x.Free()
			xs.Free()
			out.Free()
		}
		w.Free()
		ws.Free()
	}
}

// The K split's configuration attributes (cublasLtMatmulAlgoConfigAttributes_t)
// and cublasLtReductionScheme_t's schemes (INPLACE, COMPUTE_TYPE,
// OUTPUT_TYPE).
const (
	algoConfigSplitK    = 2 // CUBLASLT_ALGO_CONFIG_SPLITK_NUM
	algoConfigReduction = 3 // CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME
)

var reductionSchemes = []uint32{1, 2, 4}

// splitVariants is each algorithm of algos (named names) with its K split
// splits ways in every reduction scheme, those cuBLASLt accepts for plan p
// within the Matmul's workspace (checkAlgo), named name/skS/rsR. On the
// context's thread.
func (m *Matmul) splitVariants(p *gemmPlan, algos [][heuristicResultSize]byte, names []string, splits []uint32) ([][heuristicResultSize]byte, []string) {
	var out [][heuristicResultSize]byte
	var outNames []string
	for i := range algos {
		_, skSize, err := configAttr(&algos[i], algoConfigSplitK)
		if err != nil {
			continue
		}
		_, rsSize, err := configAttr(&algos[i], algoConfigReduction)
		if err != nil {
			continue
		}
		for _, sk := range splits {
			for _, rs := range reductionSchemes {
				a := algos[i]
				if setConfigAttr(&a, algoConfigSplitK, sk, skSize) != nil || setConfigAttr(&a, algoConfigReduction, rs, rsSize) != nil {
					continue
				}
				if res, ok := m.checkAlgo(p, algoOf(&a)); ok {
					out, outNames = append(out, res), append(outNames, fmt.Sprintf("%s/sk%d/rs%d", names[i], sk, rs))
				}
			}
		}
	}
	return out, outNames
}
