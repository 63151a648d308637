package server

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/peftd/peftd/gpuinfo"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/gpu"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/text/tokenizer"
)

// EngineConfig configures OpenEngine.
type EngineConfig struct {
	// Model is a model folder or s3:// URL (see ResolveModel); empty: the
	// embedded stories260K.
	Model string
	// Device (auto, cpu or cuda; empty: auto), GPU, Weights, KVCache and
	// Threads pick and set up the backend exactly as Config's fields of
	// those names do for peftd serve.
	Device  string
	GPU     int
	Weights string
	KVCache string
	Threads int
	// Eager runs every GPU step op by op (no CUDA graphs), as Config.Eager.
	Eager bool
	// FP8PreciseAccum is Config.FP8PreciseAccum (cuBLASLt's FP8 products
	// with their periodic promotion to float32).
	FP8PreciseAccum bool
	// Slots are the engine's adapter slots (default 4).
	Slots int
	// MaxBatchTokens bounds the rows of a step (0: the engine default).
	MaxBatchTokens int
	// KVBlocks sizes the KV cache. 0: KVTokens decides when set; else, as
	// for peftd serve, free GPU memory on cuda and the engine default on cpu.
	KVBlocks int
	// KVTokens, when set (and KVBlocks is 0), is called once the model is
	// open, before the engine is built, with the model and its tokenizer
	// (nil in token-id mode); the KV cache then holds that many tokens,
	// capped at the model's context, for each of KVSeqs sequences. An error
	// it returns is OpenEngine's.
	KVTokens func(m *llama.Model, tok *tokenizer.Tokenizer) (int, error)
	// KVSeqs is how many sequences of KVTokens tokens the KV cache holds
	// at once (0: one).
	KVSeqs int
	Logger *slog.Logger
}

// EngineInfo is what OpenEngine opened besides the engine.
type EngineInfo struct {
	Device    string               // the backend in use: cpu or cuda
	Model     *llama.Model         // the caller closes it after the engine
	Tokenizer *tokenizer.Tokenizer // nil in token-id mode
}

// OpenEngine builds an engine the way peftd serve builds its own: the backend
// cfg.Device picks (pickBackend, with the same log lines and errors), the
// model and tokenizer OpenModel opens, and the KV cache sized as described
// in EngineConfig.KVBlocks. Close the engine (it closes the backend), then
// info.Model. On error nothing stays open.
func OpenEngine(ctx context.Context, cfg EngineConfig) (e *engine.Engine, info EngineInfo, err error) {
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	if cfg.Slots == 0 {
		cfg.Slots = 4
	}
	if cfg.Slots < 0 {
		return nil, info, fmt.Errorf("server: slots must be positive, got %d", cfg.Slots)
	}
	if cfg.Device == "" {
		cfg.Device = DeviceAuto
	}
	w, err := gpu.ParseWeightFormat(cfg.Weights)
	if err != nil {
		return nil, info, fmt.Errorf("server: %w", err)
	}
	kv, err := ParseKVCache(cfg.KVCache)
	if err != nil {
		return nil, info, err
	}
	sc := Config{Device: cfg.Device, GPU: cfg.GPU, Weights: w, KVCache: kv, Eager: cfg.Eager, FP8PreciseAccum: cfg.FP8PreciseAccum, Threads: cfg.Threads, Slots: cfg.Slots,
		KVBlocks: cfg.KVBlocks, MaxBatchTokens: cfg.MaxBatchTokens}
	be, dev, err := pickBackend(sc, log)
	if err != nil {
		return nil, info, err
	}
	m, tok, err := OpenModel(ctx, cfg.Model, log)
	if err != nil {
		be.Close()
		return nil, info, err
	}
	defer func() {
		if err != nil {
			m.Close()
		}
	}()
	opts := engineOptions(sc.Slots, sc.KVBlocks, sc.MaxBatchTokens)
	switch {
	case cfg.KVBlocks > 0:
	case cfg.KVTokens != nil:
		n, err := cfg.KVTokens(m, tok)
		if err != nil {
			be.Close()
			return nil, info, err
		}
		if c := m.Config.MaxPositions; c > 0 {
			n = min(n, c)
		}
		opts.KVBlocks = max(cfg.KVSeqs, 1)*((max(n, 1)+opts.BlockSize-1)/opts.BlockSize) + 1
	case dev == DeviceCUDA:
		if mon := gpuMonitor(log); mon != nil {
			n, err := gpuKVBlocks(mon, sc, m.Config, log)
			mon.Close()
			if err != nil {
				be.Close()
				return nil, info, err
			}
			if n > 0 {
				opts.KVBlocks = n
			}
		}
	}
	if e, err = engine.New(m, be, opts); err != nil {
		be.Close()
		return nil, info, err
	}
	if err = warmEngine(e, log, false); err != nil { // one-shot tools: nothing to keep adapter images for
		e.Close()
		return nil, info, err
	}
	return e, EngineInfo{Device: dev, Model: m, Tokenizer: tok}, nil
}

// warmEngine records the backend's step programs before the first request
// (the CUDA backend's decode and mixed-step graphs; nothing on the CPU)
// and logs what it did; with pin (a server), the CUDA backend pins the
// blocks that keep adapter images meanwhile, and it returns once they are.
func warmEngine(e *engine.Engine, log *slog.Logger, pin bool) error {
	t0 := time.Now()
	g, isGPU := e.Backend().(*gpu.Backend)
	pin = pin && isGPU
	if pin {
		g.StartPinning() // beside the recordings; ready waits for it below
	}
	if isGPU {
		if products, dir := g.TuneScope(); products != "" {
			log.Info("timing cuBLASLt's algorithms before recording the CUDA graphs (seconds on a GPU's first start; later starts read the tune cache)", "products", products, "cache", dir)
		}
	}
	if err := e.Warmup(); err != nil {
		return fmt.Errorf("server: warm up the engine: %w", err)
	}
	if isGPU {
		n, _ := g.GraphStats()
		log.Info("CUDA graphs (decode and mixed steps)", "recorded", n, "seconds", fmt.Sprintf("%.2f", time.Since(t0).Seconds()), "chained_steps", g.Chains(), "products", g.Products())
		if res, took := g.TuneStats(); len(res) > 0 {
			changed := 0
			for _, r := range res {
				if r.Kept != 0 {
					changed++
				}
			}
			whole := 0
			for _, s := range g.SplitTunes() {
				if s.Whole {
					whole++
				}
			}
			lt := 0
			for _, r := range g.RouteTunes() {
				if r.Lt {
					lt++
				}
			}
			cached, file, cerr := g.TuneCacheStats()
			log.Info("cuBLASLt algorithms tuned", "products", len(res), "changed", changed, "fp8_split_to_whole", whole, "fp8_small_to_cublaslt", lt, "from_cache", cached, "cache", file, "seconds", fmt.Sprintf("%.2f", took.Seconds()))
			if cerr != nil {
				log.Warn("cuBLASLt tuning cache", "err", cerr)
			}
		}
	}
	if pin {
		<-g.PinnedDone()
		logPinned(g, log)
	}
	return nil
}

// logPinned says how much pinned host memory keeps adapter images
// (gpu.Backend.StartPinning), once it is pinned.
func logPinned(g *gpu.Backend, log *slog.Logger) {
	st := g.PinnedStats()
	switch {
	case st.PinErr != nil:
		log.Warn("pinned adapter images: the host would pin no more", "bytes", st.Bytes(), "blocks", st.Blocks, "err", st.PinErr)
	case st.Blocks > 0:
		log.Info("pinned adapter images", "bytes", st.Bytes(), "blocks", st.Blocks, "block_bytes", st.BlockBytes,
			"seconds", fmt.Sprintf("%.2f", st.Pinned.Seconds()))
	}
}

// logIdleWarm says, for a backend that records graphs, that they will be
// recorded while the engine is idle (CoreConfig.IdleWarm).
func logIdleWarm(e *engine.Engine, log *slog.Logger) {
	g, ok := e.Backend().(*gpu.Backend)
	if !ok {
		return
	}
	if g.GraphsOn() {
		log.Info("CUDA graphs (decode and mixed steps)", "recorded", 0, "when", "while idle, after ready (--warm-graphs idle)")
	}
	// ready does not wait for the pinning either: it goes on beside the
	// first requests (steps may wait for it, ~0.5 s for 1 GiB)
	g.StartPinning()
	go func() { // ends with the pinning, which Close stops
		<-g.PinnedDone()
		logPinned(g, log)
	}()
}

// engineOptions are the engine's defaults with the given slots, and KV
// blocks and batch tokens where positive (serve's and generate's engines
// alike).
func engineOptions(slots, kvBlocks, maxBatchTokens int) engine.Options {
	o := engine.DefaultOptions()
	o.AdapterSlots = slots
	if kvBlocks > 0 {
		o.KVBlocks = kvBlocks
	}
	if maxBatchTokens > 0 {
		o.MaxTokens = maxBatchTokens
	}
	return o
}

// gpuKVBlocks sizes the KV cache from the free memory of GPU cfg.GPU
// (kvBlocksFor) for cfg's slots and batch tokens, and logs it; 0 when NVML
// does not list that GPU (the engine default then), an error when the GPU
// has too little memory free.
func gpuKVBlocks(mon *gpuinfo.Monitor, cfg Config, c *llama.Config, log *slog.Logger) (int, error) {
	ds, err := mon.Devices()
	if err != nil || cfg.GPU >= len(ds) {
		return 0, nil
	}
	o := engineOptions(cfg.Slots, 0, cfg.MaxBatchTokens)
	n, err := kvBlocksFor(ds[cfg.GPU].MemFree, c, o, cfg.Weights, cfg.KVCache)
	if err != nil {
		return 0, err
	}
	if n == 0 {
		return 0, fmt.Errorf("server: GPU %d has %.1f GiB free: too little for the model's weights, %d adapter slots and activations",
			cfg.GPU, float64(ds[cfg.GPU].MemFree)/(1<<30), cfg.Slots)
	}
	log.Info("kv cache sized from free GPU memory", "blocks", n, "tokens", n*o.BlockSize)
	return n, nil
}
