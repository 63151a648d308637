//go:build cuda

package gpu

import (
	"fmt"
	"math"
	"slices"
	"testing"

	fx "github.com/peftd/peftd/internal/fixture"
	"github.com/peftd/peftd/runtime/cuda"
	"github.com/peftd/peftd/runtime/engine"
)

// TestOpLinearRoPE: Backend.LinearRoPE (kernelForce.wsRoPE 1) with each
// rope width (gemm_ws_rope_n*, fp8_ws_rope_n*; the ws plan forced to it)
// leaves what Linear and Attention's rope_store_rows leave: q and k
// rotated in place and v as the product gave it, the layer's key and value
// caches at the rows' slots, and the attention output that reads them;
// within the last bits of the product's float32 sums (a rope block's K walk
// starts where its own stagger says, not where the plain block's does),
// counted exactly. Head dims 128 (a block's pairs inside one head) and 64
// (at n48, 24 pairs straddling two heads); FP8 from 9 rows, bf16 from 17;
// with kernelForce.wsRoPE -1 (and by default, wsRoPEAuto) it declines,
// as it does with an FP8 key cache. The fused op recorded in a graph
// replays bit for bit.
func TestOpLinearRoPE(t *testing.T) {
	for _, format := range []string{"bf16", "fp8"} {
		for _, sh := range [][5]int{{8, 2, 128, 512, 0}, {8, 2, 64, 256, 48}} { // heads, KV heads, head dim, K, the one width (0: each)
			heads, kvh, hd, K := sh[0], sh[1], sh[2], sh[3]
			N, width := (heads+2*kvh)*hd, kvh*hd
			for _, bn := range []int{32, 48, 64} {
				for _, T := range []int{9, 16, 17, 40, 64} {
					if N%bn != 0 || sh[4] != 0 && bn != sh[4] || format == "bf16" && (T < wsMinRows || T == 40) || format == "fp8" && T == 17 {
						continue
					}
					name := fmt.Sprintf("%s hd%d n%d T=%d", format, hd, bn, T)
					const ctx0, bs = 100, 16
					cfg := testConfig(K, 2*K, heads, kvh, hd, 32, 1)
					r := newRigWith(t, cfg, T, engine.KVSpec{Layers: 1, Blocks: (ctx0 + 64 + bs) / bs, BlockSize: bs, KVHeads: kvh, HeadDim: hd}, Options{WeightFormat: format})
					ws := fp8WS(r.b)
					if format == "bf16" {
						ws = r.b.bws
						r.b.force.bws = 3
					}
					if ws == nil {
						t.Skip("the ws kernels are compiled only for sm_90a")
					}
					ws.force = wsPlan{i: slices.Index(wsWidths[:], bn), split: 1}
					w := r.projection("model.layers.0.self_attn.qkv_proj.weight", N, K, format)
					x := r.buffer(T, K)
					r.fill(x, r.rnd(T*K, 1))
					invFreq := cfg.InvFreq()
					scale := float32(1 / math.Sqrt(float64(hd)))
					kc, vc, _ := r.b.layerCache(0)
					nslots := r.kv.Blocks * bs
					for _, c := range []uint64{kc, vc} { // positions below ctx0 are attended: zero, not what the allocation held
						if err := cuda.CopyHtoD(r.b.s, cuda.DevicePtr(c), make([]uint16, nslots*width)); err != nil {
							t.Fatal(err)
						}
					}
					meta := seqFrom(T, ctx0, bs, zeros(T)) // the rotation at positions past 0
					// run: the product and the attention, fused or not: qkv,
					// the attention output, and the caches' rows at the slots
					run := func(force int) (qkv, att, keys, vals []float32, took bool) {
						o, out := r.buffer(T, N), r.buffer(T, heads*hd)
						q, k, v := r.view(o, 0, heads*hd), r.view(o, heads*hd, width), r.view(o, (heads+kvh)*hd, width)
						r.poison(o)
						r.poison(out)
						r.begin(meta)
						r.b.force.wsRoPE = force
						took = r.b.LinearRoPE(o, x, w, 0, invFreq)
						if !took {
							r.b.Linear(o, x, w)
						}
						r.b.Attention(out, q, k, v, 0, scale, invFreq)
						qkv, att = r.read(o, T), r.read(out, T)
						r.end()
						keys, vals = r.cacheRows(kc, meta.KVSlots, width), r.cacheRows(vc, meta.KVSlots, width)
						return qkv, att, keys, vals, took
					}
					fq, fa, fk, fv, took := run(1)
					if want := T >= ws.minRoPERows(r.b); took != want {
						t.Fatalf("%s: LinearRoPE took the product: %v, want %v", name, took, want)
					}
					if !took {
						continue
					}
					uq, ua, uk, uv, declined := run(-1)
					if declined {
						t.Fatalf("%s: LinearRoPE took the product with kernelForce.wsRoPE -1", name)
					}
					for _, c := range []struct {
						what      string
						got, want []float32
					}{{"qkv", fq, uq}, {"attention", fa, ua}, {"key cache", fk, uk}, {"value cache", fv, uv}} {
						r.compare(name+" "+c.what, c.got, f64s(c.want), 4e-3)
						t.Logf("%s %s: %d of %d values bit for bit", name, c.what, sameBits(c.got, c.want), len(c.want))
					}
					// recorded: replayed's step (oneSeq: positions and slots 0..T-1)
					// against the op run eagerly in that step
					o := r.buffer(T, N)
					r.poison(o)
					r.begin(oneSeq(T, 16, zeros(T)))
					r.b.force.wsRoPE = 1
					r.b.LinearRoPE(o, x, w, 0, invFreq)
					eager := r.read(o, T)
					r.end()
					replayed(t, r, T, name+" recorded", func() bool {
						r.b.force.wsRoPE = 1
						return r.b.LinearRoPE(o, x, w, 0, invFreq)
					}, func() { r.poison(o) }, []*Buffer{o}, [][]float32{eager})
					o2 := r.buffer(T, N)
					r.begin(meta)
					r.b.force.wsRoPE = 0
					if got := r.b.LinearRoPE(o2, x, w, 0, invFreq); got != wsRoPEAuto {
						t.Errorf("%s: by default LinearRoPE took the product: %v, want %v", name, got, wsRoPEAuto)
					}
					r.b.force.wsRoPE = 1
					r.b.kv8 = true // an FP8 key cache: its scales need each head's maximum
					if r.b.LinearRoPE(o2, x, w, 0, invFreq) {
						t.Errorf("%s: LinearRoPE took the product with an FP8 key cache", name)
					}
					r.b.kv8 = false
					r.end()
				}
			}
		}
	}
}

// minRoPERows is the fewest rows LinearRoPE takes on g: fp8_ws from
// fp8State.wsBelowFrom's lone rows (below wsMinRows), gemm_ws from
// wsMinRows.
func (g *wsProduct) minRoPERows(b *Backend) int {
	if g.esize == 1 && b.f8 != nil {
		if f := b.f8.wsBelowFrom(true); f > 0 {
			return f
		}
	}
	return wsMinRows
}

func (r *rig) view(p *Buffer, col, cols int) *Buffer {
	r.t.Helper()
	v, err := r.b.NewView(p, col, cols)
	if err != nil {
		r.t.Fatal(err)
	}
	return v.(*Buffer)
}

// cacheRows reads the bf16 cache rows (width values) at slots from the
// layer cache at base.
func (r *rig) cacheRows(base uint64, slots []int32, width int) []float32 {
	r.t.Helper()
	out := make([]float32, 0, len(slots)*width)
	h := make([]uint16, width)
	for _, s := range slots {
		if err := cuda.CopyDtoH(r.b.s, h, cuda.DevicePtr(base+uint64(2*width*int(s)))); err != nil {
			r.t.Fatal(err)
		}
		if err := r.b.s.Synchronize(); err != nil {
			r.t.Fatal(err)
		}
		for _, v := range h {
			out = append(out, fromBF16(v))
		}
	}
	return out
}

func sameBits(a, b []float32) int {
	n := 0
	for i := range a {
		if math.Float32bits(a[i]) == math.Float32bits(b[i]) {
			n++
		}
	}
	return n
}

// TestFusedForwardRoPE: the tiny fixture's forward with LinearRoPE on
// (kernelForce.wsRoPE 1; bf16: gemm_ws takes its 17-64-row base steps'
// q/k/v, K 128 in one stage, so every block walks K as gemm_ws's does)
// against off, through recorded decode and mixed steps and eager ones,
// base rows alone and beside adapters (which keep the two kernels): every
// logit within 1e-3 relative of the other's (bit for bit where the
// rotation's float32 arithmetic compiles as rope_store_rows' does; the
// count is logged), and the fused op took products. FP8: the fixture's
// q/k/v (128 bytes of K) has no fp8_ws plan, so it declines them all.
func TestFusedForwardRoPE(t *testing.T) {
	for _, format := range []string{"bf16", "fp8"} {
		t.Run(format, func(t *testing.T) {
			worst, rows, exact := 0.0, 0, 0
			bOn, bOff := fusedForward(t, format, func(b *Backend, force int) { b.force.wsRoPE = force }, func(what string, ep, es *engine.Engine, ip, is []engine.Input) {
				o1, o2 := stepBoth(t, ep, es, ip, is)
				for k := range o1 {
					rel := fx.RelErr(o1[k], o2[k])
					if !(rel <= 5e-3) {
						t.Fatalf("%s, input %d: logits with the fused op %.3g from those without", what, k, rel)
					}
					worst = max(worst, rel)
					rows++
					if firstDiff(o1[k], o2[k]) < 0 {
						exact++
					}
				}
			})
			if (bOn.fused.rope == 0) != (format == "fp8") || bOff.fused.rope != 0 {
				t.Fatalf("fused launches: %d with the op on (want some in bf16, none in FP8), %d with it off (want none)", bOn.fused.rope, bOff.fused.rope)
			}
			t.Logf("%s: %d logits rows, worst relative difference %.3g, %d bit for bit; %d fused q/k/v launches enqueued or recorded", format, rows, worst, exact, bOn.fused.rope)
		})
	}
}
