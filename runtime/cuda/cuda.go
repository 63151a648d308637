package cuda

import (
	"fmt"
	"math"
	"runtime"
	"sync"
	"unsafe"
)

// Device attributes (CUdevice_attribute) the package reads.
const (
	attrMaxThreadsPerBlock     = 1
	attrMaxSharedPerBlock      = 8
	attrMultiprocessorCount    = 16
	attrComputeCapabilityMajor = 75
	attrComputeCapabilityMinor = 76
	attrMaxSharedPerBlockOptin = 97
	attrL2CacheSize            = 38
)

var initOnce lazy

// Init loads libcuda.so.1 and initializes the driver. Without a usable driver
// the error wraps ErrNoDriver; without a device, ErrNoDevice. Both are one line.
func Init() error {
	return initOnce.do(func() error {
		if err := loadDriver(); err != nil {
			return err
		}
		if err := check("cuInit", drv.cuInit(0)); err != nil {
			if e, ok := err.(*Error); ok && (e.Code == ErrorNoDevice || e.Code == ErrorInvalidDevice) {
				return fmt.Errorf("%w: %v", ErrNoDevice, err)
			}
			if e, ok := err.(*Error); ok && sentinelOf(e.Code) == nil {
				return fmt.Errorf("%w: %v", ErrNoDriver, err)
			}
			return err
		}
		n, err := DeviceCount()
		if err != nil {
			return err
		}
		if n == 0 {
			return fmt.Errorf("%w: the driver reports 0 devices", ErrNoDevice)
		}
		return nil
	})
}

// DriverPath is the loaded libcuda path ("" before Init).
func DriverPath() string { return drv.path }

// DriverVersion is the driver's CUDA version, e.g. 13000 for 13.0.
func DriverVersion() (int, error) {
	if err := Init(); err != nil {
		return 0, err
	}
	var v int32
	return int(v), check("cuDriverGetVersion", drv.cuDriverGetVersion(&v))
}

// DeviceCount is the number of CUDA devices.
func DeviceCount() (int, error) {
	if err := loadDriver(); err != nil {
		return 0, err
	}
	var n int32
	if err := check("cuDeviceGetCount", drv.cuDeviceGetCount(&n)); err != nil {
		return 0, err
	}
	return int(n), nil
}

// Device describes a GPU.
type Device struct {
	Ordinal      int
	Name         string
	Major, Minor int // compute capability
	SMs          int
	TotalMem     uint64
	MaxShared    int // bytes of shared memory a block may opt in to
	L2Bytes      int
}

// Arch is the NVRTC/nvcc target: sm_90a on Hopper (9.0, for wgmma), else sm_XY.
func (d Device) Arch() string {
	if d.Major == 9 && d.Minor == 0 {
		return "sm_90a"
	}
	return fmt.Sprintf("sm_%d%d", d.Major, d.Minor)
}

func (d Device) String() string {
	return fmt.Sprintf("%s (%s, %d SMs, %.1f GiB)", d.Name, d.Arch(), d.SMs, float64(d.TotalMem)/(1<<30))
}

// paramArena holds kernel arguments: vals are the values, ptrs point at them
// (the kernelParams array). It is pinned so the driver may read it.
type paramArena struct {
	vals [maxKernelArgs]uint64
	ptrs [maxKernelArgs]unsafe.Pointer
}

const maxKernelArgs = 64

// Context is a device's primary context with its executor thread.
type Context struct {
	exec   *Executor
	aux    *Executor // second thread with the context current (AllocHostAside); started on first use
	auxMu  sync.Mutex
	dev    Device
	handle int32
	ctx    cuContext
	args   *paramArena
	pin    runtime.Pinner
	closed bool
}

// NewContext initializes the driver and makes device ordinal's primary context
// current on a new executor thread.
func NewContext(ordinal int) (*Context, error) {
	if err := Init(); err != nil {
		return nil, err
	}
	c := &Context{args: new(paramArena)}
	for i := range c.args.ptrs {
		c.args.ptrs[i] = unsafe.Pointer(&c.args.vals[i])
	}
	c.pin.Pin(c.args)
	exec, err := NewExecutor(func() error {
		var dev int32
		if err := check("cuDeviceGet", drv.cuDeviceGet(&dev, int32(ordinal))); err != nil {
			return err
		}
		c.handle = dev
		if err := check("cuDevicePrimaryCtxRetain", drv.cuDevicePrimaryCtxRetain(&c.ctx, dev)); err != nil {
			return err
		}
		if err := check("cuCtxSetCurrent", drv.cuCtxSetCurrent(c.ctx)); err != nil {
			drv.cuDevicePrimaryCtxRelease(dev)
			return err
		}
		name := make([]byte, 256)
		if err := check("cuDeviceGetName", drv.cuDeviceGetName(&name[0], int32(len(name)), dev)); err != nil {
			return err
		}
		c.dev = Device{Ordinal: ordinal, Name: cString(&name[0])}
		for _, a := range []struct {
			dst  *int
			attr int32
		}{{&c.dev.Major, attrComputeCapabilityMajor}, {&c.dev.Minor, attrComputeCapabilityMinor},
			{&c.dev.SMs, attrMultiprocessorCount}, {&c.dev.MaxShared, attrMaxSharedPerBlockOptin}, {&c.dev.L2Bytes, attrL2CacheSize}} {
			var v int32
			if err := check("cuDeviceGetAttribute", drv.cuDeviceGetAttribute(&v, a.attr, dev)); err != nil {
				return err
			}
			*a.dst = int(v)
		}
		return check("cuDeviceTotalMem_v2", drv.cuDeviceTotalMem(&c.dev.TotalMem, dev))
	})
	if err != nil {
		c.pin.Unpin()
		return nil, err
	}
	c.exec = exec
	return c, nil
}

// Device describes the context's GPU.
func (c *Context) Device() Device { return c.dev }

// Do runs fn on the context's thread; CUDA calls inside fn need no further hop.
func (c *Context) Do(fn func() error) error {
	if c.closed {
		return ErrClosed
	}
	return c.exec.Do(fn)
}

// Synchronize waits for all work on the device.
func (c *Context) Synchronize() error {
	return c.Do(func() error { return check("cuCtxSynchronize", drv.cuCtxSynchronize()) })
}

// MemInfo reports free and total device memory.
func (c *Context) MemInfo() (free, total uint64, err error) {
	err = c.Do(func() error { return check("cuMemGetInfo_v2", drv.cuMemGetInfo(&free, &total)) })
	return
}

// Close releases the primary context and stops the executor. Buffers,
// streams and modules must be released first.
func (c *Context) Close() error {
	if c.closed {
		return nil
	}
	err := c.Do(func() error {
		e1 := check("cuCtxSynchronize", drv.cuCtxSynchronize())
		e2 := check("cuDevicePrimaryCtxRelease_v2", drv.cuDevicePrimaryCtxRelease(c.handle))
		if e1 != nil {
			return e1
		}
		return e2
	})
	c.closed = true
	c.auxMu.Lock()
	if c.aux != nil {
		c.aux.Close()
	}
	c.auxMu.Unlock()
	c.exec.Close()
	c.pin.Unpin()
	return err
}

// DeviceBuffer is device memory.
type DeviceBuffer struct {
	c    *Context
	ptr  DevicePtr
	size int
}

// Alloc allocates n bytes of device memory (errors.Is(err, ErrOutOfMemory) when it does not fit).
func (c *Context) Alloc(n int) (*DeviceBuffer, error) { return c.alloc(n, c.Do) }

// AllocAside allocates device memory on the context's second thread (safe
// from any goroutine while steps run); the buffer frees like any other.
func (c *Context) AllocAside(n int) (*DeviceBuffer, error) { return c.alloc(n, c.doAside) }

// alloc allocates n bytes of device memory on the thread do runs on.
func (c *Context) alloc(n int, do func(func() error) error) (*DeviceBuffer, error) {
	if n <= 0 {
		return nil, fmt.Errorf("%w: allocation of %d bytes", ErrInvalidValue, n)
	}
	b := &DeviceBuffer{c: c, size: n}
	err := do(func() error {
		if err := check("cuMemAlloc_v2", drv.cuMemAlloc(&b.ptr, uint64(n))); err != nil {
			return fmt.Errorf("%w (%d bytes)", err, n)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return b, nil
}

// Ptr is the buffer's device address.
func (b *DeviceBuffer) Ptr() DevicePtr {
	if b == nil {
		return 0
	}
	return b.ptr
}

// Size is the buffer's size in bytes.
func (b *DeviceBuffer) Size() int { return b.size }

// Free releases the buffer; freeing twice is a no-op.
func (b *DeviceBuffer) Free() error {
	if b == nil || b.ptr == 0 {
		return nil
	}
	p := b.ptr
	b.ptr = 0
	return b.c.Do(func() error { return check("cuMemFree_v2", drv.cuMemFree(p)) })
}

// HostBuffer is page-locked host memory, for truly asynchronous copies.
type HostBuffer struct {
	c     *Context
	p     unsafe.Pointer
	size  int
	aside bool // allocated (and freed) on the aux thread
}

// doAside runs fn on a second OS thread where the context is current, so that
// slow driver calls (pinning hundreds of MB) do not hold up the executor
// thread that issues the running steps.
func (c *Context) doAside(fn func() error) error {
	if c.closed {
		return ErrClosed
	}
	c.auxMu.Lock()
	if c.aux == nil {
		ex, err := NewExecutor(func() error { return check("cuCtxSetCurrent", drv.cuCtxSetCurrent(c.ctx)) })
		if err != nil {
			c.auxMu.Unlock()
			return err
		}
		c.aux = ex
	}
	ex := c.aux
	c.auxMu.Unlock()
	return ex.Do(fn)
}

// AllocHostAside allocates n bytes of pinned host memory on the context's
// second thread (safe to call from any goroutine while steps run); its Free
// runs there too.
func (c *Context) AllocHostAside(n int) (*HostBuffer, error) { return c.allocHost(n, true) }

// AllocHost allocates n bytes of pinned host memory.
func (c *Context) AllocHost(n int) (*HostBuffer, error) { return c.allocHost(n, false) }

// allocHost pins n bytes, on the second thread when aside (and its Free runs there too).
func (c *Context) allocHost(n int, aside bool) (*HostBuffer, error) {
	if n <= 0 {
		return nil, fmt.Errorf("%w: host allocation of %d bytes", ErrInvalidValue, n)
	}
	h := &HostBuffer{c: c, size: n, aside: aside}
	do := c.Do
	if aside {
		do = c.doAside
	}
	if err := do(func() error { return check("cuMemAllocHost_v2", drv.cuMemAllocHost(&h.p, uint64(n))) }); err != nil {
		return nil, err
	}
	return h, nil
}

// Size is the buffer's size in bytes.
func (h *HostBuffer) Size() int { return h.size }

// Bytes views the pinned memory.
func (h *HostBuffer) Bytes() []byte { return unsafe.Slice((*byte)(h.p), h.size) }

// Int32s views the pinned memory as int32 values.
func (h *HostBuffer) Int32s() []int32 { return unsafe.Slice((*int32)(h.p), h.size/4) }

// Float32s views the pinned memory as float32 values.
func (h *HostBuffer) Float32s() []float32 { return unsafe.Slice((*float32)(h.p), h.size/4) }

// Uint16s views the pinned memory as uint16 values (bf16 or f16 data).
func (h *HostBuffer) Uint16s() []uint16 { return unsafe.Slice((*uint16)(h.p), h.size/2) }

// Free releases the pinned memory.
func (h *HostBuffer) Free() error {
	if h == nil || h.p == nil {
		return nil
	}
	p := h.p
	h.p = nil
	if h.aside {
		return h.c.doAside(func() error { return check("cuMemFreeHost", drv.cuMemFreeHost(p)) })
	}
	return h.c.Do(func() error { return check("cuMemFreeHost", drv.cuMemFreeHost(p)) })
}

// Stream is a CUDA stream. Its copies from pageable Go memory are staged by the
// driver; copies to pageable memory complete before the call returns.
type Stream struct {
	c *Context
	s cuStream
}

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
	err := s.c.Do(func() error { return check("cuMemcpyHtoDAsync_v2", drv.cuMemcpyHtoDAsync(dst, p, n, s.s)) })
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
	err := s.c.Do(func() error { return check("cuMemcpyDtoHAsync_v2", drv.cuMemcpyDtoHAsync(p, src, n, s.s)) })
	runtime.KeepAlive(dst)
	return err
}

// CopyDtoD enqueues a device-to-device copy of n bytes.
func (s *Stream) CopyDtoD(dst, src DevicePtr, n int) error {
	return s.c.Do(func() error { return check("cuMemcpyDtoDAsync_v2", drv.cuMemcpyDtoDAsync(dst, src, uint64(n), s.s)) })
}

// Memset8 sets n bytes at dst to v.
func (s *Stream) Memset8(dst DevicePtr, v uint8, n int) error {
	return s.c.Do(func() error { return check("cuMemsetD8Async", drv.cuMemsetD8Async(dst, v, uint64(n), s.s)) })
}

// Memset32 sets n 32-bit words at dst to v.
func (s *Stream) Memset32(dst DevicePtr, v uint32, n int) error {
	return s.c.Do(func() error { return check("cuMemsetD32Async", drv.cuMemsetD32Async(dst, v, uint64(n), s.s)) })
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
	return s.c.Do(func() error { return check("cuStreamWaitEvent", drv.cuStreamWaitEvent(s.s, e.e, 0)) })
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

// Module is loaded device code.
type Module struct {
	c *Context
	m cuModule
}

// LoadModule loads a cubin (or PTX, NUL-terminated) image.
func (c *Context) LoadModule(image []byte) (*Module, error) {
	if len(image) == 0 {
		return nil, fmt.Errorf("%w: empty module image", ErrInvalidValue)
	}
	m := &Module{c: c}
	err := c.Do(func() error { return check("cuModuleLoadData", drv.cuModuleLoadData(&m.m, unsafe.Pointer(&image[0]))) })
	runtime.KeepAlive(image)
	if err != nil {
		return nil, err
	}
	return m, nil
}

// Unload releases the module.
func (m *Module) Unload() error {
	if m == nil || m.m == 0 {
		return nil
	}
	h := m.m
	m.m = 0
	return m.c.Do(func() error { return check("cuModuleUnload", drv.cuModuleUnload(h)) })
}

// Function is a kernel of a module.
type Function struct {
	c    *Context
	f    cuFunction
	Name string
}

// Function looks up a kernel by its (extern "C") name.
func (m *Module) Function(name string) (*Function, error) {
	f := &Function{c: m.c, Name: name}
	err := m.c.Do(func() error { return check("cuModuleGetFunction", drv.cuModuleGetFunction(&f.f, m.m, name)) })
	if err != nil {
		return nil, fmt.Errorf("kernel %s: %w", name, err)
	}
	return f, nil
}

// SetMaxDynamicShared lets launches use up to n bytes of dynamic shared memory.
func (f *Function) SetMaxDynamicShared(n int) error {
	const maxDynamicSharedSizeBytes = 8 // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
	return f.c.Do(func() error {
		return check("cuFuncSetAttribute", drv.cuFuncSetAttribute(f.f, maxDynamicSharedSizeBytes, int32(n)))
	})
}

// Resources reports what the compiled kernel uses per thread: registers and
// local memory (spilled registers and arrays the compiler kept off them).
func (f *Function) Resources() (regs, localBytes int, err error) {
	const numRegs, localSizeBytes = 4, 3 // CU_FUNC_ATTRIBUTE_NUM_REGS, CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES
	var r, l int32
	err = f.c.Do(func() error {
		if err := check("cuFuncGetAttribute", drv.cuFuncGetAttribute(&r, numRegs, f.f)); err != nil {
			return err
		}
		return check("cuFuncGetAttribute", drv.cuFuncGetAttribute(&l, localSizeBytes, f.f))
	})
	return int(r), int(l), err
}

// BlocksPerSM is how many blocks of the kernel fit on one multiprocessor
// at once with block threads and shared bytes of dynamic shared memory.
func (f *Function) BlocksPerSM(block, shared int) (int, error) {
	var n int32
	err := f.c.Do(func() error {
		return check("cuOccupancyMaxActiveBlocksPerMultiprocessor", drv.cuOccupancyMaxActiveBlocks(&n, f.f, int32(block), uint64(shared)))
	})
	return int(n), err
}

// Dim3 is a grid or block shape; zero components count as 1.
type Dim3 struct{ X, Y, Z int }

func (d Dim3) u() (uint32, uint32, uint32) {
	one := func(v int) uint32 {
		if v <= 0 {
			return 1
		}
		return uint32(v)
	}
	return one(d.X), one(d.Y), one(d.Z)
}

// Launch enqueues the kernel on s. Arguments are passed by value: int, int32,
// uint32, int64, uint64 (DevicePtr), float32, float64, bool, *DeviceBuffer
// (its address; nil is a null pointer). A kernel parameter declared int
// receives the low 32 bits of an int.
func (f *Function) Launch(s *Stream, grid, block Dim3, shared int, args ...any) error {
	if len(args) > maxKernelArgs {
		return fmt.Errorf("%w: %d kernel arguments (max %d)", ErrInvalidValue, len(args), maxKernelArgs)
	}
	return f.c.Do(func() error {
		a := f.c.args
		for i, v := range args {
			var x uint64
			switch v := v.(type) {
			case int:
				x = uint64(int64(v))
			case int32:
				x = uint64(uint32(v))
			case uint32:
				x = uint64(v)
			case int64:
				x = uint64(v)
			case uint64:
				x = v
			case float32:
				x = uint64(math.Float32bits(v))
			case float64:
				x = math.Float64bits(v)
			case bool:
				if v {
					x = 1
				}
			case *DeviceBuffer:
				if v != nil {
					x = v.ptr
				}
			default:
				return fmt.Errorf("%w: kernel %s argument %d has unsupported type %T", ErrInvalidValue, f.Name, i, v)
			}
			a.vals[i] = x
		}
		gx, gy, gz := grid.u()
		bx, by, bz := block.u()
		var params unsafe.Pointer
		if len(args) > 0 {
			params = unsafe.Pointer(&a.ptrs[0])
		}
		if err := check("cuLaunchKernel", drv.cuLaunchKernel(f.f, gx, gy, gz, bx, by, bz, uint32(shared), s.s, params, nil)); err != nil {
			return fmt.Errorf("kernel %s grid %v block %v: %w", f.Name, grid, block, err)
		}
		return nil
	})
}
