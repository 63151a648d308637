//go:build cuda

package gpu

import (
	"fmt"
	"math"
	"strings"
	"testing"

	"github.com/peftd/peftd/runtime/cuda"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/lora"
	"github.com/peftd/peftd/runtime/safetensors"
)

// loraRef adds the float64 LoRA update of mods (outputs side by side) to want.
func loraRef(want []float64, xv []float32, in, total int, segs []engine.Segment, ads map[int]*lora.Adapter, layer int, mods []llama.Module, cfg *llama.Config) {
	loraRefAbs(want, nil, xv, in, total, segs, ads, layer, mods, cfg)
}

// loraRefAbs is loraRef that also adds, where abs is not nil, each
// element's sum of the rank terms' magnitudes (sum_k |scale s_k B_jk|): what
// an update's rounding errors scale with where its terms cancel.
func loraRefAbs(want, abs []float64, xv []float32, in, total int, segs []engine.Segment, ads map[int]*lora.Adapter, layer int, mods []llama.Module, cfg *llama.Config) {
	off := 0
	for _, mod := range mods {
		_, outF := cfg.Dims(mod)
		for _, g := range segs {
			p := ads[g.Slot].Layers[layer][mod]
			if p == nil {
				continue
			}
			for row := g.Start; row < g.End; row++ {
				tmp := make([]float64, p.Rank)
				for k := range tmp {
					for c := 0; c < in; c++ {
						tmp[k] += float64(xv[row*in+c]) * float64(fromBF16(safetensors.Float32ToBF16(p.A[k*in+c])))
					}
					tmp[k] *= float64(p.Scale)
				}
				for j := 0; j < outF; j++ {
					var s, a float64
					for k := range tmp {
						v := tmp[k] * float64(fromBF16(safetensors.Float32ToBF16(p.B[j*p.Rank+k])))
						s, a = s+v, a+math.Abs(v)
					}
					want[row*total+off+j] += s
					if abs != nil {
						abs[row*total+off+j] += a
					}
				}
			}
		}
		off += outF
	}
}

// TestOpLoRAFused checks the SGMV kernels (v2 fused, v1 and the v0
// fallback; v2 also for bitwise repeatability) on fused
// q/k/v, gate/up and single projections: heterogeneous ranks (multiples of 8
// and not), segments longer than one 16-row tile, rows without adapter,
// adapters that skip a projection, and K split across blocks; the
// off-by-default variants (loraVariants that apply to one op) bit for bit
// against the default kernels.
func TestOpLoRAFused(t *testing.T) {
	cfg := testConfig(1024, 2816, 8, 2, 128, 32, 2)
	T := 70
	r := newRig(t, cfg, T, engine.KVSpec{Layers: 2, Blocks: 8, BlockSize: 16, KVHeads: 2, HeadDim: 128})
	mk := func(rank int, scale float32, mods ...llama.Module) *lora.Adapter {
		a := &lora.Adapter{Name: "r", Layers: make([][llama.NumModules]*lora.Pair, cfg.Layers)}
		for l := range a.Layers {
			for _, m := range mods {
				in, out := cfg.Dims(m)
				a.Layers[l][m] = &lora.Pair{Rank: rank, Scale: scale, A: r.rnd(rank*in, 0.1), B: r.rnd(out*rank, 0.1)}
			}
		}
		return a
	}
	all := []llama.Module{llama.Q, llama.K, llama.V, llama.O, llama.Gate, llama.Up, llama.Down}
	ads := map[int]*lora.Adapter{0: mk(16, 2, all...), 1: mk(64, 0.5, all...), 2: mk(5, 1.25, llama.Q, llama.V, llama.Up, llama.Down),
		5: mk(24, 1, llama.K, llama.Gate), 6: mk(8, 3, all...)}
	for s, a := range ads {
		if err := r.b.LoadAdapter(s, a); err != nil {
			t.Fatal(err)
		}
	}
	segs := []engine.Segment{{Start: 0, End: 37, Slot: 1}, {Start: 40, End: 41, Slot: 0}, {Start: 41, End: 50, Slot: 2},
		{Start: 50, End: 52, Slot: 5}, {Start: 52, End: 69, Slot: 6}}
	if r.b.sgFused[0] == nil {
		t.Fatalf("SGMV v2 not loaded: %v", r.b.sgErr)
	}
	// v2, v1, v0 with a rank-5 adapter among them; then, its slot holding a
	// rank-40 one (every rank a multiple of 8), the tensor-core expand
	// adding in place (tc) and into the LoRA stream's float32 update that
	// Read adds (tc-aside)
	// tc1, tc1-aside: slots 1 and 2 holding rank-32 adapters (every rank at
	// most 32: sgmv_expand_tc1, the rank-32 adapters' kernel)
	ran := make([]int, len(loraVariants)) // cases that ran each variant
	for _, mode := range []string{"v2", "v1", "v0", "tc", "tc-aside", "tc1", "tc1-aside"} {
		// guHalf, outHalf and qkvHalf off: the aside modes check the float32
		// update buffer (bf16 updates: TestHalfUpdates)
		r.b.force = kernelForce{loraRows: mode == "v0", loraV1: mode == "v1", loraV2: mode == "v2", guHalf: -1, outHalf: -1, qkvHalf: -1}
		switch mode {
		case "tc":
			ads[2] = mk(40, 1.25, llama.Q, llama.V, llama.Up, llama.Down)
			if err := r.b.LoadAdapter(2, ads[2]); err != nil {
				t.Fatal(err)
			}
		case "tc1":
			ads[1], ads[2] = mk(32, 0.5, all...), mk(32, 1.25, llama.Q, llama.V, llama.Up, llama.Down)
			for _, s := range []int{1, 2} {
				if err := r.b.LoadAdapter(s, ads[s]); err != nil {
					t.Fatal(err)
				}
			}
		}
		tc1, aside := strings.HasPrefix(mode, "tc1"), strings.HasSuffix(mode, "aside")
		for _, mods := range [][]llama.Module{{llama.Q, llama.K, llama.V}, {llama.Gate, llama.Up}, {llama.Down}, {llama.O}, {llama.K}} {
			in, _ := cfg.Dims(mods[0])
			total := 0
			for _, m := range mods {
				_, o := cfg.Dims(m)
				total += o
			}
			layer := len(mods) % 2
			xv, ov := r.rnd(T*in, 1), r.rnd(T*total, 1)
			x, out := r.buffer(T, in), r.buffer(T, total)
			r.fill(x, xv)
			r.fill(out, ov)
			m := oneSeq(T, 16, zeros(T))
			m.LoRA = segs
			r.begin(m)
			switch kc := r.b.tcChunks(mods); {
			case (mode == "tc" || mode == "tc-aside") && kc != 2:
				t.Fatalf("%s %v: tensor-core expand chunks %d, want 2 (rank 64)", mode, mods, kc)
			case tc1 && kc != 1:
				t.Fatalf("%s %v: tensor-core expand chunks %d, want 1 (rank 32)", mode, mods, kc)
			}
			if aside {
				r.b.forkAt(x)
				r.b.LoRA(out, x, layer, mods)
				if r.b.la.pend.delta == 0 {
					t.Fatalf("%v: the update is not pending on the LoRA stream", mods)
				}
			} else {
				r.b.loraSlices(r.b.s, out.mem.Ptr(), total, x, layer, mods, accAdd)
			}
			got := r.read(out, T)
			if !aside && mode != "v0" && mode != "v2" {
				// each variant gives the default kernels' bits (where the
				// plan takes it: tc64s the rank-32 class, in place)
				// and written aside as float32 (accum 0: the LoRA stream's
				// update, zeros where a slice has no adapter)
				upd, err := r.b.ctx.Alloc(4 * T * total)
				if err != nil {
					t.Fatal(err)
				}
				aside := func() []float32 {
					h := make([]float32, T*total)
					if err := r.b.s.Memset32(upd.Ptr(), 0x7fc00000, T*total); err != nil { // NaN: unwritten shows
						t.Fatal(err)
					}
					r.b.loraSlices(r.b.s, upd.Ptr(), total, x, layer, mods, accFloat)
					if err := cuda.CopyDtoH(r.b.s, h, upd.Ptr()); err != nil {
						t.Fatal(err)
					}
					if err := r.b.s.Synchronize(); err != nil {
						t.Fatal(err)
					}
					return h
				}
				gotAside := aside()
				for i, v := range loraVariants {
					if !v.op {
						continue
					}
					before, saved := v.runs(r.b), r.b.force
					v.set(&r.b.force)
					r.fill(out, ov)
					r.b.loraSlices(r.b.s, out.mem.Ptr(), total, x, layer, mods, accAdd)
					alt := r.read(out, T)
					mid := v.runs(r.b)
					altAside := aside()
					r.b.force = saved
					if mid > before {
						ran[i]++
						if j := firstDiff(f32bits(alt), f32bits(got)); j >= 0 {
							t.Fatalf("%s %v: %s differs from the default kernels at %d (row %d): %g vs %g", mode, mods, v.name, j, j/total, alt[j], got[j])
						}
					}
					if v.runs(r.b) > mid {
						if j := firstDiff(f32bits(altAside), f32bits(gotAside)); j >= 0 {
							t.Fatalf("%s %v: %s's float32 update differs from the default kernels' at %d (row %d): %g vs %g", mode, mods, v.name, j, j/total, altAside[j], gotAside[j])
						}
					}
				}
				upd.Free()
			}
			if !aside && (mode == "v1" || mode == "tc1") {
				// sgmv_shrink64 gives sgmv_shrink's (and sgmv_shrink4's) bits
				// for the same K split (v1: the expand on CUDA cores, tc1: on
				// tensor cores; 768-column parts: two and four here)
				r.b.force.loraKChunk = 768
				r.fill(out, ov)
				r.b.loraSlices(r.b.s, out.mem.Ptr(), total, x, layer, mods, accAdd)
				small := r.read(out, T)
				r.b.force.shrink64, r.b.force.shrinkPipe = 1, -1
				r.fill(out, ov)
				before := r.b.shrinkBigs
				r.b.loraSlices(r.b.s, out.mem.Ptr(), total, x, layer, mods, accAdd)
				big := r.read(out, T)
				if r.b.shrinkBigs == before {
					t.Fatalf("%s %v: kernelForce shrink64 1, shrinkPipe -1: no sgmv_shrink64 launch", mode, mods)
				}
				for i := range small {
					if math.Float32bits(small[i]) != math.Float32bits(big[i]) {
						t.Fatalf("%s %v: sgmv_shrink64 differs from sgmv_shrink at %d (row %d): %g vs %g", mode, mods, i, i/total, big[i], small[i])
					}
				}
				// sgmv_shrink64p (the loads through a cp.async ring) gives sgmv_shrink64's bits
				if r.b.sbpFits {
					r.b.force.shrinkPipe = 1
					r.fill(out, ov)
					before = r.b.shrinkPipes
					r.b.loraSlices(r.b.s, out.mem.Ptr(), total, x, layer, mods, accAdd)
					pipe := r.read(out, T)
					if r.b.shrinkPipes == before {
						t.Fatalf("%s %v: kernelForce shrinkPipe 1: no sgmv_shrink64p launch", mode, mods)
					}
					if j := firstDiff(f32bits(pipe), f32bits(big)); j >= 0 {
						t.Fatalf("%s %v: sgmv_shrink64p differs from sgmv_shrink64 at %d (row %d): %g vs %g", mode, mods, j, j/total, pipe[j], big[j])
					}
				}
				r.b.force.shrinkPipe, r.b.force.loraKChunk = 0, 0
				r.b.force.shrink64 = 1 // its own K split: checked against the reference below
				r.fill(out, ov)
				r.b.loraSlices(r.b.s, out.mem.Ptr(), total, x, layer, mods, accAdd)
				got = r.read(out, T)
				r.b.force.shrink64 = 0
			}
			if !aside && mode == "tc1" {
				halfUpdateMatches(t, r, x, T, total, layer, mods)
			}
			if mode == "v2" { // deterministic: the same bits again (K-split partials summed in a fixed order)
				r.fill(out, ov)
				r.b.loraSlices(r.b.s, out.mem.Ptr(), total, x, layer, mods, accAdd)
				again := r.read(out, T)
				for i := range got {
					if math.Float32bits(got[i]) != math.Float32bits(again[i]) {
						t.Fatalf("v2 %v: second run differs at %d: %g vs %g", mods, i, got[i], again[i])
					}
				}
			}
			r.end()
			want := make([]float64, T*total)
			for i := range want {
				want[i] = float64(ov[i])
			}
			loraRef(want, xv, in, total, segs, ads, layer, mods, cfg)
			for _, row := range []int{37, 38, 39, 69} { // no adapter: untouched
				for j := 0; j < total; j++ {
					if got[row*total+j] != ov[row*total+j] {
						t.Fatalf("%s %v: row %d (no adapter) changed at %d", mode, mods, row, j)
					}
				}
			}
			// compare the LoRA delta itself, so the base values do not hide its errors
			gd, wd := make([]float32, len(got)), make([]float64, len(want))
			for i := range got {
				gd[i] = got[i] - ov[i]
				wd[i] = want[i] - float64(ov[i])
			}
			r.compare(fmt.Sprintf("lora %s %v delta", mode, mods), gd, wd, 2e-2)
			r.compare(fmt.Sprintf("lora %s %v", mode, mods), got, want, opTol)
		}
	}
	for i, v := range loraVariants {
		if v.op && ran[i] == 0 {
			t.Errorf("no case ran %s", v.name)
		}
	}
}

// halfUpdateMatches: the rank-32 class's update written as bf16 (accHalf:
// sgmv_expand_tch1, and sgmv_expand_tch1s with kernelForce.halfStage 1) is
// the float32 update (accFloat) rounded to bf16, value for value, and
// left unwritten exactly where the float32 one is (rows of no adapter).
func halfUpdateMatches(t *testing.T, r *rig, x *Buffer, T, total, layer int, mods []llama.Module) {
	t.Helper()
	n := T * total
	f32, err := r.b.ctx.Alloc(4 * n)
	if err != nil {
		t.Fatal(err)
	}
	defer f32.Free()
	h16, err := r.b.ctx.Alloc(2 * n)
	if err != nil {
		t.Fatal(err)
	}
	defer h16.Free()
	if err := r.b.s.Memset32(f32.Ptr(), 0x7fc00000, n); err != nil { // NaN: unwritten shows
		t.Fatal(err)
	}
	r.b.loraSlices(r.b.s, f32.Ptr(), total, x, layer, mods, accFloat)
	want := make([]float32, n)
	if err := cuda.CopyDtoH(r.b.s, want, f32.Ptr()); err != nil {
		t.Fatal(err)
	}
	saved := r.b.force
	defer func() { r.b.force = saved }()
	for _, hs := range []int{-1, 1} {
		r.b.force.halfStage = hs
		if err := r.b.s.Memset8(h16.Ptr(), 0xff, 2*n); err != nil { // bf16 NaN 0xffff: unwritten shows
			t.Fatal(err)
		}
		before := r.b.halfStageds
		r.b.loraSlices(r.b.s, h16.Ptr(), total, x, layer, mods, accHalf)
		if staged := r.b.halfStageds > before; staged != (hs == 1) {
			t.Fatalf("%v, kernelForce.halfStage %d: sgmv_expand_tch1s launched: %v", mods, hs, staged)
		}
		got := make([]uint16, n)
		if err := cuda.CopyDtoH(r.b.s, got, h16.Ptr()); err != nil {
			t.Fatal(err)
		}
		if err := r.b.s.Synchronize(); err != nil {
			t.Fatal(err)
		}
		what := map[int]string{-1: "sgmv_expand_tch1", 1: "sgmv_expand_tch1s"}[hs]
		for i, w := range want {
			switch {
			case math.IsNaN(float64(w)) && got[i] != 0xffff:
				t.Fatalf("%v: %s wrote %#04x at %d (row %d), where the float32 update is unwritten", mods, what, got[i], i, i/total)
			case !math.IsNaN(float64(w)) && got[i] != safetensors.Float32ToBF16(w):
				t.Fatalf("%v: %s's bf16 update %#04x at %d (row %d), the float32 update %g rounds to %#04x", mods, what, got[i], i, i/total, w, safetensors.Float32ToBF16(w))
			}
		}
	}
}
