package gpu

import (
	"fmt"

	"github.com/peftd/peftd/runtime/cuda"
	"github.com/peftd/peftd/runtime/engine"
)

// The q/k/v product and rope_store_rows' work in one launch
// (gemm_ws_rope_n*, kernels/llama.cu; fp8_ws_rope_n*, kernels/fp8.cu): in
// a base step whose q/k/v product a ws kernel takes (FP8 9-64 rows, bf16
// where gemm_ws does), each block streams the weight rows of BN / 2
// rotation pairs (columns i and i + hd / 2 of a head: ws_rope_row), so
// that a thread holds both columns of its pairs in registers; its end
// rounds them as the product stores them, rotates query and key heads at
// the row's position as rope_store_rows does, stores q and k in place and
// k and v in the layer's bf16 cache. rope_store_rows' launch (one of the
// four small kernels of a 16-row FP8 layer, PERFORMANCE v0.83-v0.84) and
// its read of the product go. No grid-wide barrier: every block's
// columns are its own. Off by default until measured (wsRoPEAuto); the
// FP8 key cache (its scales need a head's maximum) and steps with
// adapters keep the two kernels.

// wsRoPEAuto is whether LinearRoPE takes the products it fits by default.
// kernelForce.wsRoPE 1 / -1 turns it on / off (TestDecodeBench rows
// +wsrope / +nowsrope, the A/B; TestOpLinearRoPE checks it against Linear
// and Attention's rope_store_rows).
const wsRoPEAuto = false

// ropeFits reports whether plan p of a q/k/v product of N columns (heads
// of hd values) has a fused kernel: one split, the width's rope kernel
// loaded (not a half-row plan), N whole blocks, and hd a multiple of 4
// (each thread's two adjacent pairs in one head: bf16x2 stores).
func (g *wsProduct) ropeFits(p wsPlan, N, hd int) bool {
	return g != nil && p.split == 1 && !g.halfOn(p.i) && g.rfn[p.i] != nil && N%wsWidths[p.i] == 0 && hd > 0 && hd%4 == 0 && N%hd == 0
}

// wsRoPEArgs are a rope launch's own arguments (WsRope, common.cuh): the
// step's positions and KV slots, the inverse frequencies (0: no
// rotation), the layer's bf16 key and value caches, and the heads.
type wsRoPEArgs struct {
	pos, slots, invFreq, kc, vc uint64
	heads, kvHeads, headDim     int
}

// launchRoPE enqueues out [T, N] = x . w^T (times sx[t] sw[n] with e4m3
// operands) with plan p (ropeFits) on s, then RoPE of its query and key
// heads in place and its key and value heads stored at the rows' KV slots.
func (g *wsProduct) launchRoPE(s *cuda.Stream, p wsPlan, out, x, sx, w, sw cuda.DevicePtr, T, N, K int, r wsRoPEArgs) error {
	if err := g.check(p, out, x, w, T, N, K); err != nil {
		return err
	}
	if !g.ropeFits(p, N, r.headDim) || N != (r.heads+2*r.kvHeads)*r.headDim {
		return fmt.Errorf("gpu: ws plan %v has no q/k/v kernel with RoPE for %d columns of %d/%d/%d heads of %d", p, N, r.heads, r.kvHeads, r.kvHeads, r.headDim)
	}
	if r.pos == 0 || r.slots == 0 || r.kc == 0 || r.vc == 0 {
		return fmt.Errorf("gpu: ws product with RoPE: no positions, slots or cache")
	}
	bn := wsWidths[p.i]
	return g.rfn[p.i].Launch(s, cuda.Dim3{X: N / bn, Y: 1, Z: 1}, cuda.Dim3{X: 128, Y: 1, Z: 1}, wsShared(bn, g.esize),
		g.args(out, x, sx, w, sw, T, N, K, r.pos, r.slots, r.invFreq, r.kc, r.vc, r.heads, r.kvHeads, r.headDim)...)
}

// LinearRoPE is engine.LinearRoPEOps: qkv = in . w^T, then the rotation
// and KV store Attention begins with for layer (rope_store_rows'), as one
// gemm_ws_rope or fp8_ws_rope launch where the step has no adapter, the
// product would run on a ws kernel (wsAlone), the cache is bf16 and the
// plan has a fused kernel (ropeFits); Attention for that layer then only
// attends. False, having done nothing, otherwise (other rows, an FP8 key
// cache, a green-context partition, off by kernelForce.wsRoPE and
// wsRoPEAuto).
func (b *Backend) LinearRoPE(qkv, in engine.Buffer, w engine.Weight, layer int, invFreq []float32) bool {
	if !forcedOn(b.force.wsRoPE, wsRoPEAuto) || !b.ok() || b.kv8 || b.stepLoRA() || b.force.ropeHeads {
		return false
	}
	c := b.cfg
	heads, kvh, hd := c.Heads, b.kv.KVHeads, b.kv.HeadDim
	N, K := weightShape(w)
	o, x, T := buf(qkv), buf(in), b.rows()
	if N == 0 || x.cols != K || o.cols != N || N != (heads+2*kvh)*hd || !o.whole() || !x.whole() || layer < 0 || layer >= b.kv.Layers ||
		invFreq != nil && (len(invFreq) != hd/2 || 4*len(invFreq) > b.invFreq.Size()) {
		return false
	}
	ws, p, ok := b.wsAlone(w, x, T, N, K)
	if !ok || !ws.ropeFits(p, N, hd) {
		return false
	}
	_, fp8 := w.(*fp8Weight)
	if !b.wsFusedStart(x, T, K, fp8) {
		return true
	}
	b.wrote(qkv)
	b.fused.rope++
	kc, vc, _ := b.layerCache(layer)
	r := wsRoPEArgs{pos: b.i32(b.off.pos), slots: b.i32(b.off.kvSlots), invFreq: b.freqTable(invFreq), kc: kc, vc: vc, heads: heads, kvHeads: kvh, headDim: hd}
	xp, sx, wp, sw := b.wsOperands(x, w)
	b.fail(ws.launchRoPE(b.s, p, o.mem.Ptr(), xp, sx, wp, sw, T, N, K, r))
	if b.err == nil {
		b.ropeDone, b.ropeQKV = layer+1, cuda.DevicePtr(ptr(o))
	}
	return true
}
