package cuda

import (
	"fmt"
	"math"
	"runtime"
	"unsafe"
)

// Modules, kernels and launches.

// Module is loaded device code: a module of the primary context
// (LoadModule), or a context-independent library (LoadLibrary).
type Module struct {
	c   *Context
	m   cuModule
	lib uintptr // CUlibrary (LoadLibrary), else 0
}

// LoadLibrary loads a cubin as a context-independent library (CUDA 12.0+):
// its kernels launch in the context of the stream they are launched on,
// green contexts' included (a module's functions belong to the context
// that loaded it). The error wraps ErrNotSupported where the driver lacks
// the library API.
func (c *Context) LoadLibrary(image []byte) (*Module, error) {
	if len(image) == 0 {
		return nil, fmt.Errorf("%w: empty library image", ErrInvalidValue)
	}
	if drv.lib.load == nil || drv.lib.getKernel == nil || drv.lib.kernelFunction == nil || drv.lib.unload == nil {
		return nil, fmt.Errorf("%w: driver %s has no library API (cuLibraryLoadData)", ErrNotSupported, drv.path)
	}
	m := &Module{c: c}
	err := c.Do(func() error {
		return check("cuLibraryLoadData", drv.lib.load(&m.lib, unsafe.Pointer(&image[0]), nil, nil, 0, nil, nil, 0))
	})
	runtime.KeepAlive(image)
	if err != nil {
		return nil, err
	}
	return m, nil
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
	if m == nil || m.m == 0 && m.lib == 0 {
		return nil
	}
	h, lib := m.m, m.lib
	m.m, m.lib = 0, 0
	if lib != 0 {
		return m.c.Do(func() error { return check("cuLibraryUnload", drv.lib.unload(lib)) })
	}
	return m.c.Do(func() error { return check("cuModuleUnload", drv.cuModuleUnload(h)) })
}

// Function is a kernel of a module. Of a library's kernel, f is its
// function in the primary context (attributes, occupancy) and k the
// context-independent kernel that launches take.
type Function struct {
	c    *Context
	f    cuFunction
	k    uintptr // CUkernel (LoadLibrary), else 0
	Name string
}

// Function looks up a kernel by its (extern "C") name.
func (m *Module) Function(name string) (*Function, error) {
	f := &Function{c: m.c, Name: name}
	err := m.c.Do(func() error {
		if m.lib == 0 {
			return check("cuModuleGetFunction", drv.cuModuleGetFunction(&f.f, m.m, name))
		}
		if err := check("cuLibraryGetKernel", drv.lib.getKernel(&f.k, m.lib, name)); err != nil {
			return err
		}
		return check("cuKernelGetFunction", drv.lib.kernelFunction(&f.f, f.k))
	})
	if err != nil {
		return nil, fmt.Errorf("kernel %s: %w", name, err)
	}
	return f, nil
}

// launchable is what a launch names: the kernel of a library (the stream's
// context runs it), else the module's function.
func (f *Function) launchable() cuFunction {
	if f.k != 0 {
		return f.k
	}
	return f.f
}

// SetMaxDynamicShared lets launches use up to n bytes of dynamic shared memory.
func (f *Function) SetMaxDynamicShared(n int) error {
	const maxDynamicSharedSizeBytes = 8 // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
	return f.c.Do(func() error {
		if f.k != 0 && drv.lib.kernelSetAttribute != nil { // for every context of the device
			return check("cuKernelSetAttribute", drv.lib.kernelSetAttribute(maxDynamicSharedSizeBytes, int32(n), f.k, f.c.handle))
		}
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

// launchConfig is CUlaunchConfig (cuda.h): 56 bytes, the stream at 32, the
// attributes at 40, their count at 48.
type launchConfig struct {
	gridX, gridY, gridZ    uint32
	blockX, blockY, blockZ uint32
	shared                 uint32
	_                      uint32
	stream                 cuStream
	attrs                  unsafe.Pointer
	numAttrs               uint32
	_                      uint32
}

// launchAttr is CUlaunchAttribute: the id, padding to 8 bytes, a 64-byte
// value union (72 bytes).
type launchAttr struct {
	id    uint32
	_     uint32
	value [16]int32
}

// CUlaunchAttributeID values (cuda.h).
const (
	launchAttrAccessPolicyWindow              = 1 // CU_LAUNCH_ATTRIBUTE_ACCESS_POLICY_WINDOW: CUaccessPolicyWindow (l2.go)
	launchAttrClusterDimension                = 4 // CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION: x, y, z (uint32)
	launchAttrProgrammaticStreamSerialization = 6 // CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
)

// Launch enqueues the kernel on s. Arguments are passed by value: int, int32,
// uint32, int64, uint64 (DevicePtr), float32, float64, bool, *DeviceBuffer
// (its address; nil is a null pointer). A kernel parameter declared int
// receives the low 32 bits of an int.
func (f *Function) Launch(s *Stream, grid, block Dim3, shared int, args ...any) error {
	return f.launch(s, grid, block, Dim3{}, shared, args)
}

// LaunchCluster is Launch with the grid's blocks in thread-block clusters
// of cluster's shape (sm_90 and later; each grid dimension a multiple of
// the cluster's): the blocks of a cluster run at once and may read each
// other's shared memory. A zero dimension is 1, as in every Dim3.
func (f *Function) LaunchCluster(s *Stream, grid, block, cluster Dim3, shared int, args ...any) error {
	c, err := clusterShape(grid, cluster)
	if err != nil {
		return fmt.Errorf("kernel %s: %w", f.Name, err)
	}
	return f.launch(s, grid, block, c, shared, args)
}

// clusterShape is cluster with its zero dimensions 1, or ErrInvalidValue
// when a dimension is negative or does not divide grid's.
func clusterShape(grid, cluster Dim3) (Dim3, error) {
	if cluster.X < 0 || cluster.Y < 0 || cluster.Z < 0 || grid.X < 0 || grid.Y < 0 || grid.Z < 0 {
		return Dim3{}, fmt.Errorf("%w: clusters %v for grid %v", ErrInvalidValue, cluster, grid)
	}
	cx, cy, cz := cluster.u()
	gx, gy, gz := grid.u()
	if gx%cx != 0 || gy%cy != 0 || gz%cz != 0 {
		return Dim3{}, fmt.Errorf("%w: clusters %v for grid %v", ErrInvalidValue, cluster, grid)
	}
	return Dim3{X: int(cx), Y: int(cy), Z: int(cz)}, nil
}

// pack stores args (as Launch takes them) in a's values.
func (a *paramArena) pack(name string, args []any) error {
	if len(args) > maxKernelArgs {
		return fmt.Errorf("%w: %d kernel arguments (max %d)", ErrInvalidValue, len(args), maxKernelArgs)
	}
	nm := 0
	for i, v := range args {
		a.ptrs[i] = unsafe.Pointer(&a.vals[i])
		var x uint64
		switch v := v.(type) {
		case *TensorMap: // passed by value: 128 bytes
			if v == nil || nm == tmaMaxArgs {
				return fmt.Errorf("%w: kernel %s argument %d: a nil tensor map, or more than %d", ErrInvalidValue, name, i, tmaMaxArgs)
			}
			a.maps[nm] = *v
			a.ptrs[i] = unsafe.Pointer(&a.maps[nm])
			nm++
			continue
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
			return fmt.Errorf("%w: kernel %s argument %d has unsupported type %T", ErrInvalidValue, name, i, v)
		}
		a.vals[i] = x
	}
	return nil
}

// launch is Launch (cluster zero) and LaunchCluster.
func (f *Function) launch(s *Stream, grid, block, cluster Dim3, shared int, args []any) error {
	return f.c.Do(func() error {
		a := f.c.args
		if err := a.pack(f.Name, args); err != nil {
			return err
		}
		gx, gy, gz := grid.u()
		bx, by, bz := block.u()
		var params unsafe.Pointer
		if len(args) > 0 {
			params = unsafe.Pointer(&a.ptrs[0])
		}
		programmatic := s.pdl && s.afterKernel
		s.afterKernel = true
		n := 0
		if programmatic {
			a.attrs[n] = launchAttr{id: launchAttrProgrammaticStreamSerialization}
			a.attrs[n].value[0] = 1 // programmaticStreamSerializationAllowed
			n++
		}
		if s.win.Bytes > 0 {
			a.attrs[n] = s.win.attr()
			n++
		}
		if cluster.X > 0 {
			if drv.cuLaunchKernelEx == nil {
				return fmt.Errorf("%w: kernel %s: clusters need cuLaunchKernelEx", ErrNotSupported, f.Name)
			}
			cx, cy, cz := cluster.u()
			a.attrs[n] = launchAttr{id: launchAttrClusterDimension}
			a.attrs[n].value[0], a.attrs[n].value[1], a.attrs[n].value[2] = int32(cx), int32(cy), int32(cz)
			n++
		}
		if n > 0 {
			a.cfg = launchConfig{gridX: gx, gridY: gy, gridZ: gz, blockX: bx, blockY: by, blockZ: bz, shared: uint32(shared),
				stream: s.s, attrs: unsafe.Pointer(&a.attrs[0]), numAttrs: uint32(n)}
			if err := check("cuLaunchKernelEx", drv.cuLaunchKernelEx(unsafe.Pointer(&a.cfg), f.launchable(), params, nil)); err != nil {
				return fmt.Errorf("kernel %s grid %v block %v (programmatic %v, clusters %v, L2 window %d bytes): %w", f.Name, grid, block, programmatic, cluster, s.win.Bytes, err)
			}
			return nil
		}
		if err := check("cuLaunchKernel", drv.cuLaunchKernel(f.launchable(), gx, gy, gz, bx, by, bz, uint32(shared), s.s, params, nil)); err != nil {
			return fmt.Errorf("kernel %s grid %v block %v: %w", f.Name, grid, block, err)
		}
		return nil
	})
}
