// Package cuda binds the CUDA driver API (libcuda.so.1), NVRTC and cuBLASLt
// without cgo, through github.com/ebitengine/purego.
//
// Layers: raw symbols (driver.go, nvrtc.go, cublaslt.go: one Go func value per
// C symbol, versioned _v2 names bound explicitly) -> typed errors (errors.go:
// every status becomes an *Error that matches sentinels such as ErrOutOfMemory
// through errors.Is) -> an idiomatic API (cuda.go: Context, Stream,
// DeviceBuffer, HostBuffer, Module, Function, Event, Matmul).
//
// CUDA contexts are current per OS thread, so every call runs on one goroutine
// locked to its thread (Executor). Context methods hop to that goroutine by
// themselves; Context.Do runs a whole sequence there in one hop.
package cuda

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/ebitengine/purego"
)

// CUDAHome is the CUDA toolkit folder: $CUDA_HOME, $CUDA_PATH or /usr/local/cuda.
func CUDAHome() string {
	for _, v := range []string{"CUDA_HOME", "CUDA_PATH"} {
		if d := os.Getenv(v); d != "" {
			return d
		}
	}
	return "/usr/local/cuda"
}

// libCandidates lists where a library may be, in order: the toolkit folders
// first, then the bare names that dlopen resolves through LD_LIBRARY_PATH and
// the ldconfig cache.
func libCandidates(names ...string) []string {
	var out []string
	dirs := []string{filepath.Join(CUDAHome(), "lib64"), filepath.Join(CUDAHome(), "lib")}
	if CUDAHome() != "/usr/local/cuda" {
		dirs = append(dirs, "/usr/local/cuda/lib64")
	}
	for _, d := range dirs {
		for _, n := range names {
			out = append(out, filepath.Join(d, n))
		}
	}
	return append(out, names...)
}

// dlopen opens the first loadable candidate. The error names every path tried.
func dlopen(what, where string, candidates []string) (uintptr, string, error) {
	var tried []string
	for _, p := range candidates {
		if strings.ContainsRune(p, '/') {
			if _, err := os.Stat(p); err != nil {
				continue
			}
		}
		h, err := purego.Dlopen(p, purego.RTLD_NOW|purego.RTLD_GLOBAL)
		if err == nil {
			return h, p, nil
		}
		if strings.Contains(err.Error(), "cannot open shared object file") {
			continue // not there
		}
		tried = append(tried, fmt.Sprintf("%s (%v)", p, oneLine(err.Error())))
	}
	if len(tried) == 0 {
		return 0, "", fmt.Errorf("%s not found (looked in %s)", what, where)
	}
	return 0, "", fmt.Errorf("%s could not be loaded: %s", what, strings.Join(tried, "; "))
}

func oneLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[:i]
	}
	return s
}

// binder registers symbols of one library, remembering the first missing one.
type binder struct {
	lib  string
	h    uintptr
	err  error
	opt  bool
	miss []string
}

// fn binds fptr to the first of names found in the library.
func (b *binder) fn(fptr any, names ...string) bool {
	for _, n := range names {
		addr, err := purego.Dlsym(b.h, n)
		if err == nil && addr != 0 {
			purego.RegisterFunc(fptr, addr)
			return true
		}
	}
	if !b.opt && b.err == nil {
		b.err = fmt.Errorf("%s lacks symbol %s", b.lib, names[0])
	}
	b.miss = append(b.miss, names[0])
	return false
}

// cString reads a NUL-terminated C string.
func cString(p *byte) string {
	if p == nil {
		return ""
	}
	var sb strings.Builder
	for q := p; *q != 0; q = nextByte(q) {
		sb.WriteByte(*q)
		if sb.Len() > 1<<16 {
			break
		}
	}
	return sb.String()
}

// nullTerm returns s as a NUL-terminated byte slice.
func nullTerm(s string) []byte { return append([]byte(s), 0) }

type lazy struct {
	once sync.Once
	err  error
}

func (l *lazy) do(f func() error) error {
	l.once.Do(func() { l.err = f() })
	return l.err
}

func toolkitWhere() string {
	return CUDAHome() + "/lib64, /usr/local/cuda/lib64, LD_LIBRARY_PATH and the ldconfig cache; set CUDA_HOME"
}
