package loadgen

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Mem is a reading of the server's memory.
type Mem struct {
	RSS, RSSAnon, RSSFile int64 // bytes: VmRSS, RssAnon, RssFile of /proc/PID/status
}

// ProcMem reads /proc/pid/status.
func ProcMem(pid int) (Mem, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return Mem{}, err
	}
	var m Mem
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		var dst *int64
		switch k {
		case "VmRSS":
			dst = &m.RSS
		case "RssAnon":
			dst = &m.RSSAnon
		case "RssFile":
			dst = &m.RSSFile
		default:
			continue
		}
		f := strings.Fields(v) // "123456 kB"
		if len(f) == 0 {
			continue
		}
		n, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return Mem{}, fmt.Errorf("/proc/%d/status: %s: %w", pid, line, err)
		}
		*dst = n << 10
	}
	if m.RSS == 0 {
		return Mem{}, fmt.Errorf("/proc/%d/status has no VmRSS", pid)
	}
	return m, nil
}

// Snapshot is the server's state at one moment: its memory and the
// /metrics counters the report compares.
type Snapshot struct {
	At      time.Time
	Mem     Mem   // zero without SoakConfig.Mem
	GPUUsed int64 // peftd_gpu_memory_used_bytes summed over GPUs; -1: not exported
	// Counters are the sums of some /metrics series (loads, evictions,
	// store fetches, disk hits, panics).
	Counters map[string]float64
}

// soakCounters are the /metrics series a snapshot keeps.
var soakCounters = []string{"peftd_adapter_loads_total", "peftd_adapter_evictions_total", "peftd_adapter_store_fetches_total",
	"peftd_adapter_disk_hits_total", "peftd_panics_total"}

// snapshot reads the server's memory and counters.
func (k *soaker) snapshot(ctx context.Context) Snapshot {
	s := Snapshot{At: time.Now(), GPUUsed: -1, Counters: map[string]float64{}}
	if k.cfg.Mem != nil {
		if m, err := k.cfg.Mem(); err == nil {
			s.Mem = m
		} else {
			k.progress("memory: %v", err)
		}
	}
	st, body := k.simple(ctx, http.MethodGet, "/metrics", nil, "")
	if st != http.StatusOK {
		return s
	}
	for _, line := range strings.Split(body, "\n") {
		if line == "" || line[0] == '#' {
			continue
		}
		name, rest, _ := strings.Cut(line, " ")
		if i := strings.IndexByte(name, '{'); i >= 0 {
			// labels may hold spaces: the value is the last field
			name = name[:i]
			f := strings.Fields(line)
			rest = f[len(f)-1]
		}
		v, err := strconv.ParseFloat(strings.TrimSpace(rest), 64)
		if err != nil {
			continue
		}
		if name == "peftd_gpu_memory_used_bytes" {
			s.GPUUsed = max(s.GPUUsed, 0) + int64(v)
		} else if slices.Contains(soakCounters, name) {
			s.Counters[name] += v
		}
	}
	return s
}

// ticker prints a progress line every ProgressEvery until stopped.
func (k *soaker) ticker(ctx context.Context, start time.Time) (stop func()) {
	if k.cfg.Progress == nil {
		return func() {}
	}
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		t := time.NewTicker(k.cfg.ProgressEvery)
		defer t.Stop()
		for {
			select {
			case <-t.C:
			case <-done:
				return
			case <-ctx.Done():
				return
			}
			rss := ""
			if k.cfg.Mem != nil {
				if m, err := k.cfg.Mem(); err == nil {
					rss = fmt.Sprintf(", server RSS %s", mib(m.RSS))
				}
			}
			k.progress("%4.0fs/%.0fs: %d requests, %d failed so far%s", time.Since(start).Seconds(), k.cfg.Duration.Seconds(),
				k.sent.Load(), k.failedLive.Load(), rss)
		}
	}()
	return func() { close(done); wg.Wait() }
}

func (k *soaker) progress(format string, args ...any) {
	if k.cfg.Progress == nil {
		return
	}
	k.pmu.Lock()
	defer k.pmu.Unlock()
	fmt.Fprintf(k.cfg.Progress, "soak: %s %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, args...))
}
