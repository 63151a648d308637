// Package server wires peftd together: the base model, a compute backend
// (CPU or CUDA), the engine, the continuous-batching scheduler, the adapter
// loader over a store, and the HTTP API with its metrics.
package server

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/peftd/peftd/api"
	"github.com/peftd/peftd/gpuinfo"
	"github.com/peftd/peftd/internal/stallwatch"
	"github.com/peftd/peftd/loader/hub"
	"github.com/peftd/peftd/loader/modelfetch"
	"github.com/peftd/peftd/loader/store"
	"github.com/peftd/peftd/metrics"
	"github.com/peftd/peftd/models"
	"github.com/peftd/peftd/runtime/cpu"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/gpu"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/lora"
	"github.com/peftd/peftd/text/chat"
	"github.com/peftd/peftd/text/tokenizer"
)

// Scale-to-zero defaults for peftd serve: an adapter unused this long leaves
// the device, then host memory; with both gone and nothing pending the
// replica reports peftd_idle 1.
const (
	DefaultDeviceTTL = 5 * time.Minute
	DefaultHostTTL   = 30 * time.Minute
)

// Weight formats accepted in Config.Weights.
const (
	WeightsBF16 = gpu.WeightsBF16
	WeightsFP8  = gpu.WeightsFP8
)

// KV cache formats accepted in Config.KVCache.
const (
	KVCacheBF16 = gpu.KVBF16
	KVCacheFP8  = gpu.KVFP8
)

// ParseKVCache checks a KV cache format name ("" means bf16).
func ParseKVCache(s string) (string, error) {
	f, err := gpu.ParseKVFormat(s)
	if err != nil {
		return "", fmt.Errorf("server: %w", err)
	}
	return f, nil
}

// When the step programs' CUDA graphs are recorded (Config.WarmGraphs).
const (
	WarmReady = "ready" // all of them before the server is ready
	WarmIdle  = "idle"  // after, while the engine is idle
)

// ParseWarmGraphs checks a --warm-graphs value ("" is WarmReady).
func ParseWarmGraphs(s string) (string, error) {
	switch s {
	case "", WarmReady:
		return WarmReady, nil
	case WarmIdle:
		return WarmIdle, nil
	}
	return "", fmt.Errorf("server: --warm-graphs %q: want %s or %s", s, WarmReady, WarmIdle)
}

// Devices accepted in Config.Device.
const (
	DeviceAuto = "auto"
	DeviceCPU  = "cpu"
	DeviceCUDA = "cuda"
)

// Config is peftd serve's configuration.
type Config struct {
	// Model is the model folder; empty: the embedded stories260K.
	Model string
	// Store is a folder, file:// or s3:// URL (see store.Open); empty: a
	// folder in the peftd cache seeded with the demo adapters pirate and space.
	Store string
	// SQSQueueURL, when set, makes the s3:// store receive S3 event
	// notifications from this SQS queue (the store URL's sqs_queue
	// parameter; notify defaults to sqs). An error with any other store.
	SQSQueueURL string
	// Listen is the address ListenAndServe uses (default 127.0.0.1:8080).
	Listen string
	// Device is auto (CUDA when a usable GPU is present, else CPU), cpu or cuda.
	Device string
	// GPU is the CUDA device ordinal.
	GPU int
	// Weights is the format of the base model's projection weights on the
	// GPU: bf16 (default) or fp8 (see gpu.WeightsFP8). The CPU backend
	// computes in float32; asked for it by name (--device cpu), it
	// emulates fp8 (cpu.Options.FP8Weights: the scheme's numerics, for
	// quality checks; slower, never faster).
	Weights string
	// KVCache is the format of the KV cache: bf16 (default) or fp8 (keys
	// in e4m3 with a scale per token and KV head, values bf16 on the GPU;
	// see gpu.KVFP8). The CPU backend keeps float32, and emulates fp8 keys
	// when asked for them by name (--device cpu, cpu.Options.FP8Keys).
	KVCache string
	// Eager runs every GPU step op by op: no CUDA graphs for decode steps
	// (for debugging and comparison).
	Eager bool
	// WarmGraphs says when the CUDA graphs of the step programs are
	// recorded: WarmReady (default) before the server is ready, WarmIdle
	// after it, one at a time while the engine is idle (ready ~1 s sooner
	// on an 8B model; a request arriving meanwhile waits for one recording
	// at most, and a step whose graph is still missing runs without one).
	WarmGraphs string
	// SerialLoRA and LoRASMs are gpu.Options': LoRA updates on the compute
	// stream, and the SMs the GEMMs leave to the LoRA stream.
	SerialLoRA bool
	LoRASMs    int
	// NoFP8Wgmma is gpu.Options': every FP8 product of 17-64 rows on
	// cuBLASLt, none on the wgmma kernels (sm_90a).
	NoFP8Wgmma bool
	// NoWS is gpu.Options': FP8 products of 17-64 rows off fp8_ws
	// (sm_90a).
	NoWS bool
	// FP8PreciseAccum is gpu.Options': cuBLASLt's FP8 products with
	// their periodic promotion to float32 (default: without).
	FP8PreciseAccum bool
	// LoRAPartition is gpu.Options': SMs split by green contexts, this
	// many for the LoRA stream (0: none).
	LoRAPartition int
	// GraphRows is gpu.Options': the largest step recorded as a CUDA graph
	// (0: 256).
	GraphRows int
	// NoPDL is gpu.Options': kernels launched one after the other, without
	// Programmatic Dependent Launch (for comparison).
	NoPDL bool
	// TuneGEMMs is gpu.Options': cuBLASLt's algorithms timed for the
	// projections at the graph buckets before the graphs are recorded.
	TuneGEMMs bool
	// TuneFP8 is gpu.Options': with FP8 weights, the scaled FP8 products'
	// tiles and cluster shapes timed before the graphs are recorded.
	TuneFP8 bool
	// TuneFP8From is gpu.Options': the fewest rows TuneFP8 covers (0: 65).
	TuneFP8From int
	// TuneBF16 is gpu.Options': with bf16 weights, cuBLASLt's algorithms
	// timed for the decode products beside the LoRA stream and the
	// larger products of the base steps.
	TuneBF16 bool
	// TuneCacheDir keeps what the tunings decided (gpu.Options'): "" the
	// peftd cache's tune folder, "-" none.
	TuneCacheDir string
	// ChainSteps is gpu.Options': a step launched behind the one in
	// flight, its decode rows reading that step's tokens on the device.
	ChainSteps bool
	// WrapBackend, when set, wraps the engine backend the server chose
	// (instrumentation, fault injection in tests); the server closes what
	// it returns. A wrapper that embeds engine.Backend hides the optional
	// interfaces (device sampling, CUDA graphs): the engine runs without.
	WrapBackend func(engine.Backend) engine.Backend
	// PinnedCacheBytes is gpu.Options.PinnedImageBytes: pinned host memory
	// that keeps adapter images, so that an adapter coming back to the GPU
	// from host memory uploads by DMA alone (0: 1 GiB; negative: none).
	PinnedCacheBytes int64
	// Threads are the CPU backend's workers (0: all cores).
	Threads int
	// Slots are the device adapter slots (default 4).
	Slots int
	// KVBlocks and MaxBatchTokens size the engine (0: its defaults; on a
	// GPU, MaxBatchTokens 0 also has prompt chunks fill a step only to the
	// largest recorded one, GraphRows', while its decode rows leave room).
	KVBlocks, MaxBatchTokens int
	// MaxQueue bounds pending requests; more get 429 (default 256).
	MaxQueue int
	// RequestTimeout bounds a generation (504 past it); 0: none.
	RequestTimeout time.Duration
	// DeviceTTL and HostTTL unload adapters unused this long; 0: never.
	// peftd serve defaults them to DefaultDeviceTTL and DefaultHostTTL.
	DeviceTTL, HostTTL time.Duration
	// APIKeys is an API key file (see api.LoadKeys); Keys, when set, wins.
	APIKeys string
	Keys    *api.Keys
	// MaxUpload bounds request bodies and adapter downloads (default 2 GiB).
	MaxUpload int64
	// HostBytes bounds adapters held in host memory and DiskBytes the disk
	// cache. 0 derives a bound from the machine (loader.HostCacheBound: the
	// cgroup limit or MemAvailable less the base model's host needs;
	// loader.DiskCacheBound: the cache file system's space); negative: no
	// bound.
	HostBytes, DiskBytes int64
	// NoPrefixCache turns automatic prefix caching off.
	NoPrefixCache bool
	// Pin lists adapters loaded at start and kept on the device (at most Slots-1).
	Pin []string
	// CacheDir is the loader's disk cache; empty: a folder per store in the
	// peftd cache. "-" disables the disk tier.
	CacheDir string
	// RecheckInterval and JanitorInterval tune the loader (0: its defaults).
	RecheckInterval, JanitorInterval time.Duration
	Logger                           *slog.Logger
}

// Server is a running peftd: call Serve, then Shutdown.
type Server struct {
	cfg   Config
	mon   *gpuinfo.Monitor // nil without NVML
	log   *slog.Logger
	model *llama.Model
	// backend is the compute backend until NewCore takes it over (it then
	// closes it, also when it fails).
	backend engine.Backend
	core    *Core
	api     *api.Server
	keys    *api.Keys
	device  string

	shutOnce sync.Once
	shutErr  error

	stopWatch func() // stops the stall watcher and waits for it
}

// The stall watcher (internal/stallwatch) wakes every stallInterval; a wake
// later than stallThreshold goes to peftd_runtime_stall_seconds, and one
// later than stallLogAfter to the log too (at most one line a second).
const (
	stallInterval  = 5 * time.Millisecond
	stallThreshold = 20 * time.Millisecond
	stallLogAfter  = 50 * time.Millisecond
)

// watchStalls starts the stall watcher; s.stopWatch stops it.
func (s *Server) watchStalls(met *metrics.Metrics) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	var lastLog time.Time
	quiet := 0 // stalls not logged since the last line
	go func() {
		defer close(done)
		stallwatch.Watch(ctx, stallInterval, stallThreshold, func(st stallwatch.Stall) {
			met.Stall(st.Late)
			if st.Late < stallLogAfter {
				return
			}
			if st.At.Sub(lastLog) < time.Second {
				quiet++
				return
			}
			s.log.Warn("runtime stall: goroutines ran late", "late_ms", st.Late.Milliseconds(), "gc_pauses", st.GCPauses, "not_logged_before", quiet)
			lastLog, quiet = st.At, 0
		})
	}()
	s.stopWatch = func() { cancel(); <-done }
}

// New opens the model, picks the backend, builds the engine, scheduler,
// loader and HTTP API, and logs what it did. It does not listen.
func New(ctx context.Context, cfg Config) (*Server, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Slots == 0 {
		cfg.Slots = 4
	}
	if cfg.MaxQueue == 0 {
		cfg.MaxQueue = 256
	}
	if cfg.MaxUpload <= 0 {
		cfg.MaxUpload = 2 << 30
	}
	if cfg.Listen == "" {
		cfg.Listen = "127.0.0.1:8080"
	}
	if cfg.Device == "" {
		cfg.Device = DeviceAuto
	}
	w, err := gpu.ParseWeightFormat(cfg.Weights)
	if err != nil {
		return nil, fmt.Errorf("server: %w", err)
	}
	cfg.Weights = w
	if cfg.KVCache, err = ParseKVCache(cfg.KVCache); err != nil {
		return nil, err
	}
	if cfg.WarmGraphs, err = ParseWarmGraphs(cfg.WarmGraphs); err != nil {
		return nil, err
	}
	log := cfg.Logger
	if cfg.Slots < 0 {
		return nil, fmt.Errorf("server: slots must be positive, got %d", cfg.Slots)
	}
	if cfg.DeviceTTL < 0 || cfg.HostTTL < 0 {
		return nil, errors.New("server: the device and host TTLs must not be negative")
	}
	if cfg.SQSQueueURL != "" { // fail before loading anything
		if _, err := withSQSQueue(cfg.Store, cfg.SQSQueueURL); err != nil {
			return nil, err
		}
	}
	keys := cfg.Keys
	if keys == nil && cfg.APIKeys != "" {
		k, err := api.LoadKeys(cfg.APIKeys)
		if err != nil {
			return nil, fmt.Errorf("server: API keys: %w", err)
		}
		keys = k
	}
	s := &Server{cfg: cfg, log: log, keys: keys}
	ok := false
	defer func() {
		if !ok {
			s.closeParts()
		}
	}()

	be, dev, err := pickBackend(cfg, log)
	if err != nil {
		return nil, err
	}
	if cfg.WrapBackend != nil {
		be = cfg.WrapBackend(be)
	}
	s.device, s.backend = dev, be
	m, tok, err := OpenModel(ctx, cfg.Model, log)
	if err != nil {
		return nil, err
	}
	s.model = m
	mc := m.Config
	name := mc.Name
	tmpl, err := chat.LoadTemplate(m.Dir)
	if err != nil {
		if !errors.Is(err, chat.ErrNoTemplate) && !errors.Is(err, fs.ErrNotExist) {
			return nil, err
		}
		tmpl = nil
	}
	log.Info("model", "name", name, "dir", m.Dir, "layers", mc.Layers, "hidden", mc.Hidden,
		"heads", mc.Heads, "kv_heads", mc.KVHeads, "vocab", mc.VocabSize, "max_positions", mc.MaxPositions,
		"tokenizer", tok != nil, "chat_template", tmpl != nil)

	storeURL := cfg.Store
	if storeURL == "" {
		storeURL = filepath.Join(models.DefaultCacheDir(), "adapters")
		if err := seedStore(storeURL); err != nil {
			return nil, err
		}
	}
	openURL, err := withSQSQueue(storeURL, cfg.SQSQueueURL)
	if err != nil { // checked at the top already
		return nil, err
	}
	st, err := store.Open(openURL, log)
	if err != nil {
		return nil, fmt.Errorf("server: store: %w", err)
	}
	cacheDir := cfg.CacheDir
	switch cacheDir {
	case "":
		cacheDir = filepath.Join(models.DefaultCacheDir(), "adapter-cache", cacheKey(storeURL))
	case "-":
		cacheDir = ""
	}
	met := metrics.New(cfg.Slots)
	kvBlocks := cfg.KVBlocks
	fillRows := 0
	if dev == DeviceCUDA && cfg.MaxBatchTokens == 0 && !cfg.Eager {
		// prompt chunks fill a step to the largest recording, not past it,
		// so that each step of a moderate load replays a graph and chains
		// behind the step in flight (gpu.RecordedRows)
		fillRows = gpu.RecordedRows(cfg.GraphRows)
	}
	if dev == DeviceCUDA {
		if s.mon = gpuMonitor(log); s.mon != nil {
			met.Registry.MustRegister(metrics.NewGPU(s.mon))
			if kvBlocks == 0 {
				if kvBlocks, err = gpuKVBlocks(s.mon, cfg, m.Config, log); err != nil {
					return nil, err
				}
			}
		}
	}
	hostBytes, diskBytes := cacheBounds(cfg, m, dev, kvBlocks, cacheDir, log)
	s.backend = nil // NewCore owns it from here, and closes it if it fails
	core, err := NewCore(ctx, CoreConfig{Model: m, Backend: be, Store: st, Slots: cfg.Slots, KVBlocks: kvBlocks, NoPrefixCache: cfg.NoPrefixCache,
		IdleWarm: cfg.WarmGraphs == WarmIdle, FillRows: fillRows,
		MaxBatchTokens: cfg.MaxBatchTokens, MaxQueue: cfg.MaxQueue, CacheDir: cacheDir, MaxAdapterBytes: cfg.MaxUpload,
		HostBytes: hostBytes, DiskBytes: diskBytes,
		DeviceTTL: cfg.DeviceTTL, HostTTL: cfg.HostTTL, RecheckInterval: cfg.RecheckInterval,
		JanitorInterval: cfg.JanitorInterval, Metrics: met, Logger: log})
	if err != nil {
		return nil, err
	}
	s.core = core
	opts := core.Engine.Options()
	log.Info("engine", "backend", dev, "slots", opts.AdapterSlots, "kv_blocks", opts.KVBlocks, "block_size", opts.BlockSize,
		"max_batch_tokens", opts.MaxTokens, "prompt_fill_rows", fillRows, "max_context", opts.MaxContext)
	if g, ok := core.Engine.Backend().(*gpu.Backend); ok {
		met.Registry.MustRegister(metrics.NewUploads(func() metrics.UploadCounts {
			st := g.PinnedStats()
			return metrics.UploadCounts{Kept: st.Hits, Filled: st.Fills, Ring: st.Ring, Evictions: st.Evictions, CacheBytes: st.Bytes()}
		}))
	}
	list, err := core.Catalog.List(ctx)
	if err != nil {
		return nil, err
	}
	ids := make([]string, len(list))
	for i, a := range list {
		ids[i] = a.ID
	}
	log.Info("store", "store", storeURL, "adapters", len(list), "ids", strings.Join(ids, ","), "cache", cacheDir,
		"device_ttl", cfg.DeviceTTL.String(), "host_ttl", cfg.HostTTL.String())
	for _, id := range cfg.Pin {
		if err := core.Loader.Pin(ctx, id); err != nil {
			return nil, fmt.Errorf("server: pin %s: %w", id, err)
		}
		log.Info("pinned", "adapter", id)
	}

	var eos []int32
	for _, id := range mc.EOS {
		eos = append(eos, int32(id))
	}
	if tok != nil {
		eos = append(eos, tok.EOS()...)
	}
	s.api = api.New(api.Config{
		Generator: core.Scheduler, Catalog: core.Catalog, Tokenizer: tok, Template: tmpl, ModelName: name,
		MaxModelLen: opts.MaxContext, EOS: eos, Keys: keys, RequestTimeout: cfg.RequestTimeout,
		MaxUploadBytes: cfg.MaxUpload, Metrics: met, Logger: log, Ready: core.Scheduler.Healthy,
	})
	s.watchStalls(met)
	ok = true
	return s, nil
}

// pickBackend chooses the compute backend for cfg.Device and logs one
// "device" line saying which and, for auto falling back to CPU, why.
func pickBackend(cfg Config, log *slog.Logger) (engine.Backend, string, error) {
	switch cfg.Device {
	case DeviceCPU:
		o := cpu.Options{Threads: cfg.Threads, FP8Weights: cfg.Weights == WeightsFP8, FP8Keys: cfg.KVCache == KVCacheFP8}
		weights, kv := "f32", "f32"
		if o.FP8Weights {
			weights = "fp8 emulated in float32 (quality checks, not speed)"
		}
		if o.FP8Keys {
			kv = "fp8 keys emulated in float32"
		}
		log.Info("device", "device", DeviceCPU, "requested", cfg.Device, "threads", threads(cfg.Threads), "weights", weights, "kv_cache", kv)
		return cpu.NewWith(o), DeviceCPU, nil
	case DeviceCUDA:
		b, err := newGPU(cfg)
		if err != nil {
			return nil, "", fmt.Errorf("server: --device cuda: %w", err)
		}
		logGPU(log, cfg, b)
		return b, DeviceCUDA, nil
	case DeviceAuto:
		err := gpu.Available()
		if err == nil {
			b, gerr := newGPU(cfg)
			if gerr == nil {
				logGPU(log, cfg, b)
				return b, DeviceCUDA, nil
			}
			err = gerr
		}
		attrs := []any{"device", DeviceCPU, "requested", cfg.Device, "threads", threads(cfg.Threads), "weights", "f32", "kv_cache", "f32",
			"reason", "no usable GPU: " + oneLine(err.Error())}
		if cfg.Weights == WeightsFP8 || cfg.KVCache == KVCacheFP8 {
			// the fallback computes in float32: fp8 is a GPU format here
			// (--device cpu emulates it, slowly, for quality checks)
			attrs = append(attrs, "fp8", "not applied on the CPU fallback (--device cpu emulates it)")
		}
		log.Info("device", attrs...)
		return cpu.New(cfg.Threads), DeviceCPU, nil
	}
	return nil, "", fmt.Errorf("server: --device %q: want auto, cpu or cuda", cfg.Device)
}

func newGPU(cfg Config) (*gpu.Backend, error) {
	if err := gpu.Available(); err != nil {
		return nil, err
	}
	// Kernels compile once (NVRTC) into the default kernel cache; later
	// starts read the cubin.
	// --warm-graphs idle: the scheduler records the graphs while idle, and
	// a request's step never waits for a recording (it runs eagerly)
	return gpu.New(gpu.Options{Device: cfg.GPU, WeightFormat: cfg.Weights, KVFormat: cfg.KVCache, Eager: cfg.Eager, SerialLoRA: cfg.SerialLoRA, LoRASMs: cfg.LoRASMs, LoRAPartition: cfg.LoRAPartition, NoFP8Wgmma: cfg.NoFP8Wgmma, NoWS: cfg.NoWS, FP8PreciseAccum: cfg.FP8PreciseAccum, GraphRows: cfg.GraphRows, NoPDL: cfg.NoPDL, TuneGEMMs: cfg.TuneGEMMs, ChainSteps: cfg.ChainSteps,
		TuneFP8: cfg.TuneFP8, TuneFP8From: cfg.TuneFP8From, TuneBF16: cfg.TuneBF16, TuneCacheDir: tuneCacheDir(cfg.TuneCacheDir), RecordIdle: cfg.WarmGraphs == WarmIdle, PinnedImageBytes: cfg.PinnedCacheBytes})
}

func logGPU(log *slog.Logger, cfg Config, b *gpu.Backend) {
	d := b.Device()
	log.Info("device", "device", DeviceCUDA, "requested", cfg.Device, "ordinal", d.Ordinal, "name", d.Name,
		"compute_capability", fmt.Sprintf("%d.%d", d.Major, d.Minor), "memory_gib", fmt.Sprintf("%.1f", float64(d.TotalMem)/(1<<30)), "weights", cfg.Weights,
		"kv_cache", cfg.KVCache, "pdl", b.PDL(), "sms", d.SMs)
	if base, lora, ok := b.Partition(); ok {
		log.Info("SM partition (green contexts)", "base_model_sms", base, "lora_sms", lora)
	}
	switch {
	case b.FP8Wgmma():
		log.Info("FP8 products of 17-64 rows on the wgmma kernels (--fp8-wgmma=false: cuBLASLt)")
	case cfg.Weights == gpu.WeightsFP8 && !cfg.NoFP8Wgmma:
		log.Info("FP8 products of 17-64 rows on cuBLASLt: the wgmma kernels need an sm_90a GPU and NVRTC at start-up", "arch", d.Arch())
	}
	if b.WSProducts() {
		log.Info("FP8 products of 17-64 rows with no LoRA update beside on fp8_ws (--ws-products=false: off)")
	}
	if cfg.FP8PreciseAccum && cfg.Weights == gpu.WeightsFP8 {
		log.Info("cuBLASLt's FP8 products promote their sums to float32 every few K steps (--fp8-fast-accum=false)")
	}
}

func threads(n int) string {
	if n <= 0 {
		return "all cores"
	}
	return fmt.Sprint(n)
}

func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }

// Serve accepts HTTP connections on ln until Shutdown.
func (s *Server) Serve(ln net.Listener) error {
	s.log.Info("listening on", "addr", ln.Addr().String(), "api_keys", s.keys.Len(), "max_queue", s.cfg.MaxQueue,
		"request_timeout", s.cfg.RequestTimeout.String())
	return s.api.Serve(ln)
}

// ListenAndServe listens on Config.Listen and serves.
func (s *Server) ListenAndServe() error {
	ln, err := net.Listen("tcp", s.cfg.Listen)
	if err != nil {
		return fmt.Errorf("server: %w", err)
	}
	return s.Serve(ln)
}

// Shutdown stops HTTP (waiting for requests until ctx ends), then the
// scheduler, the loader, the engine and the model, in that order; every
// failure is reported. Later calls return the first call's result.
func (s *Server) Shutdown(ctx context.Context) error {
	s.shutOnce.Do(func() {
		s.log.Info("shutting down")
		var errs []error
		if err := s.api.Shutdown(ctx); err != nil {
			errs = append(errs, fmt.Errorf("http: %w", err))
		}
		if err := s.closeParts(); err != nil {
			errs = append(errs, err)
		}
		s.shutErr = errors.Join(errs...)
		if s.shutErr != nil {
			s.log.Warn("shutdown", "err", s.shutErr)
		}
		if s.stopWatch != nil {
			s.stopWatch()
		}
		s.log.Info("stopped")
	})
	return s.shutErr
}

// closeParts closes the core (scheduler, loader, engine) and the model.
func (s *Server) closeParts() error {
	var errs []error
	if s.backend != nil {
		if err := s.backend.Close(); err != nil {
			errs = append(errs, fmt.Errorf("backend: %w", err))
		}
		s.backend = nil
	}
	if s.core != nil {
		if err := s.core.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	if s.mon != nil {
		s.mon.Close()
		s.mon = nil
	}
	if s.model != nil {
		if err := s.model.Close(); err != nil {
			errs = append(errs, fmt.Errorf("model: %w", err))
		}
		s.model = nil
	}
	return errors.Join(errs...)
}

// API is the HTTP server.
func (s *Server) API() *api.Server { return s.api }

// Core is the engine, scheduler, loader and catalog.
func (s *Server) Core() *Core { return s.core }

// Metrics are the Prometheus metrics (also served on /metrics).
func (s *Server) Metrics() *metrics.Metrics { return s.core.Metrics }

// Device is the backend in use: cpu or cuda.
func (s *Server) Device() string { return s.device }

// KeyCount is the number of API keys guarding the server.
func (s *Server) KeyCount() int { return s.keys.Len() }

// ResolveModel turns a --model value into a local folder: the embedded
// stories260K when empty, an s3:// model mirrored into the peftd cache, a
// Hugging Face Hub model (ORG/NAME[@REVISION]) in the Hugging Face cache, or
// the folder itself. name is the model's name (the folder's, the URL's, or
// ORG/NAME).
func ResolveModel(ctx context.Context, model string, log *slog.Logger) (dir, name string, err error) {
	switch {
	case model == "":
		root, err := models.Extract(models.DefaultCacheDir())
		if err != nil {
			return "", "", err
		}
		return filepath.Join(root, models.DefaultModel), models.DefaultModel, nil
	case modelfetch.IsRemote(model):
		if log == nil {
			log = slog.Default()
		}
		dir, err := modelfetch.Fetch(ctx, model, models.DefaultCacheDir(), modelfetch.LogProgress(log, "downloading model", 5*time.Second), log)
		if err != nil {
			return "", "", err
		}
		log.Info("model fetched", "url", model, "dir", dir)
		return dir, modelfetch.Name(model), nil
	case hub.Is(model): // ORG/NAME[@REVISION] that is no local path, or hf://...
		if log == nil {
			log = slog.Default()
		}
		dir, err := hub.Resolve(ctx, model, hub.FromEnv(log))
		if err != nil {
			return "", "", err
		}
		return dir, hub.Name(model), nil
	}
	return model, filepath.Base(filepath.Clean(model)), nil
}

// OpenModel opens the model ResolveModel finds and its tokenizer (nil in
// token-id mode, when the folder has no tokenizer.json).
func OpenModel(ctx context.Context, model string, log *slog.Logger) (*llama.Model, *tokenizer.Tokenizer, error) {
	dir, name, err := ResolveModel(ctx, model, log)
	if err != nil {
		return nil, nil, err
	}
	m, err := llama.Open(dir)
	if err != nil {
		return nil, nil, err
	}
	m.Config.Name = name
	tok, err := tokenizer.Load(dir)
	if err != nil && !errors.Is(err, tokenizer.ErrNoTokenizer) {
		m.Close()
		return nil, nil, err
	}
	return m, tok, nil
}

// seedStore creates dir with the embedded demo adapters (pirate, space) the
// first time.
func seedStore(dir string) error {
	if _, err := os.Stat(dir); err == nil {
		return nil
	}
	root, err := models.Extract(models.DefaultCacheDir())
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	for _, n := range []string{"pirate", "space"} {
		src := filepath.Join(root, models.AdaptersDir, n)
		dst := filepath.Join(dir, n)
		if err := os.MkdirAll(dst, 0o755); err != nil {
			return err
		}
		for _, fn := range []string{lora.ConfigFile, lora.WeightsFile} {
			b, err := os.ReadFile(filepath.Join(src, fn))
			if err != nil {
				return err
			}
			if err := os.WriteFile(filepath.Join(dst, fn), b, 0o644); err != nil {
				return err
			}
		}
	}
	return nil
}

// withSQSQueue returns the store URL with its sqs_queue parameter set to
// queue; it refuses a store that is not s3:// and a URL naming another queue.
func withSQSQueue(storeURL, queue string) (string, error) {
	if queue == "" {
		return storeURL, nil
	}
	if storeURL == "" {
		return "", errors.New("server: an SQS queue (--sqs-queue-url) needs an s3:// store (--store s3://bucket/prefix)")
	}
	parsed, err := store.ParseURL(storeURL)
	if err != nil {
		return "", fmt.Errorf("server: store: %w", err)
	}
	o, ok := parsed.(store.S3Options)
	if !ok {
		return "", fmt.Errorf("server: an SQS queue (--sqs-queue-url) needs an s3:// store, not %q", storeURL)
	}
	if o.SQSQueueURL != "" && o.SQSQueueURL != queue {
		return "", fmt.Errorf("server: the store URL names the SQS queue %q and --sqs-queue-url %q", o.SQSQueueURL, queue)
	}
	u, err := url.Parse(storeURL)
	if err != nil {
		return "", fmt.Errorf("server: store: %w", err)
	}
	q := u.Query()
	q.Set("sqs_queue", queue)
	u.RawQuery = q.Encode()
	return u.String(), nil
}

// cacheKey names a store's disk cache folder.
func cacheKey(store string) string {
	h := sha256.Sum256([]byte(store))
	return hex.EncodeToString(h[:8])
}

// tuneCacheDir is Config.TuneCacheDir as gpu.Options takes it: "" the
// peftd cache's tune folder, "-" none.
func tuneCacheDir(dir string) string {
	switch dir {
	case "-":
		return ""
	case "":
		return filepath.Join(models.DefaultCacheDir(), "tune")
	}
	return dir
}
