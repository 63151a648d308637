package gpu

import "github.com/peftd/peftd/runtime/cuda"

// Hoisting cuBLASLt's memsets out of the compute stream's chain (PERFORMANCE
// v0.42).
//
// Some cuBLASLt algorithms zero a counter in their workspace before their
// GEMM kernel: FP8 gate/up at 129-256 rows (a persistent kernel, one block
// per SM it plans for). A recording captures it as a memset node between
// the kernel before the product and the product's kernel, and a memset
// node costs the chain a launch latency: nsys (H200, FP8, 64 decode rows
// and a 176-token prompt) put the product 6 µs after add_rmsnorm without
// adapters, 0.4 µs for the q/k/v product beside it, which has no memset.
// With adapters it costs more: the LoRA stream's shrink, forked at the same
// add_rmsnorm, launches during those microseconds and its expand (launched
// programmatically) follows, their blocks fill every SM, and cuBLASLt's
// blocks (each takes a whole SM's registers) start only as they drain: the
// product started 21 µs after add_rmsnorm in every layer.
//
// After a capture, each such memset M (a memset whose dependencies are
// exactly what a cuBLASLt call's first operation depended on, and whose
// dependants lead to that call's last kernel) is moved up one place: it
// depends on what its parent A depended on instead of on A, and A gains a
// full edge to M's dependants. M then runs beside A, and the product
// launches when A ends as any kernel after a kernel does. Safe because A
// is not cuBLASLt's (not the last node of any cuBLASLt call), so it does
// not touch cuBLASLt's workspace, and everything that did (an earlier
// product on the same stream) is an ancestor of A's parents, so still of M.

// memsetHoist reports whether recordings hoist cuBLASLt's memsets
// (kernelForce.memHoist: -1 off; on by default).
func (b *Backend) memsetHoist() bool { return forcedOn(b.force.memHoist, true) }

// hoistPlan is the edges to remove from and add to a graph of edges edges
// to hoist the memsets of calls; memset reports a node's type.
func hoistPlan(edges []cuda.GraphEdge, calls []cuda.LibraryCall, memset func(cuda.GraphNode) bool) (remove, add []cuda.GraphEdge, hoisted int) {
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
	addEdge := func(from, to cuda.GraphNode) {
		if k := [2]cuda.GraphNode{from, to}; !has[k] {
			has[k] = true
			add = append(add, cuda.GraphEdge{From: from, To: to})
		}
	}
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
			hoisted++
			for _, e := range in { // A -> M goes; A's parents -> M and A -> M's dependants come
				remove = append(remove, e)
				for _, pe := range parents[e.From] {
					addEdge(pe.From, m)
				}
				for _, d := range children[m] {
					addEdge(e.From, d)
				}
			}
		}
	}
	return remove, add, hoisted
}

// hoistMemsets applies hoistPlan to g; it returns how many memsets moved.
func hoistMemsets(g *cuda.Graph, calls []cuda.LibraryCall) (int, error) {
	if len(calls) == 0 {
		return 0, nil
	}
	edges, err := g.Edges()
	if err != nil {
		return 0, err
	}
	var terr error
	remove, add, n := hoistPlan(edges, calls, func(x cuda.GraphNode) bool {
		t, err := g.Type(x)
		if err != nil && terr == nil {
			terr = err
		}
		return err == nil && t == cuda.NodeMemset
	})
	if terr != nil {
		return 0, terr
	}
	return n, g.Rewire(remove, add)
}
