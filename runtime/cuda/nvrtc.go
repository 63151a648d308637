package cuda

import (
	"fmt"
	"path/filepath"
	"runtime"
	"strings"
	"unsafe"

	"github.com/ebitengine/purego"
)

type nvrtcLib struct {
	path                   string
	nvrtcVersion           func(major, minor *int32) int32
	nvrtcGetErrorString    func(r int32) string
	nvrtcCreateProgram     func(prog *uintptr, src, name string, nHeaders int32, headers, includeNames unsafe.Pointer) int32
	nvrtcDestroyProgram    func(prog *uintptr) int32
	nvrtcCompileProgram    func(prog uintptr, nOpts int32, opts unsafe.Pointer) int32
	nvrtcGetProgramLogSize func(prog uintptr, n *uint64) int32
	nvrtcGetProgramLog     func(prog uintptr, log *byte) int32
	nvrtcGetCUBINSize      func(prog uintptr, n *uint64) int32
	nvrtcGetCUBIN          func(prog uintptr, out *byte) int32
}

var (
	nvrtc     nvrtcLib
	nvrtcLoad lazy
)

func loadNVRTC() error {
	return nvrtcLoad.do(func() error {
		h, path, err := dlopen("NVRTC (libnvrtc.so.13/.12)", toolkitWhere(), libCandidates("libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"))
		if err != nil {
			return fmt.Errorf("%w: %v", ErrNoLibrary, err)
		}
		// NVRTC dlopens its builtins library by soname at compile time; load it
		// from NVRTC's own folder first so no LD_LIBRARY_PATH is needed.
		if strings.ContainsRune(path, '/') {
			if m, _ := filepath.Glob(filepath.Join(filepath.Dir(path), "libnvrtc-builtins.so.*")); len(m) > 0 {
				purego.Dlopen(m[len(m)-1], purego.RTLD_NOW|purego.RTLD_GLOBAL)
			}
		}
		l := nvrtcLib{path: path}
		b := &binder{lib: path, h: h}
		b.fn(&l.nvrtcVersion, "nvrtcVersion")
		b.fn(&l.nvrtcGetErrorString, "nvrtcGetErrorString")
		b.fn(&l.nvrtcCreateProgram, "nvrtcCreateProgram")
		b.fn(&l.nvrtcDestroyProgram, "nvrtcDestroyProgram")
		b.fn(&l.nvrtcCompileProgram, "nvrtcCompileProgram")
		b.fn(&l.nvrtcGetProgramLogSize, "nvrtcGetProgramLogSize")
		b.fn(&l.nvrtcGetProgramLog, "nvrtcGetProgramLog")
		b.fn(&l.nvrtcGetCUBINSize, "nvrtcGetCUBINSize")
		b.fn(&l.nvrtcGetCUBIN, "nvrtcGetCUBIN")
		if b.err != nil {
			return fmt.Errorf("%w: %v", ErrNoLibrary, b.err)
		}
		nvrtc = l
		return nil
	})
}

func nvrtcErr(op string, r int32, log string) error {
	if r == 0 {
		return nil
	}
	return &NVRTCError{Op: op, Code: r, Name: nvrtc.nvrtcGetErrorString(r), Log: log}
}

// NVRTCVersion loads NVRTC and reports its version.
func NVRTCVersion() (major, minor int, err error) {
	if err := loadNVRTC(); err != nil {
		return 0, 0, err
	}
	var a, b int32
	if err := nvrtcErr("nvrtcVersion", nvrtc.nvrtcVersion(&a, &b), ""); err != nil {
		return 0, 0, err
	}
	return int(a), int(b), nil
}

// NVRTCPath is the loaded NVRTC library ("" before use).
func NVRTCPath() string { return nvrtc.path }

// Compile compiles CUDA C++ source to a cubin with NVRTC. opts are NVRTC
// options, e.g. "-arch=sm_90a", "-I/usr/local/cuda/include". It needs no
// context. On a compilation error the *NVRTCError (errors.Is ErrCompile) holds
// the log; on success log holds any warnings.
func Compile(src, name string, opts []string) (cubin []byte, log string, err error) {
	if err := loadNVRTC(); err != nil {
		return nil, "", err
	}
	var prog uintptr
	if err := nvrtcErr("nvrtcCreateProgram", nvrtc.nvrtcCreateProgram(&prog, src, name, 0, nil, nil), ""); err != nil {
		return nil, "", err
	}
	defer nvrtc.nvrtcDestroyProgram(&prog)

	cs := make([][]byte, len(opts))
	ptrs := make([]*byte, len(opts)+1)
	var pin runtime.Pinner
	defer pin.Unpin()
	for i, o := range opts {
		cs[i] = nullTerm(o)
		ptrs[i] = &cs[i][0]
		pin.Pin(ptrs[i])
	}
	pin.Pin(&ptrs[0])
	r := nvrtc.nvrtcCompileProgram(prog, int32(len(opts)), unsafe.Pointer(&ptrs[0]))
	runtime.KeepAlive(cs)
	var n uint64
	if nvrtc.nvrtcGetProgramLogSize(prog, &n) == 0 && n > 1 {
		buf := make([]byte, n)
		if nvrtc.nvrtcGetProgramLog(prog, &buf[0]) == 0 {
			log = string(buf[:n-1])
		}
	}
	if err := nvrtcErr("nvrtcCompileProgram", r, log); err != nil {
		return nil, log, fmt.Errorf("%s: %w", name, err)
	}
	if err := nvrtcErr("nvrtcGetCUBINSize", nvrtc.nvrtcGetCUBINSize(prog, &n), ""); err != nil {
		return nil, log, err
	}
	if n == 0 {
		return nil, log, fmt.Errorf("%w: NVRTC produced no cubin for %s (the -arch option must name a real sm_XX target)", ErrCompile, name)
	}
	cubin = make([]byte, n)
	if err := nvrtcErr("nvrtcGetCUBIN", nvrtc.nvrtcGetCUBIN(prog, &cubin[0]), ""); err != nil {
		return nil, log, err
	}
	return cubin, log, nil
}
