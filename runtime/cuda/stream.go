package cuda

import (
	"errors"
	"fmt"
	"runtime"
	"unsafe"
)

// Streams, copies and events.

// Stream is a CUDA stream. Its copies from pageable Go memory are staged by the
// driver; copies to pageable memory complete before the call returns.
type Stream struct {
	c *Context
	s cuStream
	// pdl: kernels launched on the stream may begin while the kernel before
	// them finishes (SetProgrammaticLaunch); afterKernel: the stream's last
	// operation was a kernel (only then is a launch programmatic: a copy, a
	// memset, an event wait or a graph before it keeps its full dependency)
	pdl, afterKernel bool
	// win: the L2 access policy window of every kernel launched on the
	// stream (SetAccessWindow; Bytes 0: none)
	win AccessWindow
}

// ErrNoPDL: the driver or the GPU cannot launch kernels programmatically
// (Programmatic Dependent Launch needs cuLaunchKernelEx and sm_90 or newer).
var ErrNoPDL = errors.New("cuda: programmatic dependent launch is not supported")

// SetProgrammaticLaunch turns Programmatic Dependent Launch on or off for
// the kernels launched on s from now on (stream capture records it as
// programmatic edges): a kernel's blocks may be scheduled while the kernel
// before it on s still runs, so its launch and prologue overlap that
// kernel's tail. Every kernel launched this way must execute
// griddepcontrol.wait (cudaGridDependencySynchronize) before it reads what
// the kernel before it wrote: peftd's kernels do so first thing.
func (s *Stream) SetProgrammaticLaunch(on bool) error {
	if on && (drv.cuLaunchKernelEx == nil || s.c.dev.Major < 9) {
		return fmt.Errorf("%w (driver %s, compute capability %d.%d)", ErrNoPDL, drv.path, s.c.dev.Major, s.c.dev.Minor)
	}
	s.pdl = on
	return nil
}

// ProgrammaticLaunch reports whether s launches kernels programmatically.
func (s *Stream) ProgrammaticLaunch() bool { return s.pdl }

// NewStream creates a stream.
func (c *Context) NewStream() (*Stream, error) {
	s := &Stream{c: c}
	if err := c.Do(func() error { return check("cuStreamCreate", drv.cuStreamCreate(&s.s, 0)) }); err != nil {
		return nil, err
	}
	return s, nil
}

// NewPriorityStream creates a stream whose blocks the device schedules
// ahead of those of default-priority streams (the greatest priority the
// context allows): work that runs beside a long kernel and should take
// each multiprocessor it frees first.
func (c *Context) NewPriorityStream() (*Stream, error) {
	s := &Stream{c: c}
	if err := c.Do(func() error {
		var least, greatest int32
		if err := check("cuCtxGetStreamPriorityRange", drv.cuCtxGetStreamPriorities(&least, &greatest)); err != nil {
			return err
		}
		return check("cuStreamCreateWithPriority", drv.cuStreamCreateWithPriority(&s.s, 0, greatest))
	}); err != nil {
		return nil, err
	}
	return s, nil
}

// Synchronize waits for the stream's work.
func (s *Stream) Synchronize() error {
	return s.c.Do(func() error { return check("cuStreamSynchronize", drv.cuStreamSynchronize(s.s)) })
}

// Destroy releases the stream.
func (s *Stream) Destroy() error {
	if s == nil || s.s == 0 {
		return nil
	}
	h := s.s
	s.s = 0
	return s.c.Do(func() error { return check("cuStreamDestroy_v2", drv.cuStreamDestroy(h)) })
}

func bytesOf[T any](v []T) (unsafe.Pointer, uint64) {
	if len(v) == 0 {
		return nil, 0
	}
	var z T
	return unsafe.Pointer(&v[0]), uint64(len(v)) * uint64(unsafe.Sizeof(z))
}

// CopyHtoD enqueues a copy of src to device address dst.
func CopyHtoD[T any](s *Stream, dst DevicePtr, src []T) error {
	p, n := bytesOf(src)
	if n == 0 {
		return nil
	}
	err := s.c.Do(func() error {
		s.afterKernel = false
		return check("cuMemcpyHtoDAsync_v2", drv.cuMemcpyHtoDAsync(dst, p, n, s.s))
	})
	runtime.KeepAlive(src)
	return err
}

// CopyDtoH enqueues a copy from device address src into dst. Into pageable
// memory the copy has completed on return; into a HostBuffer's memory it has
// completed after the stream is synchronized.
func CopyDtoH[T any](s *Stream, dst []T, src DevicePtr) error {
	p, n := bytesOf(dst)
	if n == 0 {
		return nil
	}
	err := s.c.Do(func() error {
		s.afterKernel = false
		return check("cuMemcpyDtoHAsync_v2", drv.cuMemcpyDtoHAsync(p, src, n, s.s))
	})
	runtime.KeepAlive(dst)
	return err
}

// CopyDtoD enqueues a device-to-device copy of n bytes.
func (s *Stream) CopyDtoD(dst, src DevicePtr, n int) error {
	return s.c.Do(func() error {
		s.afterKernel = false
		return check("cuMemcpyDtoDAsync_v2", drv.cuMemcpyDtoDAsync(dst, src, uint64(n), s.s))
	})
}

// Memset8 sets n bytes at dst to v.
func (s *Stream) Memset8(dst DevicePtr, v uint8, n int) error {
	return s.c.Do(func() error {
		s.afterKernel = false
		return check("cuMemsetD8Async", drv.cuMemsetD8Async(dst, v, uint64(n), s.s))
	})
}

// Memset32 sets n 32-bit words at dst to v.
func (s *Stream) Memset32(dst DevicePtr, v uint32, n int) error {
	return s.c.Do(func() error {
		s.afterKernel = false
		return check("cuMemsetD32Async", drv.cuMemsetD32Async(dst, v, uint64(n), s.s))
	})
}

// Event is a CUDA event.
type Event struct {
	c *Context
	e cuEvent
}

// NewEvent creates an event; timing=false makes it cheaper (CU_EVENT_DISABLE_TIMING).
func (c *Context) NewEvent(timing bool) (*Event, error) {
	ev := &Event{c: c}
	flags := uint32(0)
	if !timing {
		flags = 2
	}
	if err := c.Do(func() error { return check("cuEventCreate", drv.cuEventCreate(&ev.e, flags)) }); err != nil {
		return nil, err
	}
	return ev, nil
}

// Record enqueues the event on s.
func (e *Event) Record(s *Stream) error {
	return e.c.Do(func() error { return check("cuEventRecord", drv.cuEventRecord(e.e, s.s)) })
}

// Synchronize waits for the event.
func (e *Event) Synchronize() error {
	return e.c.Do(func() error { return check("cuEventSynchronize", drv.cuEventSynchronize(e.e)) })
}

// Done reports whether the event has completed.
func (e *Event) Done() (bool, error) {
	var r int32
	e.c.Do(func() error { r = drv.cuEventQuery(e.e); return nil })
	if Result(r) == ErrorNotReady {
		return false, nil
	}
	return r == 0, check("cuEventQuery", r)
}

// Since is the time in milliseconds from start to e (both recorded with timing).
func (e *Event) Since(start *Event) (float32, error) {
	var ms float32
	err := e.c.Do(func() error { return check("cuEventElapsedTime", drv.cuEventElapsedTime(&ms, start.e, e.e)) })
	return ms, err
}

// Wait makes s wait for the event.
func (s *Stream) Wait(e *Event) error {
	return s.c.Do(func() error {
		s.afterKernel = false
		return check("cuStreamWaitEvent", drv.cuStreamWaitEvent(s.s, e.e, 0))
	})
}

// Destroy releases the event.
func (e *Event) Destroy() error {
	if e == nil || e.e == 0 {
		return nil
	}
	h := e.e
	e.e = 0
	return e.c.Do(func() error { return check("cuEventDestroy_v2", drv.cuEventDestroy(h)) })
}
