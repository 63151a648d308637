package gpu

import (
	"testing"

	"github.com/peftd/peftd/runtime/cuda"
)

// TestProgrammaticEdges: of a recording's edges, only the full ones from a
// source kernel (the LoRA stream's last kernel at a join, the op before
// the GEMM at a fork; with all, any kernel) into a consumer (the first
// kernel of ours after the wait) are picked; edges from other nodes, from
// non-kernel nodes, into other kernels, or already programmatic, stay as
// they are.
func TestProgrammaticEdges(t *testing.T) {
	const (
		gemm   cuda.GraphNode = iota + 1 // cuBLASLt on the compute stream
		expand                           // the LoRA stream's last kernel (a join source)
		rope                             // the op reading the update (the join's consumer)
		memcpy                           // a copy node (a join source that is no kernel)
		shrink                           // the LoRA stream's first kernel (the fork's consumer)
		norm                             // the op before the GEMM (the fork's source)
		gemm2                            // a library kernel after a join source
		prev                             // the LoRA stream's kernel before shrink (the layer before's expand)
	)
	full, prog := cuda.EdgeData{}, cuda.ProgrammaticEdge
	e := func(from, to cuda.GraphNode, d cuda.EdgeData) cuda.GraphEdge {
		return cuda.GraphEdge{From: from, To: to, Data: d}
	}
	edges := []cuda.GraphEdge{
		e(gemm, rope, full),     // the compute stream's edge into the consumer: kept
		e(expand, rope, full),   // the join: picked
		e(memcpy, rope, full),   // from a copy: kept
		e(shrink, expand, prog), // the LoRA stream's own PDL edges
		e(prev, shrink, full),   // from the layer before's update: not a source
		e(norm, shrink, full),   // a fork: picked only with forks
		e(norm, gemm, full),     // into cuBLASLt (no consumer): kept
		e(expand, gemm2, full),  // into a library kernel: kept
		e(rope, gemm2, full),
		e(expand, rope, prog), // already programmatic: kept
	}
	kernel := func(n cuda.GraphNode) bool { return n != memcpy }
	set := func(ns ...cuda.GraphNode) map[cuda.GraphNode]bool {
		m := map[cuda.GraphNode]bool{}
		for _, n := range ns {
			m[n] = true
		}
		return m
	}
	for _, c := range []struct {
		name     string
		src, dst map[cuda.GraphNode]bool
		all      bool
		want     []cuda.GraphEdge
	}{
		{"joins", set(expand, memcpy), set(rope), false, []cuda.GraphEdge{e(expand, rope, full)}},
		{"joins and forks", set(expand, memcpy, norm), set(rope, shrink), false, []cuda.GraphEdge{e(expand, rope, full), e(norm, shrink, full)}},
		{"into join consumers", set(expand), set(rope), true, []cuda.GraphEdge{e(gemm, rope, full), e(expand, rope, full)}},
		{"into join and fork consumers", set(expand, norm), set(rope, shrink), true, []cuda.GraphEdge{e(gemm, rope, full), e(expand, rope, full), e(prev, shrink, full), e(norm, shrink, full)}},
		{"no consumers", set(expand, norm), nil, true, nil},
		{"none", nil, nil, false, nil},
	} {
		got := programmaticEdges(edges, c.src, c.dst, c.all, kernel)
		if len(got) != len(c.want) {
			t.Errorf("%s: picked %v, want %v", c.name, got, c.want)
			continue
		}
		for i := range got {
			if got[i] != c.want[i] {
				t.Errorf("%s: picked %v, want %v", c.name, got, c.want)
				break
			}
		}
	}
}
