package cuda

import (
	"errors"
	"fmt"
)

// Sentinel errors; every *Error, *NVRTCError and *BLASError matches the
// sentinel of its kind through errors.Is.
var (
	// ErrNoDriver: no usable NVIDIA driver (libcuda.so.1 missing, a stub, or too old).
	ErrNoDriver = errors.New("cuda: no NVIDIA driver")
	// ErrNoDevice: the driver sees no CUDA device.
	ErrNoDevice = errors.New("cuda: no CUDA device")
	// ErrOutOfMemory: a device or pinned host allocation failed.
	ErrOutOfMemory = errors.New("cuda: out of memory")
	// ErrInvalidValue: an argument was rejected.
	ErrInvalidValue = errors.New("cuda: invalid value")
	// ErrInvalidContext: no current context on the calling thread.
	ErrInvalidContext = errors.New("cuda: invalid context")
	// ErrNotReady: an asynchronous operation has not completed (not a failure).
	ErrNotReady = errors.New("cuda: not ready")
	// ErrLaunch: a kernel faulted or could not launch; the context is unusable after a fault.
	ErrLaunch = errors.New("cuda: kernel launch failed")
	// ErrNoBinary: the module holds no code for this device.
	ErrNoBinary = errors.New("cuda: no binary for this GPU")
	// ErrNoLibrary: NVRTC or cuBLASLt could not be loaded.
	ErrNoLibrary = errors.New("cuda: library not found")
	// ErrCompile: NVRTC rejected a program (the error holds the log).
	ErrCompile = errors.New("cuda: compilation failed")
	// ErrNotSupported: the operation is not supported with these arguments.
	ErrNotSupported = errors.New("cuda: not supported")
	// ErrClosed: the context or executor was closed.
	ErrClosed = errors.New("cuda: closed")
	// ErrCanceled: an upload was canceled before it ended (Transfer.Cancel).
	ErrCanceled = errors.New("cuda: upload canceled")
)

// Result is a CUresult.
type Result int32

// CUresult values the package names.
const (
	Success                   Result = 0
	ErrorInvalidValue         Result = 1
	ErrorOutOfMemory          Result = 2
	ErrorNotInitialized       Result = 3
	ErrorDeinitialized        Result = 4
	ErrorStubLibrary          Result = 34
	ErrorInsufficientDriver   Result = 35
	ErrorNoDevice             Result = 100
	ErrorInvalidDevice        Result = 101
	ErrorInvalidImage         Result = 200
	ErrorInvalidContext       Result = 201
	ErrorNoBinaryForGPU       Result = 209
	ErrorInvalidPTX           Result = 218
	ErrorUnsupportedPTX       Result = 222
	ErrorInvalidHandle        Result = 400
	ErrorNotFound             Result = 500
	ErrorNotReady             Result = 600
	ErrorIllegalAddress       Result = 700
	ErrorLaunchOutOfRes       Result = 701
	ErrorLaunchTimeout        Result = 702
	ErrorHardwareStackError   Result = 714
	ErrorIllegalInstruction   Result = 715
	ErrorMisalignedAddress    Result = 716
	ErrorInvalidAddressSpace  Result = 717
	ErrorInvalidPC            Result = 718
	ErrorLaunchFailed         Result = 719
	ErrorNotSupported         Result = 801
	ErrorSystemNotReady       Result = 802
	ErrorSystemDriverMismatch Result = 803
	ErrorCompatNotSupported   Result = 804
)

// Error is a failed driver call.
type Error struct {
	Op   string // the C function, e.g. cuMemAlloc_v2
	Code Result
	Name string // CUDA_ERROR_...
	Msg  string // the driver's description
}

func (e *Error) Error() string {
	name := e.Name
	if name == "" {
		name = fmt.Sprintf("CUresult %d", int(e.Code))
	}
	if e.Msg != "" {
		return fmt.Sprintf("cuda: %s: %s (%s)", e.Op, name, e.Msg)
	}
	return fmt.Sprintf("cuda: %s: %s", e.Op, name)
}

// Is maps the code onto the package's sentinels.
func (e *Error) Is(target error) bool { return sentinelOf(e.Code) == target }

func sentinelOf(c Result) error {
	switch c {
	case ErrorOutOfMemory:
		return ErrOutOfMemory
	case ErrorInvalidValue:
		return ErrInvalidValue
	case ErrorNoDevice, ErrorInvalidDevice:
		return ErrNoDevice
	case ErrorStubLibrary, ErrorInsufficientDriver, ErrorSystemDriverMismatch, ErrorCompatNotSupported, ErrorSystemNotReady:
		return ErrNoDriver
	case ErrorInvalidContext:
		return ErrInvalidContext
	case ErrorNotReady:
		return ErrNotReady
	case ErrorIllegalAddress, ErrorLaunchOutOfRes, ErrorLaunchTimeout, ErrorHardwareStackError, ErrorIllegalInstruction,
		ErrorMisalignedAddress, ErrorInvalidAddressSpace, ErrorInvalidPC, ErrorLaunchFailed:
		return ErrLaunch
	case ErrorNoBinaryForGPU, ErrorInvalidImage, ErrorInvalidPTX, ErrorUnsupportedPTX:
		return ErrNoBinary
	case ErrorNotSupported:
		return ErrNotSupported
	}
	return nil
}

// check turns a CUresult into nil or an *Error.
func check(op string, r int32) error {
	if r == 0 {
		return nil
	}
	e := &Error{Op: op, Code: Result(r)}
	if drv.cuGetErrorName != nil {
		var p *byte
		if drv.cuGetErrorName(r, &p) == 0 {
			e.Name = cString(p)
		}
		p = nil
		if drv.cuGetErrorString(r, &p) == 0 {
			e.Msg = cString(p)
		}
	}
	return e
}

// NVRTCError is a failed NVRTC call; Log holds the compiler's output.
type NVRTCError struct {
	Op   string
	Code int32
	Name string
	Log  string
}

func (e *NVRTCError) Error() string {
	s := fmt.Sprintf("nvrtc: %s: %s", e.Op, e.Name)
	if e.Log != "" {
		s += "\n" + e.Log
	}
	return s
}

// Is matches ErrCompile for compilation errors, ErrOutOfMemory for NVRTC_ERROR_OUT_OF_MEMORY.
func (e *NVRTCError) Is(target error) bool {
	switch e.Code {
	case 1:
		return target == ErrOutOfMemory
	case 6:
		return target == ErrCompile
	case 5:
		return target == ErrInvalidValue
	}
	return false
}

// BLASError is a failed cuBLASLt call.
type BLASError struct {
	Op   string
	Code int32
}

var blasNames = map[int32]string{
	1: "CUBLAS_STATUS_NOT_INITIALIZED", 3: "CUBLAS_STATUS_ALLOC_FAILED", 7: "CUBLAS_STATUS_INVALID_VALUE",
	8: "CUBLAS_STATUS_ARCH_MISMATCH", 11: "CUBLAS_STATUS_MAPPING_ERROR", 13: "CUBLAS_STATUS_EXECUTION_FAILED",
	14: "CUBLAS_STATUS_INTERNAL_ERROR", 15: "CUBLAS_STATUS_NOT_SUPPORTED", 16: "CUBLAS_STATUS_LICENSE_ERROR",
}

func (e *BLASError) Error() string {
	n, ok := blasNames[e.Code]
	if !ok {
		n = fmt.Sprintf("cublasStatus %d", e.Code)
	}
	return fmt.Sprintf("cublasLt: %s: %s", e.Op, n)
}

// Is maps cuBLAS statuses onto the sentinels.
func (e *BLASError) Is(target error) bool {
	switch e.Code {
	case 3:
		return target == ErrOutOfMemory
	case 7:
		return target == ErrInvalidValue
	case 15:
		return target == ErrNotSupported
	case 13:
		return target == ErrLaunch
	case 1:
		return target == ErrNoDriver
	}
	return false
}

func checkBLAS(op string, r int32) error {
	if r == 0 {
		return nil
	}
	return &BLASError{Op: op, Code: r}
}
