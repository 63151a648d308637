//go:build cuda

package gpu

import (
	"fmt"
	"math"
	"testing"

	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/lora"
)

// TestLoRAK: each fused group's product with the LoRA update inside its K
// (loraK: fp8_wsl, gemm_wsl) against the product and then the update added
// in place by the SGMV kernels (loraSlices), with bf16 and FP8 weights, at
// 5, 16, 40 and 64 rows: ranks 8-64, an adapter without some projections,
// rows without an adapter, and slots taken in no particular order. The
// updates (each output less the same product without adapters; about as
// large as the product here, so that the outputs' bf16 rounding is a few
// parts in 1,000 of them) must match the SGMV kernels' within 1.5%
// (norm-wise), the outputs within 1%.
func TestLoRAK(t *testing.T) {
	cfg := testConfig(1024, 2816, 8, 2, 128, 32, 2)
	kv := engine.KVSpec{Layers: 2, Blocks: 8, BlockSize: 16, KVHeads: 2, HeadDim: 128}
	for _, format := range []string{"bf16", "fp8"} {
		t.Run(format, func(t *testing.T) {
			opts := Options{}
			if format == "fp8" {
				opts.WeightFormat = WeightsFP8
			}
			r := newRigWith(t, cfg, 64, kv, opts)
			if format == "fp8" && r.b.f8 == nil {
				t.Skip("no FP8 weights on this GPU")
			}
			mk := func(rank int, scale float32, mods ...llama.Module) *lora.Adapter {
				return r.adapter(rank, scale, 0.3, mods...)
			}
			all := []llama.Module{llama.Q, llama.K, llama.V, llama.O, llama.Gate, llama.Up, llama.Down}
			for s, a := range map[int]*lora.Adapter{0: mk(16, 2, all...), 1: mk(64, 0.5, all...), 2: mk(8, 1.25, llama.Q, llama.V, llama.Up, llama.Down),
				5: mk(24, 1, llama.K, llama.Gate), 6: mk(32, 3, all...)} {
				if err := r.b.LoadAdapter(s, a); err != nil {
					t.Fatal(err)
				}
			}
			groups := []struct {
				name string
				mods []llama.Module
			}{
				{"self_attn.qkv_proj", []llama.Module{llama.Q, llama.K, llama.V}},
				{"self_attn.o_proj", []llama.Module{llama.O}},
				{"mlp.gate_up_proj", []llama.Module{llama.Gate, llama.Up}},
				{"mlp.down_proj", []llama.Module{llama.Down}},
			}
			order := []int{6, 1, -1, 0, 2, 5, 1, 6} // the rows' slots, round robin (-1: none)
			for _, T := range []int{5, 16, 40, 64} {
				var segs []engine.Segment
				for i := 0; i < T; i++ {
					if s := order[i%len(order)]; s >= 0 {
						segs = append(segs, engine.Segment{Start: i, End: i + 1, Slot: s})
					}
				}
				for gi, g := range groups {
					layer := gi % cfg.Layers
					in, _ := cfg.Dims(g.mods[0])
					total := 0
					for _, m := range g.mods {
						_, o := cfg.Dims(m)
						total += o
					}
					w := r.projection(fmt.Sprintf("model.layers.%d.%s.weight", layer, g.name), total, in, format)
					x, out := r.buffer(T, in), r.buffer(T, total)
					r.fill(x, r.rnd(T*in, 1))
					what := fmt.Sprintf("%d rows %s", T, g.name)

					r.begin(oneSeq(T, 16, zeros(T))) // no adapters: the product alone
					r.b.Linear(out, x, w)
					base := r.read(out, T)
					r.end()

					m := oneSeq(T, 16, zeros(T))
					m.LoRA = segs
					r.begin(m)
					r.b.force.loraK = -1
					r.b.Linear(out, x, w)
					r.b.loraSlices(r.b.s, out.mem.Ptr(), total, x, layer, g.mods, accAdd)
					want := r.read(out, T)
					r.b.force.loraK = 1
					r.poison(out)
					before := r.b.loraKs
					r.b.LinearLoRA(out, x, w, layer, g.mods)
					if r.b.loraKs == before {
						t.Fatalf("%s: no wsl launch", what)
					}
					got := r.read(out, T)
					r.b.force.loraK = 0
					r.end()

					var dOut, nOut, dUpd, nUpd float64
					for i := range want {
						gv, wv, bv := float64(got[i]), float64(want[i]), float64(base[i])
						if math.IsNaN(gv) || math.IsInf(gv, 0) {
							t.Fatalf("%s: element %d (row %d) is %v", what, i, i/total, gv)
						}
						dOut += (gv - wv) * (gv - wv)
						nOut += wv * wv
						dUpd += ((gv - bv) - (wv - bv)) * ((gv - bv) - (wv - bv))
						nUpd += (wv - bv) * (wv - bv)
					}
					relOut, relUpd := math.Sqrt(dOut/nOut), math.Sqrt(dUpd/nUpd)
					t.Logf("%s: outputs %.3g, updates %.3g (update norm %.3g of the output's)", what, relOut, relUpd, math.Sqrt(nUpd/nOut))
					if !(relOut <= 0.01) || !(relUpd <= 0.015) {
						t.Errorf("%s: relative error of the outputs %.3g (limit 0.01), of the updates %.3g (limit 0.015)", what, relOut, relUpd)
					}
				}
			}
		})
	}
}
