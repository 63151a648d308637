//go:build cuda

package gpu

import (
	"fmt"
	"math"
	"testing"

	"github.com/peftd/peftd/kernels"
	"github.com/peftd/peftd/runtime/cuda"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/lora"
	"github.com/peftd/peftd/runtime/safetensors"
)

// TestLinearLoRAWS checks the FP8 product with the LoRA expand in its end
// (lora_ws.go, fp8_ws_lora) at 8B shapes, every fused group, 17-64 rows,
// in the eager and the recorded steps' layouts: adapters of ranks 32, 16
// (on some projections only) and 8, rows without an adapter, and a step of
// eight distinct adapters (more than the drain's pieces hold at gate/up's
// width: the rest staged after the K loop). Rows without an adapter must
// be fp8_ws's product to the bit (the same plan, K split included), the
// others hold product + update rounded once: within a bf16 step of the
// exact sum of that product and the float64 reference update.
func TestLinearLoRAWS(t *testing.T) {
	cfg := cfg8B(1)
	const maxT = 64
	r := newRigWith(t, cfg, maxT, engine.KVSpec{Layers: 1, Blocks: 8, BlockSize: 16, KVHeads: 8, HeadDim: 128}, Options{WeightFormat: "fp8"})
	if r.b.f8 == nil || r.b.f8.ws == nil {
		t.Skip("no fp8_ws on this card")
	}
	if r.b.f8.ws.lfn == [len(wsWidths)]*cuda.Function{} {
		if kernels.Defined("PEFTD_WSL") {
			t.Fatal("PEFTD_WSL is defined but no fp8_ws_lora kernel loaded")
		}
		t.Skip("fp8_ws_lora is compiled only with PEFTD_KERNEL_DEFINES=-DPEFTD_WSL")
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
	for _, s := range []int{2, 4, 5, 6, 7} {
		ads[s] = mk(32, 1, all...)
	}
	for s, a := range ads {
		if err := r.b.LoadAdapter(s, a); err != nil {
			t.Fatal(err)
		}
	}
	eight := make([]engine.Segment, 8)
	for i := range eight {
		eight[i] = engine.Segment{Start: 8 * i, End: 8*i + 8, Slot: (i * 3) % 8}
	}
	cases := []struct {
		T    int
		segs []engine.Segment
		none []int // rows without an adapter
	}{
		{17, []engine.Segment{{Start: 0, End: 9, Slot: 0}, {Start: 10, End: 17, Slot: 3}}, []int{9}},
		{40, []engine.Segment{{Start: 0, End: 5, Slot: 0}, {Start: 7, End: 30, Slot: 1}, {Start: 30, End: 40, Slot: 3}}, []int{5, 6}},
		{64, eight, nil},
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
		wh := make([]uint16, total*in)
		for i, v := range r.rnd(total*in, 0.02) {
			wh[i] = safetensors.Float32ToBF16(v)
		}
		w, err := r.b.f8.upload(wh, total, in)
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range cases {
			for _, graph := range []bool{false, true} {
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
				T := r.b.rows()
				p, _ := r.b.f8.ws.plan(T, total, in)
				what := fmt.Sprintf("%v, %d rows (%d run, plan %v), graph layout %v", mods, c.T, T, p, graph)
				r.b.force = kernelForce{wsLoRA: 0b1111}
				if !r.b.loraWS(out, x, w, 0, mods) {
					t.Fatalf("%s: fp8_ws_lora did not take the group", what)
				}
				if pd := r.b.la.pend; pd.delta != 0 || pd.lora != nil {
					t.Fatalf("%s: an update is pending: %+v", what, pd)
				}
				r.b.force = kernelForce{}
				r.b.f8.invalidate()
				if err := r.b.f8.prepare(ptr(x), T, in, r.b.gen); err != nil {
					t.Fatal(err)
				}
				if err := r.b.f8.ws.launch(r.b.s, p, ptr(plain), r.b.f8.actQ.Ptr(), r.b.f8.actS.Ptr(), w.q.Ptr(), w.scale.Ptr(), T, total, in, nil); err != nil {
					t.Fatal(err)
				}
				got, base := r.read(out, c.T), r.read(plain, c.T)
				r.end()
				for _, row := range c.none {
					for j := 0; j < total; j++ {
						if math.Float32bits(got[row*total+j]) != math.Float32bits(base[row*total+j]) {
							t.Fatalf("%s: row %d (no adapter) differs from fp8_ws's product at %d: %g vs %g", what, row, j, got[row*total+j], base[row*total+j])
						}
					}
				}
				want, abs := make([]float64, c.T*total), make([]float64, c.T*total)
				loraRefAbs(want, abs, xv, in, total, c.segs, ads, 0, mods, cfg)
				gd := make([]float32, len(want))
				var su, sr float64
				for i := range gd {
					gd[i] = got[i] - base[i]
					exact := float64(base[i]) + want[i]
					// the output's and the product's roundings, the shrink's
					// float32 sums, and the expand's: its rank terms are
					// split into bf16 hi + lo parts (2^-18 of each term) and
					// summed in float32, which where they cancel is far
					// more than 1e-3 of the update (v0.60's one failure:
					// 2.67e-6 off an update of 2.21e-4): 2^-16 of the
					// terms' magnitudes
					bound := bf16Step(exact) + bf16Step(float64(base[i])) + 1e-3*math.Abs(want[i]) + 0x1p-16*abs[i] + 1e-6
					if e := math.Abs(float64(got[i]) - exact); !(e <= bound) {
						t.Fatalf("%s: row %d column %d: %g, want %g (product %g + update %g, its terms' magnitudes %g): %.3g off, bound %.3g",
							what, i/total, i%total, got[i], exact, base[i], want[i], abs[i], e, bound)
					}
					su += want[i] * want[i]
					sr += bf16Step(exact) * bf16Step(exact) / 4
				}
				tol := 2e-2
				if su > 0 {
					tol += 2 * math.Sqrt(sr/su)
				}
				r.compare(fmt.Sprintf("%s update (RMS %.3g)", what, math.Sqrt(su/float64(len(gd)))), gd, want, tol)
			}
		}
	}
}
