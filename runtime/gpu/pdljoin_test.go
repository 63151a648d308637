package gpu

import (
	"testing"

	"github.com/peftd/peftd/runtime/cuda"
)

// TestProgrammaticEdges: of a recording's edges, only the full ones out of
// a join's source kernel into a kernel launched programmatically (one a
// programmatic edge already leads into) are picked; edges from other
// nodes, into library kernels, out of non-kernel nodes, or already
// programmatic, stay as they are.
func TestProgrammaticEdges(t *testing.T) {
	const (
		gemm   cuda.GraphNode = iota + 1 // cuBLASLt on the compute stream
		expand                           // the LoRA stream's last kernel (a join source)
		rope                             // the op reading the update (launched programmatically)
		memcpy                           // a copy node (a join source that is no kernel)
		shrink                           // the LoRA stream's first kernel
		norm                             // the op before the GEMM
		gemm2                            // a library kernel after a join source
		prev                             // the LoRA stream's kernel before shrink (the layer before's expand)
	)
	full, prog := cuda.EdgeData{}, cuda.ProgrammaticEdge
	e := func(from, to cuda.GraphNode, d cuda.EdgeData) cuda.GraphEdge {
		return cuda.GraphEdge{From: from, To: to, Data: d}
	}
	edges := []cuda.GraphEdge{
		e(gemm, rope, prog),     // the compute stream's own PDL edge
		e(expand, rope, full),   // the join: picked
		e(memcpy, rope, full),   // from a copy: kept
		e(shrink, expand, prog), // the LoRA stream's own PDL edges
		e(prev, shrink, prog),
		e(norm, shrink, full),  // a fork: picked only if norm is a source
		e(norm, gemm, full),    // into cuBLASLt (nothing programmatic leads into it): kept
		e(expand, gemm2, full), // into a library kernel: kept
		e(rope, gemm2, full),
	}
	kernel := func(n cuda.GraphNode) bool { return n != memcpy }
	for _, c := range []struct {
		name string
		src  []cuda.GraphNode
		want []cuda.GraphEdge
	}{
		{"joins", []cuda.GraphNode{expand, memcpy}, []cuda.GraphEdge{e(expand, rope, full)}},
		{"joins and forks", []cuda.GraphNode{expand, memcpy, norm}, []cuda.GraphEdge{e(expand, rope, full), e(norm, shrink, full)}},
		{"none", nil, nil},
	} {
		src := map[cuda.GraphNode]bool{}
		for _, n := range c.src {
			src[n] = true
		}
		got := programmaticEdges(edges, src, kernel)
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
