package cpu

import (
	"encoding/binary"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/safetensors"
)

func TestQuantizeE4M3(t *testing.T) {
	nan := float32(math.NaN())
	for _, tc := range []struct {
		name    string
		in, out []float32
	}{
		{"zero row stays zero", []float32{0, 0, 0}, []float32{0, 0, 0}},
		// amax 2: x * 224 is 224, -112, 56, 448, all e4m3 values.
		{"representable values stay", []float32{1, -0.5, 0.25, 2}, []float32{1, -0.5, 0.25, 2}},
		// 0.3 * 448 = 134.4: e4m3 has 128 and 144 there; 128 / 448.
		{"rounds to the nearest e4m3", []float32{1, 0.3, -0.3}, []float32{1, 128.0 / 448, -128.0 / 448}},
		// 1e-6 * 448 is below half the smallest subnormal (2^-9).
		{"tiny values flush to zero", []float32{1, 1e-6}, []float32{1, 0}},
		{"a NaN poisons its row", []float32{1, nan, 2}, []float32{nan, nan, nan}},
		{"an Inf poisons its row", []float32{1, float32(math.Inf(-1))}, []float32{nan, nan}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			x := append([]float32(nil), tc.in...)
			QuantizeE4M3(x)
			for i := range x {
				w := tc.out[i]
				if math.IsNaN(float64(w)) != math.IsNaN(float64(x[i])) || math.Abs(float64(x[i]-w)) > 1e-6*math.Abs(float64(w)) {
					t.Fatalf("QuantizeE4M3(%v) = %v, want %v", tc.in, x, tc.out)
				}
			}
		})
	}
}

// e4m3Ref is the reference image of one row: bf16, then e4m3 with scale
// amax / 448, in float64 where the kernels compute in float32.
func e4m3Ref(x []float32) []float64 {
	b := make([]float32, len(x))
	var amax float32
	for i, v := range x {
		b[i] = math.Float32frombits(uint32(safetensors.Float32ToBF16(v)) << 16)
		amax = max(amax, float32(math.Abs(float64(b[i]))))
	}
	out := make([]float64, len(x))
	for i, v := range b {
		out[i] = float64(safetensors.E4M3ToFloat32(safetensors.Float32ToE4M3(v*(448/amax)))) * float64(amax/448)
	}
	return out
}

func f32Bytes(v []float32) []byte {
	b := make([]byte, 4*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(x))
	}
	return b
}

// TestFP8Linear: with FP8Weights, a projection multiplies the e4m3 images
// of its bf16-rounded weight rows and input rows; a tensor the scheme
// leaves alone (llama.FP8Projection says no) multiplies exactly; without
// the option nothing is quantized.
func TestFP8Linear(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	const rows, in, out = 5, 32, 16
	vec := func(n int) []float32 {
		v := make([]float32, n)
		for i := range v {
			v[i] = float32(rng.NormFloat64())
		}
		return v
	}
	w, x := vec(out*in), vec(rows*in)
	for _, tc := range []struct {
		name  string
		fp8   bool
		wname string
		quant bool
	}{
		{"fp8 projection", true, "model.layers.0.mlp.gate_up_proj.weight", true},
		{"fp8, not a projection", true, "lm_head.weight", false},
		{"fp8 off", false, "model.layers.0.mlp.gate_up_proj.weight", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := NewWith(Options{Threads: 2, FP8Weights: tc.fp8})
			wt, err := b.Upload(tc.wname, safetensors.F32, []int{out, in}, f32Bytes(w))
			if err != nil {
				t.Fatal(err)
			}
			xb, _ := b.NewBuffer(rows, in)
			copy(xb.(*Buffer).data, x)
			ob, _ := b.NewBuffer(rows, out)
			b.meta = &engine.StepMeta{Tokens: make([]int32, rows)}
			b.Linear(ob, xb, wt)
			got := ob.(*Buffer).data
			for r := range rows {
				xr := x[r*in : (r+1)*in]
				var xq []float64
				if tc.quant {
					xq = e4m3Ref(xr)
				}
				for j := range out {
					wr := w[j*in : (j+1)*in]
					var wq []float64
					if tc.quant {
						wq = e4m3Ref(wr)
					}
					var ref, mag float64
					for k := range in {
						a, c := float64(xr[k]), float64(wr[k])
						if tc.quant {
							a, c = xq[k], wq[k]
						}
						ref += a * c
						mag += math.Abs(a * c)
					}
					if d := math.Abs(float64(got[r*out+j]) - ref); d > 1e-6*mag {
						t.Fatalf("row %d col %d: %v, want %v", r, j, got[r*out+j], ref)
					}
				}
			}
			// The input is not changed (LoRA reads it after the product).
			for i := range x {
				if xb.(*Buffer).data[i] != x[i] {
					t.Fatal("Linear changed its input")
				}
			}
		})
	}
}

// TestQuantizeE4M3Subnormal: a row whose largest value is so small that
// 448 / amax overflows float32 quantizes without NaN (0 * Inf), its zero
// staying zero.
func TestQuantizeE4M3Subnormal(t *testing.T) {
	x := []float32{1e-38, 0, -5e-39}
	QuantizeE4M3(x)
	for i, v := range x {
		if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
			t.Fatalf("value %d became %v", i, v)
		}
	}
	if x[1] != 0 || x[0] <= 0 || x[2] >= 0 {
		t.Errorf("quantized to %v", x)
	}
}

// TestFP8KeysDecodeQuery: with FP8Keys every cached key head is its e4m3
// image; a sequence's one row of the step (a decode row) also rounds its
// query heads to e4m3 where the GPU's decode kernel multiplies Q K^T on the
// FP8 tensor cores (head_dim 64 here), while a prefill row's queries, and
// a decode row's at head_dim 32, stay as they are. Each row is checked
// against a float64 reference with and without the query's rounding, so
// the test fails if the wrong one is applied.
func TestFP8KeysDecodeQuery(t *testing.T) {
	for _, tc := range []struct {
		hd      int
		decQ8   bool // the decode row's queries rounded
		fp8Keys bool
	}{{64, true, true}, {32, false, true}, {64, false, false}} {
		t.Run(fmt.Sprintf("hd%d-fp8keys%v", tc.hd, tc.fp8Keys), func(t *testing.T) {
			const heads, kvh, bs, layers = 4, 2, 4, 1
			hd := tc.hd
			rng := rand.New(rand.NewPCG(7, uint64(hd)))
			b := NewWith(Options{Threads: 2, FP8Keys: tc.fp8Keys})
			if got := tc.fp8Keys && qk8Decode(heads, kvh, hd); got != tc.decQ8 {
				t.Fatalf("the decode row's queries rounded: %v, want %v", got, tc.decQ8)
			}
			cfg := &llama.Config{Heads: heads, KVHeads: kvh, HeadDim: hd}
			if err := b.Init(cfg, engine.Spec{MaxTokens: 8, KV: engine.KVSpec{Layers: layers, Blocks: 8, BlockSize: bs, KVHeads: kvh, HeadDim: hd}}); err != nil {
				t.Fatal(err)
			}
			width := kvh * hd
			var keys, vals [][]float32 // per position of sequence 0, as cached
			// step runs Attention over rows of sequence 0 (positions
			// [ctx-n, ctx), pages 0 and 1) and returns q and the output
			step := func(n, ctx int) (q, out []float32) {
				meta := &engine.StepMeta{Tokens: make([]int32, n), Seqs: []engine.SeqMeta{{Start: 0, Len: n, Context: ctx, Blocks: []int32{0, 1}}}}
				for r := range n {
					meta.KVSlots = append(meta.KVSlots, int32(ctx-n+r))
				}
				qb, _ := b.NewBuffer(n, heads*hd)
				kb, _ := b.NewBuffer(n, width)
				vb, _ := b.NewBuffer(n, width)
				ob, _ := b.NewBuffer(n, heads*hd)
				for _, x := range [][]float32{qb.(*Buffer).data, kb.(*Buffer).data, vb.(*Buffer).data} {
					for i := range x {
						x[i] = float32(rng.NormFloat64())
					}
				}
				for r := range n {
					k := slices.Clone(kb.(*Buffer).row(r))
					if tc.fp8Keys {
						for h := range kvh {
							ref := e4m3Ref(k[h*hd : (h+1)*hd])
							for i, v := range ref {
								k[h*hd+i] = float32(v)
							}
						}
					}
					keys, vals = append(keys, k), append(vals, slices.Clone(vb.(*Buffer).row(r)))
				}
				if err := b.Begin(meta); err != nil {
					t.Fatal(err)
				}
				b.Attention(ob, qb, kb, vb, 0, 0.125, nil)
				return slices.Clone(qb.(*Buffer).data), slices.Clone(ob.(*Buffer).data)
			}
			// ref: row r (position pos) and head h over positions [0, pos]
			ref := func(q []float64, pos, h int) []float64 {
				kv := h / (heads / kvh)
				s := make([]float64, pos+1)
				mx := math.Inf(-1)
				for p := range s {
					for i := range hd {
						s[p] += q[i] * float64(keys[p][kv*hd+i])
					}
					s[p] *= 0.125
					mx = max(mx, s[p])
				}
				var sum float64
				for p := range s {
					s[p] = math.Exp(s[p] - mx)
					sum += s[p]
				}
				o := make([]float64, hd)
				for p := range s {
					for i := range o {
						o[i] += s[p] / sum * float64(vals[p][kv*hd+i])
					}
				}
				return o
			}
			// far is how far got is from want, relative to want's largest value
			far := func(got []float32, want []float64) float64 {
				var d, m float64
				for i, w := range want {
					d, m = max(d, math.Abs(float64(got[i])-w)), max(m, math.Abs(w))
				}
				return d / m
			}
			check := func(name string, q, out []float32, rows, ctx int, quant bool) {
				for r := range rows {
					for h := range heads {
						qh := q[r*heads*hd+h*hd : r*heads*hd+(h+1)*hd]
						exact := make([]float64, hd)
						for i, v := range qh {
							exact[i] = float64(v)
						}
						want, other := exact, e4m3Ref(qh)
						if quant {
							want, other = other, exact
						}
						got := out[r*heads*hd+h*hd : r*heads*hd+(h+1)*hd]
						pos := ctx - rows + r
						if e := far(got, ref(want, pos, h)); e > 1e-5 {
							t.Errorf("%s row %d head %d: %.3g from its reference", name, r, h, e)
						}
						if pos > 0 && far(got, ref(other, pos, h)) < 1e-4 {
							t.Errorf("%s row %d head %d: as close to the reference with the other query rounding", name, r, h)
						}
					}
				}
			}
			q, out := step(5, 5) // prefill: 5 rows
			check("prefill", q, out, 5, 5, false)
			q, out = step(1, 6) // decode: one row
			check("decode", q, out, 1, 6, tc.decQ8)
		})
	}
}
