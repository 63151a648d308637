//go:build cuda

package gpu

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	fx "github.com/peftd/peftd/internal/fixture"
	"github.com/peftd/peftd/kernels"
	"github.com/peftd/peftd/runtime/cuda"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/lora"
	"github.com/peftd/peftd/runtime/sample"
)

// Benchmarks at Llama-3.1-8B shapes. They print tables (lines starting with
// "BENCH") and are skipped unless asked for: PEFTD_LORA_BENCH=1 for the LoRA
// microbenchmark, PEFTD_MODEL_8B=DIR for decode throughput (DIR from
// tools/make_random_llama.py). scripts/gpu-check.sh runs both on the device.

func bench(format string, args ...any) { fmt.Printf("BENCH "+format+"\n", args...) }

func median(v []float32) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return float64(s[n/2])
	}
	return float64(s[n/2-1]+s[n/2]) / 2
}

// eventMedianMs runs fn(i) warm+reps times on s, each between two timing
// events, and returns the median device time of the last reps in ms.
func eventMedianMs(t testing.TB, s *cuda.Stream, warm, reps int, fn func(i int) error) float64 {
	t.Helper()
	ms, err := s.MedianMs(warm, reps, fn)
	if err != nil {
		t.Fatal(err)
	}
	return ms
}

// graphMedianUs records fn(0..calls-1) on s as one CUDA graph and returns the
// median device time per call in microseconds over reps replays. Launched one
// by one from the test, short kernels would be timed waiting for the host's
// launches; a replayed graph keeps the GPU fed.
func graphMedianUs(t testing.TB, s *cuda.Stream, calls, reps int, fn func(i int) error) float64 {
	t.Helper()
	us, err := s.GraphMedianUs(calls, reps, fn)
	if err != nil {
		t.Fatal(err)
	}
	return us
}

// deviceCopyBW measures device-to-device copy bandwidth on s in bytes/s,
// counting bytes read plus bytes written (median of 10 copies of 1 GiB).
func deviceCopyBW(t testing.TB, c *cuda.Context, s *cuda.Stream) float64 {
	const n = 1 << 30
	src, err := c.Alloc(n)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Free()
	dst, err := c.Alloc(n)
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Free()
	if err := s.Memset32(src.Ptr(), 0x3f803f80, n/4); err != nil {
		t.Fatal(err)
	}
	ms := eventMedianMs(t, s, 2, 10, func(int) error { return s.CopyDtoD(dst.Ptr(), src.Ptr(), n) })
	return 2 * n / (ms / 1e3)
}

// copyBandwidth is deviceCopyBW on the backend's compute stream.
func copyBandwidth(t testing.TB, b *Backend) float64 { return deviceCopyBW(t, b.ctx, b.s) }

// cfg8B is Llama-3.1-8B's configuration with the given number of layers.
func cfg8B(layers int) *llama.Config { return testConfig(4096, 14336, 32, 8, 128, 128256, layers) }

// randomAdapter makes an adapter of rank r on all seven projections of every layer.
func randomAdapter(rng *rand.Rand, cfg *llama.Config, r int, scale float32) *lora.Adapter {
	a := &lora.Adapter{Name: fmt.Sprintf("r%d", r), Layers: make([][llama.NumModules]*lora.Pair, cfg.Layers)}
	rnd := func(n int, s float32) []float32 {
		v := make([]float32, n)
		for i := range v {
			v[i] = (rng.Float32()*2 - 1) * s
		}
		return v
	}
	for l := range a.Layers {
		for m := llama.Module(0); m < llama.NumModules; m++ {
			in, out := cfg.Dims(m)
			a.Layers[l][m] = &lora.Pair{Rank: r, Scale: scale, A: rnd(r*in, 0.02), B: rnd(out*r, 0.02)}
		}
	}
	return a
}

// ranOr is time(arg) where the capture launched the variant counter n
// counts, else NaN (the variant does not apply to the case).
func ranOr(n *int, time func(bool) float64, arg bool) float64 {
	before := *n
	us := time(arg)
	if *n == before {
		return math.NaN()
	}
	return us
}

// loraParamsPerRank is sum over the seven projections of (in + out) at 8B shapes.
func loraParamsPerRank(cfg *llama.Config) int {
	n := 0
	for m := llama.Module(0); m < llama.NumModules; m++ {
		in, out := cfg.Dims(m)
		n += in + out
	}
	return n
}

// TestLoRABench times the LoRA path alone (shrink + expand) of one decoder
// layer at 8B shapes: fused q/k/v (4096 -> 6144), o (4096 -> 4096), fused
// gate/up (4096 -> 28672), down (14336 -> 4096), captured once into a CUDA
// graph and replayed with the L2 cache flushed before each replay (a kernel
// reading 256 MiB, leaving clean lines: a memset flush left ~50 MB of dirty
// lines whose write-back added ~15-20 us to every replay); the median of the
// replays' event times. Adapters are assigned to
// tokens round-robin (the engine groups them into segments); v0 is the first
// row-at-a-time kernels, v1 the SGMV kernels (two launches per op), v2 the
// fused SGMV kernels of kernels/sgmv.cu (one launch per op), tc the shrink
// and tensor-core expand; graph_us is tc in a recorded step's layout, the
// updates added in place (as serial LoRA does), aside_us the same written
// as float32 updates (as the LoRA stream does beside the products),
// x64s_us tc_us with the rank-32 class's expands on 64-row tiles with the
// output tile staged in shared memory at every row count
// (sgmv_expand_tc64s, kernelForce.stageOut 1; tc_us takes it from
// stageOutMinRows LoRA rows, stageOutAuto), nopipe_us tc_us with the
// big shrinks on sgmv_shrink64, not sgmv_shrink64p (kernelForce.shrinkPipe
// -1; sgBigMinRows LoRA rows up); NaN where the variant's kernel does not
// run (ranks above 32 for x64s_us).
func TestLoRABench(t *testing.T) {
	if os.Getenv("PEFTD_LORA_BENCH") == "" {
		t.Skip("set PEFTD_LORA_BENCH=1 to run")
	}
	const maxT = 2048
	cfg := cfg8B(1)
	r := newRig(t, cfg, maxT, engine.KVSpec{Layers: 1, Blocks: maxT / 16, BlockSize: 16, KVHeads: 8, HeadDim: 128})
	b := r.b
	bw := copyBandwidth(t, b)
	dev := b.Device()
	bench("lora device %s; copy bandwidth %.0f GB/s (D2D 1 GiB, read+write)", dev.Name, bw/1e9)
	// PEFTD_LORA_BENCH_ONLY=N,rank,T (e.g. 4,32,8, or 4,32,4x512pf for the
	// prefill case): that case alone, v1 then v2, one untimed replay each
	// and no warm-up (for ncu: 8 + 4 kernels).
	reps, warm := 40, 3
	var only []string
	if o := os.Getenv("PEFTD_LORA_BENCH_ONLY"); o != "" {
		only = strings.Split(o, ",")
		for i := range only {
			only[i] = strings.TrimSpace(only[i])
		}
		if len(only) != 3 {
			t.Fatalf("PEFTD_LORA_BENCH_ONLY=%q: want N,rank,T", o)
		}
		for _, f := range only[:2] {
			if _, err := strconv.Atoi(f); err != nil {
				t.Fatalf("PEFTD_LORA_BENCH_ONLY=%q: %v", o, err)
			}
		}
		reps, warm = 1, 0
	}
	// PEFTD_LORA_BENCH_SETS=4x32,1x32: only those adapters x rank tables (timed as usual)
	sets := os.Getenv("PEFTD_LORA_BENCH_SETS")
	// PEFTD_LORA_BENCH_SHRINK64=1 or -1: sgmv_shrink64 for every shrink, or none (kernelForce.shrink64)
	sh64 := envInt(t, "PEFTD_LORA_BENCH_SHRINK64", "lora shrinks: kernelForce.shrink64")
	// PEFTD_LORA_BENCH_KC=1024: the shrinks' K split in pieces of that many
	// columns (kernelForce.loraKChunk; -1: covering the SMs twice)
	kc := envInt(t, "PEFTD_LORA_BENCH_KC", "lora shrinks: kernelForce.loraKChunk")
	if only == nil { // host cost of one eager kernel launch (purego call + hop to the CUDA thread)
		x := r.buffer(1, 256)
		r.fill(x, r.rnd(256, 1))
		const n = 4000
		if err := b.fn.siluMul.Launch(b.s, cuda.Dim3{X: 1}, cuda.Dim3{X: 256}, 0, x.mem, x.mem, x.mem, uint64(0), uint64(0), uint64(0), 1, 256, 256, 0, uint64(0), uint64(0)); err != nil {
			t.Fatal(err)
		}
		b.s.Synchronize()
		t0 := time.Now()
		for i := 0; i < n; i++ {
			if err := b.fn.siluMul.Launch(b.s, cuda.Dim3{X: 1}, cuda.Dim3{X: 256}, 0, x.mem, x.mem, x.mem, uint64(0), uint64(0), uint64(0), 1, 256, 256, 0, uint64(0), uint64(0)); err != nil {
				t.Fatal(err)
			}
		}
		host := time.Since(t0)
		if err := b.s.Synchronize(); err != nil {
			t.Fatal(err)
		}
		bench("lora eager launch: %.1f us host time per kernel launch (%d tiny launches, %.1f us each end to end)", float64(host.Microseconds())/n, n, float64(time.Since(t0).Microseconds())/n)
	}
	flush := l2Flusher(t, b)
	var err error
	// activations: inputs and outputs of the four LoRA ops of a layer
	type op struct {
		name string
		x    *Buffer
		out  *Buffer
		mods []llama.Module
	}
	ops := []op{
		{"qkv", r.buffer(maxT, 4096), r.buffer(maxT, 6144), []llama.Module{llama.Q, llama.K, llama.V}},
		{"o", r.buffer(maxT, 4096), r.buffer(maxT, 4096), []llama.Module{llama.O}},
		{"gate_up", r.buffer(maxT, 4096), r.buffer(maxT, 28672), []llama.Module{llama.Gate, llama.Up}},
		{"down", r.buffer(maxT, 14336), r.buffer(maxT, 4096), []llama.Module{llama.Down}},
	}
	for _, o := range ops {
		r.fill(o.x, r.rnd(maxT*o.x.cols, 1))
		r.fill(o.out, r.rnd(maxT*o.out.cols, 1))
	}
	// each op's float32 update, as a step's LoRA stream writes it beside the
	// product for the op reading the product to add (aside_us)
	aside := make([]*cuda.DeviceBuffer, len(ops))
	for i, o := range ops {
		if aside[i], err = b.ctx.Alloc(4 * maxT * o.out.cols); err != nil {
			t.Fatal(err)
		}
		defer aside[i].Free()
	}
	if b.sgFused[0] == nil && b.sgErr != nil {
		t.Logf("%v", b.sgErr)
	}
	// timeGraph captures the layer's LoRA ops and returns the median replay
	// time in µs: the updates added in place to the outputs, or (inPlace
	// false) written as float32 updates aside.
	shrinkOnly := false // timeGraph captures the ops' shrinks alone (shrink_us)
	timeGraph := func(inPlace bool) float64 {
		return replayUs(t, b, flush, warm, reps, func() {
			for i, o := range ops {
				switch {
				case shrinkOnly:
					groupShrink(b, o.x, o.mods)
				case inPlace:
					b.loraSlices(b.s, o.out.mem.Ptr(), o.out.cols, o.x, 0, o.mods, accAdd)
				default:
					b.loraSlices(b.s, aside[i].Ptr(), o.out.cols, o.x, 0, o.mods, accFloat)
				}
			}
		})
	}
	perRank := loraParamsPerRank(cfg)
	actBytes := func(T int) float64 { // x read once per op, out read and written
		n := 0
		for _, o := range ops {
			n += o.x.cols + 2*o.out.cols
		}
		return float64(2 * T * n)
	}
	bench("lora %-4s %-4s %-9s %9s %9s %9s %9s %8s %9s %9s %7s %7s %7s %7s %9s %9s %9s %9s %9s", "N", "rank", "T", "v0_us", "v1_us", "v2_us", "tc_us", "adapt_MB", "floor_us", "floorA_us", "v1_frac", "v2_frac", "tcA_frac", "v1/tc", "graph_us", "aside_us", "x64s_us", "nopipe_us", "shrink_us")
	rng := rand.New(rand.NewPCG(1, 2))
	for _, nAd := range []int{1, 4, 16} {
		for _, rank := range []int{16, 32, 64} {
			if only != nil && (fmt.Sprint(nAd) != only[0] || fmt.Sprint(rank) != only[1]) || sets != "" && !slices.Contains(strings.Split(sets, ","), fmt.Sprintf("%dx%d", nAd, rank)) {
				continue
			}
			for s := 0; s < 16; s++ {
				if err := b.UnloadAdapter(s); err != nil {
					t.Fatal(err)
				}
			}
			for s := 0; s < nAd; s++ {
				if err := b.LoadAdapter(s, randomAdapter(rng, cfg, rank, 2)); err != nil {
					t.Fatal(err)
				}
			}
			type tc struct {
				label string
				segs  []int // rows per adapter, in slot order
			}
			var cases []tc
			for _, T := range []int{1, 8, 16, 32, 64, 128, 256} {
				segs := make([]int, min(nAd, T))
				for i := 0; i < T; i++ {
					segs[i%nAd]++
				}
				cases = append(cases, tc{fmt.Sprint(T), segs})
			}
			if nAd == 4 { // prefill: 512, 1,024 and 2,048 rows (stageOutMinRows)
				for _, n := range []int{128, 256, 512} {
					cases = append(cases, tc{fmt.Sprintf("4x%dpf", n), []int{n, n, n, n}})
				}
			}
			for _, c := range cases {
				if only != nil && c.label != only[2] {
					continue
				}
				T := 0
				var segs []engine.Segment
				for s, n := range c.segs {
					segs = append(segs, engine.Segment{Start: T, End: T + n, Slot: s})
					T += n
				}
				m := oneSeq(T, 16, zeros(T))
				m.LoRA = segs
				// v0, v1, v2 (fused; v1 where the v2 module is missing), tc (the
				// default: shrink + tensor-core expand), and the graph layout:
				// what a replayed serving step of T rows runs (the rows padded
				// to their bucket, the bucket's tile capacity, the rank class)
				var us [9]float64
				for v := range 5 {
					if only != nil && v == 0 {
						continue
					}
					if v == 4 {
						us[4], us[5] = math.NaN(), math.NaN()
						// (the rig's graphs have tiles for 8 adapters: the
						// 16-adapter rows get no graph column)
						if b.g.off || !b.preOK || T > b.g.maxRows || len(c.segs) > b.g.slots {
							continue
						}
						graphLoRALayout(t, b, m, T)
						us[4], us[5] = timeGraph(true), timeGraph(false)
						r.end()
						continue
					}
					b.force = kernelForce{loraRows: v == 0, loraV1: v == 1, loraV2: v == 2, shrink64: sh64, loraKChunk: kc}
					r.begin(m)
					us[v] = timeGraph(true)
					r.end()
				}
				// x64s_us: tc with the expands on sgmv_expand_tc64s at every
				// row count (the rank-32 class)
				b.force = kernelForce{shrink64: sh64, loraKChunk: kc, stageOut: 1}
				r.begin(m)
				us[6] = ranOr(&b.expandStageds, timeGraph, true)
				r.end()
				// nopipe_us: tc with the big shrinks on sgmv_shrink64, not
				// sgmv_shrink64p (kernelForce.shrinkPipe -1)
				b.force = kernelForce{shrink64: sh64, loraKChunk: kc, shrinkPipe: -1}
				r.begin(m)
				us[7] = ranOr(&b.shrinkBigs, timeGraph, true)
				r.end()
				// shrink_us: tc's shrinks alone, on the whole card (what a
				// LoRA update carried in the products' K would still run
				// ahead of each product)
				b.force = kernelForce{shrink64: sh64, loraKChunk: kc}
				r.begin(m)
				shrinkOnly = true
				us[8] = timeGraph(true)
				shrinkOnly = false
				r.end()
				b.force = kernelForce{}
				adBytes := float64(2 * rank * perRank * len(c.segs))
				floor := adBytes / bw * 1e6
				floorAll := (adBytes + actBytes(T)) / bw * 1e6
				bench("lora %-4d %-4d %-9s %9.1f %9.1f %9.1f %9.1f %8.1f %9.1f %9.1f %7.2f %7.2f %7.2f %7.2f %9.1f %9.1f %9.1f %9.1f %9.1f", nAd, rank, c.label, us[0], us[1], us[2], us[3], adBytes/1e6, floor, floorAll, floor/us[1], floor/us[2], floorAll/us[3], us[1]/us[3], us[4], us[5], us[6], us[7], us[8])
			}
		}
	}
}

// decodeVariant is one row of TestDecodeBench: how the step runs.
type decodeVariant struct {
	lora, sampled, eager, serial bool
	sms                          int    // -1: autoLoRASMs
	nopdl                        bool   // kernels launched one after the other (Options.NoPDL)
	split                        int    // attn_decode's KV splits (kernelForce.decSplit; 0: decSplitFor's)
	ropeHeads                    bool   // rope_store for every shape (kernelForce.ropeHeads), not rope_store_rows
	tuned                        bool   // after Options.TuneGEMMs' tuning (it cannot be undone: these rows come last)
	opts                         int    // attn_decode's opts (kernelForce.decOpts: 0 the default, -1 none)
	lt                           bool   // every bf16 product through cuBLASLt (kernelForce.noSkinny)
	wgFull                       bool   // wgmma products beside the LoRA stream on every SM, as v0.32 ran them (kernelForce.wgFull)
	splitBeside                  bool   // FP8 weights: products beside the LoRA stream plan their K split for the whole card (fp8State.splitBeside)
	nopad                        bool   // FP8 weights: scaled products for their own rows, not padded to a multiple of 128 (fp8State.padOff)
	wgBeside                     bool   // FP8 weights: every 33-64-row product beside the LoRA stream on fp8_wg (fp8State.wgBeside: v0.32's routing)
	kc                           int    // LoRA shrinks' K split in pieces of kc columns (kernelForce.loraKChunk; 0: the default; -1: covering the SMs twice at every row count)
	skLate                       bool   // gemm_skinny without its early weight tiles (kernelForce.skLate)
	dv                           int    // attn_decode's variant whatever the rows: 1 + a decVariant (kernelForce.decVar; 0: decVariantFor's)
	padOld                       bool   // FP8 weights: v0.43's padding (129-255 rows only; 33-64-row gate/up on fp8_wg: fp8State.padOld)
	fslate                       bool   // FP8 weights: fp8_stream without its early weight tiles (fp8State.streamLate)
	fs, gv                       bool   // FP8 weights: fp8_stream for every 1-16 rows (fp8State.streamOn; the default from fp8StreamMinRows), or for none (streamOff)
	noseg                        bool   // FP8 weights: fp8_gemv, not fp8_gemv_seg, at 1-4 rows (fp8State.segOff)
	nosege                       bool   // FP8 weights: not fp8_gemv_seg's early twins in steps with no LoRA update (fp8State.segEarlyOff)
	wslone                       bool   // FP8 weights: fp8_ws only for products no LoRA update runs beside (fp8State.wsLone: v0.58-v0.62's rule)
	wsfrom                       int    // FP8 weights: fp8_ws from this many rows below 17 too (fp8State.wsFrom; label +wsN)
	nowslone                     bool   // FP8 weights: lone products of 9-16 rows on fp8_stream, not fp8_ws (fp8State.wsLoneFrom 0)
	nowsbeside                   bool   // FP8 weights: products of 9-16 rows beside a LoRA update on fp8_stream with no SMs held, not fp8_ws with autoSmallHoldsFP8 (fp8State.wsBesideFrom 0; v0.83's rule)
	pa                           bool   // FP8 weights: cuBLASLt's FP8 products with float32 promotion (Options.FP8PreciseAccum)
	siluo2                       int    // FP8 silu_mul of more than 64 rows as silu_mul_o2 (kernelForce.siluO2: 1 on, -1 off, 0 the default: above fp8MidRows)
	silucl                       int    // FP8 silu_mul of 1-64 rows as silu_mul_cl (kernelForce.siluCl: 1 wherever it fits, -1 never, 0 the default)
	addcl                        int    // add_rmsnorm as add_rmsnorm_cl (kernelForce.addCl: 1 wherever it fits, -1 never, 0 the default: 1-16 rows adding a LoRA update)
	hoist                        int    // recordings and cuBLASLt's memsets (kernelForce.memHoist: -1 as captured, 1 moved, 0 the default: moved and replaced by fill_rows)
	prio                         int    // recordings with the LoRA stream's kernels at its priority (kernelForce.nodePrio: 1 at every row count, -1 at none, 0 the default)
	wg                           bool   // FP8 weights: fp8_wg (wgmma; PEFTD_WG) for 17-128 rows (fp8State.wgOn)
	ws                           bool   // FP8 weights: fp8_ws (ws.go; PEFTD_WG) for the 17-64 rows it plans (fp8State.wsOn)
	wsgu                         bool   // FP8 weights: fp8_ws for the gate/up product only (fp8State.wsWide)
	wsqo                         bool   // FP8 weights: fp8_ws for the q/k/v and o products only (fp8State.wsNarrow)
	bws                          int    // bf16 weights: gemm_ws (ws.go) for 17-64 rows, 1 every product, 2 q/k/v and o, 3 every product no LoRA update runs beside (v0.68's default), 4 those and every product of at most bwsBesideRows rows beside one (the default on sm_90a: since v0.84 every row count, as 1), -1 none (kernelForce.bws)
	nows                         bool   // FP8 weights: no fp8_ws for lone products by default (fp8State.wsAuto off: Options.NoWS)
	wgsk                         bool   // FP8 weights: fp8_wgsk (wgsk.go: stream-K, TMA stages) for every product of 65-256 rows it takes (fp8State.wgskOn)
	nowga                        bool   // FP8 weights: Options.NoFP8Wgmma, every product of 17-64 rows on cuBLASLt (the default routes wgAutoFits' to fp8_wg: fp8State.wgAuto)
	part                         int    // SMs for the LoRA stream in a green-context split (partition.go; PEFTD_LORA_PARTITION lists them; 0: none)
	holds                        [4]int // SMs each fused group's product leaves to the LoRA stream (kernelForce.holds; 0: the default, holdFor)
	pdlJoins                     int    // recordings' programmatic joins (kernelForce.pdlJoins: -1 none, 0 the default (2), 1, 3)
	sergrp                       int    // groups whose update runs after the product on the compute stream, in place, no SMs held (kernelForce.serialLoRA: -1 none, 0 the default, else a mask of llama.FusedGroups; label +serN)
	inline                       int    // groups whose shrink runs inside gemm_skinny (kernelForce.loraInline: -1 none, 0 the default (q/k/v), else a mask of llama.FusedGroups)
	rfold                        int    // q/k/v LoRA expanded inside RoPE at 1-16 rows (kernelForce.ropeLoRA: 1 on, -1 off, 0 the default)
	l2                           int    // the LoRA update buffer as an L2 persisting window (kernelForce.l2Win: 1 on, -1 off, 3 on over the whole buffer, 0 the default)
	sh64                         int    // LoRA shrinks as sgmv_shrink64 (kernelForce.shrink64: 1 always, -1 never, 0 the default)
	wssilu                       int    // bf16 gate/up and silu_mul in one gemm_ws_silu launch where it fits (kernelForce.wsSiLU: 1 on, -1 never, 0 the default: wsSiLUAuto)
	wsh16                        bool   // FP8 gate/up of 1-16 rows on fp8_wsh16 (kernelForce.wsHalf16; label +wsh16)
	wslong16                     bool   // plans of 1-16 rows on fp8_ws16 keep narrow blocks over long K (kernelForce.wsLong16; label +wslong16)
	ws16                         int    // FP8 products of 1-16 rows on the 16-row kernels (fp8_ws16_n*) where a ws kernel takes them (kernelForce.ws16: 1 on, -1 never, 0 the default: ws16Auto)
	wshalf                       int    // gate/up on the half-row kernels (gemm_wsh, fp8_wsh) where loaded (kernelForce.wsHalf: 1 on, -1 never, 0 the default: wsHalfAuto, wsHalfFP8Auto)
	onopdl                       int    // the o group's LoRA kernels without PDL (kernelForce.oNoPDL: 1 on, -1 off, 0 the default)
	qkvhalf                      int    // the q/k/v LoRA update as bf16, read by rope_store_rows_h / rope_store_h (kernelForce.qkvHalf: 1 on, -1 off, 0 the default: qkvHalfAuto)
	outhalf                      int    // the o and down LoRA updates as bf16, read by add_rmsnorm_h (kernelForce.outHalf: 1 on, -1 off, 0 the default: outHalfAuto)
	hstage                       int    // the rank-32 class's bf16 updates written by sgmv_expand_tch1s, the output tile staged (kernelForce.halfStage: 1 on, -1 off, 0 the default: halfStageAuto)
	guhalf                       int    // the gate/up LoRA update as bf16, read by silu_mul_h / _o2h / _clh (kernelForce.guHalf: 1 on, -1 off, 0 the default: guHalfAuto)
	alllogits                    bool   // mixed recordings compute every row's logits (kernelForce.allLogits; the default: half their rows where that holds the step's, logitCaps)
	wsnorm                       int    // o and down with the add_rmsnorm after them in one gemm_ws_norm / fp8_ws_norm launch where it fits (kernelForce.wsNorm: 1 on, -1 never, 0 the default: wsNormAuto)
}

// force is f with the kernel settings row v sets (kernelForce's other
// fields as f has them).
func (v decodeVariant) force(f kernelForce) kernelForce {
	f.decSplit, f.ropeHeads, f.decOpts = v.split, v.ropeHeads, v.opts
	f.noSkinny, f.skLate, f.decVar, f.bws = v.lt, v.skLate, v.dv, v.bws
	f.wgFull, f.loraKChunk = v.wgFull, v.kc
	f.holds, f.pdlJoins, f.loraInline, f.serialLoRA = v.holds, v.pdlJoins, v.inline, v.sergrp
	f.ropeLoRA, f.nodePrio, f.siluCl, f.addCl = v.rfold, v.prio, v.silucl, v.addcl
	f.memHoist, f.l2Win, f.shrink64, f.wsSiLU, f.wsNorm, f.wsHalf, f.ws16 = v.hoist, v.l2, v.sh64, v.wssilu, v.wsnorm, v.wshalf, v.ws16
	f.wsLong16, f.wsHalf16 = v.wslong16, v.wsh16
	f.oNoPDL, f.siluO2, f.guHalf, f.outHalf, f.qkvHalf = v.onopdl, v.siluo2, v.guhalf, v.outhalf, v.qkvhalf
	f.allLogits, f.halfStage = v.alllogits, v.hstage
	return f
}

// fp8Knobs are the FP8 products' settings a recording bakes in (fp8State's
// fields of those names).
type fp8Knobs struct {
	streamOn, streamOff, wgOn, wgAuto, wgBeside, segOff, splitBeside, padOff bool
	wgskOn                                                                   bool
	streamLate, padOld, wsOn, wsWide, wsNarrow                               bool
	wsAuto, segEarlyOff, wsLone, fastAccum                                   bool
	wsFrom, wsLoneFrom, wsBesideFrom                                         int
}

// fp8KnobsOf is f's settings as they are.
func fp8KnobsOf(f *fp8State) fp8Knobs {
	return fp8Knobs{streamOn: f.streamOn, streamOff: f.streamOff, wgOn: f.wgOn, wgAuto: f.wgAuto, wgBeside: f.wgBeside,
		segOff: f.segOff, splitBeside: f.splitBeside, padOff: f.padOff, streamLate: f.streamLate, padOld: f.padOld,
		wsOn: f.wsOn, wsWide: f.wsWide, wsNarrow: f.wsNarrow, wsAuto: f.wsAuto, segEarlyOff: f.segEarlyOff, wsLone: f.wsLone, wsFrom: f.wsFrom, wsLoneFrom: f.wsLoneFrom, wsBesideFrom: f.wsBesideFrom, fastAccum: f.mm.FastAccum(), wgskOn: f.wgskOn}
}

// fp8 is the FP8 settings row v asks of f (wgAuto: f's default unless v.nowga).
func (v decodeVariant) fp8(f *fp8State) fp8Knobs {
	return fp8Knobs{streamOn: v.fs, streamOff: v.gv, wgOn: v.wg, wgAuto: f.wgAutoDefault && !v.nowga, wgBeside: v.wgBeside,
		segOff: v.noseg, splitBeside: v.splitBeside, padOff: v.nopad, streamLate: v.fslate, padOld: v.padOld,
		wsOn: v.ws, wsWide: v.wsgu, wsNarrow: v.wsqo, wsAuto: f.wsAutoDefault && !v.nows, segEarlyOff: v.nosege, wsLone: v.wslone, wsFrom: v.wsfrom, wsLoneFrom: v.wsLoneFrom(), wsBesideFrom: v.wsBesideFrom(), fastAccum: !v.pa, wgskOn: v.wgsk}
}

// wsLoneFrom is fp8State.wsLoneFrom as v asks for it.
func (v decodeVariant) wsLoneFrom() int {
	if v.nowslone {
		return 0
	}
	return wsLoneFromDefault
}

// wsBesideFrom is fp8State.wsBesideFrom as v asks for it.
func (v decodeVariant) wsBesideFrom() int {
	if v.nowsbeside {
		return 0
	}
	return wsBesideFromDefault
}

// apply sets f's settings to k.
func (k fp8Knobs) apply(f *fp8State) {
	f.streamOn, f.streamOff, f.wgOn, f.wgAuto, f.wgBeside, f.segOff, f.splitBeside, f.padOff = k.streamOn, k.streamOff, k.wgOn, k.wgAuto, k.wgBeside, k.segOff, k.splitBeside, k.padOff
	f.streamLate, f.padOld, f.wsOn, f.wsWide, f.wsNarrow, f.wsAuto = k.streamLate, k.padOld, k.wsOn, k.wsWide, k.wsNarrow, k.wsAuto
	f.segEarlyOff, f.wsLone, f.wsFrom, f.wsLoneFrom, f.wsBesideFrom = k.segEarlyOff, k.wsLone, k.wsFrom, k.wsLoneFrom, k.wsBesideFrom
	f.wgskOn = k.wgskOn
	f.mm.SetFastAccum(k.fastAccum)
}

// label names a row of TestDecodeBench's table: "no" (base) or the
// adapters ("4xr32"), then each setting that differs from the default.
func (v decodeVariant) label(ads []*lora.Adapter, pdlOK bool) string {
	lbl := "no"
	if v.sampled {
		lbl = "no+ds"
	}
	if v.lora && len(ads) > 0 {
		lbl = fmt.Sprintf("%dxr%d", len(ads), ads[0].MaxRank())
	}
	if v.sms >= 0 {
		lbl += fmt.Sprintf("+sms%d", v.sms)
	}
	if v.split > 0 {
		lbl += fmt.Sprintf("+split%d", v.split)
	}
	if v.opts != 0 {
		lbl += fmt.Sprintf("+opts%d", max(v.opts, 0))
	}
	if v.dv > 0 {
		lbl += "+" + decVariant(v.dv-1).String()
	}
	for _, f := range []struct {
		on   bool
		name string
	}{{v.eager, "eager"}, {v.serial, "serial"}, {v.nopdl && pdlOK, "nopdl"}, {v.ropeHeads, "ropeheads"}, {v.lt, "lt"}, {v.wgFull, "wgfull"}, {v.wgBeside, "wgbeside"}, {v.splitBeside, "splitbeside"}, {v.nopad, "nopad"}, {v.padOld, "padold"}, {v.fslate, "fslate"}, {v.skLate, "late"},
		{v.fs, "fs"}, {v.gv, "gv"}, {v.noseg, "noseg"}, {v.nosege, "nosege"}, {v.wg, "wg"}, {v.wgsk, "wgsk"}, {v.ws, "ws"}, {v.wsgu, "wsgu"}, {v.wsqo, "wsqo"}, {v.bws == 1, "bws"}, {v.bws == 2, "bwsqo"}, {v.bws == 3, "bwslone"}, {v.bws < 0, "nobws"}, {v.nows, "nows"}, {v.wslone, "wslone"}, {v.nowga, "nowga"}, {v.pa, "pa"}, {v.tuned, "tuned"}, {v.nowslone, "nowslone"}, {v.nowsbeside, "nowsbeside"}, {v.alllogits, "alllogits"},
		{v.wslong16, "wslong16"}, {v.wsh16, "wsh16"}} {
		if f.on {
			lbl += "+" + f.name
		}
	}
	if v.kc > 0 {
		lbl += fmt.Sprintf("+kc%d", v.kc)
	} else if v.kc < 0 {
		lbl += "+kcauto" // the shrinks' K split to cover the SMs twice, whatever the rows (before fp8KChunk)
	}
	lbl += countLabel(v.wsfrom, "ws") + countLabel(v.part, "part")
	if v.holds != [4]int{} {
		h := v.holds[:]
		for h[len(h)-1] == 0 {
			h = h[:len(h)-1]
		}
		lbl += "+hold"
		for i, n := range h {
			if i > 0 {
				lbl += "."
			}
			lbl += strconv.Itoa(n)
		}
	}
	switch {
	case v.sergrp < 0:
		lbl += "+noser"
	case v.sergrp > 0:
		lbl += fmt.Sprintf("+ser%d", v.sergrp)
	}
	switch {
	case v.inline < 0:
		lbl += "+noinl"
	case v.inline > 0:
		lbl += fmt.Sprintf("+inl%d", v.inline)
	}
	lbl += onOffLabel(v.rfold, "rfold")
	lbl += onOffLabel(v.sh64, "sh64")
	lbl += onOffLabel(v.wssilu, "wssilu")
	lbl += onOffLabel(v.wsnorm, "wsnorm")
	lbl += onOffLabel(v.hstage, "hstage")
	lbl += onOffLabel(v.wshalf, "wshalf")
	lbl += onOffLabel(v.ws16, "ws16")
	lbl += onOffLabel(v.silucl, "silucl")
	lbl += onOffLabel(v.siluo2, "siluo2")
	lbl += onOffLabel(v.guhalf, "guhalf")
	lbl += onOffLabel(v.outhalf, "outhalf")
	lbl += onOffLabel(v.qkvhalf, "qkvhalf")
	lbl += onOffLabel(v.addcl, "addcl")
	lbl += onOffLabel(v.prio, "prio")
	lbl += onOffLabel(v.onopdl, "onopdl")
	lbl += onOffLabel(v.hoist, "hoist")
	if v.l2 > 1 {
		lbl += fmt.Sprintf("+l2m%d", v.l2)
	} else {
		lbl += onOffLabel(v.l2, "l2")
	}
	switch v.pdlJoins {
	case -1:
		lbl += "+fulljoin"
	case 1, 2, 3:
		lbl += fmt.Sprintf("+pdljoin%d", v.pdlJoins)
	}
	return lbl
}

// countLabel is a label's part for a setting of n (0: the default):
// "+name" and n, or nothing.
func countLabel(n int, name string) string {
	if n > 0 {
		return fmt.Sprintf("+%s%d", name, n)
	}
	return ""
}

// onOffLabel is a label's part for a kernelForce switch (1 on, -1 off, 0
// the default): "+name", "+noname", or nothing.
func onOffLabel(v int, name string) string {
	switch {
	case v < 0:
		return "+no" + name
	case v > 0:
		return "+" + name
	}
	return ""
}

// partOf is the SMs the LoRA stream has in gb's partition while it is on, else 0.
func partOf(gb *Backend) int {
	if p := gb.smPart; p != nil && p.on {
		return p.asked
	}
	return 0
}

// benchPartition puts gb's streams in a green-context split with n SMs for
// the LoRA stream (n 0: the primary context's streams), opening the split
// if gb has another or none. It logs the SMs each side got.
func benchPartition(gb *Backend, n int) error {
	if err := gb.setPartition(false); err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	if p := gb.smPart; p != nil && p.asked != n {
		if err := p.close(gb); err != nil {
			return err
		}
		gb.smPart = nil
	}
	if gb.smPart == nil {
		if err := gb.openPartition(n); err != nil {
			return err
		}
	}
	if err := gb.setPartition(true); err != nil {
		return err
	}
	base, lora, _ := gb.Partition()
	bench("decode SM partition %d: compute stream %d SMs, LoRA stream %d", n, base, lora)
	return nil
}

// TestDecodeBench measures decode throughput of a random-weight
// Llama-3.1-8B-shaped checkpoint (tools/make_random_llama.py) through
// engine.Step: per batch size, prompts of 512 random tokens are prefilled in
// chunks of 8 prompts, then 128 decode steps of one token per sequence
// (random token ids: decode cost does not depend on them), once with no
// adapters and once with the four rank-32 adapters round-robin over the
// sequences. Reports wall-clock and device-time tokens/s and the byte
// roofline: (weights + adapters touched + KV read and written per step) /
// the measured copy bandwidth.
func TestDecodeBench(t *testing.T) {
	dir := os.Getenv("PEFTD_MODEL_8B")
	if dir == "" {
		t.Skip("PEFTD_MODEL_8B is not set (make one with tools/make_random_llama.py)")
	}
	t0 := time.Now()
	batches := envBatches(t, "PEFTD_DECODE_BATCHES", []int{1, 16, 64, 256})
	// PEFTD_DECODE_PROMPT: the prompt length (default 512; e.g. 4096 for
	// attention-bound decode)
	prompt := envPositive(t, "PEFTD_DECODE_PROMPT", 512)
	const newTok = 128
	// PEFTD_DECODE_MIXED=P: every timed step also starts a new sequence with
	// a P-token prompt (under the next adapter in turn with adapters, none
	// without), released after the step, so a step of B decode rows replays
	// the mixed recording of B + P rows: serving's mixed steps (serve8b's
	// SERVEKINDS: ~59 decode rows beside ~180 prompt rows). gpu_ms counts
	// the prompt rows; tok/s counts the decode tokens alone.
	mixedP := envPositive(t, "PEFTD_DECODE_MIXED", 0)
	maxB := slices.Max(batches)
	// the step and the cache also hold adapterLoadBench's 8 x 512-token
	// prefill and its 64 sequences, each at most 512+adapterLoadSteps tokens
	opts := engine.Options{MaxTokens: max(prefillChunk(prompt)*prompt, 8*512), BlockSize: 16,
		KVBlocks: max(maxB*(prompt+newTok)/16+64, 64*(512+adapterLoadSteps)/16+64) + (mixedP+15)/16}
	// refuse a cache the card cannot hold before the 16 GB load
	if cfg, err := llama.LoadConfig(filepath.Join(dir, "base")); err == nil {
		kvBytes := int64(cfg.Layers) * int64(opts.KVBlocks) * 16 * int64(cfg.KVHeads*cfg.HeadDim) * 4
		if kvBytes > 100<<30 {
			t.Fatalf("batches %v x (%d + %d) tokens need %.0f GiB of bf16 KV cache: set PEFTD_DECODE_BATCHES lower", batches, prompt, newTok, float64(kvBytes)/(1<<30))
		}
	}
	m, ads := openRandom8B(t, dir)
	ads = distinctAdapters(ads, envPositive(t, "PEFTD_DECODE_ADAPTERS", len(ads)))
	c := m.Config
	opts.AdapterSlots = len(ads) + 1
	// bf16 unless PEFTD_WEIGHTS=fp8; a bf16 KV cache unless PEFTD_KV=fp8
	// +partN rows (PEFTD_LORA_PARTITION) need kernels that run in a green
	// context: the libraries' (kernels.Options.ContextFree)
	parts := envBatches(t, "PEFTD_LORA_PARTITION", nil)
	gb, err := New(Options{WeightFormat: os.Getenv("PEFTD_WEIGHTS"), KVFormat: os.Getenv("PEFTD_KV"), Kernels: kernels.Options{ContextFree: len(parts) > 0}})
	if err != nil {
		t.Fatal(err)
	}
	bw := copyBandwidth(t, gb)
	// PEFTD_ATTN_TS=1 with a PEFTD_ATTN_TS build (PEFTD_KERNEL_DEFINES):
	// each row prints where attn_decode's time goes (attnTimestamps)
	attnTS := os.Getenv("PEFTD_ATTN_TS") != "" && kernels.Defined("PEFTD_ATTN_TS")
	gb.force.attnTS = attnTS
	// PEFTD_EXPAND_TS=1 with a PEFTD_EXPAND_TS build: each row with
	// adapters prints how the last gate/up expand's blocks ran in time
	// (expandTimestamps)
	if os.Getenv("PEFTD_EXPAND_TS") != "" && gb.xtsBuild {
		if gb.expandTS, err = gb.ctx.Alloc(8 * xtsBlocks * xtsWords); err != nil { // freed by Close
			gb.Close()
			t.Fatal(err)
		}
	}
	e, err := engine.New(m, gb, opts)
	if err != nil {
		gb.Close()
		t.Fatal(err)
	}
	defer e.Close()
	loadAdapters(t, e, ads)
	if err := gb.SetTiming(true); err != nil {
		t.Fatal(err)
	}
	tw := time.Now()
	if err := e.Warmup(); err != nil {
		t.Fatal(err)
	}
	warm := time.Since(tw)
	recorded, _ := gb.GraphStats()
	load := time.Since(t0)
	// bytes per decode step that do not depend on the batch: every weight but the embedding table
	var wBytes float64
	for _, name := range m.Tensors.Names() {
		if name == llama.EmbedName && !c.TieEmbeddings {
			continue
		}
		info, ok := m.Tensors.Info(name)
		if !ok {
			t.Fatalf("no tensor %s", name)
		}
		n := 1
		for _, d := range info.Shape {
			n *= d
		}
		if gb.f8 != nil && fp8Projection(name, info.Shape) {
			wBytes += float64(n + 4*info.Shape[0]) // e4m3 values and a float32 scale per row
		} else {
			wBytes += float64(2 * n) // bf16 on the device
		}
	}
	adBytes := 0.0
	if len(ads) > 0 {
		adBytes = float64(ads[0].Params * 2)
	}
	kvTok := float64(2 * c.Layers * c.KVHeads * c.HeadDim * 2) // K and V, bf16, all layers
	kvf := KVBF16
	if gb.kv8 { // e4m3 keys with a float32 scale per token and KV head, bf16 values
		kvTok, kvf = float64(c.Layers*c.KVHeads*(3*c.HeadDim+4)), KVFP8
	}
	wf := WeightsBF16
	if gb.f8 != nil {
		wf = WeightsFP8
	}
	bench("decode device %s; weights %s; KV cache %s; prompts of %d tokens; %s: %d layers, hidden %d, vocab %d; %d adapters of %.0f MB; copy bandwidth %.0f GB/s; loaded in %v; %d decode graphs recorded in %v (%d captured without an eager run first)",
		gb.Device().Name, wf, kvf, prompt, dir, c.Layers, c.Hidden, c.VocabSize, len(ads), adBytes/1e6, bw/1e9, load.Round(time.Second), recorded, warm.Round(time.Millisecond), gb.g.Direct)
	if mixedP > 0 {
		bench("decode mixed steps: every timed step also prefills a new %d-token prompt (in gpu_ms and roof_ms, not in tok/s)", mixedP)
	}
	bench("decode %-5s %-11s %10s %10s %10s %9s %9s %9s %9s %10s", "batch", "lora", "wall_tok/s", "gpu_tok/s", "roof_tok/s", "gpu_frac", "wall_ms", "gpu_ms", "roof_ms", "prefill_s")
	rng := rand.New(rand.NewPCG(3, 4))
	ctx := context.Background()
	pdlOK := gb.PDL() // the card launches programmatically: the +nopdl rows are the A/B
	bench("decode programmatic dependent launch: %v", pdlOK)
	bench("decode attn_decode blocks resident at once: w4 %d, w2 %d, w8 %d", gb.decResident[decV4], gb.decResident[decV2], gb.decResident[decV8])
	if d := gb.Device(); gb.la.delta != nil {
		bench("decode L2 %d MB: at most %d MB set aside for persisting lines, windows of at most %d MB; the LoRA update buffer %d MB (its first %d MB a window by default)",
			d.L2Bytes>>20, d.PersistL2Max>>20, d.WindowMax>>20, gb.la.delta.Size()>>20, gb.l2Window().Bytes>>20)
	}
	// base, adapters, base sampled on the device (StepSample), both
	// eagerly (no graphs, as before v0.11), then adapters with every
	// LoRA update on the compute stream (SerialLoRA) and with the GEMMs
	// holding 0, 8, 16, 24 or 32 SMs back for the LoRA stream whatever the
	// batch (LoRASMs; the others choose by the batch: autoLoRASMs)
	// the rows most wanted first: PEFTD_DECODE_QUICK and
	// PEFTD_DECODE_VARIANTS take the first ones
	vs := []decodeVariant{{sms: -1}, {lora: true, sms: -1},
		{sms: -1, lt: true}, {lora: true, sms: -1, lt: true}, {sms: -1, fs: true}, {lora: true, sms: -1, fs: true}, {sms: -1, gv: true}, {lora: true, sms: -1, gv: true},
		{sms: -1, skLate: true}, {sms: -1, opts: -1},
		{sms: -1, split: 4},
		{sms: -1, opts: 3}, {sms: -1, opts: 23}, {lora: true, sms: -1, opts: 23}, {sms: -1, opts: 7}, {lora: true, sms: -1, opts: 7}, {sms: -1, opts: 55}, {lora: true, sms: -1, opts: 55},
		{sms: -1, nopdl: true}, {lora: true, sms: -1, nopdl: true},
		{sms: -1, ropeHeads: true}, {sms: -1, split: 16}, {sms: -1, split: 1}, {sms: -1, split: 2}, {sms: -1, split: 3}, {sms: -1, dv: 1 + int(decV2)}, {lora: true, sms: -1, dv: 1 + int(decV2)}, {sms: -1, dv: 1 + int(decV4)}, {lora: true, sms: -1, dv: 1 + int(decV4)}, {sms: -1, dv: 1 + int(decV8)}, {lora: true, sms: -1, dv: 1 + int(decV8)},
		{sampled: true, sms: -1}, {eager: true, sms: -1}, {lora: true, eager: true, sms: -1},
		{lora: true, serial: true, sms: -1}, {lora: true, sms: 0}, {lora: true, sms: 8}, {lora: true, sms: 16}, {lora: true, sms: 24}, {lora: true, sms: 32},
		{lora: true, sms: 0, ws: true}, {lora: true, sms: 8, ws: true}, {lora: true, sms: 16, ws: true},
		{lora: true, sms: -1, holds: [4]int{16}}, {lora: true, sms: -1, holds: [4]int{32}}, {lora: true, sms: -1, wgFull: true}, {lora: true, sms: -1, wgBeside: true}, {lora: true, sms: -1, splitBeside: true}, {sms: -1, nopad: true}, {lora: true, sms: -1, nopad: true}, {lora: true, sms: -1, kc: 1024}, {lora: true, sms: -1, kc: 512}, {lora: true, sms: -1, kc: 2048}, {lora: true, sms: -1, kc: 4096}, {lora: true, sms: -1, kc: -1}, {lora: true, sms: -1, inline: -1}, {lora: true, sms: -1, inline: 0b1011}, {lora: true, sms: -1, sergrp: 2}, {lora: true, sms: -1, sergrp: 4}, {lora: true, sms: -1, sergrp: 8}, {lora: true, sms: -1, sergrp: 12}, {lora: true, sms: -1, sergrp: 14}, {lora: true, sms: -1, sergrp: 15}, {lora: true, sms: -1, sergrp: -1}, {lora: true, sms: -1, pdlJoins: -1}, {lora: true, sms: -1, pdlJoins: 1}, {lora: true, sms: -1, pdlJoins: 3},
		{sms: -1, wg: true}, {lora: true, sms: -1, wg: true},
		{sms: -1, wgsk: true}, {lora: true, sms: -1, wgsk: true},
		{sms: -1, nowga: true}, {lora: true, sms: -1, nowga: true},
		{sms: -1, ws: true}, {lora: true, sms: -1, ws: true}, {sms: -1, wsgu: true}, {lora: true, sms: -1, wsgu: true},
		{sms: -1, wsqo: true}, {lora: true, sms: -1, wsqo: true}, {sms: -1, nows: true}, {lora: true, sms: -1, nows: true}, {lora: true, sms: -1, wslone: true},
		{sms: -1, wsfrom: 1}, {lora: true, sms: -1, wsfrom: 1}, {sms: -1, wsfrom: 9}, {lora: true, sms: -1, wsfrom: 9}, {sms: -1, nowslone: true}, {lora: true, sms: -1, nowslone: true}, {lora: true, sms: -1, nowsbeside: true},
		{sms: -1, bws: 1}, {lora: true, sms: -1, bws: 1}, {sms: -1, bws: 2}, {lora: true, sms: -1, bws: 2}, {sms: -1, bws: 3}, {lora: true, sms: -1, bws: 3}, {sms: -1, bws: -1}, {lora: true, sms: -1, bws: -1},
		{lora: true, sms: -1, rfold: 1}, {lora: true, sms: -1, rfold: -1},
		{sms: -1, noseg: true}, {lora: true, sms: -1, noseg: true}, {sms: -1, nosege: true}, {lora: true, sms: -1, prio: -1}, {lora: true, sms: -1, prio: 1}, {sms: -1, hoist: -1}, {lora: true, sms: -1, hoist: -1}, {sms: -1, hoist: 1}, {lora: true, sms: -1, hoist: 1},
		{sms: -1, silucl: -1}, {lora: true, sms: -1, silucl: -1}, {sms: -1, silucl: 1}, {lora: true, sms: -1, silucl: 1},
		{sms: -1, siluo2: -1}, {lora: true, sms: -1, siluo2: -1}, {sms: -1, siluo2: 1}, {lora: true, sms: -1, siluo2: 1},
		{sms: -1, addcl: -1}, {lora: true, sms: -1, addcl: -1}, {sms: -1, addcl: 1}, {lora: true, sms: -1, addcl: 1},
		{sms: -1, padOld: true}, {lora: true, sms: -1, padOld: true},
		{sms: -1, fslate: true}, {lora: true, sms: -1, fslate: true},
		{sms: -1, l2: -1}, {lora: true, sms: -1, l2: -1}, {sms: -1, l2: 3}, {lora: true, sms: -1, l2: 3},
		{lora: true, sms: -1, sh64: 1}, {lora: true, sms: -1, sh64: -1},
		{sms: -1, pa: true}, {lora: true, sms: -1, pa: true},
		{sms: -1, wssilu: 1}, {sms: -1, wssilu: -1},
		{sms: -1, wsnorm: 1}, {sms: -1, wsnorm: -1}, {sms: -1, wssilu: 1, wsnorm: 1},
		{sms: -1, wshalf: 1}, {sms: -1, wshalf: -1}, {lora: true, sms: -1, wshalf: 1}, {lora: true, sms: -1, wshalf: -1}, {sms: -1, wshalf: 1, wssilu: 1}, {sms: -1, wshalf: 1, wssilu: 1, wsnorm: 1},
		{sms: -1, wsfrom: 9, wssilu: 1, wsnorm: 1}, {sms: -1, wsfrom: 9, wssilu: 1, wsnorm: 1, wshalf: 1}, // FP8 9-16 rows: fp8_ws with the fused ends
		{sms: -1, ws16: 1}, {sms: -1, ws16: -1}, {lora: true, sms: -1, ws16: 1}, {lora: true, sms: -1, ws16: -1}, {sms: -1, wslong16: true}, {lora: true, sms: -1, wslong16: true},
		{sms: -1, wsh16: true}, {lora: true, sms: -1, wsh16: true}, {sms: -1, wsh16: true, wslong16: true}, {lora: true, sms: -1, wsh16: true, wslong16: true},
		{lora: true, sms: -1, onopdl: 1}, {lora: true, sms: -1, onopdl: -1},
		{lora: true, sms: -1, hstage: 1}, {lora: true, sms: -1, hstage: -1},
		{lora: true, sms: -1, guhalf: 1}, {lora: true, sms: -1, guhalf: -1}, {lora: true, sms: -1, outhalf: 1}, {lora: true, sms: -1, outhalf: -1}, {lora: true, sms: -1, qkvhalf: 1}, {lora: true, sms: -1, qkvhalf: -1}, {lora: true, sms: -1, outhalf: 1, qkvhalf: 1},
		{sms: -1, alllogits: true}, {lora: true, sms: -1, alllogits: true},
	}
	// PEFTD_LORA_PARTITION=16,32: rows +part16, +part32 with the SMs split by
	// green contexts (Options.LoRAPartition), base and adapters, with and
	// without PDL (issue 9's A/B: partition on/off x PDL on/off)
	for _, n := range parts {
		vs = append(vs, decodeVariant{sms: -1, part: n}, decodeVariant{lora: true, sms: -1, part: n},
			decodeVariant{sms: -1, nopdl: true, part: n}, decodeVariant{lora: true, sms: -1, nopdl: true, part: n})
	}
	// PEFTD_DECODE_HOLDS=32.32.16.24,48.0.0.-1: rows with adapters and
	// those SMs held back from each fused group's product (q/k/v, o,
	// gate/up, down; 0: the default for that group; -1: none, the product
	// on every SM and the LoRA stream's blocks sharing them;
	// kernelForce.holds); an entry ending +wsN (16.16.16.16+ws9) also
	// puts FP8 products from N rows below 17 on fp8_ws (the +wsN rows'
	// fp8State.wsFrom: label 4xr32+ws9+hold16.16.16.16), an entry ending
	// +splitbeside (32.32.20.32+splitbeside) the K split of FP8 products
	// beside the LoRA stream planned for the whole card (fp8State.splitBeside:
	// label 4xr32+splitbeside+hold32.32.20.32). These rows are asked for by
	// name, so PEFTD_DECODE_ROWS, PEFTD_DECODE_QUICK and
	// PEFTD_DECODE_VARIANTS do not drop them (session 103 nearly ran an
	// A/B whose hold rows PEFTD_DECODE_ROWS=4xr32 would have filtered out)
	var asked []decodeVariant
	if env := os.Getenv("PEFTD_DECODE_HOLDS"); env != "" {
		for _, f := range strings.Split(env, ",") {
			var h [4]int
			wsFrom, splitBeside := 0, false
			if hs, ok := strings.CutSuffix(f, "+splitbeside"); ok {
				f, splitBeside = hs, true
			}
			if hs, ws, ok := strings.Cut(f, "+ws"); ok {
				n, err := strconv.Atoi(ws)
				if err != nil || n < 1 || n > 16 {
					t.Fatalf("PEFTD_DECODE_HOLDS: %q: +ws%s is not +ws1 to +ws16", f, ws)
				}
				f, wsFrom = hs, n
			}
			parts := strings.Split(f, ".")
			if len(parts) > len(h) {
				t.Fatalf("PEFTD_DECODE_HOLDS: %q has more than %d groups", f, len(h))
			}
			for i, p := range parts {
				n, err := strconv.Atoi(p)
				if err != nil || n < -1 || n > gb.Device().SMs/2 {
					t.Fatalf("PEFTD_DECODE_HOLDS: %q: %q is not -1 (none) or 0 to %d SMs", f, p, gb.Device().SMs/2)
				}
				h[i] = n
			}
			asked = append(asked, decodeVariant{lora: true, sms: -1, holds: h, wsfrom: wsFrom, splitBeside: splitBeside})
		}
	}
	if os.Getenv("PEFTD_DECODE_QUICK") != "" { // base and adapters, each with cuBLASLt (+lt), and with FP8 weights with fp8_stream at every row count (+fs) and at none (+gv)
		vs = vs[:8]
	}
	// PEFTD_DECODE_VARIANTS=n: only the first n rows, and no adapter-load
	// part (gpu-check's nsysdec traces the base rows alone)
	onlyRows := envPositive(t, "PEFTD_DECODE_VARIANTS", 0)
	if onlyRows > 0 {
		vs = vs[:min(onlyRows, len(vs))]
	}
	// PEFTD_DECODE_ROWS=no,4xr32+lt,...: only the rows of those labels
	rowsWanted := os.Getenv("PEFTD_DECODE_ROWS")
	rowLabels := strings.Split(rowsWanted, ",")
	wantRow := func(v decodeVariant) bool { return rowsWanted == "" || slices.Contains(rowLabels, v.label(ads, pdlOK)) }
	vs = slices.DeleteFunc(vs, func(v decodeVariant) bool { return !wantRow(v) })
	for _, v := range asked { // once each, where the list has that row too
		if !slices.ContainsFunc(vs, func(w decodeVariant) bool { return w.label(ads, pdlOK) == v.label(ads, pdlOK) }) {
			vs = append(vs, v)
		}
	}
	type run struct {
		B int
		v decodeVariant
	}
	var runs []run
	for _, B := range batches {
		for _, v := range vs {
			runs = append(runs, run{B, v})
		}
	}
	// PEFTD_TUNE_FP8_FROM=16: the FP8 tuning (the `+tuned` rows) from 16
	// rows, each route of 64 rows or fewer against cuBLASLt's tuned product
	// (Options.TuneFP8From)
	gb.tune.fp8From = envPositive(t, "PEFTD_TUNE_FP8_FROM", 0)
	// bf16: the `+tuned` rows take peftd serve's tuning (Options.TuneBF16:
	// the decode products beside the LoRA stream, the larger ones on the
	// whole card), or with
	// PEFTD_DECODE_TUNE=all every product of tuneMinRows rows and more
	// (Options.TuneGEMMs)
	tuneAll := os.Getenv("PEFTD_DECODE_TUNE") == "all"
	for _, B := range batches { // the tuned rows: base and adapters again
		// FP8: the tuning takes products of more than wsMaxRows rows
		// (tuneFP8), or from PEFTD_TUNE_FP8_FROM; under PEFTD_DECODE_VARIANTS
		// (nsysdec) only where PEFTD_DECODE_ROWS names them
		rows := B + mixedP // a mixed step's products take the prompt's rows too
		bf16Rows := rows >= tuneMinRows
		if (gb.f8 == nil && bf16Rows || gb.f8 != nil && rows >= gb.fp8TuneFrom()) && (onlyRows == 0 || rowsWanted != "") {
			for _, v := range []decodeVariant{{sms: -1, tuned: true}, {lora: true, sms: -1, tuned: true}} {
				if wantRow(v) {
					runs = append(runs, run{B, v})
				}
			}
		}
	}
	// PEFTD_DECODE_PROFILE_RANGE=1: the profiler's range (cuProfilerStart)
	// opens at the first timed decode step and closes after the last, for
	// nsys --capture-range=cudaProfilerApi (gpu-check's nsysdec): with one
	// batch the trace holds its decode steps alone, not the prefill's
	// launches (64 x 4,096 prompt rows filled v0.25's traces first)
	profRange, inRange := os.Getenv("PEFTD_DECODE_PROFILE_RANGE") != "", false
	for _, rn := range runs {
		B, v := rn.B, rn.v
		withLoRA, sampled := v.lora, v.sampled
		gb.g.off = v.eager
		if withLoRA && len(ads) == 0 || v.nopdl && !pdlOK || v.split > 0 && B > 64 || (v.fs || v.gv) && (gb.f8 == nil || gb.f8.stream == nil) || (v.wg || v.nowga) && (gb.f8 == nil || gb.f8.wg == nil) || v.wgsk && (gb.f8 == nil || gb.f8.wgsk == nil) || v.bws != 0 && (gb.f8 != nil || gb.bws == nil) || v.nows && gb.f8 == nil || (v.wslone || v.wsfrom > 0 || v.nowslone || v.nowsbeside) && (gb.f8 == nil || gb.f8.ws == nil) || v.fslate && (gb.f8 == nil || gb.f8.stream == nil) || (v.padOld || v.pa) && gb.f8 == nil {
			continue
		}
		retune := v.tuned && !gb.tune.done
		if wantPDL := pdlOK && !v.nopdl; retune || partOf(gb) != v.part || gb.la.on == v.serial || gb.la.sms != v.sms || gb.s.ProgrammaticLaunch() != wantPDL ||
			gb.force != v.force(gb.force) || gb.f8 != nil && fp8KnobsOf(gb.f8) != v.fp8(gb.f8) { // recordings bake the LoRA and launch modes, the kernels and the GEMM algorithms in
			gb.la.on, gb.la.sms = !v.serial, v.sms
			gb.force = v.force(gb.force)
			if err := gb.applyL2Window(); err != nil {
				t.Fatal(err)
			}
			if gb.f8 != nil {
				v.fp8(gb.f8).apply(gb.f8)
			}
			if retune { // tuned by the Warmup below
				if gb.f8 != nil || tuneAll {
					gb.tune.on = true
				} else {
					gb.tune.bf16 = true
				}
			}
			if err := benchPartition(gb, v.part); errors.Is(err, ErrPartition) {
				bench("decode SM partition %d: %v (row %s left out)", v.part, err, v.label(ads, pdlOK))
				continue
			} else if err != nil { // before PDL: the streams change
				t.Fatal(err)
			}
			if err := gb.s.SetProgrammaticLaunch(wantPDL); err != nil {
				t.Fatal(err)
			}
			if err := gb.la.s.SetProgrammaticLaunch(wantPDL); err != nil {
				t.Fatal(err)
			}
			if err := gb.dropGraphs(); err != nil {
				t.Fatal(err)
			}
			if err := e.Warmup(); err != nil {
				t.Fatal(err)
			}
			recorded, _ = gb.GraphStats()
		}
		seqs := make([]*engine.Sequence, B)
		slot := func(i int) int {
			if !withLoRA {
				return -1
			}
			return i % len(ads)
		}
		tp := time.Now()
		prefillRandom(t, e, rng, c.VocabSize, seqs, prompt, slot)
		prefill := time.Since(tp)
		var wall time.Duration
		var gpuMs, roofS float64
		in := make([]engine.Input, B)
		if profRange && !inRange {
			if err := gb.ctx.ProfilerStart(); err != nil {
				t.Fatal(err)
			}
			inRange = true
		}
		for step := 0; step < newTok; step++ {
			kvRead := 0.0
			for i := range in {
				in[i] = engine.Input{Seq: seqs[i], Tokens: []int32{int32(rng.IntN(c.VocabSize))}, Slot: slot(i)}
				kvRead += float64(seqs[i].Len()+1) * kvTok
			}
			stepIn := in
			var fresh *engine.Sequence // PEFTD_DECODE_MIXED's prompt
			if mixedP > 0 {
				fresh = &engine.Sequence{}
				toks := make([]int32, mixedP)
				for k := range toks {
					toks[k] = int32(rng.IntN(c.VocabSize))
				}
				stepIn = append(in[:B:B], engine.Input{Seq: fresh, Tokens: toks, Slot: slot(B + step)})
			}
			ts := time.Now()
			if sampled {
				sp := make([]engine.Sampling, len(stepIn))
				for i := range sp {
					sp[i] = engine.Sampling{Params: sample.Params{Temperature: 0.8, TopP: 0.95}, Seed: uint64(i), Index: uint64(stepIn[i].Seq.Len())}
				}
				if _, err := e.StepSample(ctx, stepIn, sp); err != nil {
					t.Fatal(err)
				}
			} else if _, err := e.Step(ctx, stepIn); err != nil {
				t.Fatal(err)
			}
			wall += time.Since(ts)
			gpuMs += float64(gb.StepMs())
			if fresh != nil {
				e.Release(fresh)
			}
			bytes := wBytes + kvRead + float64(B+mixedP)*kvTok
			if withLoRA {
				bytes += adBytes * float64(min(len(stepIn), len(ads)))
			}
			roofS += bytes / bw
		}
		if attnTS {
			attnTimestamps(t, gb, B, v.label(ads, pdlOK))
		}
		if gb.expandTS != nil && withLoRA {
			expandTimestamps(t, gb, B, v.label(ads, pdlOK))
		}
		for _, s := range seqs {
			e.Release(s)
		}
		toks := float64(B * newTok)
		lbl := v.label(ads, pdlOK)
		bench("decode %-5d %-11s %10.0f %10.0f %10.0f %9.2f %9.2f %9.2f %9.2f %10.1f", B, lbl, toks/wall.Seconds(), toks/(gpuMs/1e3), toks/roofS,
			roofS*1e3/gpuMs, wall.Seconds()*1e3/newTok, gpuMs/newTok, roofS*1e3/newTok, prefill.Seconds())
	}
	if inRange {
		if err := gb.ctx.ProfilerStop(); err != nil {
			t.Fatal(err)
		}
	}
	if err := benchPartition(gb, 0); err != nil {
		t.Fatal(err)
	}
	gb.g.off, gb.force.decSplit, gb.force.ropeHeads, gb.force.decOpts = false, 0, false, 0
	gb.force.noSkinny, gb.force.skLate, gb.force.decVar, gb.force.bws = false, false, 0, 0
	gb.force.wgFull, gb.force.loraKChunk = false, 0
	gb.force.holds, gb.force.pdlJoins, gb.force.ropeLoRA, gb.force.nodePrio = [4]int{}, 0, 0, 0
	gb.force.siluCl, gb.force.memHoist, gb.force.l2Win = 0, 0, 0
	if err := gb.applyL2Window(); err != nil {
		t.Fatal(err)
	}
	if gb.f8 != nil {
		decodeVariant{}.fp8(gb.f8).apply(gb.f8) // the default row's FP8 settings, every knob
	}
	if res, took := gb.TuneStats(); len(res) > 0 {
		changed := 0
		for _, r := range res {
			if r.Kept != 0 {
				changed++
			}
			if len(r.Configs) > 0 && len(r.Us) > 0 { // FP8: configurations of one algorithm (the first: the heuristic's)
				bench("decode tune T=%d N=%d K=%d sms=%d: %d configurations, first %s %.1f us, kept %s %.1f us", r.T, r.N, r.K, r.SMs, len(r.Us), r.Configs[0], r.Us[0], r.Configs[r.Kept], r.Us[r.Kept])
				continue
			}
			if len(r.Us) > 0 {
				bench("decode tune T=%d N=%d K=%d sms=%d: %d algorithms and configurations, first %.1f us, kept #%d %.1f us", r.T, r.N, r.K, r.SMs, len(r.Us), r.Us[0], r.Kept, r.Us[r.Kept])
			}
		}
		for _, s := range gb.SplitTunes() {
			bench("decode tune split T=%d N=%d K=%d sms=%d: %d-way split %.1f us, whole %.1f us, whole kept %v", s.T, s.N, s.K, s.SMs, s.S, s.SplitUs, s.WholeUs, s.Whole)
		}
		for _, r := range gb.RouteTunes() {
			bench("decode tune route T=%d N=%d K=%d sms=%d: route %.1f us, cuBLASLt tuned %.1f us, cuBLASLt kept %v", r.T, r.N, r.K, r.SMs, r.RouteUs, r.LtUs, r.Lt)
		}
		bench("decode tune: %d products tuned in %v, %d changed", len(res), took.Round(time.Millisecond), changed)
	}
	rec, rep := gb.GraphStats()
	bench("decode graphs: %d recorded, %d steps replayed; %d edges made programmatic (pdljoin.go), %d cuBLASLt memsets hoisted (memsethoist.go)", rec, rep, gb.g.joins.retyped, gb.g.hoisted)
	if rec != recorded {
		t.Errorf("%d decode graphs recorded after Warmup's %d: a decode step needed a new recording", rec, recorded)
	}
	if len(ads) > 0 && onlyRows == 0 {
		adapterLoadBench(t, e, c, ads, rng)
	}
}

// attnTimestamps prints the phases of the last step's last attn_decode
// launch from a PEFTD_ATTN_TS build (llama.cu: per block, ATS_W = 4
// %globaltimer words a warp, entry / after griddepcontrol.wait / first tile
// landed / last tile done, then ATS_B = 8: warps merged / end / warp 0's
// tiles / warp 0 at griddepcontrol.wait (after the step's metadata and the
// early tiles' copies) / the merge's first barrier passed / its second /
// warp 0's metadata chain done (its first pages loaded) / the SM it ran on),
// in µs from the earliest block's entry: median, p90 and max over the
// blocks (a block's warp phases: warp 0's entry and wait, the warps' median
// first tile, their latest last tile). A second line says where the late
// blocks were (attnStragglers).
func attnTimestamps(t *testing.T, gb *Backend, B int, lbl string) {
	const atsW, atsB = 4, 8 // llama.cu's ATS_W and ATS_B
	split, warps := gb.decSplitFor(B), gb.decVariantFor(B).warps()
	blocks, words := B*gb.kv.KVHeads*split, atsW*warps+atsB
	if gb.part == nil || blocks*words*8 > gb.part.Size() {
		bench("decode attnts %d %s: no room for %d blocks' timestamps", B, lbl, blocks)
		return
	}
	if err := gb.s.Synchronize(); err != nil {
		t.Fatal(err)
	}
	h := make([]uint64, blocks*words)
	if err := cuda.CopyDtoH(gb.s, h, gb.part.Ptr()); err != nil {
		t.Fatal(err)
	}
	t0 := uint64(math.MaxUint64)
	for i := range blocks {
		t0 = min(t0, h[i*words])
	}
	us := func(v uint64) float32 { return float32(int64(v-t0)) / 1e3 }
	names := []string{"entry", "meta", "pre", "wait", "first", "last", "bar1", "bar2", "merged", "end"}
	cols := make([][]float32, len(names))
	tiles := make([]float32, blocks)
	for i := range blocks {
		r := h[i*words : (i+1)*words]
		var firsts []float32
		last := float32(0)
		for w := range warps {
			if r[atsW*w+2] != 0 {
				firsts = append(firsts, us(r[atsW*w+2]))
			}
			last = max(last, us(r[atsW*w+3]))
		}
		if len(firsts) == 0 {
			firsts = []float32{us(r[1])}
		}
		for j, v := range []float32{us(r[0]), us(r[atsW*warps+6]), us(r[atsW*warps+3]), us(r[1]), float32(median(firsts)), last, us(r[atsW*warps+4]), us(r[atsW*warps+5]), us(r[atsW*warps]), us(r[atsW*warps+1])} {
			cols[j] = append(cols[j], v)
		}
		tiles[i] = float32(r[atsW*warps+2])
	}
	line := fmt.Sprintf("decode attnts %d %-10s grid %dx%dx%d warps %d, warp 0 tiles median %.0f:", B, lbl, B, gb.kv.KVHeads, split, warps, median(tiles))
	for j, n := range names {
		c := slices.Clone(cols[j])
		slices.Sort(c)
		line += fmt.Sprintf("  %s %.2f/%.2f/%.2f", n, median(c), c[len(c)*9/10], c[len(c)-1])
	}
	bench("%s", line)
	sms := make([]int, blocks)
	for i := range blocks {
		sms[i] = int(h[i*words+atsW*warps+7])
	}
	bench("decode attnts %d %-10s late: %s", B, lbl, attnStragglers(cols[0], cols[4], cols[5], sms, B, gb.kv.KVHeads))
	bench("decode attnts %d %-10s waves: %s", B, lbl, attnWaves(cols[0], cols[4], cols[5], cols[9], sms))
}

// attnWaves says what a block that takes an SM's place after another ends
// (a second wave) costs: per SM the blocks in entry order; a block entering
// after one of the SM's earlier blocks ended replaces the earliest-ending
// of those not yet replaced. Medians over the replacements (µs): the
// replaced block's tail (its last tile to its end: the warp merge and the
// writes), its end to the new block's entry (the launch), to the new
// block's first tile landed (the slot's DRAM gap), and the new block's last
// tile to its end; then the first wave's median end, the second's median
// entry and the kernel's last end.
func attnWaves(entry, first, last, end []float32, sms []int) string {
	bySM := map[int][]int{}
	for i, s := range sms {
		bySM[s] = append(bySM[s], i)
	}
	var tail, launch, gap, tail2, end1, entry2 []float32
	for _, bl := range bySM {
		slices.SortFunc(bl, func(a, c int) int { return cmp.Compare(entry[a], entry[c]) })
		used := map[int]bool{}
		for j, b := range bl {
			pred := -1
			for _, a := range bl[:j] {
				if !used[a] && end[a] <= entry[b] && (pred < 0 || end[a] < end[pred]) {
					pred = a
				}
			}
			if pred < 0 {
				end1 = append(end1, end[b])
				continue
			}
			used[pred] = true
			tail = append(tail, end[pred]-last[pred])
			launch = append(launch, entry[b]-end[pred])
			gap = append(gap, first[b]-end[pred])
			tail2 = append(tail2, end[b]-last[b])
			entry2 = append(entry2, entry[b])
		}
	}
	if len(gap) == 0 {
		return fmt.Sprintf("one wave (%d blocks), median end %.2f", len(end1), median(end1))
	}
	return fmt.Sprintf("%d replacements: tail %.2f, launch %.2f, first tile %.2f after the end, new tail %.2f; first wave's end %.2f, second's entry %.2f, last end %.2f",
		len(gap), median(tail), median(launch), median(gap), median(tail2), median(end1), median(entry2), slices.Max(end))
}

// attnStragglers says where attn_decode's late blocks ran: the median last
// tile (µs) of the blocks on SMs holding k of them, of each KV head's
// blocks, and the eight latest blocks (decode entry, KV head, SM, blocks
// on that SM; entry, first and last tile). Blocks are numbered as the grid
// (entry fastest, then KV head, then split).
func attnStragglers(entry, first, last []float32, sms []int, B, kvh int) string {
	perSM := map[int]int{}
	for _, s := range sms {
		perSM[s]++
	}
	byLoad, byHead := map[int][]float32{}, make([][]float32, kvh)
	for i, l := range last {
		byLoad[perSM[sms[i]]] = append(byLoad[perSM[sms[i]]], l)
		byHead[i/B%kvh] = append(byHead[i/B%kvh], l)
	}
	var b strings.Builder
	b.WriteString("last by blocks an SM")
	for _, k := range slices.Sorted(maps.Keys(byLoad)) {
		fmt.Fprintf(&b, " %d:%.2f(%d)", k, median(byLoad[k]), len(byLoad[k]))
	}
	b.WriteString("; by KV head")
	for h, v := range byHead {
		if len(v) > 0 {
			fmt.Fprintf(&b, " %d:%.2f", h, median(v))
		}
	}
	idx := make([]int, len(last))
	for i := range idx {
		idx[i] = i
	}
	slices.SortFunc(idx, func(a, c int) int { return cmp.Compare(last[c], last[a]) })
	b.WriteString("; latest")
	for _, i := range idx[:min(8, len(idx))] {
		fmt.Fprintf(&b, " [e%d h%d sm%d x%d %.2f %.2f %.2f]", i%B, i/B%kvh, sms[i], perSM[sms[i]], entry[i], first[i], last[i])
	}
	return b.String()
}

// adapterLoadSteps bounds adapterLoadBench's decode steps (and so the
// tokens its sequences grow by past their 512-token prompts).
const adapterLoadSteps = 192

// adapterLoadBench measures the step-time hiccup of loading a rank-64
// adapter at 8B shapes into a free slot while 64 sequences decode with the
// other adapters, synchronously (LoadAdapter on the engine goroutine) and
// asynchronously (PrepareAdapter on another goroutine, LoadPrepared between
// steps), and checks that the first step using the slot gives the same
// logits either way and that a step on another slot is unchanged while the
// upload is in flight.
func adapterLoadBench(t *testing.T, e *engine.Engine, c *llama.Config, ads []*lora.Adapter, rng *rand.Rand) {
	ctx := context.Background()
	big := randomAdapter(rng, c, 64, 2)
	for _, l := range big.Layers { // randomAdapter leaves Params unset
		for _, p := range l {
			if p != nil {
				big.Params += int64(len(p.A) + len(p.B))
			}
		}
	}
	slot := len(ads)
	h2dBench(t, e.Backend().(*Backend), big)
	const B, prompt = 64, 512
	seqs := make([]*engine.Sequence, B)
	prefillRandom(t, e, rng, c.VocabSize, seqs, prompt, func(j int) int { return j % len(ads) }) // 8 prompts a step
	// a serving step: greedy tokens sampled on the device (Step would copy
	// 64 x 128256 logits to the host, ~33 MB a step, and time that). The
	// two async phases step for 150 ms each: at most adapterLoadSteps steps
	// in all fit the cache TestDecodeBench sized (64 rows at ~5.5 ms a step
	// take ~85).
	steps := 0
	decode := func() time.Duration {
		if steps++; steps > adapterLoadSteps {
			t.Fatalf("adapterload: more than %d steps (the cache holds no more)", adapterLoadSteps)
		}
		in := make([]engine.Input, B)
		sp := make([]engine.Sampling, B)
		for i := range in {
			in[i] = engine.Input{Seq: seqs[i], Tokens: []int32{int32(rng.IntN(c.VocabSize))}, Slot: i % len(ads)}
			sp[i] = engine.Sampling{Index: uint64(seqs[i].Len())}
		}
		t0 := time.Now()
		if _, err := e.StepSample(ctx, in, sp); err != nil {
			t.Fatal(err)
		}
		return time.Since(t0)
	}
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1e3 }
	var base []float32
	for range 20 {
		base = append(base, float32(ms(decode())))
	}
	med := median(base)
	// synchronous: the engine goroutine converts and uploads between two steps
	t0 := time.Now()
	if err := e.LoadAdapter(slot, big); err != nil {
		t.Fatal(err)
	}
	syncLoad := time.Since(t0)
	syncNext := decode()
	if err := e.UnloadAdapter(slot); err != nil {
		t.Fatal(err)
	}
	bench("adapterload 8B shapes, rank-64 adapter (%.0f MB bf16), batch %d decoding on %d other adapters; step median %.2f ms (greedy tokens sampled on the device)", float64(big.Params*2)/1e6, B, len(ads), med)
	bench("adapterload sync:  LoadAdapter %.1f ms on the engine goroutine + next step %.2f ms => hiccup %.1f ms", ms(syncLoad), ms(syncNext), ms(syncLoad)+ms(syncNext)-med)
	// asynchronous: prepare on another goroutine while steps run, commit,
	// and step on for 150 ms (the upload goes on after the prepare returns:
	// ~8 ms by DMA from a kept image, ~40-55 ms through the ring)
	gb := e.Backend().(*Backend)
	asyncLoad := func() {
		for range 3 {
			decode()
		}
		before := gb.PinnedStats()
		type res struct {
			p   *engine.Prepared
			err error
		}
		ch := make(chan res, 1)
		tp := time.Now()
		go func() {
			p, err := e.PrepareAdapter(big)
			ch <- res{p, err}
		}()
		var during []float32
		var x res
	wait:
		for {
			select {
			case x = <-ch:
				break wait
			default:
				during = append(during, float32(ms(decode())))
			}
		}
		prep := time.Since(tp)
		if x.err != nil {
			t.Fatal(x.err)
		}
		t0 := time.Now()
		if err := e.LoadPrepared(slot, x.p); err != nil {
			t.Fatal(err)
		}
		commit := time.Since(t0)
		for time.Since(tp) < 150*time.Millisecond {
			during = append(during, float32(ms(decode())))
		}
		maxDuring := float32(0)
		for _, d := range during {
			maxDuring = max(maxDuring, d)
		}
		path, after := "through the ring", gb.PinnedStats()
		switch {
		case after.Hits > before.Hits:
			path = "from a kept image"
		case after.Fills > before.Fills:
			path = "filling kept blocks"
		}
		bench("adapterload async (%s): prepare %.1f ms off the engine goroutine, LoadPrepared %.2f ms; %d steps in the 150 ms from the prepare on: median %.2f, max %.2f ms (%.2fx the median step)",
			path, ms(prep), ms(commit), len(during), median(during), maxDuring, float64(maxDuring)/med)
	}
	asyncLoad() // big is kept (h2dBench uploaded it)
	if err := e.UnloadAdapter(slot); err != nil {
		t.Fatal(err)
	}
	pins := gb.pins
	gb.pins = nil
	asyncLoad()
	gb.pins = pins
	for _, s := range seqs {
		e.Release(s)
	}
	// correctness: the first step on the new slot, right after LoadPrepared, against a synchronous load
	toks := make([]int32, 16)
	for k := range toks {
		toks[k] = int32(rng.IntN(c.VocabSize))
	}
	one := func(sl int) []float32 {
		s := &engine.Sequence{}
		out, err := e.Step(ctx, []engine.Input{{Seq: s, Tokens: toks, Slot: sl}})
		if err != nil {
			t.Fatal(err)
		}
		e.Release(s)
		return out[0]
	}
	// (same slot contents in both runs, so the LoRA kernels' split choices match)
	if err := e.UnloadAdapter(slot); err != nil {
		t.Fatal(err)
	}
	if err := e.LoadAdapter(slot, big); err != nil {
		t.Fatal(err)
	}
	other0 := one(0)
	gotS := one(slot)
	if err := e.UnloadAdapter(slot); err != nil {
		t.Fatal(err)
	}
	p, err := e.PrepareAdapter(big)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.LoadPrepared(slot, p); err != nil {
		t.Fatal(err)
	}
	other1 := one(0) // while the upload may be in flight
	gated0 := e.Backend().(*Backend).gatedSteps
	gotA := one(slot)
	gated := e.Backend().(*Backend).gatedSteps - gated0
	dOther, dNew := fx.RelErr(other1, other0), fx.RelErr(gotA, gotS)
	bench("adapterload check: other slot during the upload rel %.3g; first step on the new slot (gated: %d), async vs sync load rel %.3g", dOther, gated, dNew)
	if dOther != 0 || dNew != 0 {
		t.Errorf("async adapter load changed results: other slot %.3g, new slot %.3g", dOther, dNew)
	}
	if err := e.UnloadAdapter(slot); err != nil {
		t.Fatal(err)
	}
}

// openRandom8B opens the checkpoint tools/make_random_llama.py wrote in dir
// (base/) and its adapters (adapters/*); the model closes with the test.
func openRandom8B(t *testing.T, dir string) (*llama.Model, []*lora.Adapter) {
	t.Helper()
	m, err := llama.Open(filepath.Join(dir, "base"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	var ads []*lora.Adapter
	entries, _ := os.ReadDir(filepath.Join(dir, "adapters"))
	for _, e := range entries {
		a, err := lora.Load(filepath.Join(dir, "adapters", e.Name()), m.Config)
		if err != nil {
			t.Fatal(err)
		}
		ads = append(ads, a)
	}
	return m, ads
}

// distinctAdapters is n adapters from the checkpoint's ads, one a slot:
// ads, then copies of them under new names (PEFTD_DECODE_ADAPTERS=16 or
// 64: issue 9's "16 and 64 distinct adapters in one batch"). Each copy is
// its own slot image on the device, so a step reads every slot its rows
// use, as it would with n trained adapters of those shapes; the host
// weights are shared.
func distinctAdapters(ads []*lora.Adapter, n int) []*lora.Adapter {
	if len(ads) == 0 || n <= len(ads) {
		return ads[:min(n, len(ads))]
	}
	out := slices.Clone(ads)
	for i := len(ads); i < n; i++ {
		c := *ads[i%len(ads)]
		c.Name = fmt.Sprintf("%s-copy%d", c.Name, i)
		out = append(out, &c)
	}
	return out
}

// envBatches is the comma-separated batch sizes in environment variable
// name, or def when it is not set.
func envBatches(t *testing.T, name string, def []int) []int {
	t.Helper()
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n <= 0 {
			t.Fatalf("%s=%q: want batch sizes like 1,16,64", name, s)
		}
		out = append(out, n)
	}
	return out
}

// benchShape is a product's weight shape in the product benchmarks.
type benchShape struct {
	name string
	N, K int
}

// shapes8B are the 8B projections' weight shapes (fused q/k/v and gate/up).
var shapes8B = []benchShape{{"qkv", 6144, 4096}, {"o", 4096, 4096}, {"gate_up", 28672, 4096}, {"down", 4096, 14336}}

// envShapes is the shapes in the environment variable name, def when it
// is unset: NAME:NxK entries, e.g. g8k:28672x8192,gpad:28672x4224 (FP8
// gate/up's grid in 8 KB weight rows, and in rows padded to 4,224 bytes).
func envShapes(t *testing.T, name string, def []benchShape) []benchShape {
	t.Helper()
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	var out []benchShape
	for _, f := range strings.Split(s, ",") {
		var sh benchShape
		nm, dims, ok := strings.Cut(strings.TrimSpace(f), ":")
		ns, ks, ok2 := strings.Cut(dims, "x")
		var e1, e2 error
		sh.name = nm
		sh.N, e1 = strconv.Atoi(ns)
		sh.K, e2 = strconv.Atoi(ks)
		if !ok || !ok2 || nm == "" || e1 != nil || e2 != nil || sh.N <= 0 || sh.K <= 0 {
			t.Fatalf("%s=%q: want shapes like qkv:6144x4096,down:4096x14336", name, s)
		}
		out = append(out, sh)
	}
	return out
}

// envInt is the integer in environment variable name (0 when unset),
// announced as a bench line "what N" when set.
func envInt(t *testing.T, name, what string) int {
	t.Helper()
	v := os.Getenv(name)
	if v == "" {
		return 0
	}
	n, err := strconv.Atoi(v)
	if err != nil {
		t.Fatalf("%s=%q: %v", name, v, err)
	}
	bench("%s %d", what, n)
	return n
}

// envPositive is the positive integer in the environment variable name,
// def when it is unset.
func envPositive(t *testing.T, name string, def int) int {
	t.Helper()
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 1 {
		t.Fatalf("%s=%q: want a positive integer", name, v)
	}
	return n
}

// loadAdapters puts ads in slots 0, 1, ...
func loadAdapters(t *testing.T, e *engine.Engine, ads []*lora.Adapter) {
	t.Helper()
	for i, a := range ads {
		if err := e.LoadAdapter(i, a); err != nil {
			t.Fatal(err)
		}
	}
}

// TestDecodeProfile runs one decode step without adapters and one with the
// four adapters at each batch size of PEFTD_PROFILE_BATCHES (default 1,64)
// inside a profiler range (cuProfilerStart/Stop), for
// ncu --profile-from-start off: scripts/gpu-check.sh's profile phase turns
// the kernels' durations into a table per step. Needs PEFTD_MODEL_8B and
// PEFTD_PROFILE=1.
func TestDecodeProfile(t *testing.T) {
	dir := os.Getenv("PEFTD_MODEL_8B")
	if dir == "" || os.Getenv("PEFTD_PROFILE") == "" {
		t.Skip("PEFTD_MODEL_8B and PEFTD_PROFILE=1 are not both set")
	}
	m, ads := openRandom8B(t, dir)
	c := m.Config
	batches := envBatches(t, "PEFTD_PROFILE_BATCHES", []int{1, 64})
	// PEFTD_DECODE_PROMPT and PEFTD_KV as in TestDecodeBench: the prefill
	// runs outside the profiler's range, so long contexts cost no profiling
	prompt := envPositive(t, "PEFTD_DECODE_PROMPT", 512)
	maxB := slices.Max(batches)
	// each sequence: the prompt and the four profiled tokens, in whole pages
	opts := engine.Options{MaxTokens: max(prefillChunk(prompt)*prompt, 8*512), BlockSize: 16, KVBlocks: maxB*((prompt+8+15)/16) + 64, AdapterSlots: len(ads) + 1}
	e := newEngineWith(t, m, opts, Options{WeightFormat: os.Getenv("PEFTD_WEIGHTS"), KVFormat: os.Getenv("PEFTD_KV"), Eager: os.Getenv("PEFTD_EAGER") != ""})
	gb := e.Backend().(*Backend)
	loadAdapters(t, e, ads)
	if err := e.Warmup(); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(5, 6))
	for _, B := range batches {
		seqs := make([]*engine.Sequence, B)
		prefillRandom(t, e, rng, c.VocabSize, seqs, prompt, func(int) int { return -1 })
		step := func(withLoRA bool) {
			in := make([]engine.Input, B)
			for i := range in {
				slot := -1
				if withLoRA && len(ads) > 0 {
					slot = i % len(ads)
				}
				in[i] = engine.Input{Seq: seqs[i], Tokens: []int32{int32(rng.IntN(c.VocabSize))}, Slot: slot}
			}
			if _, err := e.Step(ctx, in); err != nil {
				t.Fatal(err)
			}
		}
		step(false) // outside the range: any first-use work
		step(true)
		if err := gb.ctx.ProfilerStart(); err != nil {
			t.Fatal(err)
		}
		step(false)
		step(true)
		if err := gb.ctx.ProfilerStop(); err != nil {
			t.Fatal(err)
		}
		bench("profile batch %d: steps base, %d adapters", B, len(ads))
		for _, s := range seqs {
			e.Release(s)
		}
	}
}

// prefillChunk is how many prompts of prompt tokens a prefill step of the
// decode benchmarks takes: 4,096 rows at most, at least one prompt.
func prefillChunk(prompt int) int { return max(1, 4096/prompt) }

// prefillRandom starts seqs[i] (each a new sequence) with a prompt of
// prompt random token ids below vocab under adapter slot(i) (-1: none),
// prefillChunk(prompt) prompts a step.
func prefillRandom(t *testing.T, e *engine.Engine, rng *rand.Rand, vocab int, seqs []*engine.Sequence, prompt int, slot func(int) int) {
	t.Helper()
	chunk := prefillChunk(prompt)
	for i := 0; i < len(seqs); i += chunk {
		var in []engine.Input
		for j := i; j < min(len(seqs), i+chunk); j++ {
			seqs[j] = &engine.Sequence{}
			toks := make([]int32, prompt)
			for k := range toks {
				toks[k] = int32(rng.IntN(vocab))
			}
			in = append(in, engine.Input{Seq: seqs[j], Tokens: toks, Slot: slot(j)})
		}
		if _, err := e.Step(context.Background(), in); err != nil {
			t.Fatal(err)
		}
	}
}

// h2dBench prints where an adapter upload's time goes: one copy of the
// image's bytes from pinned and from pageable host memory (the link's
// bandwidth), the host fill of the image alone (as the uploader's ring does
// it, 16 MiB at a time), and PrepareAdapter through the ring until the last
// byte lands. Medians of 5.
func h2dBench(t *testing.T, b *Backend, a *lora.Adapter) {
	b.StartPinning()
	<-b.PinnedDone()
	img, err := b.slotLayout(a)
	if err != nil {
		t.Fatal(err)
	}
	n := 2 * img.total
	dev, err := b.ctx.Alloc(n)
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Free()
	pinned, err := b.ctx.AllocHost(n)
	if err != nil {
		t.Fatal(err)
	}
	defer pinned.Free()
	pageable := make([]byte, n)
	for i := range pageable {
		pageable[i] = byte(i)
	}
	copy(pinned.Bytes(), pageable)
	timed := func(f func()) float64 {
		var v []float32
		for range 5 {
			t0 := time.Now()
			f()
			v = append(v, float32(time.Since(t0).Seconds()*1e3))
		}
		return median(v)
	}
	sync := func() {
		if err := b.s.Synchronize(); err != nil {
			t.Fatal(err)
		}
	}
	pin := timed(func() {
		if err := cuda.CopyHtoD(b.s, dev.Ptr(), pinned.Bytes()); err != nil {
			t.Fatal(err)
		}
		sync()
	})
	page := timed(func() {
		if err := cuda.CopyHtoD(b.s, dev.Ptr(), pageable); err != nil {
			t.Fatal(err)
		}
		sync()
	})
	chunk := make([]uint16, stageChunkBytes/2)
	fill := timed(func() {
		for off := 0; off < img.total; off += len(chunk) {
			img.fill(chunk[:min(len(chunk), img.total-off)], off, a)
		}
	})
	// PrepareAdapter until the last byte has landed
	upload := func(a *lora.Adapter) {
		p, err := b.PrepareAdapter(a)
		if err != nil {
			t.Fatal(err)
		}
		if err := p.(*preparedAdapter).tr.Wait(); err != nil {
			t.Fatal(err)
		}
		p.Release()
	}
	pins := b.pins
	b.pins = nil // through the ring
	ring := timed(func() { upload(a) })
	b.pins = pins
	kept, hit := math.NaN(), math.NaN()
	if pins != nil {
		fills := pins.snapshot().Fills
		kept = timed(func() { // a new adapter each time: filled into kept blocks
			c := *a
			upload(&c)
		})
		upload(a)
		waitFills(t, b, fills+6)
		hit = timed(func() { upload(a) }) // from its kept image: DMA alone
	}
	gbs := func(ms float64) float64 { return float64(n) / ms / 1e6 }
	bench("adapterload h2d (%.0f MB image): one copy from pinned %.2f ms (%.1f GB/s), from pageable %.2f ms (%.1f GB/s); host fill alone %.2f ms (%.1f GB/s); PrepareAdapter to the last byte: through the ring %.2f ms (%.1f GB/s), filling kept blocks %.2f ms (%.1f GB/s), from a kept image %.2f ms (%.1f GB/s); image cache %+v",
		float64(n)/1e6, pin, gbs(pin), page, gbs(page), fill, gbs(fill), ring, gbs(ring), kept, gbs(kept), hit, gbs(hit), b.PinnedStats())
}

// graphLoRALayout begins step m of T rows on b in the layout a recorded
// mixed step of T rows with every LoRA module runs (the rows padded to
// their bucket, the bucket's tile capacity, the rank class); a decode
// step's LoRA launches are the same.
func graphLoRALayout(t *testing.T, b *Backend, m *engine.StepMeta, T int) {
	t.Helper()
	n := graphBuckets[bucketIndex(T)]
	key, err := b.graphKeyFor(n, engine.Shape{LoRA: uint8(1<<llama.NumModules - 1)}, true, len(m.LogitRows))
	if err == nil {
		err = b.fillGraphMeta(m, key)
	}
	if err != nil {
		t.Fatal(err)
	}
}

// TestLoRABesideBench (PEFTD_LORA_BESIDE=1; rows PEFTD_LORA_BESIDE_ROWS,
// default 16,64,256): each LoRA group of an 8B layer (four rank-32
// adapters, rows round-robin, the recorded steps' layout) beside its product
// as a step runs them: the fork before the product, the SM hold, the
// update on the LoRA stream. Device µs from the fork to the product's end
// and to the update's end, and each alone (the product on the whole card,
// the update with the card to itself), medians of replays after an L2
// flush. over: how long the op reading the product waits for the update.
// The kernels are those of a recorded step, launched eagerly.
func TestLoRABesideBench(t *testing.T) {
	if os.Getenv("PEFTD_LORA_BESIDE") == "" {
		t.Skip("set PEFTD_LORA_BESIDE=1 to run")
	}
	rowsList := envBatches(t, "PEFTD_LORA_BESIDE_ROWS", []int{16, 64, 256})
	maxT := slices.Max(rowsList)
	cfg := cfg8B(1)
	// the products in bf16, or FP8 with PEFTD_WEIGHTS=fp8
	r := newRigWith(t, cfg, maxT, engine.KVSpec{Layers: 1, Blocks: max(16, maxT/16), BlockSize: 16, KVHeads: 8, HeadDim: 128}, Options{WeightFormat: os.Getenv("PEFTD_WEIGHTS")})
	b := r.b
	if !b.la.on || b.la.delta == nil {
		t.Skip("no LoRA stream on this backend")
	}
	b.force.loraKChunk = envPositive(t, "PEFTD_LORA_BESIDE_KCHUNK", 0) // the shrinks' K split (kernelForce.loraKChunk)
	rng := rand.New(rand.NewPCG(3, 4))
	const nAd = 4
	for s := range nAd {
		if err := b.LoadAdapter(s, randomAdapter(rng, cfg, 32, 2)); err != nil {
			t.Fatal(err)
		}
	}
	type group struct {
		name string
		mods []llama.Module
		w    engine.Weight
		x    *Buffer
		out  *Buffer
	}
	var groups []group
	for _, g := range []struct {
		name string
		mods []llama.Module
	}{{"qkv", []llama.Module{llama.Q, llama.K, llama.V}}, {"o", []llama.Module{llama.O}}, {"gate_up", []llama.Module{llama.Gate, llama.Up}}, {"down", []llama.Module{llama.Down}}} {
		in, n := cfg.Dims(g.mods[0])
		n = 0
		for _, m := range g.mods {
			_, o := cfg.Dims(m)
			n += o
		}
		x, out := r.buffer(maxT, in), r.buffer(maxT, n)
		r.fill(x, r.rnd(maxT*in, 1))
		if b.f8 != nil { // e4m3 0.0156, scale 0.5: the values do not change the time
			w, err := b.f8.newWeight(n, in, func(w *fp8Weight) error {
				if err := b.s.Memset32(w.q.Ptr(), 0x20202020, n*in/4); err != nil {
					return err
				}
				return b.s.Memset32(w.scale.Ptr(), math.Float32bits(0.5), n)
			})
			if err != nil {
				t.Fatal(err)
			}
			groups = append(groups, group{g.name, g.mods, w, x, out})
			continue
		}
		mem, err := b.ctx.Alloc(2 * n * in)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { mem.Free() })
		if err := b.s.Memset32(mem.Ptr(), 0x3c003c00, n*in/2); err != nil { // bf16 0.0078: the values do not change the time
			t.Fatal(err)
		}
		groups = append(groups, group{g.name, g.mods, &weight{mem: mem, rows: n, cols: in}, x, out})
	}
	flush := l2Flusher(t, b)
	var err error
	const reps = 20
	var evs [3]*cuda.Event // fork, product's end, update's end
	for i := range evs {
		if evs[i], err = b.ctx.NewEvent(true); err != nil {
			t.Fatal(err)
		}
		defer evs[i].Destroy()
	}
	bench("lorabeside device %s; products in %s; 4 x r32 adapters, rows round-robin; µs from the fork, medians of %d; shrinks' K split in pieces of %d columns (0: the default)", b.Device().Name, map[bool]string{false: "bf16", true: "FP8"}[b.f8 != nil], reps, b.force.loraKChunk)
	bench("lorabeside %-5s %-8s %5s %10s %10s %10s %10s %8s", "rows", "group", "held", "prod_us", "lora_us", "prod_beside", "lora_beside", "over_us")
	// PEFTD_LORA_BESIDE_SMS=16,24,32: the table again with that many SMs held
	// from every product (Options.LoRASMs; q/k/v too): the held column
	// says what each product left
	smsList := envBatches(t, "PEFTD_LORA_BESIDE_SMS", []int{-1})
	for _, sms := range smsList {
		b.la.sms = sms
		for _, T := range rowsList {
			if b.g.off || !b.preOK || T > b.g.maxRows {
				t.Fatalf("%d rows: no graph layout for them (graphs off or over %d rows)", T, b.g.maxRows)
			}
			segs := make([]engine.Segment, 0, nAd)
			per := make([]int, nAd)
			for i := range T {
				per[i%nAd]++
			}
			at := 0
			for s, n := range per {
				if n > 0 {
					segs = append(segs, engine.Segment{Start: at, End: at + n, Slot: s})
					at += n
				}
			}
			m := oneSeq(T, 16, zeros(T))
			m.LoRA = segs
			graphLoRALayout(t, b, m, T)
			for _, g := range groups {
				// run: the product (prod), the update (lora) or both as a step
				// runs them; returns the median µs from the fork to the
				// product's end and to the update's end
				run := func(prod, lora bool) (float64, float64) {
					var tp, tl []float32
					for range reps {
						// six flushes (~0.4 ms of device time): the host enqueues
						// everything after them before the device gets there, so
						// the events time the device, not the launches
						for range 6 {
							flush()
						}
						evs[0].Record(b.s)
						switch {
						case prod && lora:
							b.Linear(g.out, g.x, g.w) // records the fork, holds the SMs
						case prod: // as a step without adapters: no fork, no SMs held
							b.la.on = false
							b.Linear(g.out, g.x, g.w)
							b.la.on = true
						default:
							b.forkAt(g.x)
						}
						evs[1].Record(b.s)
						if lora {
							b.LoRA(g.out, g.x, 0, g.mods)
							if b.la.pend.delta == 0 {
								t.Fatalf("%s at %d rows: the update did not go to the LoRA stream", g.name, T)
							}
							b.la.pend = pendingDelta{}
							evs[2].Record(b.la.s)
							b.fail(b.s.Wait(b.la.join))
						}
						if b.err != nil {
							t.Fatal(b.err)
						}
						if err := b.s.Synchronize(); err != nil {
							t.Fatal(err)
						}
						d1, err := evs[1].Since(evs[0])
						if err != nil {
							t.Fatal(err)
						}
						tp = append(tp, d1)
						if lora {
							d2, err := evs[2].Since(evs[0])
							if err != nil {
								t.Fatal(err)
							}
							tl = append(tl, d2)
						}
					}
					pu, lu := median(tp)*1e3, math.NaN()
					if lora {
						lu = median(tl) * 1e3
					}
					return pu, lu
				}
				prodAlone, _ := run(true, false)
				_, loraAlone := run(false, true)
				prodBeside, loraBeside := run(true, true)
				bench("lorabeside %-5d %-8s %5d %10.1f %10.1f %10.1f %10.1f %8.1f", T, g.name, b.productSMs(g.w), prodAlone, loraAlone, prodBeside, loraBeside, max(0, loraBeside-prodBeside))
			}
			r.end()
		}
	}
}

// TestDecodeVariantKnobs: what TestDecodeBench compares before a row (its
// kernelForce and FP8 settings against the backend's) is what it then sets,
// so a row records again exactly when its settings differ.
func TestDecodeVariantKnobs(t *testing.T) {
	rows := []decodeVariant{{sms: -1}, {sms: -1, opts: 23}, {lora: true, sms: -1, dv: 2, holds: [4]int{16}},
		{sms: -1, fs: true, nowga: true}, {lora: true, sms: -1, fslate: true, nopad: true, l2: -1}}
	for _, v := range rows {
		var f kernelForce
		f.attnRows, f.loraV2 = true, true // fields no row sets stay as they are
		got := v.force(f)
		if got != v.force(got) || !got.attnRows || !got.loraV2 || got.decOpts != v.opts || got.holds != v.holds {
			t.Errorf("%+v: force %+v", v, got)
		}
		for _, st := range []*fp8State{{wgAutoDefault: true, mm: &cuda.Matmul{}}, {mm: &cuda.Matmul{}}} { // apply sets the Matmul's accumulation
			want := v.fp8(st)
			want.apply(st)
			if fp8KnobsOf(st) != want {
				t.Errorf("%+v: FP8 settings %+v after apply, want %+v", v, fp8KnobsOf(st), want)
			}
			if want.streamOn != v.fs || want.wgAuto != (st.wgAutoDefault && !v.nowga) {
				t.Errorf("%+v: FP8 settings %+v: streamOn or wgAuto not as the row asks", v, want)
			}
		}
	}
}

// expandTimestamps prints how the blocks of the last gate/up expand of the
// last step ran (a PEFTD_EXPAND_TS build: per block its entry, the end of
// its griddepcontrol.wait and its end, %globaltimer ns, and its SM), in
// µs from the first block's entry: the blocks, the SMs they ran on, the
// last entry and end; then in 4 µs windows of entry, how many blocks
// entered, on how many SMs, and their median wait and run (wait end to
// end). A knee in the SMs a window shows where the product beside the
// expand left the card to it.
func expandTimestamps(t *testing.T, gb *Backend, B int, lbl string) {
	if err := gb.s.Synchronize(); err != nil {
		t.Fatal(err)
	}
	h := make([]uint64, xtsBlocks*xtsWords)
	if err := cuda.CopyDtoH(gb.s, h, gb.expandTS.Ptr()); err != nil {
		t.Fatal(err)
	}
	type blk struct {
		entry, wait, run float32
		sm               int
	}
	var bs []blk
	t0 := uint64(math.MaxUint64)
	for i := range xtsBlocks {
		if r := h[i*xtsWords:]; r[0] != 0 {
			t0 = min(t0, r[0])
		}
	}
	var last, lastEnd float32
	sms := map[int]bool{}
	for i := range xtsBlocks {
		r := h[i*xtsWords:]
		if r[0] == 0 || r[2] < r[1] || r[1] < r[0] {
			continue
		}
		b := blk{entry: float32(r[0]-t0) / 1e3, wait: float32(r[1]-r[0]) / 1e3, run: float32(r[2]-r[1]) / 1e3, sm: int(r[3])}
		bs = append(bs, b)
		sms[b.sm] = true
		last, lastEnd = max(last, b.entry), max(lastEnd, b.entry+b.wait+b.run)
	}
	if len(bs) == 0 {
		bench("decode expandts %d %s: no gate/up expand recorded", B, lbl)
		return
	}
	line := fmt.Sprintf("decode expandts %d %-10s %d blocks on %d SMs, last entry %.1f, last end %.1f µs; by entry (µs: blocks, SMs, median wait, median run):", B, lbl, len(bs), len(sms), last, lastEnd)
	const win = 4
	for w0 := float32(0); w0 <= last; w0 += win {
		n, in, waits, runs := 0, map[int]bool{}, []float32{}, []float32{}
		for _, b := range bs {
			if b.entry >= w0 && b.entry < w0+win {
				n++
				in[b.sm] = true
				waits, runs = append(waits, b.wait), append(runs, b.run)
			}
		}
		if n > 0 {
			line += fmt.Sprintf(" [%.0f,%.0f) %d %d %.1f %.1f", w0, w0+win, n, len(in), median(waits), median(runs))
		}
	}
	bench("%s", line)
}
