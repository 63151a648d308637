//go:build cuda

package gpu

import (
	"encoding/binary"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"strings"
	"testing"

	"github.com/peftd/peftd/kernels"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/lora"
	"github.com/peftd/peftd/runtime/safetensors"
)

// The op tests compare each kernel with a float64 reference computed here
// from the same bf16-rounded inputs, on fresh random data (never zeros).
// Tolerance: bf16 outputs carry ~2^-9 relative rounding; 1e-2 norm-wise
// relative error leaves room for float32 accumulation order.
const opTol = 1e-2

type rig struct {
	t     *testing.T
	b     *Backend
	cfg   *llama.Config
	kv    engine.KVSpec
	rng   *rand.Rand
	worst float64
}

func newRig(t *testing.T, cfg *llama.Config, maxT int, kv engine.KVSpec) *rig {
	t.Helper()
	return newRigWith(t, cfg, maxT, kv, Options{})
}

// newRigWith is newRig on a backend made with opts.
func newRigWith(t *testing.T, cfg *llama.Config, maxT int, kv engine.KVSpec, opts Options) *rig {
	t.Helper()
	b, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := b.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	if err := b.Init(cfg, engine.Spec{MaxTokens: maxT, KV: kv, AdapterSlots: 8}); err != nil {
		t.Fatal(err)
	}
	r := &rig{t: t, b: b, cfg: cfg, kv: kv, rng: rand.New(rand.NewPCG(testSeed(t), 7))}
	t.Cleanup(func() { t.Logf("maxrel=%.3g", r.worst) })
	return r
}

func testConfig(hidden, inter, heads, kvHeads, headDim, vocab, layers int) *llama.Config {
	c := &llama.Config{VocabSize: vocab, Hidden: hidden, Intermediate: inter, Layers: layers, Heads: heads, KVHeads: kvHeads,
		HeadDim: headDim, RMSNormEps: 1e-5, RopeTheta: 500000, MaxPositions: 131072, HiddenAct: "silu",
		RopeScaling: &llama.RopeScaling{Type: "llama3", Factor: 8, LowFreqFactor: 1, HighFreqFactor: 4, OriginalMaxPositions: 8192}}
	if err := c.Validate(); err != nil {
		panic(err)
	}
	return c
}

// rnd returns n bf16-representable random values in [-s, s), never all zero.
func (r *rig) rnd(n int, s float32) []float32 {
	v := make([]float32, n)
	for i := range v {
		v[i] = fromBF16(safetensors.Float32ToBF16((r.rng.Float32()*2 - 1) * s))
	}
	return v
}

func (r *rig) weight(rows, cols int, s float32) (*weight, []float32) {
	v := r.rnd(rows*cols, s)
	raw := make([]byte, 4*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint32(raw[4*i:], math.Float32bits(x))
	}
	shape := []int{rows, cols}
	if rows == 1 {
		shape = []int{cols}
	}
	w, err := r.b.Upload("w", safetensors.F32, shape, raw)
	if err != nil {
		r.t.Fatal(err)
	}
	return w.(*weight), v
}

func (r *rig) buffer(rows, cols int) *Buffer {
	x, err := r.b.NewBuffer(rows, cols)
	if err != nil {
		r.t.Fatal(err)
	}
	return x.(*Buffer)
}

// fill uploads v (bf16-rounded) into the first rows of x.
func (r *rig) fill(x *Buffer, v []float32) {
	h := make([]uint16, len(v))
	f32ToBF16(h, v)
	if err := copyHtoD(r.b, x, h); err != nil {
		r.t.Fatal(err)
	}
}

// poison fills a buffer with NaN so unwritten outputs show.
func (r *rig) poison(x *Buffer) {
	h := make([]uint16, x.rows*x.cols)
	for i := range h {
		h[i] = 0x7fc0
	}
	if err := copyHtoD(r.b, x, h); err != nil {
		r.t.Fatal(err)
	}
}

func (r *rig) read(x *Buffer, rows int) []float32 {
	out := make([]float32, rows*x.cols)
	if err := r.b.Read(x, rows, out); err != nil {
		r.t.Fatal(err)
	}
	return out
}

// compare checks got against want (float64) by norm-wise relative error.
func (r *rig) compare(name string, got []float32, want []float64, tol float64) {
	r.t.Helper()
	var d, n float64
	for i := range want {
		g := float64(got[i])
		if math.IsNaN(g) || math.IsInf(g, 0) {
			r.t.Errorf("%s: element %d is %v (unwritten or overflow)", name, i, g)
			return
		}
		d += (g - want[i]) * (g - want[i])
		n += want[i] * want[i]
	}
	rel := math.Sqrt(d / n)
	if n == 0 {
		rel = math.Sqrt(d)
	}
	r.worst = max(r.worst, rel)
	if !(rel <= tol) {
		r.t.Errorf("%s: relative error %.3g > %.1g", name, rel, tol)
	} else {
		r.t.Logf("%s: rel %.3g", name, rel)
	}
}

// oneSeq is a step of T rows of one fresh sequence on pages 0..
func oneSeq(T, bs int, tokens []int32) *engine.StepMeta {
	m := &engine.StepMeta{Tokens: tokens}
	var blocks []int32
	for i := 0; i < (T+bs-1)/bs; i++ {
		blocks = append(blocks, int32(i))
	}
	for i := 0; i < T; i++ {
		m.Positions = append(m.Positions, int32(i))
		m.KVSlots = append(m.KVSlots, blocks[i/bs]*int32(bs)+int32(i%bs))
		m.LogitRows = append(m.LogitRows, int32(i))
	}
	m.Seqs = []engine.SeqMeta{{Start: 0, Len: T, Context: T, Blocks: blocks}}
	return m
}

func (r *rig) begin(m *engine.StepMeta) {
	r.t.Helper()
	if err := r.b.Begin(m); err != nil {
		r.t.Fatal(err)
	}
}

func (r *rig) end() {
	r.t.Helper()
	if err := r.b.End(); err != nil {
		r.t.Fatal(err)
	}
}

func zeros(T int) []int32 { return make([]int32, T) }

func TestOpEmbed(t *testing.T) {
	for _, sh := range [][3]int{{5, 37, 72}, {33, 512, 128}, {1, 3, 4097}} {
		T, V, H := sh[0], sh[1], sh[2]
		r := newRig(t, testConfig(64, 128, 4, 2, 16, V, 1), T, engine.KVSpec{Layers: 1, Blocks: 4, BlockSize: 16, KVHeads: 2, HeadDim: 16})
		table, tv := r.weight(V, H, 1)
		toks := make([]int32, T)
		for i := range toks {
			toks[i] = int32(r.rng.IntN(V))
		}
		out := r.buffer(T, H)
		r.poison(out)
		r.begin(oneSeq(T, 16, toks))
		r.b.Embed(out, table)
		got := r.read(out, T)
		r.end()
		want := make([]float64, T*H)
		for i, id := range toks {
			for j := 0; j < H; j++ {
				want[i*H+j] = float64(tv[int(id)*H+j])
			}
		}
		r.compare("embed", got, want, 0)
	}
}

// TestOpAddRMSNorm: add_rmsnorm, and add_rmsnorm_cl (a cluster of blocks a
// row: add and norm together, widths a multiple of 16 up to 8,192, on sm_90
// and later) where kernelForce.addCl sends them.
func TestOpAddRMSNorm(t *testing.T) {
	for _, sh := range [][3]int{{1, 64, 0}, {7, 172, 0}, {33, 4104, 0}, {1, 4096, 1}, {5, 2064, 1}, {16, 8192, 1}, {7, 176, 1}, {3, 4096, -1}} {
		T, H, cl := sh[0], sh[1], sh[2]
		for mode := 0; mode < 3; mode++ { // 0: add+norm, 1: add only, 2: norm only
			r := newRig(t, testConfig(64, 128, 4, 2, 16, 32, 1), T, engine.KVSpec{Layers: 1, Blocks: 4, BlockSize: 16, KVHeads: 2, HeadDim: 16})
			r.b.force.addCl = cl
			if mode == 0 && cl > 0 && !r.b.addClFits(H, false) && r.b.ctx.Device().Major >= 9 {
				t.Fatalf("add_rmsnorm_cl does not take %d columns", H)
			}
			w, wv := r.weight(1, H, 2)
			xv, dv := r.rnd(T*H, 3), r.rnd(T*H, 1)
			x, d, out := r.buffer(T, H), r.buffer(T, H), r.buffer(T, H)
			r.fill(x, xv)
			r.fill(d, dv)
			r.poison(out)
			r.begin(oneSeq(T, 16, zeros(T)))
			var db, ob *Buffer
			if mode != 2 {
				db = d
			}
			if mode != 1 {
				ob = out
			}
			var dbI, obI engine.Buffer
			if db != nil {
				dbI = db
			}
			if ob != nil {
				obI = ob
			}
			r.b.AddRMSNorm(x, dbI, obI, w, 1e-5)
			gx := r.read(x, T)
			var gout []float32
			if ob != nil {
				gout = r.read(out, T)
			}
			r.end()
			wantX := make([]float64, T*H)
			wantO := make([]float64, T*H)
			for i := 0; i < T; i++ {
				var ss float64
				for j := 0; j < H; j++ {
					v := xv[i*H+j]
					if db != nil {
						v = fromBF16(safetensors.Float32ToBF16(v + dv[i*H+j]))
					}
					wantX[i*H+j] = float64(v)
					ss += float64(v) * float64(v)
				}
				inv := 1 / math.Sqrt(ss/float64(H)+1e-5)
				for j := 0; j < H; j++ {
					wantO[i*H+j] = float64(wv[j]) * wantX[i*H+j] * inv
				}
			}
			name := fmt.Sprintf("T=%d H=%d addCl %d mode %d", T, H, cl, mode)
			r.compare(name+" x", gx, wantX, 1e-3)
			if ob != nil {
				r.compare(name+" out", gout, wantO, opTol)
			}
		}
	}
}

func TestOpLinear(t *testing.T) {
	for _, sh := range [][3]int{{1, 64, 64}, {5, 77, 172}, {33, 352, 128}, {17, 512, 128}, {3, 1000, 333}} {
		T, N, K := sh[0], sh[1], sh[2]
		r := newRig(t, testConfig(64, 128, 4, 2, 16, 32, 1), T, engine.KVSpec{Layers: 1, Blocks: 4, BlockSize: 16, KVHeads: 2, HeadDim: 16})
		w, wv := r.weight(N, K, 0.5)
		xv := r.rnd(T*K, 1)
		x, out := r.buffer(T, K), r.buffer(T, N)
		r.fill(x, xv)
		r.poison(out)
		r.begin(oneSeq(T, 16, zeros(T)))
		r.b.Linear(out, x, w)
		got := r.read(out, T)
		r.end()
		want := make([]float64, T*N)
		for i := 0; i < T; i++ {
			for j := 0; j < N; j++ {
				var s float64
				for k := 0; k < K; k++ {
					s += float64(xv[i*K+k]) * float64(wv[j*K+k])
				}
				want[i*N+j] = s
			}
		}
		r.compare("linear", got, want, opTol)
	}
}

func TestOpSiLUMul(t *testing.T) {
	for _, sh := range [][2]int{{1, 64}, {7, 173}, {40, 1000}} {
		T, C := sh[0], sh[1]
		r := newRig(t, testConfig(64, 128, 4, 2, 16, 32, 1), T, engine.KVSpec{Layers: 1, Blocks: 4, BlockSize: 16, KVHeads: 2, HeadDim: 16})
		gv, uv := r.rnd(T*C, 6), r.rnd(T*C, 2)
		g, u := r.buffer(T, C), r.buffer(T, C)
		r.fill(g, gv)
		r.fill(u, uv)
		r.begin(oneSeq(T, 16, zeros(T)))
		r.b.SiLUMul(g, g, u) // in place, as the engine does
		got := r.read(g, T)
		r.end()
		want := make([]float64, T*C)
		for i := range want {
			x := float64(gv[i])
			want[i] = x / (1 + math.Exp(-x)) * float64(uv[i])
		}
		r.compare("silu_mul", got, want, opTol)
	}
}

// TestOpRoPE: rope_store_rows takes head_dim 64, 128 and 256 (aligned
// rows), rope_store the others, and those three again (kernelForce.ropeHeads).
func TestOpRoPE(t *testing.T) {
	for _, sh := range [][4]int{{4, 2, 32, 0}, {8, 4, 8, 0}, {2, 1, 128, 0}, {2, 1, 128, 1}, {4, 2, 64, 0}, {4, 2, 64, 1}, {2, 2, 256, 0}, {2, 2, 256, 1}} {
		heads, kvh, hd := sh[0], sh[1], sh[2]
		T := 9
		cfg := testConfig(heads*hd, 128, heads, kvh, hd, 32, 1)
		r := newRig(t, cfg, T, engine.KVSpec{Layers: 1, Blocks: 4, BlockSize: 16, KVHeads: kvh, HeadDim: hd})
		r.b.force.ropeHeads = sh[3] == 1
		qv, kv := r.rnd(T*heads*hd, 2), r.rnd(T*kvh*hd, 2)
		q, k := r.buffer(T, heads*hd), r.buffer(T, kvh*hd)
		r.fill(q, qv)
		r.fill(k, kv)
		m := oneSeq(T, 16, zeros(T))
		for i := range m.Positions {
			m.Positions[i] = int32(r.rng.IntN(120000))
		}
		inv := cfg.InvFreq()
		r.begin(m)
		r.b.RoPE(q, k, inv, heads, kvh, hd)
		gq, gk := r.read(q, T), r.read(k, T)
		r.end()
		rot := func(v []float32, nh int) []float64 {
			out := make([]float64, len(v))
			half := hd / 2
			for i := 0; i < T; i++ {
				for h := 0; h < nh; h++ {
					base := i*nh*hd + h*hd
					for j := 0; j < half; j++ {
						ang := float64(float32(m.Positions[i]) * inv[j])
						c, s := math.Cos(ang), math.Sin(ang)
						x1, x2 := float64(v[base+j]), float64(v[base+j+half])
						out[base+j] = x1*c - x2*s
						out[base+j+half] = x2*c + x1*s
					}
				}
			}
			return out
		}
		r.compare("rope q", gq, rot(qv, heads), opTol)
		r.compare("rope k", gk, rot(kv, kvh), opTol)
	}
}

// attnRef keeps each sequence's K and V rows for the reference.
type attnSeq struct {
	blocks []int32
	k, v   [][]float32 // per position: [kvh*hd]
}

func TestOpAttention(t *testing.T) {
	for _, sh := range [][4]int{{4, 2, 32, 16}, {4, 2, 32, 1}, {8, 4, 8, 5}, {2, 2, 128, 16}, {4, 1, 64, 3}} {
		heads, kvh, hd, bs := sh[0], sh[1], sh[2], sh[3]
		cfg := testConfig(heads*hd, 128, heads, kvh, hd, 32, 2)
		blocks := 512 / bs
		maxT := 64
		r := newRig(t, cfg, maxT, engine.KVSpec{Layers: 2, Blocks: blocks, BlockSize: bs, KVHeads: kvh, HeadDim: hd})
		// Pages come from a shuffled free list, so page tables are not contiguous.
		free := r.rng.Perm(blocks)
		seqs := make([]*attnSeq, 3)
		for i := range seqs {
			seqs[i] = &attnSeq{}
		}
		width := kvh * hd
		scale := float32(1 / math.Sqrt(float64(hd)))
		// Step 1: three prefills (13, 20, 9 rows); step 2: decode 1, prefill chunk 6, decode 1; step 3: decode each.
		for step, lens := range [][]int{{13, 20, 9}, {1, 6, 1}, {1, 1, 1}} {
			m := &engine.StepMeta{}
			for si, n := range lens {
				s := seqs[si]
				ctx0 := len(s.k)
				for len(s.blocks)*bs < ctx0+n {
					s.blocks = append(s.blocks, int32(free[0]))
					free = free[1:]
				}
				m.Seqs = append(m.Seqs, engine.SeqMeta{Start: len(m.Tokens), Len: n, Context: ctx0 + n, Blocks: s.blocks})
				for j := 0; j < n; j++ {
					p := ctx0 + j
					m.Tokens = append(m.Tokens, 0)
					m.Positions = append(m.Positions, int32(p))
					m.KVSlots = append(m.KVSlots, s.blocks[p/bs]*int32(bs)+int32(p%bs))
				}
			}
			T := len(m.Tokens)
			qv, kv, vv := r.rnd(T*heads*hd, 2), r.rnd(T*width, 2), r.rnd(T*width, 2)
			q, k, v, out := r.buffer(T, heads*hd), r.buffer(T, width), r.buffer(T, width), r.buffer(T, heads*hd)
			r.fill(q, qv)
			r.fill(k, kv)
			r.fill(v, vv)
			r.poison(out)
			r.begin(m)
			r.b.Attention(out, q, k, v, 1, scale, nil)
			got := r.read(out, T)
			r.end()
			// reference
			keys, values := make([][][]float32, len(m.Seqs)), make([][][]float32, len(m.Seqs))
			for si, sm := range m.Seqs {
				s := seqs[si]
				for j := 0; j < sm.Len; j++ {
					row := sm.Start + j
					s.k = append(s.k, kv[row*width:(row+1)*width])
					s.v = append(s.v, vv[row*width:(row+1)*width])
				}
				keys[si], values[si] = s.k, s.v
			}
			want := refAttention(m, keys, values, qv, heads, kvh, hd, scale)
			r.compare("attention step "+string(rune('1'+step)), got, want, opTol)
		}
	}
}

func TestOpLoRA(t *testing.T) {
	cfg := testConfig(64, 136, 4, 2, 16, 32, 2)
	T := 12
	r := newRig(t, cfg, T, engine.KVSpec{Layers: 2, Blocks: 4, BlockSize: 16, KVHeads: 2, HeadDim: 16})
	mk := func(rank int, scale float32, mods ...llama.Module) *lora.Adapter {
		a := &lora.Adapter{Name: "r", Layers: make([][llama.NumModules]*lora.Pair, cfg.Layers)}
		for l := range a.Layers {
			for _, m := range mods {
				in, out := cfg.Dims(m)
				a.Layers[l][m] = &lora.Pair{Rank: rank, Scale: scale, A: r.rnd(rank*in, 0.5), B: r.rnd(out*rank, 0.5)}
			}
		}
		return a
	}
	ads := map[int]*lora.Adapter{0: mk(8, 2, llama.Q, llama.V), 1: mk(16, 0.5, llama.Q, llama.Down), 3: mk(5, 1.25, llama.Q, llama.Down), 4: mk(64, 1, llama.Down)}
	for s, a := range ads {
		if err := r.b.LoadAdapter(s, a); err != nil {
			t.Fatal(err)
		}
	}
	// replace slot 4 by a different adapter (rank 3) to check reloading
	ads[4] = mk(3, 4, llama.Q, llama.Down)
	if err := r.b.LoadAdapter(4, ads[4]); err != nil {
		t.Fatal(err)
	}
	segs := []engine.Segment{{Start: 0, End: 3, Slot: 1}, {Start: 4, End: 9, Slot: 0}, {Start: 9, End: 10, Slot: 3}, {Start: 10, End: 12, Slot: 4}}
	// aside: the update runs on the LoRA stream into the delta buffer (as
	// after a Linear of x) and Read adds it (add_delta)
	for _, c := range []struct {
		layer int
		mod   llama.Module
		aside bool
	}{{0, llama.Q, false}, {0, llama.Down, false}, {1, llama.Q, false}, {1, llama.Down, false}, {0, llama.Q, true}, {1, llama.Down, true}} {
		layer, mod := c.layer, c.mod
		{
			in, outF := cfg.Dims(mod)
			xv, ov := r.rnd(T*in, 1), r.rnd(T*outF, 1)
			x, out := r.buffer(T, in), r.buffer(T, outF)
			r.fill(x, xv)
			r.fill(out, ov)
			m := oneSeq(T, 16, zeros(T))
			m.LoRA = segs
			r.begin(m)
			if c.aside {
				r.b.forkAt(x)
				if r.b.la.forkIn == 0 {
					t.Fatal("the LoRA stream does not take the update")
				}
			}
			r.b.LoRA(out, x, layer, []llama.Module{mod})
			if c.aside && r.b.la.pend.delta == 0 {
				t.Fatal("the update is not pending on the LoRA stream")
			}
			got := r.read(out, T)
			r.end()
			want := make([]float64, T*outF)
			for i := range want {
				want[i] = float64(ov[i])
			}
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
						var s float64
						for k := range tmp {
							s += tmp[k] * float64(fromBF16(safetensors.Float32ToBF16(p.B[j*p.Rank+k])))
						}
						want[row*outF+j] += s
					}
				}
			}
			// rows outside segments (row 3) and rows whose adapter skips the module must be untouched
			for j := 0; j < outF; j++ {
				if got[3*outF+j] != ov[3*outF+j] {
					t.Fatalf("row 3 (no adapter) changed at %d: %v -> %v", j, ov[3*outF+j], got[3*outF+j])
				}
			}
			r.compare(fmt.Sprintf("lora %s aside=%v", mod, c.aside), got, want, opTol)
		}
	}
	if err := r.b.UnloadAdapter(1); err != nil {
		t.Fatal(err)
	}
	m := oneSeq(T, 16, zeros(T))
	m.LoRA = segs
	if err := r.b.Begin(m); err == nil {
		t.Error("Begin accepted a segment of an unloaded slot")
	}
}

func TestOpLogits(t *testing.T) {
	for _, sh := range [][3]int{{7, 64, 77}, {20, 128, 512}, {3, 288, 1001}} {
		T, H, V := sh[0], sh[1], sh[2]
		// hidden 64 in the config: Logits must size its scratch from x, not the config
		r := newRig(t, testConfig(64, 128, 4, 2, 16, V, 1), T, engine.KVSpec{Layers: 1, Blocks: 4, BlockSize: 16, KVHeads: 2, HeadDim: 16})
		norm, nv := r.weight(1, H, 2)
		head, hv := r.weight(V, H, 0.5)
		xv := r.rnd(T*H, 3)
		x, out := r.buffer(T, H), r.buffer(T, V)
		r.fill(x, xv)
		m := oneSeq(T, 16, zeros(T))
		m.LogitRows = []int32{int32(T - 1), 0, int32(T / 2)}
		r.begin(m)
		r.b.Logits(out, x, norm, head, 1e-5)
		got := r.read(out, 3)
		r.end()
		want := make([]float64, 3*V)
		for i, row := range m.LogitRows {
			var ss float64
			for j := 0; j < H; j++ {
				ss += float64(xv[int(row)*H+j]) * float64(xv[int(row)*H+j])
			}
			inv := float32(1 / math.Sqrt(ss/float64(H)+1e-5))
			nr := make([]float64, H)
			for j := range nr {
				nr[j] = float64(fromBF16(safetensors.Float32ToBF16(nv[j] * (xv[int(row)*H+j] * inv))))
			}
			for v := 0; v < V; v++ {
				var s float64
				for j := 0; j < H; j++ {
					s += nr[j] * float64(hv[v*H+j])
				}
				want[i*V+v] = s
			}
		}
		r.compare("logits", got, want, opTol)
	}
}

func TestKernelCache(t *testing.T) {
	dir := t.TempDir()
	b1, err := New(Options{Kernels: kernels.Options{CacheDir: dir}})
	if err != nil {
		t.Fatal(err)
	}
	info1, dev := b1.KernelInfo, b1.Device()
	b1.Close()
	n := kernels.Compiles()
	b2, err := New(Options{Kernels: kernels.Options{CacheDir: dir}})
	if err != nil {
		t.Fatal(err)
	}
	info2 := b2.KernelInfo
	b2.Close()
	if !info1.Compiled || info2.Compiled || kernels.Compiles() != n {
		t.Errorf("cold start compiled=%v, warm start compiled=%v (compiles %d -> %d)", info1.Compiled, info2.Compiled, n, kernels.Compiles())
	}
	t.Logf("cold: compiled in %v into %s; warm: from cache; device %v", info1.CompileTime, info1.CachePath, dev)
	if info1.Log != "" {
		t.Logf("NVRTC log: %s", info1.Log)
	}
}

// refAttention is causal attention in float64 over step m: row j of
// sequence si (query qv, heads x hd values a row) attends keys[si][p] and
// values[si][p] (kvh x hd values) for every position p up to its own, each
// query head its group's KV head.
func refAttention(m *engine.StepMeta, keys, values [][][]float32, qv []float32, heads, kvh, hd int, scale float32) []float64 {
	want := make([]float64, len(m.Tokens)*heads*hd)
	for si, sm := range m.Seqs {
		for j := 0; j < sm.Len; j++ {
			row := sm.Start + j
			ctx := sm.Context - sm.Len + j + 1
			for h := 0; h < heads; h++ {
				off := (h / (heads / kvh)) * hd
				sc := make([]float64, ctx)
				mx := math.Inf(-1)
				for p := 0; p < ctx; p++ {
					var d float64
					for e := 0; e < hd; e++ {
						d += float64(qv[row*heads*hd+h*hd+e]) * float64(keys[si][p][off+e])
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
						o += sc[p] * float64(values[si][p][off+e])
					}
					want[row*heads*hd+h*hd+e] = o / sum
				}
			}
		}
	}
	return want
}

// TestShippedKernels: cubins built ahead of time (kernels.Build, what
// `peftd kernels` runs) into a folder named in ShippedDirs load from there
// into a backend whose own cache is empty: nothing is compiled at start.
func TestShippedKernels(t *testing.T) {
	shipped, cache := t.TempDir(), t.TempDir()
	b0, err := New(Options{Kernels: kernels.Options{CacheDir: cache}})
	if err != nil {
		t.Fatal(err)
	}
	dev := b0.Device()
	arch := dev.Arch()
	b0.Close()
	wf := "" // fp8.cu loads too where the GPU can run it
	if dev.Major*10+dev.Minor >= 89 {
		wf = WeightsFP8
	}
	for _, m := range kernels.Modules { // the FP8 module's wgmma build too, on sm_90a (FP8 weights load it)
		if !m.For(arch, dev.Major*10+dev.Minor) {
			continue
		}
		o := kernels.Options{CacheDir: shipped, ShippedDirs: []string{}, Extra: m.Extra}
		info, err := kernels.Build(m.Name, arch, o)
		if err != nil {
			t.Fatalf("Build(%s, %s): %v", m.Label(), arch, err)
		}
		if !info.Compiled || !strings.HasPrefix(info.CachePath, shipped) {
			t.Errorf("Build(%s) into an empty folder: compiled=%v path %s", m.Label(), info.Compiled, info.CachePath)
		}
		again, err := kernels.Build(m.Name, arch, o)
		if err != nil || again.Compiled {
			t.Errorf("Build(%s) again: compiled=%v, %v (want: already there)", m.Label(), again.Compiled, err)
		}
	}
	empty := t.TempDir()
	b, err := New(Options{Kernels: kernels.Options{CacheDir: empty, ShippedDirs: []string{shipped}}, WeightFormat: wf})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if b.KernelInfo.Compiled || !strings.HasPrefix(b.KernelInfo.CachePath, shipped) {
		t.Errorf("llama.cu: compiled=%v from %s, want the shipped cubin", b.KernelInfo.Compiled, b.KernelInfo.CachePath)
	}
	if b.f8 != nil && (b.f8.Info.Compiled || !strings.HasPrefix(b.f8.Info.CachePath, shipped)) {
		t.Errorf("fp8.cu: compiled=%v from %s, want the shipped cubin", b.f8.Info.Compiled, b.f8.Info.CachePath)
	}
	if ents, _ := os.ReadDir(empty); len(ents) != 0 {
		t.Errorf("the backend's own cache got %d files: it compiled something", len(ents))
	}
}
