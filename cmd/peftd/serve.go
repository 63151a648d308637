package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/peftd/peftd/api"
	"github.com/peftd/peftd/server"
)

// serveFlags are peftd serve's settings; every flag has a PEFTD_* variable.
type serveFlags struct {
	model, store, listen, device, apiKeys string
	sqsQueueURL                           string
	slots, kvBlocks, maxBatchTokens       int
	maxQueue                              int
	noPrefixCache                         bool
	eager                                 bool
	warmGraphs                            string
	serialLoRA, noPDL, tuneGEMMs, chain   bool
	tuneFP8, tuneBF16                     bool
	tuneFP8From                           int
	tuneCache                             string
	fp8Wgmma, wsProducts, fp8FastAccum    bool
	loraSMs, loraPartition                int
	graphRows                             int
	requestTimeout, deviceTTL, hostTTL    time.Duration
	maxUpload, hostBytes, diskBytes       int64
	pinnedBytes                           int64
	cacheDir, logLevel, pin               string
	weights, kvCache                      string
}

func envName(flag string) string {
	return "PEFTD_" + strings.ToUpper(strings.ReplaceAll(flag, "-", "_"))
}

func cmdServe(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet(ctx, "serve", stdout, stderr)
	var f serveFlags
	fs.StringVar(&f.model, "model", "", "model: a folder, s3://bucket/prefix, or a Hugging Face Hub ID ORG/NAME[@REVISION] (default: the embedded stories260K)")
	fs.StringVar(&f.store, "store", "", "adapter store: a folder (one sub-folder per adapter ID), file:// or s3://bucket/prefix URL (default: a folder in the peftd cache seeded with the demo adapters pirate and space)")
	fs.StringVar(&f.sqsQueueURL, "sqs-queue-url", "", "SQS queue receiving the s3:// store's S3 event notifications (sets the store URL's sqs_queue; an error with other stores)")
	fs.StringVar(&f.listen, "listen", "127.0.0.1:8080", "address to listen on (a non-loopback address needs --api-keys)")
	fs.StringVar(&f.device, "device", "auto", "compute device: auto (cuda when a usable GPU is present, else cpu), cpu or cuda")
	fs.StringVar(&f.weights, "weights", "bf16", "base model projection weights on the GPU: bf16, or fp8 (e4m3, one scale per output row, activations quantized per token; embeddings, norms, lm_head and LoRA stay bf16)")
	fs.StringVar(&f.kvCache, "kv-cache", "bf16", "KV cache on the GPU: bf16, or fp8 (keys in e4m3 with one scale per token and KV head, values bf16: a quarter less memory per token; sm_89+)")
	fs.IntVar(&f.slots, "slots", 4, "adapters resident on the device at once")
	fs.IntVar(&f.kvBlocks, "kv-blocks", 0, "KV cache pages (0: the engine default)")
	fs.IntVar(&f.maxBatchTokens, "max-batch-tokens", 0, "token rows per engine step (0: 512, and on a GPU prompt chunks fill a step only to the largest CUDA-graph recording, --graph-rows' 256, while its decode rows leave room)")
	fs.IntVar(&f.maxQueue, "max-queue", 256, "requests waiting or running at most; more get 429")
	fs.StringVar(&f.warmGraphs, "warm-graphs", server.WarmReady, "GPU: when to record the CUDA graphs of the steps: ready (all before the server is ready) or idle (after, while no request runs: ready about a second sooner on an 8B model; until its graph is recorded a step runs without one, and the first requests wait for a recording in flight)")
	fs.BoolVar(&f.eager, "eager", false, "GPU: run every step op by op, without CUDA graphs for decode steps (for debugging and comparison)")
	fs.BoolVar(&f.noPDL, "no-pdl", false, "GPU: launch kernels one after the other, without Programmatic Dependent Launch (for comparison)")
	fs.BoolVar(&f.chain, "chain-steps", true, "GPU: launch each graph-replayed step behind the one in flight, its decode rows reading that step's tokens on the device, so the GPU never waits for the host between steps (--chain-steps=false: each step waits for the host to have the tokens of the one before)")
	fs.BoolVar(&f.tuneGEMMs, "tune-gemms", false, "GPU: before recording the CUDA graphs, time the algorithms cuBLASLt offers for the bf16 projections at 32-256 rows, and the first one's other tiles and cluster shapes, and keep the fastest (the algorithms alone were within 1% of cuBLASLt's first choice on an H200, so off by default); with --weights fp8, as --tune-fp8")
	fs.BoolVar(&f.tuneFP8, "tune-fp8", true, "GPU, --weights fp8: before recording the CUDA graphs, time every tile and cluster shape of cuBLASLt's FP8 product at 65-256 rows, and the K split against it, and keep the fastest (an H200 served 2.5-3% more tokens a second; ~20 s for Llama 3.1 8B, once: see --tune-cache)")
	fs.BoolVar(&f.tuneBF16, "tune-bf16", true, "GPU, bf16 weights: before recording the CUDA graphs, time the algorithms cuBLASLt offers for the decode products it runs beside the LoRA stream (33-64 rows) and for the base steps' products of 65-256 rows on the whole card, and keep the fastest (an H200's 64-row steps with four adapters 1.5-1.9% faster, an H100's base mixed steps 1%; under 85 s for Llama 3.1 8B, once: see --tune-cache)")
	fs.IntVar(&f.tuneFP8From, "tune-fp8-from", 0, "GPU, --tune-fp8: the fewest rows tuned (0: 65, the steps cuBLASLt runs); below 65 each product's own route (peftd's FP8 kernels) is timed against cuBLASLt's product tuned at those rows, which takes it where faster (measured: steps within 1.5%, twice the tuning time, docs/PERFORMANCE.md v0.67)")
	fs.StringVar(&f.tuneCache, "tune-cache", "", "folder keeping what --tune-fp8, --tune-bf16 and --tune-gemms decided, one file per GPU, driver and cuBLASLt, so that later starts skip the timing (default: the peftd cache's tune folder; - disables)")
	fs.BoolVar(&f.serialLoRA, "serial-lora", false, "GPU: run each LoRA update on the compute stream after its projection, not beside it on the LoRA stream (for comparison)")
	fs.IntVar(&f.graphRows, "graph-rows", 0, "GPU: the largest step, in rows, recorded as a CUDA graph (256, 384 or 512; 0: 256), and with --max-batch-tokens 0 the rows prompt chunks fill a step to; larger steps run op by op and cannot be chained behind the step in flight")
	fs.BoolVar(&f.wsProducts, "ws-products", true, "GPU, sm_90a: products of 17-64 rows on the ws kernels (wgmma, one wave of weight-row blocks): with --weights fp8 fp8_ws (docs/PERFORMANCE.md v0.56-v0.63), with bf16 weights gemm_ws for the products no LoRA update runs beside (v0.68); --ws-products=false keeps them on cuBLASLt, gemm_skinny and fp8_wg")
	fs.BoolVar(&f.fp8FastAccum, "fp8-fast-accum", true, "GPU, --weights fp8: cuBLASLt's FP8 products (steps of 65 rows and more) accumulate as the tensor cores do, as peftd's own FP8 kernels do; false: with cuBLASLt's periodic promotion to float32 (an A/B: docs/PERFORMANCE.md v0.65)")
	fs.BoolVar(&f.fp8Wgmma, "fp8-wgmma", true, "GPU, --weights fp8, sm_90a: FP8 products of 17-64 rows on the wgmma kernels instead of cuBLASLt (every shape up to 32 rows, the wide gate/up product up to 64; docs/PERFORMANCE.md v0.31, v0.33); --fp8-wgmma=false keeps them all on cuBLASLt")
	fs.IntVar(&f.loraPartition, "lora-partition", 0, "GPU: split the SMs by green contexts, at least this many (8 a unit on Hopper) for the LoRA stream and the rest for the base model, in every step (0: no partition; an experiment, see docs/PERFORMANCE.md)")
	fs.IntVar(&f.loraSMs, "lora-sms", 0, "GPU: multiprocessors the GEMMs of a step with adapters leave to the LoRA stream (0: chosen by the step's rows: none up to 16 rows, 16 above, 48 for the q/k/v product from 64 rows; -1: none)")
	fs.BoolVar(&f.noPrefixCache, "no-prefix-cache", false, "do not reuse KV pages across requests that start with the same tokens and adapter version")
	fs.DurationVar(&f.requestTimeout, "request-timeout", 5*time.Minute, "generation deadline (504 past it; 0: none)")
	fs.StringVar(&f.apiKeys, "api-keys", "", "API key file (JSON array of {key, adapters, admin}, or lines KEY [ADAPTERS] [admin])")
	fs.DurationVar(&f.deviceTTL, "device-ttl", server.DefaultDeviceTTL, "unload adapters unused this long from the device (0: only when a slot is needed)")
	fs.DurationVar(&f.hostTTL, "host-ttl", server.DefaultHostTTL, "drop adapters unused this long from host memory (0: never); with both TTLs past and no request pending, peftd_idle is 1")
	fs.Int64Var(&f.maxUpload, "max-upload-bytes", 2<<30, "largest request body, adapter uploads included (413 past it)")
	fs.Int64Var(&f.hostBytes, "host-cache-bytes", 0, "bound on adapters held in host memory, in bytes; LRU past it, sparing adapters on the device or in use "+
		"(0: half of the cgroup memory limit or MemAvailable left after the base model and a 10% margin, at least a few adapters; -1: no bound)")
	fs.Int64Var(&f.diskBytes, "disk-cache-bytes", 0, "bound on the adapter disk cache, in bytes; LRU past it "+
		"(0: half of the cache file system's free space plus what the cache holds, at least 1 GiB if there is room; -1: no bound)")
	fs.Int64Var(&f.pinnedBytes, "pinned-cache-bytes", 0, "GPU: pinned host memory keeping adapter images, so that an adapter coming back to the GPU from host memory is one DMA "+
		"(0: 1 GiB, pinned at start; -1: none, every upload is copied through a 64 MiB staging ring)")
	fs.StringVar(&f.cacheDir, "cache-dir", "", "adapter disk cache folder (default: one per store in the peftd cache; - disables the disk tier)")
	fs.StringVar(&f.logLevel, "log-level", "info", "debug, info, warn or error")
	fs.StringVar(&f.pin, "pin", "", "comma-separated adapter IDs loaded at start and kept on the device (at most slots-1)")
	config := fs.String("config", "", "config file: a JSON object of flag names to values, e.g. {\"listen\": \"127.0.0.1:9000\", \"slots\": 8}; env and flags win")
	// A config file, then PEFTD_* variables, set the defaults; flags win.
	cfgFile := os.Getenv(envName("config"))
	for i, a := range args { // the file must be read before the flags it sets are parsed
		if v, ok := strings.CutPrefix(a, "--config="); ok {
			cfgFile = v
		} else if v, ok := strings.CutPrefix(a, "-config="); ok {
			cfgFile = v
		} else if (a == "--config" || a == "-config") && i+1 < len(args) {
			cfgFile = args[i+1]
		}
	}
	if cfgFile != "" {
		*config = cfgFile
		if err := applyConfigFile(fs, cfgFile); err != nil {
			return err
		}
	}
	var envErr error
	fs.VisitAll(func(fl *flag.Flag) {
		if v, ok := os.LookupEnv(envName(fl.Name)); ok && envErr == nil {
			if err := fl.Value.Set(v); err != nil {
				envErr = fmt.Errorf("serve: %s=%q: %w", envName(fl.Name), v, err)
			}
			fl.DefValue = v
		}
	})
	if envErr != nil {
		return envErr
	}
	if err := fs.Parse(args); err != nil {
		return errUsage
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("serve: unexpected argument %q", fs.Arg(0))
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(f.logLevel)); err != nil {
		return fmt.Errorf("serve: --log-level: %w", err)
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	return serve(ctx, f, log)
}

// checkListen refuses a non-loopback address when no API keys guard it.
func checkListen(addr string, keys int) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("serve: --listen %q: %w", addr, err)
	}
	if keys > 0 {
		return nil
	}
	if host == "localhost" {
		return nil
	}
	if ip := net.ParseIP(host); ip != nil && ip.IsLoopback() {
		return nil
	}
	return fmt.Errorf("serve: refusing to listen on %q without API keys: anyone who can reach it could run and deploy adapters; "+
		"give --api-keys FILE (or PEFTD_API_KEYS), or listen on a loopback address such as 127.0.0.1:8080", addr)
}

func serve(ctx context.Context, f serveFlags, log *slog.Logger) error {
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	var keys *api.Keys
	if f.apiKeys != "" {
		k, err := api.LoadKeys(f.apiKeys)
		if err != nil {
			return fmt.Errorf("serve: --api-keys: %w", err)
		}
		keys = k
	}
	if err := checkListen(f.listen, keys.Len()); err != nil {
		return err
	}
	if f.slots <= 0 {
		return fmt.Errorf("serve: --slots must be positive, got %d", f.slots)
	}
	if f.deviceTTL < 0 || f.hostTTL < 0 {
		return fmt.Errorf("serve: --device-ttl and --host-ttl must not be negative")
	}
	if f.graphRows < 0 {
		return fmt.Errorf("serve: --graph-rows must not be negative, got %d", f.graphRows)
	}
	switch f.device {
	case server.DeviceAuto, server.DeviceCPU, server.DeviceCUDA:
	default:
		return fmt.Errorf("serve: --device %q: want auto, cpu or cuda", f.device)
	}
	switch f.weights {
	case server.WeightsBF16, server.WeightsFP8:
	default:
		return fmt.Errorf("serve: --weights %q: want bf16 or fp8", f.weights)
	}
	if f.tuneFP8From < 0 {
		return fmt.Errorf("serve: --tune-fp8-from %d: want 0 (65 rows) or a positive row count", f.tuneFP8From)
	}
	switch f.kvCache {
	case server.KVCacheBF16, server.KVCacheFP8:
	default:
		return fmt.Errorf("serve: --kv-cache %q: want bf16 or fp8", f.kvCache)
	}
	srv, err := server.New(ctx, server.Config{Model: f.model, Store: f.store, SQSQueueURL: f.sqsQueueURL, Listen: f.listen, Device: f.device, Weights: f.weights, KVCache: f.kvCache, Eager: f.eager, WarmGraphs: f.warmGraphs,
		SerialLoRA: f.serialLoRA, NoPDL: f.noPDL, TuneGEMMs: f.tuneGEMMs, TuneFP8: f.tuneFP8, TuneFP8From: f.tuneFP8From, TuneBF16: f.tuneBF16, TuneCacheDir: f.tuneCache, ChainSteps: f.chain, LoRASMs: f.loraSMs, LoRAPartition: f.loraPartition, NoFP8Wgmma: !f.fp8Wgmma, NoWS: !f.wsProducts, FP8PreciseAccum: !f.fp8FastAccum, GraphRows: f.graphRows, PinnedCacheBytes: f.pinnedBytes, Slots: f.slots, KVBlocks: f.kvBlocks, MaxBatchTokens: f.maxBatchTokens, MaxQueue: f.maxQueue, NoPrefixCache: f.noPrefixCache,
		RequestTimeout: f.requestTimeout, DeviceTTL: f.deviceTTL, HostTTL: f.hostTTL, Keys: keys,
		MaxUpload: f.maxUpload, HostBytes: f.hostBytes, DiskBytes: f.diskBytes, CacheDir: f.cacheDir, Pin: splitList(f.pin), Logger: log})
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	ln, err := net.Listen("tcp", f.listen)
	if err != nil {
		srv.Shutdown(context.Background())
		return fmt.Errorf("serve: %w", err)
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	var serveErr error
	select {
	case serveErr = <-errc:
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	shutErr := srv.Shutdown(sctx)
	if serveErr != nil {
		return fmt.Errorf("serve: %w", serveErr)
	}
	if shutErr != nil {
		return fmt.Errorf("serve: shutdown: %w", shutErr)
	}
	return nil
}

// applyConfigFile sets flags from a JSON object of flag names to values
// (strings, numbers or booleans); an unknown name is an error.
func applyConfigFile(fs *flag.FlagSet, path string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("serve: --config: %w", err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		return fmt.Errorf("serve: --config %s: want a JSON object of flag names to values: %w", path, err)
	}
	for k, v := range m {
		fl := fs.Lookup(k)
		if fl == nil || k == "config" {
			return fmt.Errorf("serve: --config %s: unknown setting %q (use the flag names of peftd serve -h)", path, k)
		}
		var s string
		switch v := v.(type) {
		case string:
			s = v
		case float64:
			s = strconv.FormatFloat(v, 'f', -1, 64)
		case bool:
			s = strconv.FormatBool(v)
		default:
			return fmt.Errorf("serve: --config %s: %q must be a string, number or boolean", path, k)
		}
		if err := fl.Value.Set(s); err != nil {
			return fmt.Errorf("serve: --config %s: %s=%q: %w", path, k, s, err)
		}
		fl.DefValue = s
	}
	return nil
}

// splitList splits a comma-separated list, dropping empty items.
func splitList(s string) []string {
	var out []string
	for _, x := range strings.Split(s, ",") {
		if x = strings.TrimSpace(x); x != "" {
			out = append(out, x)
		}
	}
	return out
}
