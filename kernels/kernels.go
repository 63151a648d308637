// Package kernels holds peftd's CUDA C++ sources, embedded in the binary and
// compiled at first use by NVRTC for the device's architecture. Cubins are
// cached on disk under $XDG_CACHE_HOME/peftd/kernels (or ~/.cache/peftd/kernels),
// keyed by sha256(source + options), the architecture and the NVRTC version,
// so a warm start compiles nothing.
package kernels

import (
	"crypto/sha256"
	"embed"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/peftd/peftd/internal/atomicfile"
	"github.com/peftd/peftd/runtime/cuda"
)

//go:embed *.cu *.cuh
var sources embed.FS

// Llama is the forward-pass kernel source used by runtime/gpu.
const Llama = "llama.cu"

// ErrNoHeaders: the CUDA include folder (for cuda_bf16.h) is missing.
var ErrNoHeaders = errors.New("kernels: CUDA headers not found")

// Source returns an embedded source file with its local headers in place:
// each `#include "name"` line of an embedded file (common.cuh) is replaced
// by that file's text, once per source (the headers say #pragma once), so
// NVRTC gets one self-contained source and the cache key covers the
// headers too. Angle-bracket includes (CUDA's) are left to NVRTC.
func Source(name string) (string, error) {
	var b strings.Builder
	if err := expand(&b, name, map[string]bool{}); err != nil {
		return "", err
	}
	return b.String(), nil
}

func expand(b *strings.Builder, name string, seen map[string]bool) error {
	raw, err := sources.ReadFile(name)
	if err != nil {
		return fmt.Errorf("kernels: no source %q: %w", name, err)
	}
	seen[name] = true
	for line := range strings.Lines(string(raw)) {
		inc, ok := localInclude(line)
		if !ok {
			if strings.TrimSpace(line) != "#pragma once" {
				b.WriteString(line)
			}
			continue
		}
		if seen[inc] {
			continue
		}
		if err := expand(b, inc, seen); err != nil {
			return fmt.Errorf("kernels: %s includes %q: %w", name, inc, err)
		}
	}
	return nil
}

// localInclude returns the file named by a line `#include "file"`.
func localInclude(line string) (string, bool) {
	rest, ok := strings.CutPrefix(strings.TrimSpace(line), "#include")
	if !ok {
		return "", false
	}
	rest = strings.TrimSpace(rest)
	if len(rest) < 2 || rest[0] != '"' {
		return "", false
	}
	end := strings.IndexByte(rest[1:], '"')
	if end < 0 {
		return "", false
	}
	return rest[1 : 1+end], true
}

// Options tune Load. Zero values take the defaults.
type Options struct {
	CacheDir   string   // default $XDG_CACHE_HOME/peftd/kernels or ~/.cache/peftd/kernels
	IncludeDir string   // default $CUDA_HOME/include (/usr/local/cuda/include)
	Extra      []string // more NVRTC options (part of the cache key)
	// ShippedDirs are read-only folders of cubins searched after the cache
	// (peftd kernels wrote them, e.g. into a container image); nil: the
	// colon-separated folders of $PEFTD_KERNEL_DIRS.
	ShippedDirs []string
	// ContextFree loads the cubin as a context-independent library
	// (cuda.Context.LoadLibrary): its kernels then run in the context of
	// the stream they are launched on, a green context's too
	// (runtime/gpu/partition.go). Not part of the cache key: the cubin is
	// the same.
	ContextFree bool
}

// Info tells how a module was obtained.
type Info struct {
	Compiled    bool          // false: read from the cache or a shipped folder
	CachePath   string        // the cubin file
	CompileTime time.Duration // NVRTC time when compiled
	Log         string        // NVRTC warnings
}

// Module is a source runtime/gpu loads and the oldest compute capability
// (major*10+minor) it builds for; a variant also has the NVRTC options it
// is built with and the one target it is for.
type Module struct {
	Name  string
	MinCC int
	Extra []string // Options.Extra of the variant (nil: the default build)
	Arch  string   // the only NVRTC target of the variant ("": every one from MinCC)
}

// For reports whether m is built for NVRTC target arch of compute
// capability cc (major*10+minor).
func (m Module) For(arch string, cc int) bool {
	return cc >= m.MinCC && (m.Arch == "" || m.Arch == arch)
}

// Label names the module and its variant's options.
func (m Module) Label() string {
	return strings.Join(append([]string{m.Name}, m.Extra...), " ")
}

// FP8Wgmma is the options of the FP8 module's wgmma build, which
// runtime/gpu loads on sm_90a for FP8 products of 17-64 rows.
var FP8Wgmma = []string{"-DPEFTD_WG"}

// BF16Wgmma is the options of the forward module's build with gemm_ws
// (ws_body on bf16 operands; every other kernel's SASS unchanged), which
// runtime/gpu loads on sm_90a with bf16 weights for products of 17-64 rows.
var BF16Wgmma = []string{"-DPEFTD_WS"}

// Modules are every source and variant runtime/gpu may load: what `peftd
// kernels` compiles ahead of time.
var Modules = []Module{{Name: Llama, MinCC: 80}, {Name: Llama, MinCC: 90, Extra: BF16Wgmma, Arch: "sm_90a"}, {Name: Sgmv, MinCC: 80}, {Name: FP8, MinCC: 89}, {Name: FP8, MinCC: 90, Extra: FP8Wgmma, Arch: "sm_90a"}}

var compiles atomic.Int64

// Compiles counts NVRTC compilations by Load in this process.
func Compiles() int64 { return compiles.Load() }

// DefaultCacheDir is where cubins go by default.
func DefaultCacheDir() (string, error) {
	d, err := os.UserCacheDir() // $XDG_CACHE_HOME, else ~/.cache
	if err != nil {
		return "", fmt.Errorf("kernels: no cache folder: %w", err)
	}
	return filepath.Join(d, "peftd", "kernels"), nil
}

// ShippedDirsEnv names the folders of shipped cubins (Options.ShippedDirs).
const ShippedDirsEnv = "PEFTD_KERNEL_DIRS"

// DefinesEnv names space-separated NVRTC options (e.g. -DNAME) added to
// every compile after Options.Extra: kernel variants chosen at build time
// for an A/B measurement without a rebuilt binary. They are part of the
// cache key, so a cubin built without them is never loaded with them.
const DefinesEnv = "PEFTD_KERNEL_DEFINES"

// Defined reports whether DefinesEnv defines the macro name (-Dname or
// -Dname=value): the host side of a kernel variant that changes more than
// the code (e.g. the shared memory a launch needs) asks it.
func Defined(name string) bool { return len(defineValues(name)) > 0 }

// DefinedInt is the value DefinesEnv gives the macro name (-Dname=value),
// or def where it gives none or not an integer: the host side of a
// kernel's tunable size (e.g. its stages) reads it.
func DefinedInt(name string, def int) int {
	for _, v := range defineValues(name) {
		if n, err := strconv.Atoi(v); err == nil {
			return n
		}
	}
	return def
}

// defineValues are the values of DefinesEnv's -Dname and -Dname=value
// options, in order ("" for none).
func defineValues(name string) []string {
	var vs []string
	for _, f := range strings.Fields(os.Getenv(DefinesEnv)) {
		m, ok := strings.CutPrefix(f, "-D")
		if !ok {
			continue
		}
		if m == name {
			vs = append(vs, "")
		} else if v, ok := strings.CutPrefix(m, name+"="); ok {
			vs = append(vs, v)
		}
	}
	return vs
}

func (o Options) shipped() []string {
	if o.ShippedDirs != nil {
		return o.ShippedDirs
	}
	return filepath.SplitList(os.Getenv(ShippedDirsEnv))
}

// IncludeDir is the CUDA include folder NVRTC needs for cuda_bf16.h.
func IncludeDir() string { return filepath.Join(cuda.CUDAHome(), "include") }

// Key is the cache file name for a source compiled with opts for arch.
func Key(name, src string, opts []string, arch string, nvrtcMajor, nvrtcMinor int) string {
	h := sha256.New()
	h.Write([]byte(src))
	for _, o := range opts {
		h.Write([]byte{0})
		h.Write([]byte(o))
	}
	base := strings.TrimSuffix(name, filepath.Ext(name))
	return fmt.Sprintf("%s-%s-%s-nvrtc%d.%d.cubin", base, hex.EncodeToString(h.Sum(nil))[:32], arch, nvrtcMajor, nvrtcMinor)
}

// job is one source to compile for one architecture: its text, NVRTC
// options and cache file name.
type job struct {
	name, src, inc, key string
	opts                []string
	dir                 string // the cache folder
}

func newJob(name, arch string, o Options) (*job, error) {
	src, err := Source(name)
	if err != nil {
		return nil, err
	}
	inc := o.IncludeDir
	if inc == "" {
		inc = IncludeDir()
	}
	opts := []string{"-arch=" + arch, "-std=c++17", "-lineinfo", "-I" + inc}
	if st, err := os.Stat(filepath.Join(inc, "cccl")); err == nil && st.IsDir() {
		opts = append(opts, "-I"+filepath.Join(inc, "cccl")) // CUDA 13 keeps <nv/target> there
	}
	opts = append(opts, o.Extra...)
	opts = append(opts, strings.Fields(os.Getenv(DefinesEnv))...)
	maj, min, err := cuda.NVRTCVersion()
	if err != nil {
		return nil, err
	}
	dir := o.CacheDir
	if dir == "" {
		if dir, err = DefaultCacheDir(); err != nil {
			return nil, err
		}
	}
	return &job{name: name, src: src, inc: inc, key: Key(name, src, opts, arch, maj, min), opts: opts, dir: dir}, nil
}

// places are where a cubin for j may already be, in the order they are
// searched: the cache, then the shipped folders.
func (j *job) places(o Options) []string {
	ps := []string{filepath.Join(j.dir, j.key)}
	for _, d := range o.shipped() {
		ps = append(ps, filepath.Join(d, j.key))
	}
	return ps
}

// compile runs NVRTC and writes the cubin into the cache (a read-only
// cache costs a recompile next time, nothing more: said in info.Log).
func (j *job) compile() ([]byte, Info, error) {
	info := Info{CachePath: filepath.Join(j.dir, j.key)}
	if _, err := os.Stat(filepath.Join(j.inc, "cuda_bf16.h")); err != nil {
		return nil, info, fmt.Errorf("%w: %s has no cuda_bf16.h; set CUDA_HOME to the CUDA toolkit folder", ErrNoHeaders, j.inc)
	}
	t0 := time.Now()
	cubin, log, err := cuda.Compile(j.src, j.name, j.opts)
	if err != nil {
		return nil, info, fmt.Errorf("kernels: %w", err)
	}
	compiles.Add(1)
	info.Compiled, info.CompileTime, info.Log = true, time.Since(t0), log
	if err := atomicfile.Write(info.CachePath, cubin); err != nil {
		info.Log += fmt.Sprintf("\nkernels: cache not written: %v", err)
	}
	return cubin, info, nil
}

// Build compiles the named source for arch (an NVRTC -arch value, e.g.
// sm_90a: cuda.Device.Arch) into the cache folder unless a cubin for it is
// already there or in a shipped folder. It needs NVRTC and the CUDA
// headers, not a GPU.
func Build(name, arch string, o Options) (Info, error) {
	j, err := newJob(name, arch, o)
	if err != nil {
		return Info{}, err
	}
	for _, p := range j.places(o) {
		if st, err := os.Stat(p); err == nil && st.Size() > 0 {
			return Info{CachePath: p}, nil
		}
	}
	_, info, err := j.compile()
	return info, err
}

// Load returns the named source's module on c: from the disk cache, else
// from a shipped folder, else compiled by NVRTC (and then cached).
func Load(c *cuda.Context, name string, o Options) (*cuda.Module, Info, error) {
	j, err := newJob(name, c.Device().Arch(), o)
	if err != nil {
		return nil, Info{}, err
	}
	for i, p := range j.places(o) {
		cubin, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		m, err := load(c, cubin, o)
		if err == nil {
			return m, Info{CachePath: p}, nil
		}
		if !errors.Is(err, cuda.ErrNoBinary) {
			return nil, Info{CachePath: p}, err
		}
		if i == 0 {
			os.Remove(p) // a stale or corrupt cache entry: rebuild it
		}
		// a shipped cubin the driver refuses: compile one into the cache
	}
	cubin, info, err := j.compile()
	if err != nil {
		return nil, info, err
	}
	m, err := load(c, cubin, o)
	if err != nil {
		return nil, info, err
	}
	return m, info, nil
}

// load loads cubin as a module, or as a library where o asks for one.
func load(c *cuda.Context, cubin []byte, o Options) (*cuda.Module, error) {
	if o.ContextFree {
		return c.LoadLibrary(cubin)
	}
	return c.LoadModule(cubin)
}
