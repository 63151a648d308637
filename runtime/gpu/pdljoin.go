package gpu

import "github.com/peftd/peftd/runtime/cuda"

// Programmatic joins (kernelForce.pdlJoins; PERFORMANCE v0.31-v0.32).
//
// A recording captures the LoRA stream's join (the compute stream waiting
// for the update, lora.go) as a full dependency: the op that reads the
// update launches only once the LoRA stream's last kernel has finished, so
// every join costs a launch's latency, four times a layer, where the
// compute stream's own ops overlap their launches (PDL). nsys (v0.32, one
// row, four adapters): the ops after a join show no overlap with the
// kernel before them (add_rmsnorm 0.6 µs a step against 1,128 without
// adapters). Every kernel of ours starts with griddepcontrol.wait
// (pdl_entry), so the join may be a programmatic dependency instead: the
// reading op's blocks are scheduled as soon as the update's kernel has
// started its blocks, and wait there for it to finish and its writes to be
// visible.
//
// Modes (joinMode): 1 retypes the join edges (from the update's last
// kernel into the op reading it); 2, the default, every kernel edge into
// the op reading the update (the product before it too: a kernel captured
// with two dependencies gets full edges from both); 3 as 2, and every
// kernel edge into the LoRA stream's first kernel of each update (the
// fork). Decode with four rank-32 adapters on the H200 (v0.32, device ms
// a step at 1 / 16 / 64 / 256 rows), logits bit-identical in every mode:
//
//	bf16  full joins 4.67 / 5.42 / 6.72 / 12.78, mode 1 4.64 / 5.37 / 6.66 / 12.72,
//	      mode 2 4.43 / 5.30 / 6.62 / 12.68, mode 3 4.49 / 5.53 / 6.73 / 13.25
//	FP8   full joins 3.38 / 4.27 / 6.06 / 11.92, mode 1 3.35 / 4.21 / 5.92 / 11.91,
//	      mode 2 3.29 / 4.09 / 5.91 / 11.90, mode 3 3.32 / 4.14 / 6.03 / 11.94
//
// While a recording captures, the LoRA stream's last nodes at each join
// (the compute stream's at each fork) are the sources, and the first
// kernel of ours launched on the waiting stream after the wait is the
// consumer. After the capture every full edge from a source kernel into a
// consumer is retyped programmatic. (v0.31's rule, edges into kernels some
// programmatic edge already led into, found none: a kernel captured with
// two dependencies gets full edges from both.)

// captureSources collects, during a capture, the nodes whose edges may
// become programmatic.
type captureSources struct {
	on, all  bool // collecting; every kernel edge into a consumer (modes 2 and 3)
	src, dst map[cuda.GraphNode]bool
	next     map[*cuda.Stream]bool // streams whose next kernel of ours is a consumer
}

func newCaptureSources(mode int) captureSources {
	return captureSources{on: mode > 0, all: mode > 1, src: map[cuda.GraphNode]bool{}, dst: map[cuda.GraphNode]bool{}, next: map[*cuda.Stream]bool{}}
}

// joinMode is the recordings' programmatic joins (0: none): kernelForce's
// mode, 2 by default (-1 turns them off), with PDL on.
func (b *Backend) joinMode() int {
	if !b.pdl {
		return 0
	}
	return forced(b.force.pdlJoins, 2)
}

// leaves adds the nodes s's next work would depend on to set.
func (c *captureSources) leaves(s *cuda.Stream, set map[cuda.GraphNode]bool) {
	nodes, err := s.CaptureLeaves()
	if err != nil {
		return // a driver without edge data: the recording keeps full joins
	}
	for _, n := range nodes {
		set[n] = true
	}
}

// source adds s's last nodes to the sources.
func (c *captureSources) source(s *cuda.Stream) {
	if c.on {
		c.leaves(s, c.src)
	}
}

// waits notes that s is about to wait for a source: its next kernel of
// ours is a consumer.
func (c *captureSources) waits(s *cuda.Stream) {
	if c.on {
		c.next[s] = true
	}
}

// launched notes a kernel of ours just launched on s.
func (c *captureSources) launched(s *cuda.Stream) {
	if !c.on || !c.next[s] {
		return
	}
	delete(c.next, s)
	c.leaves(s, c.dst)
}

// programmaticEdges picks the full edges from a source kernel (with all,
// from any kernel) into a consumer.
func programmaticEdges(edges []cuda.GraphEdge, src, dst map[cuda.GraphNode]bool, all bool, isKernel func(cuda.GraphNode) bool) []cuda.GraphEdge {
	var out []cuda.GraphEdge
	for _, e := range edges {
		if e.Data == (cuda.EdgeData{}) && (all || src[e.From]) && dst[e.To] && isKernel(e.From) {
			out = append(out, e)
		}
	}
	return out
}

// joinStats is what retypeJoins found in one recording.
type joinStats struct {
	src, dst             int // sources and consumers collected
	full, prog           int // edges from a source into a consumer, by type before
	otherFull, otherProg int // edges into consumers from elsewhere, by type before
	retyped              int
}

// add sums o into st.
func (st *joinStats) add(o joinStats) {
	st.src += o.src
	st.dst += o.dst
	st.full += o.full
	st.prog += o.prog
	st.otherFull += o.otherFull
	st.otherProg += o.otherProg
	st.retyped += o.retyped
}

// retypeJoins makes g's join (and fork) edges programmatic.
func retypeJoins(g *cuda.Graph, c captureSources) (joinStats, error) {
	st := joinStats{src: len(c.src), dst: len(c.dst)}
	if len(c.dst) == 0 {
		return st, nil
	}
	edges, err := g.Edges()
	if err != nil {
		return st, err
	}
	for _, e := range edges {
		switch {
		case !c.dst[e.To]:
		case !c.src[e.From] && e.Data == (cuda.EdgeData{}):
			st.otherFull++
		case !c.src[e.From]:
			st.otherProg++
		case e.Data == (cuda.EdgeData{}):
			st.full++
		default:
			st.prog++
		}
	}
	var kerr error
	pick := programmaticEdges(edges, c.src, c.dst, c.all, func(n cuda.GraphNode) bool {
		k, err := g.IsKernel(n)
		if err != nil && kerr == nil {
			kerr = err
		}
		return k
	})
	if kerr != nil {
		return st, kerr
	}
	st.retyped = len(pick)
	return st, g.Retype(pick, cuda.ProgrammaticEdge)
}
