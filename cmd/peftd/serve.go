package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/peftd/peftd/api"
	"github.com/peftd/peftd/loader"
	"github.com/peftd/peftd/loader/store"
	"github.com/peftd/peftd/models"
	"github.com/peftd/peftd/runtime/chat"
	"github.com/peftd/peftd/runtime/cpu"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/lora"
	"github.com/peftd/peftd/scheduler"
)

// serveFlags are peftd serve's settings; every flag has a PEFTD_* variable.
type serveFlags struct {
	model, store, listen, device, apiKeys string
	slots, kvBlocks, maxBatchTokens       int
	maxQueue                              int
	requestTimeout, deviceTTL, hostTTL    time.Duration
	maxUpload                             int64
	logLevel                              string
}

func envName(flag string) string {
	return "PEFTD_" + strings.ToUpper(strings.ReplaceAll(flag, "-", "_"))
}

func cmdServe(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var f serveFlags
	fs.Usage = func() {
		fmt.Fprint(stderr, "Usage: peftd serve [flags]\n\nServe the base model and its LoRA adapters over HTTP (OpenAI-compatible).\n"+
			"Every flag can also be set with a PEFTD_<FLAG> variable, e.g. PEFTD_LISTEN, PEFTD_API_KEYS; flags win.\n\n")
		fs.PrintDefaults()
	}
	fs.StringVar(&f.model, "model", "", "model folder (default: the embedded stories260K)")
	fs.StringVar(&f.store, "store", "", "adapter store: a folder (one sub-folder per adapter ID), file:// or s3://bucket/prefix URL (default: a folder in the peftd cache seeded with the demo adapters pirate and space)")
	fs.StringVar(&f.listen, "listen", "127.0.0.1:8080", "address to listen on (a non-loopback address needs --api-keys)")
	fs.StringVar(&f.device, "device", "auto", "compute device: auto or cpu")
	fs.IntVar(&f.slots, "slots", 4, "adapters resident on the device at once")
	fs.IntVar(&f.kvBlocks, "kv-blocks", 0, "KV cache pages (0: the engine default)")
	fs.IntVar(&f.maxBatchTokens, "max-batch-tokens", 0, "token rows per engine step (0: the engine default)")
	fs.IntVar(&f.maxQueue, "max-queue", 256, "requests waiting or running at most; more get 429")
	fs.DurationVar(&f.requestTimeout, "request-timeout", 5*time.Minute, "generation deadline (504 past it; 0: none)")
	fs.StringVar(&f.apiKeys, "api-keys", "", "API key file (JSON array of {key, adapters, admin}, or lines KEY [ADAPTERS] [admin])")
	fs.DurationVar(&f.deviceTTL, "device-ttl", 0, "unload adapters unused this long from the device (0: only when a slot is needed)")
	fs.DurationVar(&f.hostTTL, "host-ttl", 0, "drop adapters unused this long from host memory (0: never)")
	fs.Int64Var(&f.maxUpload, "max-upload-bytes", 2<<30, "largest request body, adapter uploads included (413 past it)")
	fs.StringVar(&f.logLevel, "log-level", "info", "debug, info, warn or error")
	// PEFTD_* variables set the defaults; flags win.
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
	switch f.device {
	case "auto", "cpu":
	default:
		return fmt.Errorf("serve: --device %q: want auto or cpu (cuda is not wired into serve yet)", f.device)
	}
	log.Info("device", "device", "cpu", "requested", f.device, "threads", "all cores")

	lm, err := loadModel(f.model)
	if err != nil {
		return err
	}
	defer lm.model.Close()
	cfg := lm.model.Config
	name := cfg.Name
	if name == "" {
		name = filepath.Base(lm.model.Dir)
	}
	tmpl, err := chat.LoadTemplate(lm.model.Dir)
	if err != nil {
		if !errors.Is(err, chat.ErrNoTemplate) {
			return err
		}
		tmpl = nil
	}
	log.Info("model", "name", name, "dir", lm.model.Dir, "layers", cfg.Layers, "hidden", cfg.Hidden,
		"heads", cfg.Heads, "kv_heads", cfg.KVHeads, "vocab", cfg.VocabSize, "max_positions", cfg.MaxPositions,
		"tokenizer", lm.tok != nil, "chat_template", tmpl != nil)

	storeDir := f.store
	if storeDir == "" {
		storeDir = filepath.Join(models.DefaultCacheDir(), "adapters")
		if err := seedStore(storeDir); err != nil {
			return err
		}
	}
	st, err := store.Open(storeDir, log)
	if err != nil {
		return fmt.Errorf("serve: --store: %w", err)
	}
	if f.deviceTTL < 0 || f.hostTTL < 0 {
		return fmt.Errorf("serve: --device-ttl and --host-ttl must not be negative")
	}

	opts := engine.DefaultOptions()
	opts.AdapterSlots = f.slots
	if f.kvBlocks > 0 {
		opts.KVBlocks = f.kvBlocks
	}
	if f.maxBatchTokens > 0 {
		opts.MaxTokens = f.maxBatchTokens
	}
	e, err := engine.New(lm.model, cpu.New(0), opts)
	if err != nil {
		return err
	}
	defer e.Close()
	opts = e.Options()
	log.Info("engine", "slots", opts.AdapterSlots, "kv_blocks", opts.KVBlocks, "block_size", opts.BlockSize,
		"max_batch_tokens", opts.MaxTokens, "max_context", opts.MaxContext)

	metrics := api.NewMetrics(f.slots)
	res := &residency{}
	sched := scheduler.New(e, res, scheduler.Config{MaxQueue: f.maxQueue, Logger: log, OnStep: metrics.OnStep})
	defer sched.Close()
	mgr, err := loader.New(ctx, loader.Options{Store: st, Device: sched, Base: cfg, Slots: f.slots,
		CacheDir: filepath.Join(models.DefaultCacheDir(), "adapter-cache", cacheKey(storeDir)), MaxAdapterBytes: f.maxUpload,
		DeviceTTL: f.deviceTTL, HostTTL: f.hostTTL, Logger: log})
	if err != nil {
		return err
	}
	defer mgr.Close()
	res.m.Store(mgr)
	cat := &loaderCatalog{m: mgr, st: st, base: cfg}
	list, err := cat.List(ctx)
	if err != nil {
		return err
	}
	ids := make([]string, len(list))
	for i, a := range list {
		ids[i] = a.ID
	}
	log.Info("store", "store", storeDir, "adapters", len(list), "ids", strings.Join(ids, ","),
		"device_ttl", f.deviceTTL.String(), "host_ttl", f.hostTTL.String())

	var eos []int32
	for _, id := range cfg.EOS {
		eos = append(eos, int32(id))
	}
	if lm.tok != nil {
		eos = append(eos, lm.tok.EOS()...)
	}
	srv := api.New(api.Config{
		Generator: sched, Catalog: cat, Tokenizer: lm.tok, Template: tmpl, ModelName: name,
		MaxModelLen: opts.MaxContext, EOS: eos, Keys: keys, RequestTimeout: f.requestTimeout,
		MaxUploadBytes: f.maxUpload, Metrics: metrics, Logger: log,
	})
	ln, err := net.Listen("tcp", f.listen)
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	log.Info("listening on", "addr", ln.Addr().String(), "api_keys", keys.Len(), "max_queue", f.maxQueue,
		"request_timeout", f.requestTimeout.String())
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}
	log.Info("shutting down")
	sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		log.Warn("shutdown", "err", err)
	}
	log.Info("stopped")
	return nil
}

// seedStore creates dir with the embedded demo adapters (pirate, space) the
// first time.
func seedStore(dir string) error {
	if _, err := os.Stat(dir); err == nil {
		return nil
	}
	root, err := embeddedRoot()
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

// residency is the scheduler's Residency over the loader's Manager, which is
// created after the scheduler (the Manager's Device is the scheduler).
type residency struct {
	m atomic.Pointer[loader.Manager]
}

func (r *residency) Acquire(ctx context.Context, id string) (scheduler.Lease, error) {
	m := r.m.Load()
	if m == nil {
		return nil, errors.New("serve: the adapter loader is not ready")
	}
	l, err := m.Acquire(ctx, id)
	if err != nil {
		if errors.Is(err, loader.ErrNotFound) || errors.Is(err, loader.ErrBadID) {
			return nil, fmt.Errorf("%w %q: %w", scheduler.ErrUnknownAdapter, id, err)
		}
		return nil, err
	}
	return l, nil
}

// loaderCatalog is api.Catalog over the loader's index and its store.
type loaderCatalog struct {
	m    *loader.Manager
	st   store.Store
	base *llama.Config
}

func toInfo(a loader.AdapterInfo) api.AdapterInfo {
	return api.AdapterInfo{ID: a.ID, Tier: a.Tier.String(), Version: a.Version, Rank: a.Rank, Bytes: a.StoreBytes,
		Refcount: a.Refs, LastUsed: a.LastUsed, Invocations: int64(a.Invocations)}
}

func (c *loaderCatalog) List(ctx context.Context) ([]api.AdapterInfo, error) {
	out := []api.AdapterInfo{}
	for _, a := range c.m.List() {
		if a.Current && !a.Deleted && a.Error == "" {
			out = append(out, toInfo(a))
		}
	}
	return out, nil
}

func (c *loaderCatalog) Get(ctx context.Context, id string) (api.AdapterInfo, error) {
	a, ok := c.m.Get(id)
	if !ok || a.Deleted || !a.Current || a.Error != "" {
		return api.AdapterInfo{}, fmt.Errorf("%w: %q", api.ErrNotFound, id)
	}
	return toInfo(a), nil
}

func (c *loaderCatalog) Put(ctx context.Context, id string, configJSON, weights []byte) error {
	if err := store.ValidateID(id); err != nil {
		return fmt.Errorf("%w: %w", api.ErrInvalidAdapter, err)
	}
	if _, err := lora.Parse(id, configJSON, weights, c.base); err != nil {
		return fmt.Errorf("%w: %w", api.ErrInvalidAdapter, err)
	}
	if _, err := c.st.Put(ctx, id, configJSON, weights); err != nil {
		return err
	}
	return c.m.Sync(ctx)
}

func (c *loaderCatalog) Delete(ctx context.Context, id string) error {
	if _, err := c.Get(ctx, id); err != nil {
		return err
	}
	if err := c.st.Delete(ctx, id); err != nil {
		if errors.Is(err, store.ErrNotFound) {
			return fmt.Errorf("%w: %q", api.ErrNotFound, id)
		}
		return err
	}
	return c.m.Sync(ctx)
}

// cacheKey names a store's disk cache folder.
func cacheKey(store string) string {
	h := sha256.Sum256([]byte(store))
	return hex.EncodeToString(h[:8])
}
