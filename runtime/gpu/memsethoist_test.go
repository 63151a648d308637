package gpu

import (
	"slices"
	"testing"

	"github.com/peftd/peftd/runtime/cuda"
)

// TestHoistPlan checks which memsets hoistPlan moves and the edges it
// removes and adds, on graphs shaped as recordings are (node numbers:
// 1xx kernels of ours, 2xx cuBLASLt's kernels, 3xx memsets).
func TestHoistPlan(t *testing.T) {
	type E = cuda.GraphEdge
	e := func(from, to cuda.GraphNode) E { return E{From: from, To: to} }
	prog := cuda.ProgrammaticEdge
	nodes := func(ns ...cuda.GraphNode) []cuda.GraphNode { return ns }
	call := func(before, after []cuda.GraphNode) cuda.LibraryCall {
		return cuda.LibraryCall{Before: before, After: after}
	}
	cases := []struct {
		name        string
		edges       []E
		calls       []cuda.LibraryCall
		remove, add []E
		hoisted     int
	}{{
		// o product (201) -> add_rmsnorm (101, also joining the LoRA
		// stream's 102 programmatically) -> memset -> gate/up (202); the
		// LoRA stream's shrink 103 forks at 101
		name:   "after one of ours",
		edges:  []E{e(201, 101), {From: 102, To: 101, Data: prog}, e(101, 301), e(301, 202), e(101, 103)},
		calls:  []cuda.LibraryCall{call(nodes(100), nodes(201)), call(nodes(101), nodes(202))},
		remove: []E{e(101, 301)}, add: []E{e(201, 301), e(102, 301), e(101, 202)}, hoisted: 1,
	}, {
		name:  "after another product",
		edges: []E{e(101, 201), e(201, 301), e(301, 202)},
		calls: []cuda.LibraryCall{call(nodes(101), nodes(201)), call(nodes(201), nodes(202))},
	}, {
		name:   "at the graph's start",
		edges:  []E{e(101, 301), e(301, 202)},
		calls:  []cuda.LibraryCall{call(nodes(101), nodes(202))},
		remove: []E{e(101, 301)}, add: []E{e(101, 202)}, hoisted: 1,
	}, {
		// cuBLASLt's split-K: memset -> GEMM -> reduce, the reduce last
		name:   "split-K reduce last",
		edges:  []E{e(100, 101), e(101, 301), e(301, 202), e(202, 203)},
		calls:  []cuda.LibraryCall{call(nodes(101), nodes(203))},
		remove: []E{e(101, 301)}, add: []E{e(100, 301), e(101, 202)}, hoisted: 1,
	}, {
		name:  "a memset of ours beside the product",
		edges: []E{e(100, 101), e(101, 301), e(101, 202), e(301, 104)},
		calls: []cuda.LibraryCall{call(nodes(101), nodes(202))},
	}, {
		name:  "no memset",
		edges: []E{e(100, 101), e(101, 202), e(101, 103)},
		calls: []cuda.LibraryCall{call(nodes(101), nodes(202))},
	}, {
		name:  "a memset with another dependency",
		edges: []E{e(100, 101), e(101, 301), e(105, 301), e(301, 202)},
		calls: []cuda.LibraryCall{call(nodes(101), nodes(202))},
	}, {
		name:   "edge to the product already there",
		edges:  []E{e(100, 101), e(101, 301), e(301, 202), e(101, 202)},
		calls:  []cuda.LibraryCall{call(nodes(101), nodes(202))},
		remove: []E{e(101, 301)}, add: []E{e(100, 301)}, hoisted: 1,
	}}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			memset := func(n cuda.GraphNode) bool { return n >= 300 }
			moves := hoistPlan(c.edges, c.calls, memset)
			rm, add := hoistEdges(moves)
			if n := len(moves); n != c.hoisted || !slices.Equal(rm, c.remove) || !slices.Equal(add, c.add) {
				t.Errorf("hoisted %d, remove %v, add %v; want %d, %v, %v", n, rm, add, c.hoisted, c.remove, c.add)
			}
		})
	}
}
