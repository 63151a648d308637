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
	"strings"
	"sync/atomic"
	"time"

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
}

// Info tells how a module was obtained.
type Info struct {
	Compiled    bool          // false: read from the cache
	CachePath   string        // the cubin file
	CompileTime time.Duration // NVRTC time when compiled
	Log         string        // NVRTC warnings
}

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

// Load returns the named source's module on c, from the disk cache or
// compiled by NVRTC (and then cached).
func Load(c *cuda.Context, name string, o Options) (*cuda.Module, Info, error) {
	var info Info
	src, err := Source(name)
	if err != nil {
		return nil, info, err
	}
	inc := o.IncludeDir
	if inc == "" {
		inc = IncludeDir()
	}
	arch := c.Device().Arch()
	opts := []string{"-arch=" + arch, "-std=c++17", "-lineinfo", "-I" + inc}
	if st, err := os.Stat(filepath.Join(inc, "cccl")); err == nil && st.IsDir() {
		opts = append(opts, "-I"+filepath.Join(inc, "cccl")) // CUDA 13 keeps <nv/target> there
	}
	opts = append(opts, o.Extra...)
	maj, min, err := cuda.NVRTCVersion()
	if err != nil {
		return nil, info, err
	}
	dir := o.CacheDir
	if dir == "" {
		if dir, err = DefaultCacheDir(); err != nil {
			return nil, info, err
		}
	}
	info.CachePath = filepath.Join(dir, Key(name, src, opts, arch, maj, min))
	if cubin, err := os.ReadFile(info.CachePath); err == nil {
		m, err := c.LoadModule(cubin)
		if err == nil {
			return m, info, nil
		}
		if !errors.Is(err, cuda.ErrNoBinary) {
			return nil, info, err
		}
		os.Remove(info.CachePath) // stale or corrupt: rebuild
	}
	if _, err := os.Stat(filepath.Join(inc, "cuda_bf16.h")); err != nil {
		return nil, info, fmt.Errorf("%w: %s has no cuda_bf16.h; set CUDA_HOME to the CUDA toolkit folder", ErrNoHeaders, inc)
	}
	t0 := time.Now()
	cubin, log, err := cuda.Compile(src, name, opts)
	if err != nil {
		return nil, info, fmt.Errorf("kernels: %w", err)
	}
	compiles.Add(1)
	info.Compiled, info.CompileTime, info.Log = true, time.Since(t0), log
	if err := writeAtomic(info.CachePath, cubin); err != nil {
		// A read-only cache costs a recompile next time, nothing more.
		info.Log += fmt.Sprintf("\nkernels: cache not written: %v", err)
	}
	m, err := c.LoadModule(cubin)
	if err != nil {
		return nil, info, err
	}
	return m, info, nil
}

func writeAtomic(path string, data []byte) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	f, err := os.CreateTemp(filepath.Dir(path), ".tmp-*")
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		os.Remove(f.Name())
		return err
	}
	if err := f.Close(); err != nil {
		os.Remove(f.Name())
		return err
	}
	return os.Rename(f.Name(), path)
}
