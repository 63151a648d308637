package server

import (
	"fmt"
	"log/slog"

	"github.com/peftd/peftd/gpuinfo"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/gpu"
	"github.com/peftd/peftd/runtime/llama"
)

// kvBlocksFor sizes the KV cache from free device memory: what is left after
// what the CUDA backend says it takes besides its pages (gpu.MemoryNeeds:
// the weights in their format, adapter slots, a step's activations), keeping
// 10% of free memory in reserve.
func kvBlocksFor(free uint64, c *llama.Config, opts engine.Options, weights, kv string) (int, error) {
	fixed, perBlock, err := gpu.MemoryNeeds(c, opts.MaxTokens, opts.BlockSize, opts.AdapterSlots, weights, kv)
	if err != nil {
		return 0, err
	}
	need := fixed + free/10
	if free <= need || perBlock == 0 {
		return 0, nil
	}
	return int((free - need) / perBlock), nil
}

// gpuMonitor opens NVML for memory sizing, health and metrics; without it
// the server still runs (the reason is logged once).
func gpuMonitor(log *slog.Logger) *gpuinfo.Monitor {
	mon, err := gpuinfo.Open()
	if err != nil {
		log.Info("gpu monitor", "nvml", false, "reason", oneLine(err.Error()))
		return nil
	}
	ds, err := mon.Devices()
	if err != nil {
		log.Warn("gpu monitor", "err", err)
		mon.Close()
		return nil
	}
	for _, d := range ds {
		log.Info("gpu", "index", d.Index, "name", d.Name, "memory_free_gib", fmt.Sprintf("%.1f", float64(d.MemFree)/(1<<30)),
			"memory_total_gib", fmt.Sprintf("%.1f", float64(d.MemTotal)/(1<<30)), "temp_c", d.TempC, "throttle", d.Throttle)
	}
	return mon
}
