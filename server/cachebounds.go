package server

import (
	"fmt"
	"io/fs"
	"log/slog"
	"os"

	"github.com/peftd/peftd/loader"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/gpu"
	"github.com/peftd/peftd/runtime/llama"
)

// hostRoot is where HostMemory reads /proc and /sys/fs/cgroup (tests swap it).
var hostRoot fs.FS = os.DirFS("/")

// cacheBounds resolves Config.HostBytes and DiskBytes (explicit values win,
// negative means no bound, 0 derives one from the machine) into the
// loader's (0: none) and logs one line for each saying where it came from.
func cacheBounds(cfg Config, m *llama.Model, dev string, kvBlocks int, cacheDir string, log *slog.Logger) (host, disk int64) {
	var hb loader.Bound
	switch {
	case cfg.HostBytes > 0:
		hb = loader.Bound{Bytes: cfg.HostBytes, Source: loader.SourceFlag}
	case cfg.HostBytes < 0:
		hb = loader.Bound{Source: loader.SourceUnbounded}
	default:
		hb = loader.HostCacheBound(hostRoot, baseHostBytes(m, dev, kvBlocks, cfg.PinnedCacheBytes), hostFloor(m.Config))
	}
	log.Info("host adapter cache bound", "bytes", hb.Bytes, "size", humanBytes(hb.Bytes), "source", hb.Source,
		"memory", hb.Avail, "reserved", hb.Reserved, "floor", hb.Floor, "backend", dev)

	var db loader.Bound
	switch {
	case cacheDir == "":
		db = loader.Bound{Source: "disabled"}
	case cfg.DiskBytes > 0:
		db = loader.Bound{Bytes: cfg.DiskBytes, Source: loader.SourceFlag}
	case cfg.DiskBytes < 0:
		db = loader.Bound{Source: loader.SourceUnbounded}
	default:
		db = loader.DiskCacheBound(cacheDir, 0)
	}
	log.Info("disk adapter cache bound", "bytes", db.Bytes, "size", humanBytes(db.Bytes), "source", db.Source,
		"space", db.Avail, "floor", db.Floor, "dir", cacheDir)
	return hb.Bytes, db.Bytes
}

// baseHostBytes is what the base model needs in host memory: on the CPU
// backend the mapped safetensors, their float32 copy and the float32 KV
// cache; on the GPU backend the weights and KV cache live on the device
// (host staging during the upload is transient), so only the pinned memory
// the backend keeps is set aside: the adapter image blocks (pinned, the
// --pinned-cache-bytes flag: 0 for the default, negative for none) and the
// staging ring.
func baseHostBytes(m *llama.Model, dev string, kvBlocks int, pinned int64) int64 {
	if dev != DeviceCPU {
		return gpu.PinnedBytes(pinned) + gpu.StagingRingBytes
	}
	c := m.Config
	var mapped, f32 int64
	for _, s := range c.Expected() {
		n := int64(1)
		for _, d := range s.Shape {
			n *= int64(d)
		}
		f32 += 4 * n
		if info, ok := m.Tensors.Info(s.Name); ok {
			mapped += info.NumElements() * int64(info.DType.Size())
		}
	}
	o := engine.DefaultOptions()
	if kvBlocks <= 0 {
		kvBlocks = o.KVBlocks
	}
	kv := int64(c.Layers) * 2 * int64(kvBlocks) * int64(o.BlockSize) * int64(c.KVHeads*c.HeadDim) * 4
	return mapped + f32 + kv
}

// hostFloor is the least host bound derived from the machine: room for four
// rank-16 adapters on all seven projections (float32), at least
// loader.MinHostCacheBytes.
func hostFloor(c *llama.Config) int64 {
	var per int64
	for mod := llama.Module(0); mod < llama.NumModules; mod++ {
		in, out := c.Dims(mod)
		per += int64(c.Layers) * 16 * int64(in+out) * 4
	}
	return max(4*per, loader.MinHostCacheBytes)
}

func humanBytes(n int64) string {
	if n <= 0 {
		return "none"
	}
	const unit = 1 << 10
	if n < unit {
		return fmt.Sprintf("%dB", n)
	}
	f, suffix := float64(n), "KMGTPE"
	i := -1
	for f >= unit && i < len(suffix)-1 {
		f /= unit
		i++
	}
	return fmt.Sprintf("%.1f%ciB", f, suffix[i])
}
