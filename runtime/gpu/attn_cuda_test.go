//go:build cuda

package gpu

import (
	"fmt"
	"math"
	"os"
	"slices"
	"testing"

	fx "github.com/peftd/peftd/internal/fixture"
	"github.com/peftd/peftd/kernels"
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
	// head_dim 48 and 8: no attn_decode variant, the per-row kernel takes every row
	// 16 query heads per KV head: no attn_decode (<= 8), attn_prefill takes every row
	for _, sh := range []attnShape{{32, 8, 128, 1}, {32, 8, 128, 5}, {32, 8, 128, 16}, {4, 2, 64, 5}, {8, 8, 32, 16}, {8, 1, 32, 1}, {16, 2, 256, 16}, {4, 2, 48, 16}, {8, 4, 8, 1}, {16, 1, 64, 16}} {
		t.Run(sh.String(), func(t *testing.T) { attentionCase(t, sh, false) })
	}
}

// TestOpAttentionFP8Keys: the same with an FP8 key cache (Options.KVFormat
// fp8): rope_store stores the step's keys as e4m3 with a scale per token and
// KV head, exactly as quantKey does; attn_decode8, attn_prefill8 (the
// per-row kernel at head_dim 256) and the per-row kernel attend over the
// dequantized keys, which the reference uses.
func TestOpAttentionFP8Keys(t *testing.T) {
	for _, sh := range []attnShape{{32, 8, 128, 16}, {32, 8, 128, 1}, {4, 2, 64, 5}, {16, 2, 256, 16}, {8, 8, 32, 16}} {
		t.Run(sh.String(), func(t *testing.T) { attentionCase(t, sh, true) })
	}
}

type attnShape struct{ heads, kvh, hd, bs int }

func (sh attnShape) String() string {
	return fmt.Sprintf("h%d_kv%d_d%d_bs%d", sh.heads, sh.kvh, sh.hd, sh.bs)
}

// quantKey is a key row of kvh heads of hd values as an FP8 key cache
// holds it: per head, scale = amax / 448 (1 for a zero head) and e4m3
// values of v / scale (rope_store's rounding: v times 448 / amax).
func quantKey(v []float32, kvh, hd int) (q []byte, scales []float32) {
	q = make([]byte, len(v))
	for h := range kvh {
		amax := float32(0)
		for _, x := range v[h*hd : (h+1)*hd] {
			amax = max(amax, float32(math.Abs(float64(x))))
		}
		sc, inv := float32(1), float32(0)
		if amax > 0 {
			sc, inv = amax/448, 448/amax
		}
		for i, x := range v[h*hd : (h+1)*hd] {
			q[h*hd+i] = safetensors.Float32ToE4M3(x * inv)
		}
		scales = append(scales, sc)
	}
	return q, scales
}

// attentionCase is one shape of TestOpAttentionDecode (k8: of
// TestOpAttentionFP8Keys).
func attentionCase(t *testing.T, sh attnShape, k8 bool) {
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
	var bo Options
	if k8 {
		bo.KVFormat = KVFP8
	}
	r := newRigWith(t, cfg, 256, engine.KVSpec{Layers: 2, Blocks: blocks, BlockSize: bs, KVHeads: kvh, HeadDim: hd}, bo)
	if r.b.kv8 != k8 {
		t.Fatalf("FP8 key cache %v, want %v", r.b.kv8, k8)
	}
	width := kvh * hd
	free := r.rng.Perm(blocks)
	type seq struct {
		cached, rows int
		blocks       []int32
		k, v         [][]float32 // with FP8 keys, k holds the dequantized keys
	}
	// Order in the step: decode, prefill, decode, decode, prefill, decode.
	var seqs []*seq
	for i, c := range ctxs {
		seqs = append(seqs, &seq{cached: c - 1, rows: 1})
		if i < len(pre) {
			seqs = append(seqs, &seq{cached: pre[i][0], rows: pre[i][1]})
		}
	}
	// the cache images; unused slots hold large values, so a stray read shows
	kImg, k8Img, sImg, vImg := make([]uint16, blocks*bs*width), make([]byte, blocks*bs*width), make([]float32, blocks*bs*kvh), make([]uint16, blocks*bs*width)
	for i := range kImg {
		kImg[i], k8Img[i], vImg[i] = safetensors.Float32ToBF16(50), safetensors.Float32ToE4M3(300), safetensors.Float32ToBF16(-50)
	}
	for i := range sImg {
		sImg[i] = 1
	}
	deq := func(q []byte, sc []float32) []float32 {
		out := make([]float32, len(q))
		for i, b := range q {
			out[i] = safetensors.E4M3ToFloat32(b) * sc[i/hd]
		}
		return out
	}
	for _, s := range seqs {
		n := s.cached + s.rows
		for len(s.blocks)*bs < n {
			s.blocks = append(s.blocks, int32(free[0]))
			free = free[1:]
		}
		for p := 0; p < s.cached; p++ {
			kv, vv := r.rnd(width, 2), r.rnd(width, 2)
			slot := int(s.blocks[p/bs])*bs + p%bs
			if k8 {
				q8, sc := quantKey(kv, kvh, hd)
				copy(k8Img[slot*width:], q8)
				for h, v := range sc {
					sImg[kscaleAt(slot, kvh, h, bs)] = v
				}
				kv = deq(q8, sc)
			} else {
				f32ToBF16(kImg[slot*width:(slot+1)*width], kv)
			}
			s.k, s.v = append(s.k, kv), append(s.v, vv)
			f32ToBF16(vImg[slot*width:(slot+1)*width], vv)
		}
	}
	kc, vc, ksc := r.b.layerCache(layer)
	errs := []error{cuda.CopyHtoD(r.b.s, vc, vImg)}
	if k8 {
		errs = append(errs, cuda.CopyHtoD(r.b.s, kc, k8Img), cuda.CopyHtoD(r.b.s, ksc, sImg))
	} else {
		errs = append(errs, cuda.CopyHtoD(r.b.s, kc, kImg))
	}
	for _, e := range errs {
		if e != nil {
			t.Fatal(e)
		}
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
	// with FP8 keys, the step's keys as rope_store stores them: bf16 (the buffer), then e4m3
	wantQ, wantS := make([][]byte, T), make([][]float32, T)
	for si, s := range seqs {
		st := m.Seqs[si].Start
		for j := 0; j < s.rows; j++ {
			key := kv[(st+j)*width : (st+j+1)*width]
			if k8 {
				kb := make([]uint16, width)
				f32ToBF16(kb, key)
				kr := make([]float32, width)
				for i, b := range kb {
					kr[i] = fromBF16(b)
				}
				wantQ[st+j], wantS[st+j] = quantKey(kr, kvh, hd)
				key = deq(wantQ[st+j], wantS[st+j])
			}
			s.k = append(s.k, key)
			s.v = append(s.v, vv[(st+j)*width:(st+j+1)*width])
		}
	}
	scale := float32(1 / math.Sqrt(float64(hd)))
	keys, values := make([][][]float32, len(seqs)), make([][][]float32, len(seqs))
	for si, s := range seqs {
		keys[si], values[si] = s.k, s.v
	}
	want := refAttention(m, keys, values, qv, heads, kvh, hd, scale)
	// sm_89 and later (attnQK8): attn_decode8 quantizes each
	// decode row's q per head, as the keys are per token, and multiplies on
	// the FP8 tensor cores; what it writes is compared with a reference of
	// that q (the prefill rows' kernel keeps bf16 q)
	wantDec := want
	if dev := r.b.ctx.Device(); k8 && hd >= 64 && attnQK8(dev.Major, dev.Minor) {
		qq := slices.Clone(qv)
		for si, s := range seqs {
			if s.rows != 1 {
				continue
			}
			row := qq[m.Seqs[si].Start*heads*hd : (m.Seqs[si].Start+1)*heads*hd]
			qb := make([]uint16, len(row))
			f32ToBF16(qb, row)
			for i, b := range qb {
				row[i] = fromBF16(b) // the kernel reads the bf16 q
			}
			q8, sc := quantKey(row, heads, hd)
			copy(row, deq(q8, sc))
		}
		wantDec = refAttention(m, keys, values, qq, heads, kvh, hd, scale)
		t.Logf("e4m3 Q K^T: decode rows compared with q quantized per head")
	}
	q, k, v, out := r.buffer(T, heads*hd), r.buffer(T, width), r.buffer(T, width), r.buffer(T, heads*hd)
	r.fill(q, qv)
	r.fill(k, kv)
	r.fill(v, vv)
	// The split path twice: its merge counters must be back at zero. First
	// with no opts (kernelForce.decOpts -1), the second time with opts 3
	// (the first tiles before griddepcontrol.wait, the 16-wide merge), which
	// must give the same bits. A third time with the splits as thread-block
	// clusters (opts 7, the default; on sm_90 and later): fewer splits, so
	// the sums differ in their last bits. A fourth time with 2 warps a block
	// (attn_decode2, attn_decode8_w2: kernelForce.decVar), a fifth with 8
	// (attn_decode_w8, attn_decode8_w8, where it fits the head dimension),
	// a sixth with 4 (attn_decode, attn_decode8) and a seventh with the
	// blocks head-major (opts 23), which must give opts 7's bits, and an
	// eighth with the decode blocks beside attn_prefill (opts 39, bit 5:
	// no wait before their tiles; bf16 keys), the same bits again.
	var first, seven []float32
	for i, run := range []struct {
		v0   bool
		opts int
		dv   int // 1 + a decVariant
	}{{false, -1, 0}, {false, 3, 0}, {false, 7, 0}, {false, 0, 1 + int(decV2)}, {false, 0, 1 + int(decV8)}, {false, 0, 1 + int(decV4)}, {false, 23, 0}, {false, 39, 0}, {true, 0, 0}} {
		v0 := run.v0
		r.b.force.attnRows, r.b.force.decOpts, r.b.force.decVar = v0, run.opts, run.dv
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
		if k8 {
			name += ", FP8 keys"
		}
		switch i {
		case 0:
			first = got
		case 1:
			name += ", again with decOpts 3"
			for j := range got {
				if math.Float32bits(got[j]) != math.Float32bits(first[j]) {
					t.Fatalf("attn_decode with decOpts 3: value %d is %g, %g without", j, got[j], first[j])
				}
			}
		case 2:
			name += fmt.Sprintf(", decOpts 7 (clusters: %v, split %d)", r.b.decCluster(), r.b.decSplit)
			seven = got
		case 6, 7: // the blocks head-major (opts bit 4), or late (bit 5): the same sums as opts 7
			name += fmt.Sprintf(", decOpts %d", run.opts)
			for j := range got {
				if math.Float32bits(got[j]) != math.Float32bits(seven[j]) {
					t.Fatalf("attn_decode with decOpts %d: value %d is %g, %g with 7", run.opts, j, got[j], seven[j])
				}
			}
		case 3, 4, 5:
			name += fmt.Sprintf(", %d warps a block and %d stages (%d resident, split %d)", r.b.decV.warps(), decStages(hd), r.b.decResident[r.b.decV], r.b.decSplit)
		}
		if v0 {
			name = "per-row kernel (v0), all rows"
		}
		if v0 {
			r.compare(name, got, want, opTol)
		} else {
			r.compare(name, got, wantDec, opTol)
		}
	}
	r.b.force.attnRows, r.b.force.decOpts, r.b.force.decVar = false, 0, 0
	if k8 { // what rope_store stored for the step's keys
		gotQ, gotS := make([]byte, len(k8Img)), make([]float32, len(sImg))
		for _, e := range []error{cuda.CopyDtoH(r.b.s, gotQ, kc), cuda.CopyDtoH(r.b.s, gotS, ksc), r.b.s.Synchronize()} {
			if e != nil {
				t.Fatal(e)
			}
		}
		bad := 0
		for row := range T {
			slot := int(m.KVSlots[row])
			for h := range kvh {
				if gotS[kscaleAt(slot, kvh, h, bs)] != wantS[row][h] {
					bad++
				}
			}
			for i, b := range wantQ[row] {
				if gotQ[slot*width+i] != b {
					bad++
				}
			}
		}
		if bad > 0 {
			t.Errorf("rope_store's FP8 keys: %d of %d bytes and scales differ from quantKey's", bad, T*(width+kvh))
		}
	}
	var fs []*cuda.Function
	if r.b.decOK {
		fs = append(fs, r.b.decodeKernel(hd, decV4), r.b.decodeKernel(hd, decV2))
		if r.b.decW8Fit[headIndex(hd)] {
			fs = append(fs, r.b.decodeKernel(hd, decV8))
		}
	}
	if r.b.preOK {
		fs = append(fs, r.b.prefillKernel(hd))
	}
	for _, f := range fs {
		regs, local, err := f.Resources()
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("%s: %d registers, %d bytes of local memory per thread", f.Name, regs, local)
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
			med := graphMedianUs(t, r.b.s, 5, 20, func(int) error {
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

// TestFP8KeysFixture runs the tiny fixture's cases co-batched and
// teacher-forced on an FP8 key cache (head_dim 32: attn_decode8_d32 for
// decode rows, attn_prefill8_d32 for prefill rows, graphs as usual) and on a bf16
// one. FP8 keys move the logits (e4m3 keeps 4 significant bits): the
// relative error against the reference is reported beside bf16's and
// bounded at 0.1 per case (the FP8 weight scheme itself moves the tiny
// model's logits by 0.10); greedy choices are counted, not required.
func TestFP8KeysFixture(t *testing.T) {
	m, adapters, cases := loadFixture(t)
	V := m.Config.VocabSize
	for _, kvf := range []string{KVBF16, KVFP8} {
		opts := engine.DefaultOptions()
		e := newEngineWith(t, m, opts, Options{KVFormat: kvf})
		slots := loadSlots(t, e, adapters, fx.AdapterNames, 0)
		worst, match, total := fixtureErrors(t, e, slots, cases, V)
		t.Logf("KV cache %s: worst case-level relative error %.3g, greedy %d/%d (maxrel=%.3g)", kvf, worst, match, total, worst)
		if !(worst <= 0.1) {
			t.Errorf("KV cache %s: relative error %.3g > 0.1", kvf, worst)
		}
	}
}

// attnQK8 reports whether attn_decode8 computes Q K^T on the FP8 tensor
// cores (m16n8k32 e4m3, sm_89 and later; DEC_QK8 in llama.cu) on a GPU of
// compute capability major.minor: not when PEFTD_KERNEL_DEFINES sets
// PEFTD_ATTN_NO_QK8 (the keys widened to bf16 everywhere).
func attnQK8(major, minor int) bool {
	return major*10+minor >= 89 && !kernels.Defined("PEFTD_ATTN_NO_QK8")
}
