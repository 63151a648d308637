//go:build cuda

package gpu

import (
	"fmt"
	"math"
	"slices"
	"testing"

	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/lora"
)

// TestLinearLoRAInline checks the LoRA shrink inside gemm_skinny
// (lora_inline.go) at 8B shapes, every fused group, 1-16 rows, in the
// eager and the recorded steps' (padded, spare tiles) layouts: adapters of
// ranks 32, 16 (on some projections only) and 8, rows without an adapter.
// The product must be gemm_skinny's to the bit (rows without an adapter
// equal Linear's output), the update (float32, pending for the op that
// reads the output, here added by the next op's join) the float64
// reference's.
func TestLinearLoRAInline(t *testing.T) {
	cfg := cfg8B(1)
	const maxT = 16
	r := newRig(t, cfg, maxT, engine.KVSpec{Layers: 1, Blocks: 4, BlockSize: 16, KVHeads: 8, HeadDim: 128})
	if r.b.sk == nil {
		t.Skip("gemm_skinny does not fit this card")
	}
	mk := func(rank int, scale float32, mods ...llama.Module) *lora.Adapter {
		a := &lora.Adapter{Name: fmt.Sprintf("r%d", rank), Layers: make([][llama.NumModules]*lora.Pair, cfg.Layers)}
		for _, m := range mods {
			in, out := cfg.Dims(m)
			a.Layers[0][m] = &lora.Pair{Rank: rank, Scale: scale, A: r.rnd(rank*in, 0.05), B: r.rnd(out*rank, 0.05)}
		}
		return a
	}
	all := []llama.Module{llama.Q, llama.K, llama.V, llama.O, llama.Gate, llama.Up, llama.Down}
	ads := map[int]*lora.Adapter{0: mk(32, 2, all...), 1: mk(16, 0.5, llama.Q, llama.V, llama.Gate, llama.Down), 3: mk(8, 1.5, all...)}
	for s, a := range ads {
		if err := r.b.LoadAdapter(s, a); err != nil {
			t.Fatal(err)
		}
	}
	cases := []struct {
		T    int
		segs []engine.Segment
		none []int // rows without an adapter
	}{
		{1, []engine.Segment{{Start: 0, End: 1, Slot: 3}}, nil},
		{7, []engine.Segment{{Start: 0, End: 3, Slot: 1}, {Start: 4, End: 7, Slot: 0}}, []int{3}},
		{16, []engine.Segment{{Start: 0, End: 5, Slot: 0}, {Start: 7, End: 12, Slot: 1}, {Start: 12, End: 16, Slot: 3}}, []int{5, 6}},
	}
	groups := llama.FusedGroups[:]
	if testing.Short() {
		groups = groups[:1]
	}
	for _, mods := range groups {
		in, _ := cfg.Dims(mods[0])
		total := 0
		for _, m := range mods {
			_, o := cfg.Dims(m)
			total += o
		}
		if p, ok := r.b.sk.plan(maxT, total, in); !ok {
			t.Logf("%v: no gemm_skinny product on this card", mods)
			continue
		} else if _, ok := r.b.sk.loraPlan(p, 1); !ok {
			t.Logf("%v: gemm_skinny_n%d has no LoRA variant: the LoRA stream takes the update", mods, p.bn)
			continue
		}
		w, _ := r.weight(total, in, 0.02)
		// q/k/v: the update also left unexpanded for RoPE (lora_rope.go;
		// the next op here is not RoPE, so its join expands it in place)
		folds := []int{-1}
		if groupIndex(mods) == 0 {
			folds = append(folds, 1)
		}
		for _, c := range cases {
			for _, tc := range []struct {
				graph bool
				fold  int
			}{{false, -1}, {true, -1}, {false, 1}, {true, 1}} {
				graph := tc.graph
				if !slices.Contains(folds, tc.fold) {
					continue
				}
				what := fmt.Sprintf("%v, %d rows, graph layout %v, expand left for RoPE %v", mods, c.T, graph, tc.fold > 0)
				xv := r.rnd(maxT*in, 1)
				x, out, plain := r.buffer(maxT, in), r.buffer(maxT, total), r.buffer(maxT, total)
				r.fill(x, xv)
				r.poison(out)
				m := oneSeq(c.T, 16, zeros(c.T))
				m.LoRA = c.segs
				if graph {
					graphLoRALayout(t, r.b, m, c.T)
				} else {
					r.begin(m)
				}
				r.b.force = kernelForce{loraInline: 0b1111, ropeLoRA: tc.fold}
				if !r.b.loraInline(out, x, w, 0, mods) {
					t.Fatalf("%s: the inline path did not take the group", what)
				}
				if p := r.b.la.pend; r.b.asideOK() && tc.fold < 0 && (!p.local || p.delta == 0) {
					t.Fatalf("%s: the update is not pending in the update buffer", what)
				} else if r.b.asideOK() && tc.fold > 0 && (!p.local || p.lora == nil || p.delta != 0) {
					t.Fatalf("%s: the update is not pending unexpanded: %+v", what, p)
				}
				r.b.force = kernelForce{loraInline: -1}
				r.b.Linear(plain, x, w) // adds the pending update to out first (join)
				got, base := r.read(out, c.T), r.read(plain, c.T)
				r.end()
				r.b.force = kernelForce{}
				for _, row := range c.none {
					for j := 0; j < total; j++ {
						if got[row*total+j] != base[row*total+j] {
							t.Fatalf("%s: row %d (no adapter) differs from the product at %d: %g vs %g", what, row, j, got[row*total+j], base[row*total+j])
						}
					}
				}
				want := make([]float64, c.T*total)
				loraRef(want, xv, in, total, c.segs, ads, 0, mods, cfg)
				// The output is bf16(product + update): it holds the update
				// to within one rounding of the sum, whatever the update's
				// size. Each value within one bf16 step of the exact sum
				// (twice the rounding, plus float32 sums) plus one bf16 step
				// of the product: base is that product rounded to bf16 by
				// another kernel, whose float32 sum may differ in its last
				// bits (v0.43: o at 16 rows, product 3.0e-4 and update
				// -4.5e-4, 3.1e-6 off against a 9.5e-7 step of the sum and
				// 1.9e-6 of the product), and the update
				// over all values within 2% plus what that rounding allows
				// (small updates of rank-8 adapters at one row sit at 1-3%
				// of themselves from rounding alone).
				gd := make([]float32, len(want))
				var su, sr float64
				for i := range gd {
					gd[i] = got[i] - base[i]
					exact := float64(base[i]) + want[i]
					if e := math.Abs(float64(got[i]) - exact); e > bf16Step(exact)+bf16Step(float64(base[i]))+1e-3*math.Abs(want[i])+1e-6 {
						t.Fatalf("%s: row %d column %d: %g, want %g (product %g + update %g): %.3g off, a bf16 step is %.3g",
							what, i/total, i%total, got[i], exact, base[i], want[i], e, bf16Step(exact))
					}
					su += want[i] * want[i]
					sr += bf16Step(exact) * bf16Step(exact) / 4
				}
				tol := 2e-2
				if su > 0 {
					tol += 2 * math.Sqrt(sr/su)
				}
				r.compare(fmt.Sprintf("%s update (RMS %.3g; the output's rounding %.3g)", what, math.Sqrt(su/float64(len(gd))), math.Sqrt(sr/float64(len(gd)))), gd, want, tol)
			}
		}
	}
}

// bf16Step is the distance between v and the next bf16 value away from zero.
func bf16Step(v float64) float64 {
	if v == 0 {
		return 0x1p-133
	}
	_, e := math.Frexp(math.Abs(v)) // |v| = f 2^e, f in [0.5, 1)
	return math.Ldexp(1, e-8)
}
