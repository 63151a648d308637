package server

import (
	"fmt"
	"log/slog"

	"github.com/peftd/peftd/gpuinfo"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
)

// kvBlocksFor sizes the KV cache from free device memory: what is left after
// the bf16 weights, slots adapters of rank 64 on all seven projections, and
// the step's activations, keeping 10% of free memory in reserve.
func kvBlocksFor(free uint64, c *llama.Config, opts engine.Options) int {
	const bf16 = 2
	var weights, adapter uint64
	for _, s := range c.Expected() {
		n := uint64(1)
		for _, d := range s.Shape {
			n *= uint64(d)
		}
		weights += n * bf16
	}
	for m := llama.Module(0); m < llama.NumModules; m++ {
		in, out := c.Dims(m)
		adapter += uint64(c.Layers) * 64 * uint64(in+out) * bf16
	}
	acts := uint64(opts.MaxTokens) * uint64(8*c.Hidden+3*c.Intermediate+4*c.VocabSize) * 4
	perBlock := uint64(c.Layers) * 2 * uint64(opts.BlockSize) * uint64(c.KVHeads*c.HeadDim) * bf16
	need := weights + uint64(opts.AdapterSlots)*adapter + acts + free/10
	if free <= need || perBlock == 0 {
		return 0
	}
	return int((free - need) / perBlock)
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
