package gpu

import "github.com/peftd/peftd/runtime/engine"

// L2 prefetch of a product's weight head. A decode step's latency-bound
// kernels (add_rmsnorm, silu_mul, rmsnorm_rows: a few µs each, a block a
// row) leave DRAM nearly idle while the product after them waits for them;
// they can ask L2 for the first bytes that product reads (l2_prefetch in
// kernels/common.cuh, after griddepcontrol.wait so the product before
// keeps DRAM to itself), and the product then starts from L2. The engine
// names the next product's weight (engine.Prefetcher) before the op that
// precedes it; the pieces follow the order the product's kernel reads:
//   - row heads (cuBLASLt, fp8_wg, the K-split FP8 products): every block
//     walks K from the start of its weight rows, so the first bytes of
//     every row;
//   - the matrix's head (fp8_gemv): blocks of 16 rows in order, each
//     reading its rows whole, so the first rows.
// gemm_skinny and fp8_stream copy their first weight tiles before
// griddepcontrol.wait already (their early opts): no prefetch for them.
// v0.24 asked L2 for the whole o projection from attn_decode (which is
// DRAM-bound) before its wait: slower. The budget here is what DRAM moves
// while the kernel runs, not a whole matrix.

// l2Prefetch is l2_prefetch's arguments: n pieces of len bytes, stride
// apart from p (p 0: none).
type l2Prefetch struct {
	p      uint64
	stride int64
	n, len int
}

// args are the four kernel arguments.
func (pf l2Prefetch) args() []any { return []any{pf.p, pf.stride, pf.n, pf.len} }

// l2pfPiece is the size of the pieces of a matrix head (one
// cp.async.bulk.prefetch.L2 each).
const l2pfPiece = 64 << 10

// l2pfMinLen is the shortest row head worth a prefetch (one 32-byte
// sector is what DRAM moves anyway).
const l2pfMinLen = 64

// Prefetch names the weight of the next product (engine.Prefetcher): the
// next add_rmsnorm or silu_mul asks L2 for its head. A hint.
func (b *Backend) Prefetch(w engine.Weight) { b.pfNext = w }

// takePrefetch is the pieces for the weight Prefetch named (none when it
// named none or the budget is 0), and forgets it.
func (b *Backend) takePrefetch() l2Prefetch {
	w := b.pfNext
	b.pfNext = nil
	if w == nil {
		return l2Prefetch{}
	}
	return b.counted(b.prefetchFor(w, b.rows()))
}

// counted counts the launches that carry a prefetch (Backend.pfLaunches).
func (b *Backend) counted(pf l2Prefetch) l2Prefetch {
	if pf.p != 0 {
		b.pfLaunches++
	}
	return pf
}

// l2pfDefaultMB is the budget of a prefetch (MB) unless kernelForce.l2pf
// says otherwise; 0: off.
const l2pfDefaultMB = 0

// l2pfBudget is the bytes a prefetch asks for: kernelForce.l2pf MB (0:
// l2pfDefaultMB, -1: none), at most a third of L2 (what the product reads
// meanwhile must not push them out); 0: off.
func (b *Backend) l2pfBudget() int {
	mb := b.force.l2pf
	if mb == 0 {
		mb = l2pfDefaultMB
	}
	if mb <= 0 {
		return 0
	}
	budget := mb << 20
	if l2 := b.ctx.Device().L2Bytes; l2 > 0 {
		budget = min(budget, l2/3)
	}
	return budget
}

// prefetchFor is the pieces of w's head for its product over T rows.
func (b *Backend) prefetchFor(w engine.Weight, T int) l2Prefetch {
	budget := b.l2pfBudget()
	if budget <= 0 {
		return l2Prefetch{}
	}
	switch wt := w.(type) {
	case *weight:
		if _, ok := b.skinnyPlan(wt.rows, wt.cols, false); ok && T <= bfSkinnyMaxRows {
			return l2Prefetch{} // gemm_skinny's early tiles
		}
		return rowHeads(wt.mem.Ptr(), wt.rows, 2*wt.cols, budget)
	case *fp8Weight:
		f := b.f8
		if f == nil {
			return l2Prefetch{}
		}
		if _, ok := f.stream.plan(T, wt.rows, wt.cols); ok && !f.streamOff && (f.streamOn || T >= fp8StreamMinRows) {
			return l2Prefetch{} // fp8_stream's early tiles
		}
		if gemvFits(T, wt.rows, wt.cols) {
			return matrixHead(wt.q.Ptr(), wt.rows*wt.cols, budget)
		}
		return rowHeads(wt.q.Ptr(), wt.rows, wt.cols, budget)
	}
	return l2Prefetch{}
}

// rowHeads is the first budget/rows bytes (a multiple of 16) of each of
// rows rows rowBytes apart.
func rowHeads(p uint64, rows, rowBytes, budget int) l2Prefetch {
	n := min(rowBytes, budget/max(rows, 1)) &^ 15
	if p%16 != 0 || rowBytes%16 != 0 || n < l2pfMinLen {
		return l2Prefetch{}
	}
	return l2Prefetch{p: p, stride: int64(rowBytes), n: rows, len: n}
}

// matrixHead is the first budget bytes of a matrix of total bytes, in
// l2pfPiece pieces.
func matrixHead(p uint64, total, budget int) l2Prefetch {
	n := min(total, budget) / l2pfPiece
	if p%16 != 0 || n == 0 {
		return l2Prefetch{}
	}
	return l2Prefetch{p: p, stride: l2pfPiece, n: n, len: l2pfPiece}
}

// headPrefetch is the pieces of the LM head for Logits' product (always
// cuBLASLt's: row heads).
func (b *Backend) headPrefetch(w *weight) l2Prefetch {
	budget := b.l2pfBudget()
	if budget <= 0 {
		return l2Prefetch{}
	}
	return b.counted(rowHeads(w.mem.Ptr(), w.rows, 2*w.cols, budget))
}
