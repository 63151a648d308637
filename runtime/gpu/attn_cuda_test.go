//go:build cuda

package gpu

import (
	"fmt"
	"math"
	"math/bits"
	"os"
	"testing"

	"github.com/peftd/peftd/runtime/cuda"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/safetensors"
)

// TestOpAttentionDecode checks the split-KV decode kernel (attn_decode, its
// splits merged in the kernel) and the prefill kernel (attn_prefill) against
// a float64 reference: decode sequences with contexts of 1, 17, 640 and 4097
// tokens, page sizes 1, 5 and 16, page tables drawn from a shuffled free
// list, mixed in one step with prefill rows (13, 6, 150 and 64 rows after 0,
// 30, 70 and 0 cached tokens: partial, several and exactly one 64-row tile),
// and the same step again with the per-row kernel for every row (kernelForce.attnRows).
func TestOpAttentionDecode(t *testing.T) {
	type shape struct{ heads, kvh, hd, bs int }
	// head_dim 48 and 8: no attn_decode variant, the per-row kernel takes every row
	// 16 query heads per KV head: no attn_decode (<= 8), attn_prefill takes every row
	shapes := []shape{{32, 8, 128, 1}, {32, 8, 128, 5}, {32, 8, 128, 16}, {4, 2, 64, 5}, {8, 8, 32, 16}, {8, 1, 32, 1}, {16, 2, 256, 16}, {4, 2, 48, 16}, {8, 4, 8, 1}, {16, 1, 64, 16}}
	for _, sh := range shapes {
		t.Run(fmt.Sprintf("h%d_kv%d_d%d_bs%d", sh.heads, sh.kvh, sh.hd, sh.bs), func(t *testing.T) {
			heads, kvh, hd, bs := sh.heads, sh.kvh, sh.hd, sh.bs
			cfg := testConfig(heads*hd, 128, heads, kvh, hd, 32, 2)
			ctxs := []int{1, 17, 640, 4097}                       // decode contexts after the step
			pre := [][2]int{{0, 13}, {30, 6}, {70, 150}, {0, 64}} // prefill: tokens cached before, rows this step
			blocks := 0
			for _, c := range ctxs {
				blocks += (c + bs - 1) / bs
			}
			for _, p := range pre {
				blocks += (p[0] + p[1] + bs - 1) / bs
			}
			blocks += 16
			const layer = 1
			r := newRig(t, cfg, 256, engine.KVSpec{Layers: 2, Blocks: blocks, BlockSize: bs, KVHeads: kvh, HeadDim: hd})
			width := kvh * hd
			free := r.rng.Perm(blocks)
			type seq struct {
				cached, rows int
				blocks       []int32
				k, v         [][]float32
			}
			// Order in the step: decode, prefill, decode, decode, prefill, decode.
			var seqs []*seq
			for i, c := range ctxs {
				seqs = append(seqs, &seq{cached: c - 1, rows: 1})
				if i < len(pre) {
					seqs = append(seqs, &seq{cached: pre[i][0], rows: pre[i][1]})
				}
			}
			kImg := make([]uint16, blocks*bs*width)
			vImg := make([]uint16, blocks*bs*width)
			for i := range kImg { // unused slots: large values, so a stray read shows
				kImg[i], vImg[i] = safetensors.Float32ToBF16(50), safetensors.Float32ToBF16(-50)
			}
			for _, s := range seqs {
				n := s.cached + s.rows
				for len(s.blocks)*bs < n {
					s.blocks = append(s.blocks, int32(free[0]))
					free = free[1:]
				}
				for p := 0; p < s.cached; p++ {
					kv, vv := r.rnd(width, 2), r.rnd(width, 2)
					s.k, s.v = append(s.k, kv), append(s.v, vv)
					slot := int(s.blocks[p/bs])*bs + p%bs
					f32ToBF16(kImg[slot*width:(slot+1)*width], kv)
					f32ToBF16(vImg[slot*width:(slot+1)*width], vv)
				}
			}
			off := uint64(layer * r.b.layerB)
			if err := cuda.CopyHtoD(r.b.s, r.b.kcache.Ptr()+off, kImg); err != nil {
				t.Fatal(err)
			}
			if err := cuda.CopyHtoD(r.b.s, r.b.vcache.Ptr()+off, vImg); err != nil {
				t.Fatal(err)
			}
			m := &engine.StepMeta{}
			for _, s := range seqs {
				m.Seqs = append(m.Seqs, engine.SeqMeta{Start: len(m.Tokens), Len: s.rows, Context: s.cached + s.rows, Blocks: s.blocks})
				for j := 0; j < s.rows; j++ {
					p := s.cached + j
					m.Tokens = append(m.Tokens, 0)
					m.Positions = append(m.Positions, int32(p))
					m.KVSlots = append(m.KVSlots, s.blocks[p/bs]*int32(bs)+int32(p%bs))
				}
			}
			T := len(m.Tokens)
			qv, kv, vv := r.rnd(T*heads*hd, 2), r.rnd(T*width, 2), r.rnd(T*width, 2)
			for si, s := range seqs {
				st := m.Seqs[si].Start
				for j := 0; j < s.rows; j++ {
					s.k = append(s.k, kv[(st+j)*width:(st+j+1)*width])
					s.v = append(s.v, vv[(st+j)*width:(st+j+1)*width])
				}
			}
			want := make([]float64, T*heads*hd)
			scale := float32(1 / math.Sqrt(float64(hd)))
			for si, s := range seqs {
				sm := m.Seqs[si]
				for j := 0; j < sm.Len; j++ {
					row := sm.Start + j
					ctx := sm.Context - sm.Len + j + 1
					for h := 0; h < heads; h++ {
						ko := (h / (heads / kvh)) * hd
						sc := make([]float64, ctx)
						mx := math.Inf(-1)
						for p := 0; p < ctx; p++ {
							var d float64
							for e := 0; e < hd; e++ {
								d += float64(qv[row*heads*hd+h*hd+e]) * float64(s.k[p][ko+e])
							}
							sc[p] = d * float64(scale)
							mx = math.Max(mx, sc[p])
						}
						var sum float64
						for p := range sc {
							sc[p] = math.Exp(sc[p] - mx)
							sum += sc[p]
						}
						for e := 0; e < hd; e++ {
							var o float64
							for p := 0; p < ctx; p++ {
								o += sc[p] * float64(s.v[p][ko+e])
							}
							want[row*heads*hd+h*hd+e] = o / sum
						}
					}
				}
			}
			q, k, v, out := r.buffer(T, heads*hd), r.buffer(T, width), r.buffer(T, width), r.buffer(T, heads*hd)
			r.fill(q, qv)
			r.fill(k, kv)
			r.fill(v, vv)
			// The split path twice: its merge counters must be back at zero.
			for i, v0 := range []bool{false, false, true} {
				r.b.force.attnRows = v0
				r.poison(out)
				r.begin(m)
				if !v0 {
					wantTiles := 0
					for _, s := range m.Seqs {
						if r.b.preOK && (!r.b.decOK || s.Len > 1) {
							wantTiles += (s.Len + preRows - 1) / preRows
						}
					}
					if r.b.nPreTiles != wantTiles {
						t.Fatalf("%d attn_prefill tiles, want %d", r.b.nPreTiles, wantTiles)
					}
				}
				if !v0 && !r.b.decOK {
					if r.b.nDec != 0 {
						t.Fatalf("head_dim %d: %d rows took attn_decode, which has no variant for it", hd, r.b.nDec)
					}
				} else if !v0 {
					if r.b.nDec != len(ctxs) || r.b.nPre != T-len(ctxs) {
						t.Fatalf("split path: %d decode sequences and %d prefill rows, want %d and %d", r.b.nDec, r.b.nPre, len(ctxs), T-len(ctxs))
					}
					t.Logf("decode split %d ways", r.b.decSplit)
				}
				r.b.Attention(out, q, k, v, layer, scale, nil)
				got := r.read(out, T)
				r.end()
				name := "split-KV decode + tensor-core prefill"
				if !r.b.preOK {
					name = "split-KV decode + per-row prefill"
				}
				if i == 1 {
					name += ", again"
				}
				if v0 {
					name = "per-row kernel (v0), all rows"
				}
				r.compare(name, got, want, opTol)
			}
			r.b.force.attnRows = false
			var fs []*cuda.Function
			if r.b.decOK {
				fs = append(fs, r.b.decodeKernel(hd))
			}
			if r.b.preOK {
				fs = append(fs, r.b.fn.attnPrefill[bits.TrailingZeros(uint(hd))-5])
			}
			for _, f := range fs {
				regs, local, err := f.Resources()
				if err != nil {
					t.Fatal(err)
				}
				t.Logf("%s: %d registers, %d bytes of local memory per thread", f.Name, regs, local)
			}
		})
	}
}

// TestAttnBench times the prefill attention of one 8B layer (32 query
// heads, 8 KV heads, head_dim 128, pages of 16; rope_store included) for
// the tensor-core kernel (attn_prefill) and the per-row kernel (kernelForce.attnRows),
// median over 20 replays of a graph of 5 back-to-back calls. Cases: serving's
// steady mix (4 sequences of 128 new rows), a 512-token prompt, 4 x 512,
// and 128 rows after a cached 2,000-token prefix. It prints the effective
// tensor throughput (QK^T and PV multiply-adds of the causal rows).
// Set PEFTD_ATTN_BENCH=1 to run.
func TestAttnBench(t *testing.T) {
	if os.Getenv("PEFTD_ATTN_BENCH") == "" {
		t.Skip("set PEFTD_ATTN_BENCH=1 to run")
	}
	const heads, kvh, hd, bs = 32, 8, 128, 16
	cases := []struct {
		name         string
		seqs, cached int
		rows         int
	}{{"4x128 new", 4, 0, 128}, {"1x512 new", 1, 0, 512}, {"4x512 new", 4, 0, 512}, {"1x128 after 2000", 1, 2000, 128}}
	cfg := testConfig(heads*hd, 128, heads, kvh, hd, 32, 1)
	r := newRig(t, cfg, 2048, engine.KVSpec{Layers: 1, Blocks: 4096, BlockSize: bs, KVHeads: kvh, HeadDim: hd})
	for _, c := range cases {
		m := &engine.StepMeta{}
		next := int32(0)
		var flops float64
		for range c.seqs {
			n := c.cached + c.rows
			var blocks []int32
			for len(blocks)*bs < n {
				blocks = append(blocks, next)
				next++
			}
			m.Seqs = append(m.Seqs, engine.SeqMeta{Start: len(m.Tokens), Len: c.rows, Context: n, Blocks: blocks})
			for j := range c.rows {
				p := c.cached + j
				m.Tokens = append(m.Tokens, 0)
				m.Positions = append(m.Positions, int32(p))
				m.KVSlots = append(m.KVSlots, blocks[p/bs]*bs+int32(p%bs))
				flops += 4 * float64(heads*hd) * float64(p+1)
			}
		}
		T := len(m.Tokens)
		q, k, v, out := r.buffer(T, heads*hd), r.buffer(T, kvh*hd), r.buffer(T, kvh*hd), r.buffer(T, heads*hd)
		r.fill(q, r.rnd(T*heads*hd, 1))
		r.fill(k, r.rnd(T*kvh*hd, 1))
		r.fill(v, r.rnd(T*kvh*hd, 1))
		for _, v0 := range []bool{false, true} {
			r.b.force.attnRows = v0
			r.begin(m)
			// five calls recorded as a graph (graphMedianUs)
			med := graphMedianUs(t, r.b.ctx, r.b.s, 5, 20, func(int) error {
				r.b.Attention(out, q, k, v, 0, 0.088, nil)
				return r.b.err
			})
			r.end()
			kind := "attn_prefill (tensor cores)"
			if v0 {
				kind = "per-row kernel"
			}
			bench("attn %-18s %-28s %8.1f us  %6.1f TFLOP/s", c.name, kind, med, flops/(med*1e-6)/1e12)
		}
		r.b.force.attnRows = false
	}
}
