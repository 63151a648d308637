package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/peftd/peftd/kernels"
	"github.com/peftd/peftd/runtime/cuda"
)

// cmdKernels compiles peftd's CUDA sources ahead of time, so that a server
// (a new replica, a container) compiles nothing at start: into the kernel
// cache, or a folder shipped with the image and named by PEFTD_KERNEL_DIRS.
func cmdKernels(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet(ctx, "kernels", stdout, stderr)
	archs := fs.String("arch", "", "GPU architectures, comma-separated compute capabilities (9.0) or NVRTC targets (sm_90a, sm_89); default: the GPUs of this machine")
	dir := fs.String("dir", "", "folder for the cubins (default: the kernel cache, $XDG_CACHE_HOME/peftd/kernels)")
	if err := fs.Parse(args); err != nil {
		return errUsage
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("kernels: unexpected argument %q", fs.Arg(0))
	}
	targets, err := kernelTargets(*archs)
	if err != nil {
		return err
	}
	if _, _, err := cuda.NVRTCVersion(); err != nil {
		return fmt.Errorf("kernels: %w (NVRTC comes with the CUDA toolkit; set CUDA_HOME to its folder)", err)
	}
	type result struct {
		mod  kernels.Module
		arch string
		info kernels.Info
		err  error
	}
	var jobs []*result
	for _, t := range targets {
		for _, m := range kernels.Modules {
			if m.For(t.arch, t.cc) {
				jobs = append(jobs, &result{mod: m, arch: t.arch})
			}
		}
	}
	// NVRTC compiles on one thread per program: run them side by side
	t0 := time.Now()
	var wg sync.WaitGroup
	for _, j := range jobs {
		wg.Go(func() {
			j.info, j.err = kernels.Build(j.mod.Name, j.arch, kernels.Options{CacheDir: *dir, ShippedDirs: []string{}, Extra: j.mod.Extra})
		})
	}
	wg.Wait()
	var errs []error
	for _, j := range jobs {
		switch {
		case j.err != nil:
			errs = append(errs, fmt.Errorf("kernels: %s for %s: %w", j.mod.Label(), j.arch, j.err))
		case j.info.Compiled:
			fmt.Fprintf(stdout, "%-17s %-7s compiled in %.1f s  %s\n", j.mod.Label(), j.arch, j.info.CompileTime.Seconds(), j.info.CachePath)
		default:
			fmt.Fprintf(stdout, "%-17s %-7s already there     %s\n", j.mod.Label(), j.arch, j.info.CachePath)
		}
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	fmt.Fprintf(stdout, "%d cubins in %.1f s\n", len(jobs), time.Since(t0).Seconds())
	return nil
}

type kernelTarget struct {
	arch string // NVRTC -arch value, as runtime/gpu asks for it (cuda.Device.Arch)
	cc   int    // major*10+minor
}

// kernelTargets parses --arch, or asks the driver for this machine's GPUs.
func kernelTargets(list string) ([]kernelTarget, error) {
	var out []kernelTarget
	seen := map[string]bool{}
	add := func(major, minor int) {
		d := cuda.Device{Major: major, Minor: minor}
		if a := d.Arch(); !seen[a] {
			seen[a] = true
			out = append(out, kernelTarget{arch: a, cc: major*10 + minor})
		}
	}
	if strings.TrimSpace(list) == "" {
		if err := cuda.Init(); err != nil {
			return nil, fmt.Errorf("kernels: no GPU to compile for (%w); name the architectures with --arch, e.g. --arch 9.0,8.9", err)
		}
		n, err := cuda.DeviceCount()
		if err != nil {
			return nil, fmt.Errorf("kernels: %w", err)
		}
		for i := range n {
			c, err := cuda.NewContext(i)
			if err != nil {
				return nil, fmt.Errorf("kernels: GPU %d: %w", i, err)
			}
			d := c.Device()
			c.Close()
			add(d.Major, d.Minor)
		}
		return out, nil
	}
	for _, f := range strings.Split(list, ",") {
		major, minor, err := parseArch(strings.TrimSpace(f))
		if err != nil {
			return nil, err
		}
		add(major, minor)
	}
	return out, nil
}

// parseArch reads 9.0, sm_90 or sm_90a as (9, 0).
func parseArch(s string) (major, minor int, err error) {
	bad := func() error {
		return fmt.Errorf("kernels: --arch %q: want a compute capability (8.0, 8.6, 8.9, 9.0, ...) or an NVRTC target (sm_80, sm_90a, ...); peftd needs 8.0 or later", s)
	}
	var ma, mi string
	if a, b, ok := strings.Cut(s, "."); ok {
		ma, mi = a, b
	} else if rest, ok := strings.CutPrefix(s, "sm_"); ok {
		rest = strings.TrimRight(rest, "af") // sm_90a, sm_100f
		if len(rest) < 2 {
			return 0, 0, bad()
		}
		ma, mi = rest[:len(rest)-1], rest[len(rest)-1:]
	} else {
		return 0, 0, bad()
	}
	major, err1 := strconv.Atoi(ma)
	minor, err2 := strconv.Atoi(mi)
	if err1 != nil || err2 != nil || minor < 0 || minor > 9 || major < 8 || major > 20 {
		return 0, 0, bad()
	}
	return major, minor, nil
}
