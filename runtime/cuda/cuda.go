package cuda

import (
	"fmt"
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
	attrMaxPersistingL2        = 108 // CU_DEVICE_ATTRIBUTE_MAX_PERSISTING_L2_CACHE_SIZE
	attrMaxAccessPolicyWindow  = 109 // CU_DEVICE_ATTRIBUTE_MAX_ACCESS_POLICY_WINDOW_SIZE
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
	// PersistL2Max: the most bytes of L2 SetPersistingL2 may set aside;
	// WindowMax: the largest AccessWindow. Zero where the card or the
	// driver has no L2 persistence (before sm_80).
	PersistL2Max, WindowMax int
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
// (the kernelParams array); cfg and attrs are cuLaunchKernelEx's launch
// configuration and its attributes (programmatic serialization, cluster
// dimension). It is pinned so the driver may read it.
type paramArena struct {
	vals  [maxKernelArgs]uint64
	ptrs  [maxKernelArgs]unsafe.Pointer
	maps  [tmaMaxArgs]TensorMap // *TensorMap arguments' copies (ptrs points at them)
	cfg   launchConfig
	attrs [3]launchAttr
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
		// optional attributes stay zero where the driver does not know them
		for _, a := range []struct {
			dst      *int
			attr     int32
			optional bool
		}{{&c.dev.Major, attrComputeCapabilityMajor, false}, {&c.dev.Minor, attrComputeCapabilityMinor, false},
			{&c.dev.SMs, attrMultiprocessorCount, false}, {&c.dev.MaxShared, attrMaxSharedPerBlockOptin, false}, {&c.dev.L2Bytes, attrL2CacheSize, false},
			{&c.dev.PersistL2Max, attrMaxPersistingL2, true}, {&c.dev.WindowMax, attrMaxAccessPolicyWindow, true}} {
			var v int32
			r := drv.cuDeviceGetAttribute(&v, a.attr, dev)
			switch {
			case a.optional:
				if r == 0 && v > 0 {
					*a.dst = int(v)
				}
			default:
				if err := check("cuDeviceGetAttribute", r); err != nil {
					return err
				}
				*a.dst = int(v)
			}
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
