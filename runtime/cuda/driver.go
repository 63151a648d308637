package cuda

import (
	"fmt"
	"unsafe"
)

// Opaque driver handles.
type (
	cuContext   = uintptr
	cuModule    = uintptr
	cuFunction  = uintptr
	cuStream    = uintptr
	cuEvent     = uintptr
	cuGraph     = uintptr
	cuGraphExec = uintptr
	// DevicePtr is a device address (CUdeviceptr).
	DevicePtr = uint64
)

// driver holds the raw driver-API symbols. Versioned names are bound
// explicitly (cuMemAlloc_v2, not the cuMemAlloc macro target of old headers).
type driver struct {
	path string

	cuInit                     func(flags uint32) int32
	cuDriverGetVersion         func(v *int32) int32
	cuGetErrorName             func(r int32, s **byte) int32
	cuGetErrorString           func(r int32, s **byte) int32
	cuDeviceGetCount           func(n *int32) int32
	cuDeviceGet                func(dev *int32, ordinal int32) int32
	cuDeviceGetName            func(name *byte, n int32, dev int32) int32
	cuDeviceGetAttribute       func(v *int32, attr int32, dev int32) int32
	cuDeviceTotalMem           func(b *uint64, dev int32) int32
	cuDevicePrimaryCtxRetain   func(ctx *cuContext, dev int32) int32
	cuDevicePrimaryCtxRelease  func(dev int32) int32
	cuCtxSetCurrent            func(ctx cuContext) int32
	cuCtxSynchronize           func() int32
	cuMemGetInfo               func(free, total *uint64) int32
	cuMemAlloc                 func(p *DevicePtr, n uint64) int32
	cuMemFree                  func(p DevicePtr) int32
	cuMemAllocHost             func(p *unsafe.Pointer, n uint64) int32
	cuMemFreeHost              func(p unsafe.Pointer) int32
	cuMemcpyHtoD               func(dst DevicePtr, src unsafe.Pointer, n uint64) int32
	cuMemcpyDtoH               func(dst unsafe.Pointer, src DevicePtr, n uint64) int32
	cuMemcpyHtoDAsync          func(dst DevicePtr, src unsafe.Pointer, n uint64, s cuStream) int32
	cuMemcpyDtoHAsync          func(dst unsafe.Pointer, src DevicePtr, n uint64, s cuStream) int32
	cuMemcpyDtoDAsync          func(dst, src DevicePtr, n uint64, s cuStream) int32
	cuMemsetD8Async            func(dst DevicePtr, v uint8, n uint64, s cuStream) int32
	cuMemsetD32Async           func(dst DevicePtr, v uint32, n uint64, s cuStream) int32
	cuStreamCreate             func(s *cuStream, flags uint32) int32
	cuStreamCreateWithPriority func(s *cuStream, flags uint32, priority int32) int32
	cuCtxGetStreamPriorities   func(least, greatest *int32) int32
	cuStreamDestroy            func(s cuStream) int32
	cuStreamSynchronize        func(s cuStream) int32
	cuStreamWaitEvent          func(s cuStream, e cuEvent, flags uint32) int32
	cuEventCreate              func(e *cuEvent, flags uint32) int32
	cuEventDestroy             func(e cuEvent) int32
	cuEventRecord              func(e cuEvent, s cuStream) int32
	cuEventSynchronize         func(e cuEvent) int32
	cuEventQuery               func(e cuEvent) int32
	cuEventElapsedTime         func(ms *float32, start, end cuEvent) int32
	cuModuleLoadData           func(m *cuModule, image unsafe.Pointer) int32
	cuModuleUnload             func(m cuModule) int32
	cuModuleGetFunction        func(f *cuFunction, m cuModule, name string) int32
	cuFuncSetAttribute         func(f cuFunction, attr int32, v int32) int32
	cuFuncGetAttribute         func(v *int32, attr int32, f cuFunction) int32
	cuOccupancyMaxActiveBlocks func(n *int32, f cuFunction, blockSize int32, shared uint64) int32
	cuLaunchKernel             func(f cuFunction, gx, gy, gz, bx, by, bz, shmem uint32, s cuStream, params unsafe.Pointer, extra unsafe.Pointer) int32
	// cuLaunchKernelEx (optional: CUDA 12+): launches with attributes
	// (Programmatic Dependent Launch)
	cuLaunchKernelEx func(cfg unsafe.Pointer, f cuFunction, params unsafe.Pointer, extra unsafe.Pointer) int32
	// cuTensorMapEncodeTiled (optional: CUDA 12+; tma.go)
	cuTensorMapEncodeTiled func(m unsafe.Pointer, dtype int32, rank uint32, addr uintptr, dims, strides, box, estr unsafe.Pointer, interleave, swizzle, l2, oob int32) int32
	// The L2 set-aside for persisting accesses (optional: CUDA 11+; l2.go)
	cuCtxSetLimit               func(limit int32, v uint64) int32
	cuCtxGetLimit               func(v *uint64, limit int32) int32
	cuCtxResetPersistingL2Cache func() int32
	// Stream capture and graphs (optional: nil on drivers without them).
	cuStreamBeginCapture        func(s cuStream, mode int32) int32
	cuStreamEndCapture          func(s cuStream, g *cuGraph) int32
	cuGraphInstantiateWithFlags func(e *cuGraphExec, g cuGraph, flags uint64) int32
	cuGraphLaunch               func(e cuGraphExec, s cuStream) int32
	cuGraphExecDestroy          func(e cuGraphExec) int32
	cuGraphDestroy              func(g cuGraph) int32
	// Graph edges with edge data (optional: CUDA 12.3+; graph.go's
	// CaptureLeaves, Edges and MakeProgrammatic)
	cuStreamGetCaptureInfo    func(s cuStream, status *int32, id *uint64, g *cuGraph, deps **uintptr, data **EdgeData, n *uint64) int32
	cuGraphGetEdges           func(g cuGraph, from, to *uintptr, data *EdgeData, n *uint64) int32
	cuGraphAddDependencies    func(g cuGraph, from, to *uintptr, data *EdgeData, n uint64) int32
	cuGraphRemoveDependencies func(g cuGraph, from, to *uintptr, data *EdgeData, n uint64) int32
	cuGraphNodeGetType        func(node uintptr, t *int32) int32
	// Graph nodes rewritten (optional; graph.go's MemsetParams, AddKernel, DestroyNode)
	cuGraphMemsetNodeGetParams func(node uintptr, p *MemsetParams) int32
	cuGraphAddKernelNode       func(node *uintptr, g cuGraph, deps *uintptr, n uint64, p *kernelNodeParams) int32
	cuGraphDestroyNode         func(node uintptr) int32
	// Profiler range (optional): what ncu --profile-from-start off records.
	cuProfilerStart func() int32
	cuProfilerStop  func() int32
	// Green contexts (optional: CUDA 12.4+; green.go).
	green greenDriver
	// Context-independent libraries (optional: CUDA 12.0+; module.go).
	lib struct {
		load               func(lib *uintptr, code unsafe.Pointer, jitOpts, jitVals unsafe.Pointer, nJit uint32, libOpts, libVals unsafe.Pointer, nLib uint32) int32
		unload             func(lib uintptr) int32
		getKernel          func(k *uintptr, lib uintptr, name string) int32
		kernelFunction     func(f *cuFunction, k uintptr) int32
		kernelSetAttribute func(attr int32, v int32, k uintptr, dev int32) int32
	}
}

var (
	drv     driver
	drvLoad lazy
)

func loadDriver() error {
	return drvLoad.do(func() error {
		h, path, err := dlopen("libcuda.so.1", "LD_LIBRARY_PATH, the ldconfig cache, /usr/local/nvidia/lib64", []string{"libcuda.so.1", "/usr/lib/x86_64-linux-gnu/libcuda.so.1", "/usr/local/nvidia/lib64/libcuda.so.1", "/usr/lib64/libcuda.so.1", "libcuda.so"})
		if err != nil {
			return fmt.Errorf("%w: %v", ErrNoDriver, err)
		}
		d := driver{path: path}
		b := &binder{lib: path, h: h}
		b.fn(&d.cuInit, "cuInit")
		b.fn(&d.cuDriverGetVersion, "cuDriverGetVersion")
		b.fn(&d.cuGetErrorName, "cuGetErrorName")
		b.fn(&d.cuGetErrorString, "cuGetErrorString")
		b.fn(&d.cuDeviceGetCount, "cuDeviceGetCount")
		b.fn(&d.cuDeviceGet, "cuDeviceGet")
		b.fn(&d.cuDeviceGetName, "cuDeviceGetName")
		b.fn(&d.cuDeviceGetAttribute, "cuDeviceGetAttribute")
		b.fn(&d.cuDeviceTotalMem, "cuDeviceTotalMem_v2")
		b.fn(&d.cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain")
		b.fn(&d.cuDevicePrimaryCtxRelease, "cuDevicePrimaryCtxRelease_v2")
		b.fn(&d.cuCtxSetCurrent, "cuCtxSetCurrent")
		b.fn(&d.cuCtxSynchronize, "cuCtxSynchronize")
		b.fn(&d.cuMemGetInfo, "cuMemGetInfo_v2")
		b.fn(&d.cuMemAlloc, "cuMemAlloc_v2")
		b.fn(&d.cuMemFree, "cuMemFree_v2")
		b.fn(&d.cuMemAllocHost, "cuMemAllocHost_v2")
		b.fn(&d.cuMemFreeHost, "cuMemFreeHost")
		b.fn(&d.cuMemcpyHtoD, "cuMemcpyHtoD_v2")
		b.fn(&d.cuMemcpyDtoH, "cuMemcpyDtoH_v2")
		b.fn(&d.cuMemcpyHtoDAsync, "cuMemcpyHtoDAsync_v2")
		b.fn(&d.cuMemcpyDtoHAsync, "cuMemcpyDtoHAsync_v2")
		b.fn(&d.cuMemcpyDtoDAsync, "cuMemcpyDtoDAsync_v2")
		b.fn(&d.cuMemsetD8Async, "cuMemsetD8Async")
		b.fn(&d.cuMemsetD32Async, "cuMemsetD32Async")
		b.fn(&d.cuStreamCreate, "cuStreamCreate")
		b.fn(&d.cuStreamCreateWithPriority, "cuStreamCreateWithPriority")
		b.fn(&d.cuCtxGetStreamPriorities, "cuCtxGetStreamPriorityRange")
		b.fn(&d.cuStreamDestroy, "cuStreamDestroy_v2")
		b.fn(&d.cuStreamSynchronize, "cuStreamSynchronize")
		b.fn(&d.cuStreamWaitEvent, "cuStreamWaitEvent")
		b.fn(&d.cuEventCreate, "cuEventCreate")
		b.fn(&d.cuEventDestroy, "cuEventDestroy_v2")
		b.fn(&d.cuEventRecord, "cuEventRecord")
		b.fn(&d.cuEventSynchronize, "cuEventSynchronize")
		b.fn(&d.cuEventQuery, "cuEventQuery")
		b.fn(&d.cuEventElapsedTime, "cuEventElapsedTime_v2", "cuEventElapsedTime")
		b.fn(&d.cuModuleLoadData, "cuModuleLoadData")
		b.fn(&d.cuModuleUnload, "cuModuleUnload")
		b.fn(&d.cuModuleGetFunction, "cuModuleGetFunction")
		b.fn(&d.cuFuncSetAttribute, "cuFuncSetAttribute")
		b.fn(&d.cuFuncGetAttribute, "cuFuncGetAttribute")
		b.fn(&d.cuOccupancyMaxActiveBlocks, "cuOccupancyMaxActiveBlocksPerMultiprocessor")
		b.fn(&d.cuLaunchKernel, "cuLaunchKernel")
		if b.err != nil {
			return fmt.Errorf("%w: %v (driver too old?)", ErrNoDriver, b.err)
		}
		b.opt = true
		b.fn(&d.cuStreamBeginCapture, "cuStreamBeginCapture_v2")
		b.fn(&d.cuStreamEndCapture, "cuStreamEndCapture")
		b.fn(&d.cuGraphInstantiateWithFlags, "cuGraphInstantiateWithFlags")
		b.fn(&d.cuGraphLaunch, "cuGraphLaunch")
		b.fn(&d.cuGraphExecDestroy, "cuGraphExecDestroy")
		b.fn(&d.cuGraphDestroy, "cuGraphDestroy")
		b.fn(&d.cuStreamGetCaptureInfo, "cuStreamGetCaptureInfo_v3")
		b.fn(&d.cuGraphGetEdges, "cuGraphGetEdges_v2")
		b.fn(&d.cuGraphAddDependencies, "cuGraphAddDependencies_v2")
		b.fn(&d.cuGraphRemoveDependencies, "cuGraphRemoveDependencies_v2")
		b.fn(&d.cuGraphNodeGetType, "cuGraphNodeGetType")
		b.fn(&d.cuGraphMemsetNodeGetParams, "cuGraphMemsetNodeGetParams")
		b.fn(&d.cuGraphAddKernelNode, "cuGraphAddKernelNode_v2")
		b.fn(&d.cuGraphDestroyNode, "cuGraphDestroyNode")
		b.fn(&d.cuLaunchKernelEx, "cuLaunchKernelEx")
		b.fn(&d.cuTensorMapEncodeTiled, "cuTensorMapEncodeTiled")
		b.fn(&d.cuCtxSetLimit, "cuCtxSetLimit")
		b.fn(&d.cuCtxGetLimit, "cuCtxGetLimit")
		b.fn(&d.cuCtxResetPersistingL2Cache, "cuCtxResetPersistingL2Cache")
		b.fn(&d.cuProfilerStart, "cuProfilerStart")
		b.fn(&d.cuProfilerStop, "cuProfilerStop")
		bindGreen(b, &d.green)
		b.fn(&d.lib.load, "cuLibraryLoadData")
		b.fn(&d.lib.unload, "cuLibraryUnload")
		b.fn(&d.lib.getKernel, "cuLibraryGetKernel")
		b.fn(&d.lib.kernelFunction, "cuKernelGetFunction")
		b.fn(&d.lib.kernelSetAttribute, "cuKernelSetAttribute")
		drv = d
		return nil
	})
}
