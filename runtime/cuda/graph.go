package cuda

import "fmt"

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

// Instantiate makes an executable graph.
func (g *Graph) Instantiate() (*GraphExec, error) {
	e := &GraphExec{c: g.c}
	if err := g.c.Do(func() error {
		return check("cuGraphInstantiateWithFlags", drv.cuGraphInstantiateWithFlags(&e.e, g.g, 0))
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
