//go:build cuda

package gpu

import (
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"strings"
	"testing"

	"github.com/peftd/peftd/runtime/cuda"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/lora"
)

// TestLoRAGemmFormBench: the LoRA update of one adapter's long segment (a
// mixed step's prompt rows, a prefill's) as two plain cuBLASLt products
// a fused group, against the SGMV path (loraSlices' float32 update
// aside, as the LoRA stream writes it beside a product):
//
//	S = x . (scale A_cat)^T  (bf16 [T, slices * R]; A_cat the slices' A rows)
//	U = S . B_bd^T           ([T, N]; B_bd the slices' B, each on its own
//	                          R columns, zeros elsewhere)
//
// One 8B layer's four groups, rank 32. Cases: one adapter's segment of
// 64, 176 and 512 rows; and a mixed step of 240 rows (v0.87's shape: 60
// decode rows of four adapters, 4 of none, a 176-row prompt of one) with
// the SGMV path on the decode rows and the GEMM form on the prompt's. The
// GEMM form's update must match SGMV's to bf16's rounding of S and U
// (relative rms 1e-2). Times (PEFTD_LORA_GEMM_BENCH=1): the four groups as
// one recorded graph after an L2 flush, median of 20 replays, µs, with
// the update's bytes over the card's copy bandwidth as its floor.
func TestLoRAGemmFormBench(t *testing.T) {
	if os.Getenv("PEFTD_LORA_GEMM_BENCH") == "" {
		t.Skip("set PEFTD_LORA_GEMM_BENCH=1 to run")
	}
	const maxT, R = 512, 32
	cfg := cfg8B(1)
	r := newRig(t, cfg, maxT, engine.KVSpec{Layers: 1, Blocks: maxT / 16, BlockSize: 16, KVHeads: 8, HeadDim: 128})
	b := r.b
	bw := copyBandwidth(t, b)
	rng := rand.New(rand.NewPCG(3, 4))
	var prompt [llama.NumModules]*lora.Pair // slot 1's layer: the prompt's adapter
	for s := range 4 {
		a := randomAdapter(rng, cfg, R, 2)
		if err := b.LoadAdapter(s, a); err != nil {
			t.Fatal(err)
		}
		if s == 1 {
			prompt = a.Layers[0]
		}
	}
	type group struct {
		name      string
		mods      []llama.Module
		K, N, nR  int
		x         *Buffer
		aside     cuda.DevicePtr // SGMV's float32 update [maxT, N]
		s, u      cuda.DevicePtr // the GEMM form's S [maxT, nR] and U [maxT, N], bf16
		u32       cuda.DevicePtr // U as float32
		acat, bbd cuda.DevicePtr // the prompt adapter's scale A_cat [nR, K] and B_bd [N, nR], bf16
	}
	var groups []*group
	for gi, mods := range llama.FusedGroups {
		offs, _, K, _ := b.groupSlices(mods)
		N := offs[len(mods)]
		nR := len(mods) * R
		acat := make([]float32, nR*K)
		bbd := make([]float32, N*nR)
		for i, md := range mods {
			p := prompt[md]
			for j := 0; j < R*K; j++ {
				acat[i*R*K+j] = p.A[j] * p.Scale
			}
			for n := offs[i]; n < offs[i+1]; n++ {
				copy(bbd[n*nR+i*R:n*nR+(i+1)*R], p.B[(n-offs[i])*R:])
			}
		}
		ah, bh := make([]uint16, len(acat)), make([]uint16, len(bbd))
		f32ToBF16(ah, acat)
		f32ToBF16(bh, bbd)
		x := r.buffer(maxT, K)
		r.fill(x, r.rnd(maxT*K, 1))
		groups = append(groups, &group{name: shapes8B[gi].name, mods: mods, K: K, N: N, x: x, nR: nR,
			aside: devAlloc(t, b, 4*maxT*N), s: devAlloc(t, b, 2*maxT*nR), u: devAlloc(t, b, 2*maxT*N), u32: devAlloc(t, b, 4*maxT*N),
			acat: devUpload(t, b, ah), bbd: devUpload(t, b, bh)})
	}
	// gemmForm enqueues the GEMM form's update of rows [r0, r0+T) (U as
	// bf16, or float32 with f32)
	gemmForm := func(g *group, r0, T int, f32 bool) {
		x := cuda.DevicePtr(ptr(g.x)) + cuda.DevicePtr(2*r0*g.K)
		s := g.s + cuda.DevicePtr(2*r0*g.nR)
		b.fail(b.mm.GemmTN(b.s, s, cuda.R16BF, x, cuda.R16BF, g.acat, cuda.R16BF, T, g.nR, g.K, 1, 0))
		if f32 {
			b.fail(b.mm.GemmTN(b.s, g.u32+cuda.DevicePtr(4*r0*g.N), cuda.R32F, s, cuda.R16BF, g.bbd, cuda.R16BF, T, g.N, g.nR, 1, 0))
			return
		}
		b.fail(b.mm.GemmTN(b.s, g.u+cuda.DevicePtr(2*r0*g.N), cuda.R16BF, s, cuda.R16BF, g.bbd, cuda.R16BF, T, g.N, g.nR, 1, 0))
	}
	sgmv := func(g *group) { b.loraSlices(b.s, g.aside, g.N, g.x, 0, g.mods, accFloat) }
	flush := l2Flusher(t, b)
	timeIt := func(run func(g *group)) float64 {
		return replayUs(t, b, flush, 3, 20, func() {
			for _, g := range groups {
				run(g)
			}
		})
	}
	type tc struct {
		label    string
		segs     []engine.Segment
		T, p0, P int // rows; the prompt segment's first row and rows (slot 1)
	}
	one := func(T int) tc {
		return tc{fmt.Sprintf("1x%d", T), []engine.Segment{{Start: 0, End: T, Slot: 1}}, T, 0, T}
	}
	mixed := tc{"mixed240", []engine.Segment{{Start: 0, End: 16, Slot: 0}, {Start: 16, End: 31, Slot: 1}, {Start: 31, End: 48, Slot: 2},
		{Start: 48, End: 60, Slot: 3}, {Start: 64, End: 240, Slot: 1}}, 240, 64, 176}
	var lines []string
	for _, c := range []tc{one(64), one(176), one(512), mixed} {
		m := oneSeq(c.T, 16, zeros(c.T))
		m.LoRA = c.segs
		// numerics: the prompt rows' update both ways
		r.begin(m)
		for _, g := range groups {
			sgmv(g)
			gemmForm(g, c.p0, c.P, false)
		}
		r.end()
		for _, g := range groups {
			want := make([]float32, c.T*g.N)
			got := make([]uint16, c.T*g.N)
			if err := cuda.CopyDtoH(b.s, want, g.aside); err != nil {
				t.Fatal(err)
			}
			if err := cuda.CopyDtoH(b.s, got, g.u); err != nil {
				t.Fatal(err)
			}
			var d, n float64
			for i := c.p0 * g.N; i < (c.p0+c.P)*g.N; i++ {
				w, v := float64(want[i]), float64(fromBF16(got[i]))
				d, n = d+(v-w)*(v-w), n+w*w
			}
			if rel := math.Sqrt(d / n); !(rel < 1e-2) {
				t.Errorf("%s %s: the GEMM form's update is %.4f (relative rms) off SGMV's", c.label, g.name, rel)
			}
		}
		// times
		r.begin(m)
		sg := timeIt(sgmv)
		gf := timeIt(func(g *group) { gemmForm(g, c.p0, c.P, false) })
		gf32 := timeIt(func(g *group) { gemmForm(g, c.p0, c.P, true) })
		sh := timeIt(func(g *group) {
			x := cuda.DevicePtr(ptr(g.x)) + cuda.DevicePtr(2*c.p0*g.K)
			b.fail(b.mm.GemmTN(b.s, g.s, cuda.R16BF, x, cuda.R16BF, g.acat, cuda.R16BF, c.P, g.nR, g.K, 1, 0))
		})
		r.end()
		both := math.NaN()
		if c.p0 > 0 { // SGMV on the decode rows alone, then the GEMM form on the prompt's
			dm := oneSeq(c.T, 16, zeros(c.T))
			dm.LoRA = c.segs[:len(c.segs)-1]
			r.begin(dm)
			both = timeIt(func(g *group) {
				sgmv(g)
				gemmForm(g, c.p0, c.P, false)
			})
			r.end()
		}
		// the update's floor: x read, A and B read, U written (bf16), a layer
		var bytes float64
		for _, g := range groups {
			bytes += float64(2 * (c.P*g.K + g.nR*g.K + g.N*g.nR + c.P*g.N))
		}
		lines = append(lines, fmt.Sprintf("%s: SGMV (float32 update, every segment) %.1f; GEMM form on the %d prompt rows bf16 U %.1f (shrinks alone %.1f), float32 U %.1f; SGMV on the other rows + GEMM form %.1f; the GEMM form's bytes over %.0f GB/s %.1f",
			c.label, sg, c.P, gf, sh, gf32, both, bw/1e9, bytes/bw*1e6))
	}
	t.Logf("LORAGEMM %s, rank %d, four groups of an 8B layer (median µs of 20 replays after an L2 flush):\n  %s", b.Device().Name, R, strings.Join(lines, "\n  "))
}
