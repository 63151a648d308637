package gpu

import "github.com/peftd/peftd/runtime/cuda"

// Programmatic joins (kernelForce.pdlJoins, an A/B; PERFORMANCE v0.31 Next).
//
// A recording captures the LoRA stream's join (the compute stream waiting
// for the update, lora.go) as a full dependency: the op that reads the
// update launches only once the LoRA stream's last kernel has finished, so
// every join costs a launch's latency, four times a layer, where the
// compute stream's own ops overlap their launches (PDL). Every kernel of
// ours starts with griddepcontrol.wait (pdl_entry), so the join may be a
// programmatic dependency instead: the reading op's blocks are scheduled as
// soon as the update's kernel has started them, and wait there for it to
// finish and its writes to be visible. With pdlJoins 2 the fork (the LoRA
// stream's first kernel waiting for the op before the GEMM) is made
// programmatic too.
//
// While a recording captures, the LoRA stream's last nodes at each join
// (and the compute stream's at each fork) are collected; after the capture
// the full kernel-to-kernel edges out of them into kernels launched
// programmatically (ours: a programmatic edge already leads into them) are
// retyped.

// captureSources collects, during a capture, the nodes whose edges may
// become programmatic.
type captureSources struct {
	on  bool
	src map[cuda.GraphNode]bool
}

// collect adds the nodes s's next work would depend on.
func (c *captureSources) collect(s *cuda.Stream) {
	if !c.on {
		return
	}
	nodes, err := s.CaptureLeaves()
	if err != nil {
		return // a driver without edge data: the recording keeps full joins
	}
	for _, n := range nodes {
		c.src[n] = true
	}
}

// programmaticEdges picks the full edges out of src nodes that are kernels
// into nodes that some programmatic edge already leads into (kernels
// launched programmatically: they wait with griddepcontrol.wait).
func programmaticEdges(edges []cuda.GraphEdge, src map[cuda.GraphNode]bool, isKernel func(cuda.GraphNode) bool) []cuda.GraphEdge {
	prog := map[cuda.GraphNode]bool{}
	for _, e := range edges {
		if e.Data.Type == cuda.ProgrammaticEdge.Type {
			prog[e.To] = true
		}
	}
	var out []cuda.GraphEdge
	for _, e := range edges {
		if e.Data == (cuda.EdgeData{}) && src[e.From] && prog[e.To] && isKernel(e.From) {
			out = append(out, e)
		}
	}
	return out
}

// retypeJoins makes g's join (and fork) edges from src programmatic and
// reports how many it changed.
func retypeJoins(g *cuda.Graph, src map[cuda.GraphNode]bool) (int, error) {
	if len(src) == 0 {
		return 0, nil
	}
	edges, err := g.Edges()
	if err != nil {
		return 0, err
	}
	var kerr error
	pick := programmaticEdges(edges, src, func(n cuda.GraphNode) bool {
		k, err := g.IsKernel(n)
		if err != nil && kerr == nil {
			kerr = err
		}
		return k
	})
	if kerr != nil {
		return 0, kerr
	}
	return len(pick), g.Retype(pick, cuda.ProgrammaticEdge)
}
