package gpu

import (
	"fmt"

	"github.com/peftd/peftd/runtime/cuda"
)

// cuBLASLt's memsets in recordings (PERFORMANCE v0.42).
//
// Some cuBLASLt algorithms zero a 4-byte counter in their workspace before
// their GEMM kernel: on the H200, FP8 gate/up at 129-256 rows (a persistent
// kernel, one block for each SM it plans for) and the bf16 / FP8 lm_head
// product. A recording captures it as a memset node between the kernel
// before the product (A) and the product's kernel, and the product waited:
// nsys of FP8 steps of 64 decode rows and a 176-token prompt (one layer's
// gate/up product, median over 4,000 of them) put its start 6.4 µs after
// add_rmsnorm's end without adapters (0.4 µs for the q/k/v product, which
// has no memset) and 21 µs with four adapters: the LoRA stream's shrink,
// forked at the same add_rmsnorm, and its expand (launched
// programmatically) took every SM first, and cuBLASLt's blocks (each needs
// a whole SM's registers) started only as theirs drained.
//
// Moving the memset alone (mode 1: it depends on A's dependencies instead
// of on A, and A gains a full edge to the product) changed nothing (mixed
// steps with adapters 8.95 vs 8.97 ms): the memset then ran beside A and
// the product still started late. So each moved memset is also replaced by
// a fill_rows kernel node doing the same write (mode 2, the default): the
// product then depends on kernels only and starts 0.2-0.9 µs after A (the
// same trace, after), and the mixed steps take 8.58 instead of 8.97 ms
// with adapters, 6.88 instead of 6.95 without; FP8 decode at 256 rows with
// adapters 11.52 instead of 11.89.
//
// Which memsets: those whose dependencies are exactly what a cuBLASLt
// call's first operation depended on (cuda.Matmul.TrackCaptures notes each
// call's place) and whose dependants lead to that call's last kernel. Safe
// because A is not cuBLASLt's (not the last node of any cuBLASLt call), so
// it does not touch cuBLASLt's workspace, and everything that did (an
// earlier product on the same stream) is an ancestor of A's dependencies,
// so still of the memset or its fill_rows.

// memsetHoist is the recordings' treatment of cuBLASLt's memsets
// (kernelForce.memHoist): 0 none, 1 hoisted, 2 hoisted and replaced by
// fill_rows (the default, where the driver can rewrite nodes).
func (b *Backend) memsetHoist() int {
	switch {
	case b.force.memHoist < 0:
		return 0
	case b.force.memHoist == 1 || cuda.NodesSupported() != nil || b.fn.fillRows == nil:
		return 1
	}
	return 2
}

// memsetMove is one memset hoistPlan moves: m, which depended on the
// kernels its edges in come from, will depend on deps (those kernels' own
// dependencies); those kernels gain full edges to m's dependants to
// (fromEdges: the ones the graph lacks).
type memsetMove struct {
	m         cuda.GraphNode
	in        []cuda.GraphEdge
	deps, to  []cuda.GraphNode
	fromEdges []cuda.GraphEdge
}

// hoistPlan is the memsets of calls to move in a graph of edges edges;
// memset reports a node's type.
func hoistPlan(edges []cuda.GraphEdge, calls []cuda.LibraryCall, memset func(cuda.GraphNode) bool) []memsetMove {
	parents := map[cuda.GraphNode][]cuda.GraphEdge{}
	children := map[cuda.GraphNode][]cuda.GraphNode{}
	has := map[[2]cuda.GraphNode]bool{}
	for _, e := range edges {
		parents[e.To] = append(parents[e.To], e)
		children[e.From] = append(children[e.From], e.To)
		has[[2]cuda.GraphNode{e.From, e.To}] = true
	}
	libLast := map[cuda.GraphNode]bool{}
	for _, c := range calls {
		for _, n := range c.After {
			libLast[n] = true
		}
	}
	// leadsTo reports whether n is, or a few dependants down leads to, a node of set
	leadsTo := func(n cuda.GraphNode, set []cuda.GraphNode) bool {
		front := []cuda.GraphNode{n}
		for depth := 0; depth < 4 && len(front) > 0; depth++ {
			var next []cuda.GraphNode
			for _, f := range front {
				for _, t := range set {
					if f == t {
						return true
					}
				}
				next = append(next, children[f]...)
			}
			front = next
		}
		return false
	}
	var moves []memsetMove
	done := map[cuda.GraphNode]bool{}
	for _, c := range calls {
		if len(c.Before) == 0 || len(c.After) == 0 {
			continue
		}
		before := map[cuda.GraphNode]bool{}
		ok := true
		for _, a := range c.Before {
			before[a] = true
			ok = ok && !libLast[a]
		}
		if !ok {
			continue // a product right after another: its workspace may still be in use
		}
		for _, m := range children[c.Before[0]] {
			in := parents[m]
			if done[m] || len(in) != len(before) || !memset(m) {
				continue
			}
			same := true
			for _, e := range in {
				same = same && before[e.From]
			}
			if !same || len(children[m]) == 0 {
				continue
			}
			lead := true
			for _, d := range children[m] {
				lead = lead && leadsTo(d, c.After)
			}
			if !lead {
				continue
			}
			done[m] = true
			mv := memsetMove{m: m, in: in, to: children[m]}
			seen := map[cuda.GraphNode]bool{}
			for _, e := range in {
				for _, pe := range parents[e.From] {
					if !seen[pe.From] {
						seen[pe.From] = true
						mv.deps = append(mv.deps, pe.From)
					}
				}
				for _, d := range mv.to {
					if k := [2]cuda.GraphNode{e.From, d}; !has[k] {
						has[k] = true
						mv.fromEdges = append(mv.fromEdges, cuda.GraphEdge{From: e.From, To: d})
					}
				}
			}
			moves = append(moves, mv)
		}
	}
	return moves
}

// hoistEdges is the edges to remove and add to move the memsets of moves
// (each keeping its node).
func hoistEdges(moves []memsetMove) (remove, add []cuda.GraphEdge) {
	for _, mv := range moves {
		remove = append(remove, mv.in...)
		for _, d := range mv.deps {
			add = append(add, cuda.GraphEdge{From: d, To: mv.m})
		}
		add = append(add, mv.fromEdges...)
	}
	return remove, add
}

// hoistMemsets moves g's cuBLASLt memsets (mode 1), or replaces each by a
// fill_rows node in the moved place (mode 2); it returns how many.
// fill is fill_rows.
func hoistMemsets(g *cuda.Graph, calls []cuda.LibraryCall, mode int, fill *cuda.Function) (int, error) {
	if len(calls) == 0 || mode == 0 {
		return 0, nil
	}
	edges, err := g.Edges()
	if err != nil {
		return 0, err
	}
	var terr error
	moves := hoistPlan(edges, calls, func(x cuda.GraphNode) bool {
		t, err := g.Type(x)
		if err != nil && terr == nil {
			terr = err
		}
		return err == nil && t == cuda.NodeMemset
	})
	if terr != nil || len(moves) == 0 {
		return 0, terr
	}
	if mode == 1 {
		remove, add := hoistEdges(moves)
		return len(moves), g.Rewire(remove, add)
	}
	for _, mv := range moves {
		p, err := g.MemsetParams(mv.m)
		if err != nil {
			return 0, err
		}
		if p.ElementSize != 1 && p.ElementSize != 2 && p.ElementSize != 4 || p.Width == 0 || p.Height == 0 {
			return 0, fmt.Errorf("gpu: cuBLASLt memset of %d x %d elements of %d bytes", p.Height, p.Width, p.ElementSize)
		}
		n := p.Width * p.Height
		z, err := g.AddKernel(mv.deps, fill, cuda.Dim3{X: int(min((n+255)/256, 1024))}, cuda.Dim3{X: 256}, 0,
			p.Dst, p.Value, int(p.ElementSize), int64(p.Width), int64(p.Height), int64(p.Pitch))
		if err != nil {
			return 0, err
		}
		add := mv.fromEdges
		for _, d := range mv.to {
			add = append(add, cuda.GraphEdge{From: z, To: d})
		}
		if err := g.Rewire(nil, add); err != nil {
			return 0, err
		}
		if err := g.DestroyNode(mv.m); err != nil {
			return 0, err
		}
	}
	return len(moves), nil
}
