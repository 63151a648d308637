package e2e

import (
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/peftd/peftd/infra"
	"github.com/peftd/peftd/internal/apitest"
	"github.com/peftd/peftd/models"
	"github.com/peftd/peftd/runtime/lora"
	"github.com/peftd/peftd/server"
)

// demoStore is a store folder holding the embedded demo adapter pirate.
func demoStore(t *testing.T) string {
	t.Helper()
	root, err := models.Extract(models.DefaultCacheDir())
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, "pirate"), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{lora.ConfigFile, lora.WeightsFile} {
		b, err := os.ReadFile(filepath.Join(root, models.AdaptersDir, "pirate", f))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "pirate", f), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// splitAdapters splits a comma-separated adapter list label.
func splitAdapters(s string) []string {
	if s == "" {
		return nil
	}
	return strings.Split(s, ",")
}

// checkContract asserts the names the endpoint picker reads, on one scrape:
// exactly one LoRA info sample with the three labels and max_lora = slots,
// and the queue and KV-cache gauges (KV in 0..1, as vLLM).
func checkContract(t *testing.T, ms []apitest.Sample, slots int) (info apitest.Sample) {
	t.Helper()
	infos := apitest.Find(ms, infra.LoRAInfoMetric)
	if len(infos) != 1 {
		t.Fatalf("%s: %d samples, want 1: %v", infra.LoRAInfoMetric, len(infos), infos)
	}
	info = infos[0]
	for _, l := range []string{infra.LoRARunningLabel, infra.LoRAWaitingLabel, infra.LoRAMaxLabel} {
		if _, ok := info.Labels[l]; !ok {
			t.Errorf("%s lacks the label %s: %v", infra.LoRAInfoMetric, l, info.Labels)
		}
	}
	if len(info.Labels) != 3 {
		t.Errorf("%s labels = %v, want exactly %s, %s, %s", infra.LoRAInfoMetric, info.Labels,
			infra.LoRARunningLabel, infra.LoRAWaitingLabel, infra.LoRAMaxLabel)
	}
	if got := info.Labels[infra.LoRAMaxLabel]; got != strconv.Itoa(slots) {
		t.Errorf("%s = %q, want %d (the device slots)", infra.LoRAMaxLabel, got, slots)
	}
	// vLLM sets the value to the time of the update; the EPP takes the newest.
	if now := float64(time.Now().Unix()); info.Value < now-3600 || info.Value > now+60 {
		t.Errorf("%s value = %v, want a recent unix timestamp", infra.LoRAInfoMetric, info.Value)
	}
	for _, name := range []string{infra.QueuedRequestsMetric, infra.KVCacheUsageMetric, "vllm:num_requests_running"} {
		s := apitest.Find(ms, name)
		if len(s) != 1 {
			t.Errorf("%s: %d samples, want 1", name, len(s))
			continue
		}
		if s[0].Value < 0 || (name == infra.KVCacheUsageMetric && s[0].Value > 1) {
			t.Errorf("%s = %v out of range", name, s[0].Value)
		}
	}
	return info
}

// TestEndpointPickerMetrics scrapes a running peftd (embedded stories260K,
// CPU, 2 slots) for the metric contract of infra/k8s/inferencepool.yaml:
// idle, the LoRA info names no adapter; while a long streamed request for
// pirate is in flight running_lora_adapters names pirate,
// vllm:num_requests_running is >= 1 and the KV cache is in use; once it
// ends, the lists are empty and the gauges back at 0.
func TestEndpointPickerMetrics(t *testing.T) {
	const slots = 2
	_, url := startServer(t, "peftd", server.Config{Store: demoStore(t), Slots: slots})

	info := checkContract(t, httpc.Scrape(t, url), slots)
	if info.Labels[infra.LoRARunningLabel] != "" || info.Labels[infra.LoRAWaitingLabel] != "" {
		t.Errorf("idle: %v, want no adapters", info.Labels)
	}

	// A long stream for pirate; scrape in a loop from the first token to the
	// last (the scheduler updates the gauges every engine step).
	var (
		streaming atomic.Bool
		done      = make(chan struct{})
		mu        sync.Mutex
		sawRun    []string
		maxRun    float64
		maxKV     float64
		scrapes   int
	)
	go func() {
		defer close(done)
		status, n := stream(t, url, map[string]any{"model": "pirate", "prompt": "Once upon a time",
			"max_tokens": 400, "temperature": 0, "ignore_eos": true}, func(n int, _ string) {
			if n == 1 {
				streaming.Store(true)
			}
		})
		streaming.Store(false)
		if status != 200 || n < 100 {
			t.Errorf("stream: status %d, %d events", status, n)
		}
	}()
	t0 := time.Now()
	for {
		select {
		case <-done:
		default:
			if !streaming.Load() {
				time.Sleep(time.Millisecond)
				continue
			}
			ms := httpc.Scrape(t, url)
			info := checkContract(t, ms, slots)
			mu.Lock()
			scrapes++
			for _, a := range splitAdapters(info.Labels[infra.LoRARunningLabel]) {
				if !slices.Contains(sawRun, a) {
					sawRun = append(sawRun, a)
				}
			}
			r, _ := apitest.Value(ms, "vllm:num_requests_running")
			kv, _ := apitest.Value(ms, infra.KVCacheUsageMetric)
			maxRun, maxKV = max(maxRun, r), max(maxKV, kv)
			mu.Unlock()
			if slices.Contains(sawRun, "pirate") && maxRun >= 1 && maxKV > 0 {
				// Seen everything; let the stream finish.
				<-done
			}
			continue
		}
		break
	}
	t.Logf("stream of 400 tokens took %v; %d scrapes during it saw running adapters %v, max running %v, max KV use %.3f",
		time.Since(t0), scrapes, sawRun, maxRun, maxKV)
	if !slices.Equal(sawRun, []string{"pirate"}) {
		t.Errorf("%s{%s} during the stream named %v, want [pirate] (%d scrapes)", infra.LoRAInfoMetric, infra.LoRARunningLabel, sawRun, scrapes)
	}
	if maxRun < 1 || maxKV <= 0 || maxKV > 1 {
		t.Errorf("during the stream: vllm:num_requests_running max %v (want >= 1), %s max %v (want in (0, 1])",
			maxRun, infra.KVCacheUsageMetric, maxKV)
	}

	// Done: nothing running or waiting, gauges at 0.
	eventually(t, 10*time.Second, "the LoRA info to empty after the stream", func() bool {
		ms := httpc.Scrape(t, url)
		info := checkContract(t, ms, slots)
		r, _ := apitest.Value(ms, "vllm:num_requests_running")
		w, _ := apitest.Value(ms, infra.QueuedRequestsMetric)
		kv, _ := apitest.Value(ms, infra.KVCacheUsageMetric)
		return info.Labels[infra.LoRARunningLabel] == "" && info.Labels[infra.LoRAWaitingLabel] == "" && r == 0 && w == 0 && kv == 0
	})
	// peftd's own gauges stay alongside.
	ms := httpc.Scrape(t, url)
	for _, n := range []string{"peftd_queue_depth", "peftd_running_requests", "peftd_kv_cache_usage_ratio", "peftd_adapter_slots"} {
		if len(apitest.Find(ms, n)) != 1 {
			t.Errorf("%s missing", n)
		}
	}
	if v, _ := apitest.Value(ms, "peftd_requests_total", "adapter", "pirate", "status", "200"); v != 1 {
		t.Errorf(`peftd_requests_total{adapter="pirate",status="200"} = %v, want 1`, v)
	}
}
