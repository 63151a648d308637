//go:build cuda

package gpu

import (
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/peftd/peftd/runtime/cuda"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/lora"
	"github.com/peftd/peftd/runtime/safetensors"
)

// TestKCatGroup: each fused group of an 8B layer at 240 rows (a mixed
// step's shape: 60 decode rows of four rank-32 adapters, 4 of none, a
// 176-token prompt of one), its LoRA update carried in the FP8 product's
// K (kcat.go) six ways (the step's shrink then lora_cat_e4m3;
// lora_shrink_e4m3; lora_shrink64_e4m3 where its shared memory fits; a
// dense bf16 shrink against every position's A then kcat_select_e4m3;
// kcat_shrink_e4m3_n64 and _n128, the dense shrink in e4m3 on
// fp8_gemm_skinny's loop with the masked store at its end),
// each followed by cuBLASLt's scaled product over K + E columns, against
// the product over K plus the SGMV update added in place. The update's
// error is e4m3's on S and B (a few % of it), no S' may saturate, and
// rows of no adapter get no update. PEFTD_KCAT_BENCH=1 also times the
// four groups as one recorded graph after an L2 flush: the products over
// K alone, each way with its product over K + E (KCAT lines; the
// difference is the update's cost a layer), and their parts alone.
func TestKCatGroup(t *testing.T) {
	cfg := cfg8B(1)
	const T, P, R = 240, 4, 32
	r := newRigWith(t, cfg, T, engine.KVSpec{Layers: 1, Blocks: 32, BlockSize: 16, KVHeads: 8, HeadDim: 128}, Options{WeightFormat: "fp8"})
	b := r.b
	if b.f8 == nil {
		t.Skip("no FP8 path on this device")
	}
	if b.fn.loraCat == nil {
		t.Skip("lora_cat_e4m3 and lora_shrink_e4m3 are compiled only with PEFTD_KERNEL_DEFINES=-DPEFTD_KCAT")
	}
	rng := rand.New(rand.NewPCG(5, 6))
	// trained-like adapters: B ~ 0.2 of a weight row's largest value
	// (randomAdapter's B, as large as A, puts S' B' past e4m3's range)
	ads := make([]*lora.Adapter, P)
	for s := range ads {
		ads[s] = &lora.Adapter{Name: "kcat", Layers: make([][llama.NumModules]*lora.Pair, 1)}
		for md := llama.Module(0); md < llama.NumModules; md++ {
			in, out := cfg.Dims(md)
			ads[s].Layers[0][md] = &lora.Pair{Rank: R, Scale: 2, A: r.rnd(R*in, 0.02), B: r.rnd(out*R, 0.005)}
		}
		if err := b.LoadAdapter(s, ads[s]); err != nil {
			t.Fatal(err)
		}
	}
	segs := []engine.Segment{{Start: 0, End: 16, Slot: 0}, {Start: 16, End: 31, Slot: 1}, {Start: 31, End: 48, Slot: 2},
		{Start: 48, End: 60, Slot: 3}, {Start: 64, End: T, Slot: 1}} // rows 60-63: no adapter
	m := oneSeq(T, 16, zeros(T))
	m.LoRA = segs
	slotOf := func(row int) int {
		for _, s := range segs {
			if row >= s.Start && row < s.End {
				return s.Slot
			}
		}
		return -1
	}
	alloc := func(n int) cuda.DevicePtr {
		buf, err := b.ctx.Alloc(n)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { buf.Free() })
		return buf.Ptr()
	}
	upload := func(host any) cuda.DevicePtr {
		var p cuda.DevicePtr
		var err error
		switch h := host.(type) {
		case []byte:
			p = alloc(len(h))
			err = cuda.CopyHtoD(b.s, p, h)
		case []uint16:
			p = alloc(2 * len(h))
			err = cuda.CopyHtoD(b.s, p, h)
		case []int32:
			p = alloc(4 * len(h))
			err = cuda.CopyHtoD(b.s, p, h)
		case []float32:
			p = alloc(4 * len(h))
			err = cuda.CopyHtoD(b.s, p, h)
		}
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	kpos := upload([]int32{0, 1, 2, 3, -1, -1, -1, -1})
	type group struct {
		name       string
		mods       []llama.Module
		N, K, ld   int
		x          *Buffer
		qx, sx     cuda.DevicePtr // x in e4m3 over K, its row scales
		xcat, wcat cuda.DevicePtr // [T, ld] and [N, ld]: K then the extension
		xcat2      cuda.DevicePtr // xcat for lora_shrink_e4m3
		xcat3      cuda.DevicePtr // xcat for lora_shrink64_e4m3
		xcat4      cuda.DevicePtr // xcat for kcat_select_e4m3
		xcat5      cuda.DevicePtr // xcat for kcat_shrink_e4m3_n64
		xcat6      cuda.DevicePtr // xcat for kcat_shrink_e4m3_n128
		qa         *fp8Weight     // aall in e4m3 with row scales
		xcat7      cuda.DevicePtr // xcat for the bf16 split dense shrink
		xcat8      cuda.DevicePtr // xcat for the e4m3 split dense shrink
		aall, sd   cuda.DevicePtr // every position's A rows (bf16, [E, K], scale and factor folded in); the dense shrink [T, E] bf16
		w          *fp8Weight
		fac        cuda.DevicePtr
		base, ref  *Buffer // the product over K; plus the SGMV update
		cat, cat2  *Buffer // over K + E: lora_cat_e4m3's extension, lora_shrink_e4m3's
		cat3       *Buffer // lora_shrink64_e4m3's
		cat4       *Buffer // the dense shrink and kcat_select_e4m3's
		cat5, cat6 *Buffer // kcat_shrink_e4m3_n64's, _n128's
		cat7, cat8 *Buffer // the split dense shrinks' (bf16, e4m3) and kcat_select_split_e4m3's
	}
	var groups []*group
	for _, g := range []struct {
		name string
		mods []llama.Module
	}{{"qkv", []llama.Module{llama.Q, llama.K, llama.V}}, {"o", []llama.Module{llama.O}}, {"gate_up", []llama.Module{llama.Gate, llama.Up}}, {"down", []llama.Module{llama.Down}}} {
		K, _ := cfg.Dims(g.mods[0])
		var outs []int
		N := 0
		for _, md := range g.mods {
			_, o := cfg.Dims(md)
			outs, N = append(outs, o), N+o
		}
		E := len(g.mods) * P * R
		ld := K + E
		// weights of about 0.5 a product, the update ~10% of it
		host := make([]uint16, N*K)
		f32ToBF16(host, r.rnd(N*K, 0.025))
		w, err := b.f8.upload(host, N, K)
		if err != nil {
			t.Fatal(err)
		}
		qw := make([]byte, N*K)
		sw := make([]float32, N)
		if err := cuda.CopyDtoH(b.s, qw, w.q.Ptr()); err != nil {
			t.Fatal(err)
		}
		if err := cuda.CopyDtoH(b.s, sw, w.scale.Ptr()); err != nil {
			t.Fatal(err)
		}
		wc := make([]byte, N*ld)
		for n := 0; n < N; n++ {
			copy(wc[n*ld:n*ld+K], qw[n*K:(n+1)*K])
		}
		fac := make([]float32, 8*len(g.mods))
		for s := range fac {
			fac[s] = 1
		}
		aall := make([]float32, E*K)
		for s, a := range ads {
			off := 0
			for i, md := range g.mods {
				p := a.Layers[0][md]
				bb := make([]float32, len(p.B)) // B as the device holds it (bf16)
				h := make([]uint16, len(p.B))
				f32ToBF16(h, p.B)
				for j := range h {
					bb[j] = fromBF16(h[j])
				}
				rows := sw[off : off+outs[i]]
				f, err := kcatFactor(bb, p.Rank, rows)
				if err != nil {
					t.Fatal(err)
				}
				fac[s*len(g.mods)+i] = f
				for j := 0; j < p.Rank; j++ { // A as the device holds it (bf16), times the scale and f
					h := make([]uint16, K)
					f32ToBF16(h, p.A[j*K:(j+1)*K])
					row := aall[((i*P+s)*R+j)*K:]
					for k := range h {
						row[k] = fromBF16(h[k]) * p.Scale * f
					}
				}
				if err := kcatExtension(wc[off*ld:], ld, K+(i*P+s)*R, R, bb, p.Rank, rows, f); err != nil {
					t.Fatal(err)
				}
				off += outs[i]
			}
		}
		// activations as an LLM's: normal, four outlier channels 20x
		xs := make([]float32, T*K)
		for i := range xs {
			xs[i] = float32(rng.NormFloat64())
			if c := i % K; c == 7 || c == 300 || c == 1201 || c == K-5 {
				xs[i] *= 20
			}
		}
		x := r.buffer(T, K)
		r.fill(x, xs)
		ah := make([]uint16, E*K)
		f32ToBF16(ah, aall)
		gr := &group{name: g.name, mods: g.mods, N: N, K: K, ld: ld, x: x, w: w, wcat: upload(wc), fac: upload(fac),
			xcat4: alloc(T * ld), aall: upload(ah), sd: alloc(2 * T * E), cat4: r.buffer(T, N),
			xcat5: alloc(T * ld), xcat6: alloc(T * ld), cat5: r.buffer(T, N), cat6: r.buffer(T, N),
			xcat7: alloc(T * ld), xcat8: alloc(T * ld), cat7: r.buffer(T, N), cat8: r.buffer(T, N),
			qx: alloc(T * K), sx: alloc(4 * T), xcat: alloc(T * ld), xcat2: alloc(T * ld), xcat3: alloc(T * ld), base: r.buffer(T, N), ref: r.buffer(T, N),
			cat: r.buffer(T, N), cat2: r.buffer(T, N), cat3: r.buffer(T, N)}
		if gr.qa, err = b.f8.upload(ah, E, K); err != nil {
			t.Fatal(err)
		}
		if err := b.f8.quantRows(gr.qx, gr.sx, ptr(x), T, K, x.ld); err != nil {
			t.Fatal(err)
		}
		qx := make([]byte, T*K)
		if err := cuda.CopyDtoH(b.s, qx, gr.qx); err != nil {
			t.Fatal(err)
		}
		xc := make([]byte, T*ld)
		for i := 0; i < T; i++ {
			copy(xc[i*ld:i*ld+K], qx[i*K:(i+1)*K])
		}
		if err := cuda.CopyHtoD(b.s, gr.xcat, xc); err != nil {
			t.Fatal(err)
		}
		for _, p := range []cuda.DevicePtr{gr.xcat2, gr.xcat3, gr.xcat4, gr.xcat5, gr.xcat6, gr.xcat7, gr.xcat8} { // rows of no adapter keep these zeros
			if err := cuda.CopyHtoD(b.s, p, xc); err != nil {
				t.Fatal(err)
			}
		}
		groups = append(groups, gr)
	}
	// kcat: the shrink, lora_cat_e4m3 and the product over K + E
	kcat := func(g *group) {
		sp := groupShrink(b, g.x, g.mods)
		b.loraCat(b.s, g.xcat+cuda.DevicePtr(g.K), g.ld, g.sx, kpos, g.fac, 0, g.mods, P, R, sp.ks)
		b.fail(b.mm.GemmTNScaled(b.s, ptr(g.cat), cuda.R16BF, g.xcat, g.sx, g.wcat, g.w.scale.Ptr(), T, g.N, g.ld))
	}
	ctr := upload(make([]int32, 1024)) // lora_shrink_e4m3's counters, zero
	fused := func(g *group) {
		b.loraShrinkCat(b.s, g.xcat2+cuda.DevicePtr(g.K), g.ld, g.sx, kpos, g.fac, ctr, g.x, 0, g.mods, P, R, false)
		b.fail(b.mm.GemmTNScaled(b.s, ptr(g.cat2), cuda.R16BF, g.xcat2, g.sx, g.wcat, g.w.scale.Ptr(), T, g.N, g.ld))
	}
	fused64 := func(g *group) {
		b.loraShrinkCat(b.s, g.xcat3+cuda.DevicePtr(g.K), g.ld, g.sx, kpos, g.fac, ctr, g.x, 0, g.mods, P, R, true)
		b.fail(b.mm.GemmTNScaled(b.s, ptr(g.cat3), cuda.R16BF, g.xcat3, g.sx, g.wcat, g.w.scale.Ptr(), T, g.N, g.ld))
	}
	denseShrink := func(g *group) {
		E := g.ld - g.K
		b.fail(b.mm.GemmTN(b.s, g.sd, cuda.R16BF, ptr(g.x), cuda.R16BF, g.aall, cuda.R16BF, T, E, g.K, 1, 0))
	}
	selectCat := func(g *group) {
		E := g.ld - g.K
		b.kcatSelect(b.s, g.xcat4+cuda.DevicePtr(g.K), g.ld, g.sd, E, g.sx, kpos, len(g.mods), P, R)
	}
	denseCat := func(g *group) {
		denseShrink(g)
		selectCat(g)
		b.fail(b.mm.GemmTNScaled(b.s, ptr(g.cat4), cuda.R16BF, g.xcat4, g.sx, g.wcat, g.w.scale.Ptr(), T, g.N, g.ld))
	}
	skShrink := func(g *group, n128 bool) {
		xq := g.xcat5
		if n128 {
			xq = g.xcat6
		}
		b.kcatShrink(b.s, xq+cuda.DevicePtr(g.K), g.ld, g.qx, g.K, g.qa, kpos, P, R, n128)
	}
	skCat := func(g *group, n128 bool) {
		skShrink(g, n128)
		xq, out := g.xcat5, g.cat5
		if n128 {
			xq, out = g.xcat6, g.cat6
		}
		b.fail(b.mm.GemmTNScaled(b.s, ptr(out), cuda.R16BF, xq, g.sx, g.wcat, g.w.scale.Ptr(), T, g.N, g.ld))
	}
	// the dense shrinks as cuBLASLt K splits (float32 partials), summed by
	// kcat_select_split_e4m3: bf16 x against bf16 A, or e4m3 against e4m3
	splitPart := alloc(4 * 16 * T * 3 * P * R)
	splitShrink := func(g *group, fp8 bool, splits int) {
		E := g.ld - g.K
		if fp8 {
			b.fail(b.mm.GemmTNSplitK(b.s, splitPart, g.qx, cuda.R8FE4M3, g.qa.q.Ptr(), cuda.R8FE4M3, T, E, g.K, splits))
			b.kcatSelectSplit(b.s, g.xcat8+cuda.DevicePtr(g.K), g.ld, splitPart, splits, g.qa.scale.Ptr(), g.sx, kpos, len(g.mods), P, R)
			return
		}
		b.fail(b.mm.GemmTNSplitK(b.s, splitPart, ptr(g.x), cuda.R16BF, g.aall, cuda.R16BF, T, E, g.K, splits))
		b.kcatSelectSplit(b.s, g.xcat7+cuda.DevicePtr(g.K), g.ld, splitPart, splits, 0, g.sx, kpos, len(g.mods), P, R)
	}
	splitCat := func(g *group, fp8 bool, splits int) {
		splitShrink(g, fp8, splits)
		xq, out := g.xcat7, g.cat7
		if fp8 {
			xq, out = g.xcat8, g.cat8
		}
		b.fail(b.mm.GemmTNScaled(b.s, ptr(out), cuda.R16BF, xq, g.sx, g.wcat, g.w.scale.Ptr(), T, g.N, g.ld))
	}
	plain := func(g *group, out *Buffer) {
		b.fail(b.mm.GemmTNScaled(b.s, ptr(out), cuda.R16BF, g.qx, g.sx, g.w.q.Ptr(), g.w.scale.Ptr(), T, g.N, g.K))
	}
	r.begin(m)
	for _, g := range groups {
		plain(g, g.base)
		plain(g, g.ref)
		b.loraSlices(b.s, ptr(g.ref), g.N, g.x, 0, g.mods, accAdd)
		kcat(g)
		fused(g)
		if b.sbpFits {
			fused64(g)
		}
		denseCat(g)
		if b.f8.kcat[0] != nil {
			skCat(g, false)
		}
		if b.f8.kcat[1] != nil {
			skCat(g, true)
		}
		splitCat(g, false, 8)
		splitCat(g, true, 8)
	}
	r.end()
	for _, g := range groups {
		bs, ref := r.read(g.base, T), r.read(g.ref, T)
		for _, way := range []struct {
			name string
			xq   cuda.DevicePtr
			out  *Buffer
		}{{"lora_cat_e4m3", g.xcat, g.cat}, {"lora_shrink_e4m3", g.xcat2, g.cat2}, {"lora_shrink64_e4m3", g.xcat3, g.cat3}, {"kcat_select_e4m3", g.xcat4, g.cat4},
			{"kcat_shrink_e4m3_n64", g.xcat5, g.cat5}, {"kcat_shrink_e4m3_n128", g.xcat6, g.cat6},
			{"split8 bf16 + select", g.xcat7, g.cat7}, {"split8 e4m3 + select", g.xcat8, g.cat8}} {
			if way.out == g.cat3 && !b.sbpFits || way.out == g.cat5 && b.f8.kcat[0] == nil || way.out == g.cat6 && b.f8.kcat[1] == nil {
				continue
			}
			// S' values e4m3 saturated (±448: 0x7e, 0xfe), and the largest
			xc := make([]byte, T*g.ld)
			if err := cuda.CopyDtoH(b.s, xc, way.xq); err != nil {
				t.Fatal(err)
			}
			sat, top := 0, 0.0
			for i := 0; i < T; i++ {
				for _, v := range xc[i*g.ld+g.K : (i+1)*g.ld] {
					if v&0x7f == 0x7e {
						sat++
					}
					top = max(top, math.Abs(float64(safetensors.E4M3ToFloat32(v))))
				}
			}
			cat := r.read(way.out, T)
			var upd, errMax, errSS, updSS, noneMax, baseMax, baseSS float64
			for i := 0; i < T; i++ {
				for n := 0; n < g.N; n++ {
					k := i*g.N + n
					baseMax, baseSS = max(baseMax, math.Abs(float64(bs[k]))), baseSS+float64(bs[k])*float64(bs[k])
					d := math.Abs(float64(cat[k] - ref[k]))
					if slotOf(i) < 0 {
						noneMax = max(noneMax, math.Abs(float64(cat[k]-bs[k])))
						continue
					}
					u := float64(ref[k] - bs[k])
					upd, updSS = max(upd, math.Abs(u)), updSS+u*u
					errMax, errSS = max(errMax, d), errSS+d*d
				}
			}
			n := float64(T * g.N)
			rel, rms := errMax/upd, math.Sqrt(errSS/updSS)
			t.Logf("KCAT %-8s %-16s N %5d K %5d E %3d: update max %.4f rms %.4f (base max %.3f rms %.3f), kcat - SGMV max %.4f (%.3f of the update's max), rms %.4f of the update's; S' max %.0f, %d saturated; rows of no adapter max |kcat - base| %.5f",
				g.name, way.name, g.N, g.K, g.ld-g.K, upd, math.Sqrt(updSS/n), baseMax, math.Sqrt(baseSS/n), errMax, rel, rms, top, sat, noneMax)
			// e4m3 on S' and B': ~2^-5 relative rms each, ~0.05 of the update
			// together; both outputs rounded to bf16 (2^-9 of the base,
			// itself ~40x the update here: ~0.06 of it); an e4m3 shrink
			// rounds x too. Measured (H100, v0.89, kcatBMax 256): 0.115-0.116
			// from a bf16 shrink, 0.120-0.121 from an e4m3 one
			if !(upd > 0) || rms > 0.13 || sat > 0 || noneMax > 0.02*baseMax {
				t.Errorf("%s %s: kcat's update off the SGMV one (rms %.4f of the update, %d saturated, no-adapter rows %.5f)", g.name, way.name, rms, sat, noneMax)
			}
		}
	}
	if os.Getenv("PEFTD_KCAT_BENCH") == "" {
		return
	}
	flush := l2Flusher(t, b)
	timeIt := func(run func(g *group)) float64 {
		r.begin(m)
		defer r.end()
		return replayUs(t, b, flush, 3, 20, func() {
			for _, g := range groups {
				run(g)
			}
		})
	}
	p := timeIt(func(g *group) { plain(g, g.base) })
	k := timeIt(kcat)
	sh := timeIt(func(g *group) { groupShrink(b, g.x, g.mods) })
	// the shrinks as dense products of every position's A (P * slices * R
	// rows), bf16 and FP8 (x in e4m3 as the product reads it): what a
	// shrink with no segments costs on cuBLASLt
	dense := make([][2]cuda.DevicePtr, len(groups)) // bf16 A, its output
	dense8 := make([]*fp8Weight, len(groups))
	for i, g := range groups {
		n := P * len(g.mods) * R
		host := make([]uint16, n*g.K)
		f32ToBF16(host, r.rnd(n*g.K, 0.02))
		dense[i] = [2]cuda.DevicePtr{upload(host), alloc(4 * T * n)}
		var err error
		if dense8[i], err = b.f8.upload(host, n, g.K); err != nil {
			t.Fatal(err)
		}
	}
	d16 := timeIt(func(g *group) {
		i := slices.Index(groups, g)
		n := P * len(g.mods) * R
		b.fail(b.mm.GemmTN(b.s, dense[i][1], cuda.R16BF, ptr(g.x), cuda.R16BF, dense[i][0], cuda.R16BF, T, n, g.K, 1, 0))
	})
	d8 := timeIt(func(g *group) {
		i := slices.Index(groups, g)
		w := dense8[i]
		b.fail(b.mm.GemmTNScaled(b.s, dense[i][1], cuda.R16BF, g.qx, g.sx, w.q.Ptr(), w.scale.Ptr(), T, w.rows, g.K))
	})
	cat := timeIt(func(g *group) {
		b.loraCat(b.s, g.xcat+cuda.DevicePtr(g.K), g.ld, g.sx, kpos, g.fac, 0, g.mods, P, R, b.shrinkPlan(b.s, g.K, len(g.mods)).ks)
	})
	// the shrinks on 64-row tiles (sgmv_shrink64 / 64p, forced: by default
	// they start at sgBigMinRows LoRA rows, and this step has 236)
	b.force.shrink64 = 1
	sh64 := timeIt(func(g *group) { groupShrink(b, g.x, g.mods) })
	b.force.shrink64 = 0
	fk, fk64 := timeIt(fused), math.NaN()
	if b.sbpFits {
		fk64 = timeIt(fused64)
	}
	fs := timeIt(func(g *group) {
		b.loraShrinkCat(b.s, g.xcat2+cuda.DevicePtr(g.K), g.ld, g.sx, kpos, g.fac, ctr, g.x, 0, g.mods, P, R, false)
	})
	sk64, sk128, skc64, skc128 := math.NaN(), math.NaN(), math.NaN(), math.NaN()
	if b.f8.kcat[0] != nil {
		sk64 = timeIt(func(g *group) { skCat(g, false) })
		skc64 = timeIt(func(g *group) { skShrink(g, false) })
	}
	if b.f8.kcat[1] != nil {
		sk128 = timeIt(func(g *group) { skCat(g, true) })
		skc128 = timeIt(func(g *group) { skShrink(g, true) })
	}
	var splitT []string
	for _, fp8 := range []bool{false, true} {
		for _, sp := range []int{4, 8, 16} {
			c := timeIt(func(g *group) { splitCat(g, fp8, sp) })
			a := timeIt(func(g *group) { splitShrink(g, fp8, sp) })
			splitT = append(splitT, fmt.Sprintf("e4m3 %v split %d: the update %.1f (shrink + select alone %.1f)", fp8, sp, c-p, a))
		}
	}
	t.Logf("KCAT split dense shrinks on cuBLASLt + kcat_select_split_e4m3, four groups: %s", strings.Join(splitT, "; "))
	dk := timeIt(denseCat)
	dsh := timeIt(denseShrink)
	dsel := timeIt(selectCat)
	ext := timeIt(func(g *group) {
		b.fail(b.mm.GemmTNScaled(b.s, ptr(g.cat), cuda.R16BF, g.xcat, g.sx, g.wcat, g.w.scale.Ptr(), T, g.N, g.ld))
	})
	t.Logf("KCAT %s, %d rows, four groups of an 8B layer (median µs of 20 replays after an L2 flush): products over K %.1f, shrink + lora_cat_e4m3 + products over K + E %.1f (the update %.1f a layer), lora_shrink_e4m3 + products over K + E %.1f (the update %.1f), lora_shrink64_e4m3 + products over K + E %.1f (the update %.1f); alone: shrinks %.1f (on 64-row tiles %.1f), lora_cat_e4m3 %.1f, lora_shrink_e4m3 %.1f, products over K + E %.1f, dense shrinks on cuBLASLt bf16 %.1f, FP8 %.1f; dense shrink (every position's A, bf16) + kcat_select_e4m3 + products over K + E %.1f (the update %.1f; alone: dense shrinks %.1f, kcat_select_e4m3 %.1f); kcat_shrink_e4m3_n64 + products over K + E %.1f (the update %.1f; alone %.1f), _n128 %.1f (the update %.1f; alone %.1f)",
		b.Device().Name, T, p, k, k-p, fk, fk-p, fk64, fk64-p, sh, sh64, cat, fs, ext, d16, d8, dk, dk-p, dsh, dsel, sk64, sk64-p, skc64, sk128, sk128-p, skc128)
}
