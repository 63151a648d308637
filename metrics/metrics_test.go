package metrics

import (
	"testing"
	"time"

	"github.com/peftd/peftd/loader"
	"github.com/peftd/peftd/scheduler"
	dto "github.com/prometheus/client_model/go"
)

// values gathers the registry: metric family name -> the sum of its samples.
func values(t *testing.T, m *Metrics) map[string]float64 {
	t.Helper()
	out := map[string]float64{}
	each(t, m, func(name string, x *dto.Metric) {
		switch {
		case x.Counter != nil:
			out[name] += x.GetCounter().GetValue()
		case x.Gauge != nil:
			out[name] += x.GetGauge().GetValue()
		case x.Histogram != nil:
			out[name] += float64(x.GetHistogram().GetSampleCount())
		}
	})
	return out
}

// each calls fn with every metric m's registry gathers and its family's name.
func each(t *testing.T, m *Metrics, fn func(name string, x *dto.Metric)) {
	t.Helper()
	fams, err := m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		for _, x := range f.GetMetric() {
			fn(f.GetName(), x)
		}
	}
}

func TestRequestAndStepMetrics(t *testing.T) {
	m := New(4)
	m.Refused("a", 429)
	m.Begin()
	if v := values(t, m); v["peftd_requests_in_flight"] != 1 || v["peftd_requests_total"] != 1 {
		t.Errorf("after a refusal and a start: in flight %v, requests %v", v["peftd_requests_in_flight"], v["peftd_requests_total"])
	}
	m.FirstToken("a", 10*time.Millisecond)
	m.ColdFirstToken("store", 300*time.Millisecond)
	m.NextToken("a", time.Millisecond)
	m.OnStep(scheduler.StepStats{Rows: 3, Sequences: 2, Adapters: 1, Waiting: 5, Running: 2, TotalBlocks: 10, FreeBlocks: 4,
		Duration: 3 * time.Millisecond, Device: 2 * time.Millisecond})
	m.OnStep(scheduler.StepStats{Rows: 3, Sequences: 2, Adapters: 1, Waiting: 5, Running: 2, TotalBlocks: 10, FreeBlocks: 4,
		Duration: 3 * time.Millisecond, Plan: time.Millisecond, Issue: 2 * time.Millisecond, Ahead: true, Chained: true}) // a backend that does not time its steps
	m.OnStep(scheduler.StepStats{Waiting: 5, TotalBlocks: 10, FreeBlocks: 4}) // an idle report: no step
	v := values(t, m)
	if v["peftd_step_duration_seconds"] != 2 || v["peftd_step_device_seconds"] != 1 || v["peftd_batch_tokens"] != 2 {
		t.Errorf("two steps, one device-timed, and an idle report: %v steps, %v device times, %v batch sizes",
			v["peftd_step_duration_seconds"], v["peftd_step_device_seconds"], v["peftd_batch_tokens"])
	}
	if v["peftd_step_host_seconds"] != 2*5+1 { // five phases per step, and settle for the step planned ahead
		t.Errorf("host phases: %v observations, want 11", v["peftd_step_host_seconds"])
	}
	if v["peftd_steps_ahead_total"] != 1 || v["peftd_steps_chained_total"] != 1 {
		t.Errorf("one step ahead and chained: ahead %v, chained %v", v["peftd_steps_ahead_total"], v["peftd_steps_chained_total"])
	}
	if v["peftd_time_to_first_token_seconds"] != 1 || v["peftd_adapter_cold_first_token_seconds"] != 1 || v["peftd_inter_token_latency_seconds"] != 1 || v["peftd_queue_depth"] != 5 ||
		v["vllm:num_requests_waiting"] != 5 || v["peftd_kv_cache_usage_ratio"] != 0.6 {
		t.Errorf("after tokens and a step: %v", v)
	}
	m.End("a", 200, 7, 3, time.Second)
	v = values(t, m)
	if v["peftd_requests_in_flight"] != 0 || v["peftd_requests_total"] != 2 || v["peftd_generated_tokens_total"] != 3 ||
		v["peftd_prompt_tokens_total"] != 7 || v["peftd_queue_depth"] != 0 || v["peftd_kv_cache_usage_ratio"] != 0 {
		t.Errorf("after the last request ended: %v", v)
	}
	m.Panic("engine")
	if m.Panics("engine") != 1 || m.Panics("http") != 0 {
		t.Errorf("panics: engine %v, http %v", m.Panics("engine"), m.Panics("http"))
	}
}

func TestLoaderCollector(t *testing.T) {
	m := New(2)
	l := NewLoader()
	m.Registry.MustRegister(l)
	l.OnLoad("a", loader.TierStore, 20*time.Millisecond)
	l.OnPhase("a", "fetch_store", 10*time.Millisecond)
	v := values(t, m)
	if v["peftd_adapter_load_seconds"] != 1 || v["peftd_adapter_load_phase_seconds"] != 1 {
		t.Errorf("load histograms: %v", v)
	}
	if _, ok := v["peftd_adapter_slots"]; ok {
		t.Error("loader gauges exported before the loader was set")
	}
	l.Use(func() loader.Stats { return loader.Stats{Slots: 2, SlotsUsed: 1, DeviceLoads: 3} }, func() bool { return true })
	v = values(t, m)
	if v["peftd_adapter_slots"] != 2 || v["peftd_adapter_slots_used"] != 1 || v["peftd_adapter_loads_total"] != 3 || v["peftd_idle"] != 1 {
		t.Errorf("loader gauges: %v", v)
	}
}

// TestLoRAInfoOneSampleUnderUpdates scrapes while steps change the adapter
// lists as fast as they can: every scrape must see exactly one
// vllm:lora_requests_info sample (the endpoint picker reads it; a scrape
// between a reset and a set used to see none).
func TestLoRAInfoOneSampleUnderUpdates(t *testing.T) {
	m := New(4)
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		lists := [][]string{nil, {"a"}, {"a", "b"}, {"b"}}
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
				m.setLoRA(lists[i%len(lists)], lists[(i+1)%len(lists)])
			}
		}
	}()
	defer func() { close(stop); <-done }()
	for range 2000 {
		fams, err := m.Registry.Gather()
		if err != nil {
			t.Fatal(err)
		}
		n := -1
		for _, f := range fams {
			if f.GetName() == "vllm:lora_requests_info" {
				n = len(f.GetMetric())
				if n == 1 && len(f.GetMetric()[0].GetLabel()) != 3 {
					t.Fatalf("labels %v, want 3", f.GetMetric()[0].GetLabel())
				}
			}
		}
		if n != 1 {
			t.Fatalf("vllm:lora_requests_info: %d samples, want 1", n)
		}
	}
}

// TestRuntimeMetrics: stalls of the process and the Go runtime's scheduling
// latencies and GC pauses are exported.
func TestRuntimeMetrics(t *testing.T) {
	m := New(1)
	m.Stall(40 * time.Millisecond)
	m.Stall(300 * time.Millisecond)
	v := values(t, m)
	if v["peftd_runtime_stall_seconds"] != 2 {
		t.Errorf("stalls: %v observations, want 2", v["peftd_runtime_stall_seconds"])
	}
	for _, name := range []string{"go_sched_latencies_seconds", "go_sched_pauses_total_gc_seconds"} {
		if _, ok := v[name]; !ok {
			t.Errorf("%s is not exported", name)
		}
	}
}

func TestUploadsCollector(t *testing.T) {
	m := New(2)
	n := UploadCounts{Kept: 3, Filled: 2, Ring: 1, Evictions: 4, CacheBytes: 1 << 30}
	m.Registry.MustRegister(NewUploads(func() UploadCounts { return n }))
	v := values(t, m)
	if v["peftd_adapter_uploads_total"] != 6 || v["peftd_adapter_pinned_evictions_total"] != 4 || v["peftd_adapter_pinned_bytes"] != 1<<30 {
		t.Errorf("upload metrics: %v", v)
	}
	n.Kept++ // read at scrape time
	if v := values(t, m); v["peftd_adapter_uploads_total"] != 7 {
		t.Errorf("after one more upload: %v", v)
	}
}

// TestStepKinds: device-timed steps are split by kind (decode or mixed)
// and by whether an adapter runs in them; steps without a device time and
// idle reports are not counted.
func TestStepKinds(t *testing.T) {
	m := New(4)
	ms := time.Millisecond
	for _, s := range []scheduler.StepStats{
		{Rows: 64, Sequences: 64, Adapters: 1, Device: 6 * ms},                          // decode, base
		{Rows: 64, Sequences: 64, Adapters: 3, LoRA: true, Device: 7 * ms},              // decode, adapters
		{Rows: 200, Sequences: 60, Prefill: 2, Adapters: 4, LoRA: true, Device: 9 * ms}, // mixed, adapters
		{Rows: 200, Sequences: 60, Prefill: 2, Adapters: 1, LoRA: true, Device: 8 * ms}, // mixed, one adapter only
		{Rows: 130, Sequences: 3, Prefill: 1, Adapters: 1, Device: 5 * ms},              // mixed, base
		{Rows: 64, Sequences: 64, Adapters: 1},                                          // not device-timed
		{Waiting: 3},                                                                    // idle
	} {
		m.OnStep(s)
	}
	got := map[string]float64{}
	each(t, m, func(key string, x *dto.Metric) {
		for _, l := range x.GetLabel() {
			key += " " + l.GetName() + "=" + l.GetValue()
		}
		switch {
		case x.Counter != nil:
			got[key] = x.GetCounter().GetValue()
		case x.Histogram != nil:
			got[key+" count"] = float64(x.GetHistogram().GetSampleCount())
			got[key+" sum_ms"] = x.GetHistogram().GetSampleSum() * 1000
		}
	})
	const dev, rows = "peftd_step_kind_device_seconds", "peftd_step_kind_rows_total"
	for k, want := range map[string]float64{
		dev + " kind=decode lora=no count": 1, dev + " kind=decode lora=no sum_ms": 6,
		dev + " kind=decode lora=yes count": 1, dev + " kind=mixed lora=yes count": 2, dev + " kind=mixed lora=yes sum_ms": 17,
		dev + " kind=mixed lora=no count": 1,
		rows + " kind=decode lora=no":     64, rows + " kind=mixed lora=yes": 400, rows + " kind=mixed lora=no": 130,
	} {
		if g := got[k]; g < want-1e-9 || g > want+1e-9 {
			t.Errorf("%s = %v, want %v", k, g, want)
		}
	}
}
