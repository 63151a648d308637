package cuda

import (
	"fmt"
	"unsafe"
)

// Graph is a captured sequence of stream work (CUgraph).
type Graph struct {
	c *Context
	g cuGraph
}

// GraphExec is an instantiated graph, ready to launch (CUgraphExec).
type GraphExec struct {
	c *Context
	e cuGraphExec
}

func graphsBound() error {
	if drv.cuStreamBeginCapture == nil || drv.cuStreamEndCapture == nil || drv.cuGraphInstantiateWithFlags == nil ||
		drv.cuGraphLaunch == nil || drv.cuGraphExecDestroy == nil || drv.cuGraphDestroy == nil {
		return fmt.Errorf("%w: the driver lacks stream capture or graph symbols", ErrNotSupported)
	}
	return nil
}

// GraphsSupported reports (nil) whether the driver has the stream capture
// and graph entry points.
func GraphsSupported() error { return graphsBound() }

// captureModeThreadLocal is CU_STREAM_CAPTURE_MODE_THREAD_LOCAL: only this
// thread's unsafe API calls are refused while capturing (all CUDA calls run
// on the context's executor thread).
const captureModeThreadLocal = 1

// BeginCapture starts capturing the work enqueued on s into a graph; nothing
// runs until the graph is instantiated and launched.
func (s *Stream) BeginCapture() error {
	if err := graphsBound(); err != nil {
		return err
	}
	return s.c.Do(func() error {
		s.afterKernel = false // the recording's first kernel has no kernel before it
		return check("cuStreamBeginCapture_v2", drv.cuStreamBeginCapture(s.s, captureModeThreadLocal))
	})
}

// EndCapture ends the capture begun by BeginCapture and returns the graph.
func (s *Stream) EndCapture() (*Graph, error) {
	if err := graphsBound(); err != nil {
		return nil, err
	}
	g := &Graph{c: s.c}
	if err := s.c.Do(func() error { return check("cuStreamEndCapture", drv.cuStreamEndCapture(s.s, &g.g)) }); err != nil {
		return nil, err
	}
	return g, nil
}

// Instantiate makes an executable graph. Its kernels run at the priority
// of the stream the graph is launched into.
func (g *Graph) Instantiate() (*GraphExec, error) { return g.instantiate(0) }

// graphUseNodePriority is CUDA_GRAPH_INSTANTIATE_FLAG_USE_NODE_PRIORITY.
const graphUseNodePriority = 8

// InstantiateNodePriority makes an executable graph whose kernels keep the
// priority of the stream each was captured on (a capture copies the
// stream's priority into its kernel nodes; Instantiate's graphs ignore it):
// the blocks of a kernel captured on a NewPriorityStream are scheduled
// ahead of the pending blocks of the others.
func (g *Graph) InstantiateNodePriority() (*GraphExec, error) {
	return g.instantiate(graphUseNodePriority)
}

func (g *Graph) instantiate(flags uint64) (*GraphExec, error) {
	e := &GraphExec{c: g.c}
	if err := g.c.Do(func() error {
		return check("cuGraphInstantiateWithFlags", drv.cuGraphInstantiateWithFlags(&e.e, g.g, flags))
	}); err != nil {
		return nil, err
	}
	return e, nil
}

// Destroy releases the graph (executable graphs made from it stay valid).
func (g *Graph) Destroy() error {
	if g == nil || g.g == 0 {
		return nil
	}
	h := g.g
	g.g = 0
	return g.c.Do(func() error { return check("cuGraphDestroy", drv.cuGraphDestroy(h)) })
}

// Launch enqueues the graph on s.
func (e *GraphExec) Launch(s *Stream) error {
	return e.c.Do(func() error {
		s.afterKernel = false
		return check("cuGraphLaunch", drv.cuGraphLaunch(e.e, s.s))
	})
}

// Destroy releases the executable graph.
func (e *GraphExec) Destroy() error {
	if e == nil || e.e == 0 {
		return nil
	}
	h := e.e
	e.e = 0
	return e.c.Do(func() error { return check("cuGraphExecDestroy", drv.cuGraphExecDestroy(h)) })
}

// ProfilerStart and ProfilerStop bound the work a profiler started with
// "profile from start off" (ncu --profile-from-start off) records.
func (c *Context) ProfilerStart() error {
	if drv.cuProfilerStart == nil {
		return fmt.Errorf("%w: the driver lacks cuProfilerStart", ErrNotSupported)
	}
	return c.Do(func() error { return check("cuProfilerStart", drv.cuProfilerStart()) })
}

// ProfilerStop ends the range ProfilerStart began.
func (c *Context) ProfilerStop() error {
	if drv.cuProfilerStop == nil {
		return fmt.Errorf("%w: the driver lacks cuProfilerStop", ErrNotSupported)
	}
	return c.Do(func() error { return check("cuProfilerStop", drv.cuProfilerStop()) })
}

// GraphNode is a node of a captured graph (CUgraphNode).
type GraphNode uintptr

// EdgeData is CUgraphEdgeData: when an edge's dependency is met (FromPort)
// and of what kind (Type); zero is a full dependency, with memory
// visibility, on the upstream node's completion.
type EdgeData struct {
	FromPort, ToPort, Type uint8
	_                      [5]uint8
}

// The edge data of a programmatic dependency: the downstream kernel may
// launch once every block of the upstream kernel has triggered
// (griddepcontrol.launch_dependents) or exited, and waits for its
// completion with griddepcontrol.wait (CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC,
// CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC), as a programmatic launch on one
// stream records it.
var ProgrammaticEdge = EdgeData{FromPort: 1, Type: 1}

// GraphEdge is a dependency of a graph: To runs after From, as Data says.
type GraphEdge struct {
	From, To GraphNode
	Data     EdgeData
}

func edgesBound() error {
	if drv.cuStreamGetCaptureInfo == nil || drv.cuGraphGetEdges == nil || drv.cuGraphAddDependencies == nil ||
		drv.cuGraphRemoveDependencies == nil || drv.cuGraphNodeGetType == nil {
		return fmt.Errorf("%w: the driver lacks graph edge data (CUDA 12.3)", ErrNotSupported)
	}
	return nil
}

// EdgesSupported reports (nil) whether the driver can list and rewrite a
// graph's edges with their data.
func EdgesSupported() error { return edgesBound() }

// CaptureLeaves returns the nodes the next work captured on s would depend
// on (its last kernel, for a stream that just launched one).
func (s *Stream) CaptureLeaves() ([]GraphNode, error) {
	if err := edgesBound(); err != nil {
		return nil, err
	}
	var out []GraphNode
	err := s.c.Do(func() (err error) {
		out, err = s.captureLeaves()
		return err
	})
	return out, err
}

// captureLeaves is CaptureLeaves on the context's thread (inside Context.Do).
func (s *Stream) captureLeaves() ([]GraphNode, error) {
	var (
		status int32
		id     uint64
		g      cuGraph
		deps   *uintptr
		data   *EdgeData
		n      uint64
		out    []GraphNode
	)
	if err := check("cuStreamGetCaptureInfo_v3", drv.cuStreamGetCaptureInfo(s.s, &status, &id, &g, &deps, &data, &n)); err != nil {
		return nil, err
	}
	if status != 1 { // CU_STREAM_CAPTURE_STATUS_ACTIVE
		return nil, fmt.Errorf("%w: the stream is not capturing (status %d)", ErrInvalidValue, status)
	}
	if n > 0 && deps != nil {
		for _, d := range unsafe.Slice(deps, n) { // the driver's array: copied before the next call
			out = append(out, GraphNode(d))
		}
	}
	return out, nil
}

// Edges lists every edge of g with its data.
func (g *Graph) Edges() ([]GraphEdge, error) {
	if err := edgesBound(); err != nil {
		return nil, err
	}
	var out []GraphEdge
	err := g.c.Do(func() error {
		// arrays from the first call: a count-only query (no edge data)
		// would be refused as lossy once some edge is programmatic. A full
		// array may have been cut short: ask again with a larger one.
		for size := uint64(1024); ; size *= 4 {
			from, to, data := make([]uintptr, size), make([]uintptr, size), make([]EdgeData, size)
			n := size
			if err := check("cuGraphGetEdges_v2", drv.cuGraphGetEdges(g.g, &from[0], &to[0], &data[0], &n)); err != nil {
				return err
			}
			if n == size {
				continue
			}
			out = make([]GraphEdge, n)
			for i := range out {
				out[i] = GraphEdge{GraphNode(from[i]), GraphNode(to[i]), data[i]}
			}
			return nil
		}
	})
	return out, err
}

// GraphNodeType is a node's CUgraphNodeType.
type GraphNodeType int32

// The node types peftd's recordings hold.
const (
	NodeKernel GraphNodeType = 0 // CU_GRAPH_NODE_TYPE_KERNEL
	NodeMemset GraphNodeType = 2 // CU_GRAPH_NODE_TYPE_MEMSET
)

// Type reports node n's type.
func (g *Graph) Type(n GraphNode) (GraphNodeType, error) {
	if err := edgesBound(); err != nil {
		return 0, err
	}
	var t int32
	err := g.c.Do(func() error { return check("cuGraphNodeGetType", drv.cuGraphNodeGetType(uintptr(n), &t)) })
	return GraphNodeType(t), err
}

// IsKernel reports whether node n of g is a kernel launch.
func (g *Graph) IsKernel(n GraphNode) (bool, error) {
	t, err := g.Type(n)
	return err == nil && t == NodeKernel, err
}

// Rewire removes the edges remove (each as Edges gave it, data included)
// from g, then adds the edges add.
func (g *Graph) Rewire(remove, add []GraphEdge) error {
	if err := edgesBound(); err != nil {
		return err
	}
	op := func(name string, f func(g cuGraph, from, to *uintptr, data *EdgeData, n uint64) int32, edges []GraphEdge) error {
		if len(edges) == 0 {
			return nil
		}
		from, to, data := make([]uintptr, len(edges)), make([]uintptr, len(edges)), make([]EdgeData, len(edges))
		for i, e := range edges {
			from[i], to[i], data[i] = uintptr(e.From), uintptr(e.To), e.Data
		}
		return check(name, f(g.g, &from[0], &to[0], &data[0], uint64(len(edges))))
	}
	return g.c.Do(func() error {
		if err := op("cuGraphRemoveDependencies_v2", drv.cuGraphRemoveDependencies, remove); err != nil {
			return err
		}
		return op("cuGraphAddDependencies_v2", drv.cuGraphAddDependencies, add)
	})
}

// Retype replaces each edge (its From and To) of g by one with data d.
func (g *Graph) Retype(edges []GraphEdge, d EdgeData) error {
	if len(edges) == 0 {
		return nil
	}
	now := make([]GraphEdge, len(edges))
	for i, e := range edges {
		now[i] = GraphEdge{From: e.From, To: e.To, Data: d}
	}
	return g.Rewire(edges, now)
}

// MemsetParams is a memset node's operation (CUDA_MEMSET_NODE_PARAMS):
// Height rows of Width elements of ElementSize bytes (1, 2 or 4) set to
// Value, rows Pitch bytes apart from Dst.
type MemsetParams struct {
	Dst                DevicePtr
	Pitch              uint64
	Value, ElementSize uint32
	Width, Height      uint64
}

// kernelNodeParams is CUDA_KERNEL_NODE_PARAMS_v2.
type kernelNodeParams struct {
	fn                     cuFunction
	gridX, gridY, gridZ    uint32
	blockX, blockY, blockZ uint32
	shared                 uint32
	params, extra          unsafe.Pointer
	kern                   uintptr // CUkernel: a library's kernel (fn 0)
	ctx                    uintptr // CUcontext (0: the current one)
}

func nodesBound() error {
	if err := edgesBound(); err != nil {
		return err
	}
	if drv.cuGraphMemsetNodeGetParams == nil || drv.cuGraphAddKernelNode == nil || drv.cuGraphDestroyNode == nil {
		return fmt.Errorf("%w: the driver cannot rewrite graph nodes", ErrNotSupported)
	}
	return nil
}

// NodesSupported reports (nil) whether the driver can read memset nodes,
// add kernel nodes and remove nodes (MemsetParams, AddKernel, DestroyNode).
func NodesSupported() error { return nodesBound() }

// MemsetParams reads memset node n's operation.
func (g *Graph) MemsetParams(n GraphNode) (MemsetParams, error) {
	var p MemsetParams
	if err := nodesBound(); err != nil {
		return p, err
	}
	err := g.c.Do(func() error {
		return check("cuGraphMemsetNodeGetParams", drv.cuGraphMemsetNodeGetParams(uintptr(n), &p))
	})
	return p, err
}

// AddKernel adds to g a launch of f (grid, block, shared bytes and
// arguments as Launch takes them) that depends on deps (full edges).
func (g *Graph) AddKernel(deps []GraphNode, f *Function, grid, block Dim3, shared int, args ...any) (GraphNode, error) {
	if err := nodesBound(); err != nil {
		return 0, err
	}
	var node uintptr
	err := g.c.Do(func() error {
		a := g.c.args
		if err := a.pack(f.Name, args); err != nil {
			return err
		}
		p := kernelNodeParams{fn: f.f, kern: f.k, shared: uint32(shared)}
		if f.k != 0 {
			p.fn = 0
		}
		p.gridX, p.gridY, p.gridZ = grid.u()
		p.blockX, p.blockY, p.blockZ = block.u()
		if len(args) > 0 {
			p.params = unsafe.Pointer(&a.ptrs[0])
		}
		var dp *uintptr
		ds := make([]uintptr, len(deps))
		for i, d := range deps {
			ds[i] = uintptr(d)
		}
		if len(ds) > 0 {
			dp = &ds[0]
		}
		return check("cuGraphAddKernelNode_v2", drv.cuGraphAddKernelNode(&node, g.g, dp, uint64(len(ds)), &p))
	})
	if err != nil {
		return 0, fmt.Errorf("kernel %s: %w", f.Name, err)
	}
	return GraphNode(node), nil
}

// DestroyNode removes node n and its edges from g.
func (g *Graph) DestroyNode(n GraphNode) error {
	if err := nodesBound(); err != nil {
		return err
	}
	return g.c.Do(func() error { return check("cuGraphDestroyNode", drv.cuGraphDestroyNode(uintptr(n))) })
}
