// Package metrics is peftd's Prometheus metrics, in one place: requests,
// tokens and latency (observed by the API), engine steps (the scheduler's
// OnStep), adapters and their loads (the loader, read at scrape) and GPU
// readings (NVML, read at scrape), all on one registry served at /metrics.
package metrics

import (
	"regexp"
	"strconv"
	"sync"
	"time"

	"github.com/peftd/peftd/scheduler"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	dto "github.com/prometheus/client_model/go"
)

// Metrics are the server's request and step metrics and its registry.
// Create them before the scheduler and pass OnStep as its Config.OnStep.
type Metrics struct {
	Registry *prometheus.Registry
	maxLoRA  int

	requests   *prometheus.CounterVec
	generated  *prometheus.CounterVec
	prompt     *prometheus.CounterVec
	ttft       *prometheus.HistogramVec
	coldTTFT   *prometheus.HistogramVec
	itl        *prometheus.HistogramVec
	e2e        *prometheus.HistogramVec
	inflight   prometheus.Gauge
	waiting    prometheus.Gauge
	running    prometheus.Gauge
	batchRows  prometheus.Histogram
	batchSeqs  prometheus.Histogram
	adapters   prometheus.Histogram
	stepTime   prometheus.Histogram
	stepDevice prometheus.Histogram
	stepKind   *prometheus.HistogramVec // device time by step kind
	kindRows   *prometheus.CounterVec   // token rows by step kind
	stepHost   *prometheus.HistogramVec
	preempt    prometheus.Counter
	ahead      prometheus.Counter
	chained    prometheus.Counter
	kvUsage    prometheus.Gauge
	loraInfo   *loraInfo
	panics     *prometheus.CounterVec
	stalls     prometheus.Histogram
	// Prefix cache (tokens): peftd's names and vLLM's.
	prefixQueries, prefixHits, vllmPrefixQueries, vllmPrefixHits prometheus.Counter
	prefixPages                                                  prometheus.Gauge

	// vLLM-compatible gauges, read by the Gateway API Inference Extension
	// endpoint picker (see package infra).
	vllmWaiting, vllmRunning, vllmKV prometheus.Gauge

	mu      sync.Mutex
	active  int
	lastRun []string
}

// New registers the metrics on a new registry (with the Go and process
// collectors). maxLoRA is the number of device adapter slots.
func New(maxLoRA int) *Metrics {
	r := prometheus.NewRegistry()
	lat := []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60}
	m := &Metrics{Registry: r, maxLoRA: maxLoRA,
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "peftd_requests_total",
			Help: "Generation requests by adapter and HTTP status."}, []string{"adapter", "status"}),
		generated: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "peftd_generated_tokens_total",
			Help: "Tokens generated, by adapter."}, []string{"adapter"}),
		prompt: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "peftd_prompt_tokens_total",
			Help: "Prompt tokens processed, by adapter."}, []string{"adapter"}),
		ttft: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "peftd_time_to_first_token_seconds",
			Help: "Time from request arrival to the first generated token.", Buckets: lat}, []string{"adapter"}),
		coldTTFT: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "peftd_adapter_cold_first_token_seconds",
			Help: "Time from the arrival of a request whose adapter was loaded for it (into a device slot, from the store, disk or host memory) " +
				"to its first token: the cold start its client saw, by where the adapter came from.", Buckets: lat}, []string{"source"}),
		itl: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "peftd_inter_token_latency_seconds",
			Help: "Time between generated tokens.", Buckets: lat}, []string{"adapter"}),
		e2e: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "peftd_request_duration_seconds",
			Help: "Generation request duration.", Buckets: lat}, []string{"adapter"}),
		inflight: prometheus.NewGauge(prometheus.GaugeOpts{Name: "peftd_requests_in_flight",
			Help: "Generation requests being served by the HTTP layer."}),
		waiting: prometheus.NewGauge(prometheus.GaugeOpts{Name: "peftd_queue_depth",
			Help: "Requests waiting for admission at the last engine step."}),
		running: prometheus.NewGauge(prometheus.GaugeOpts{Name: "peftd_running_requests",
			Help: "Sequences running at the last engine step."}),
		batchRows: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "peftd_batch_tokens",
			Help: "Token rows per engine step.", Buckets: prometheus.ExponentialBuckets(1, 2, 12)}),
		batchSeqs: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "peftd_batch_size",
			Help: "Sequences per engine step.", Buckets: prometheus.ExponentialBuckets(1, 2, 10)}),
		adapters: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "peftd_batch_adapters",
			Help: "Distinct adapters (base counted as one) per engine step.", Buckets: []float64{1, 2, 3, 4, 6, 8, 12, 16, 32, 64}}),
		stepTime: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "peftd_step_duration_seconds",
			Help: "Engine step duration.", Buckets: lat}),
		stepDevice: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "peftd_step_device_seconds",
			Help: "Device time of an engine step (GPU backends: from the metadata upload to the result copy, less the device's wait for the host between the forward and the draw); " +
				"with peftd_step_duration_seconds, the host's share of a step.", Buckets: lat}),
		stepKind: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "peftd_step_kind_device_seconds",
			Help: "Device time of an engine step (as peftd_step_device_seconds) by kind: decode (one new row a sequence) or mixed (prompt chunks too), " +
				"and lora (some sequence runs an adapter: yes, no).", Buckets: lat}, []string{"kind", "lora"}),
		kindRows: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "peftd_step_kind_rows_total",
			Help: "Token rows of the engine steps counted in peftd_step_kind_device_seconds, by the same kinds."}, []string{"kind", "lora"}),
		stepHost: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "peftd_step_host_seconds",
			Help: "Host time of an engine step by phase, in order: plan (admission, the plan and its KV pages), prepare (the step's metadata), " +
				"issue (the ops enqueued; computed, on the CPU backend), wait (sampling or reading the logits until the results are back), " +
				"emit (the tokens handed to their requests). peftd_step_duration_seconds (from the launch to the tokens) is about issue + wait. " +
				"A step planned during the one before it (peftd_steps_ahead_total) had its plan and prepare off the device's path; " +
				"settle is then the host time from the tokens of the step before it to its own launch.",
			Buckets: []float64{1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, .01, .025, .05, .1, .25, .5, 1}}, []string{"phase"}),
		preempt: prometheus.NewCounter(prometheus.CounterOpts{Name: "peftd_preemptions_total",
			Help: "Sequences preempted for KV pages."}),
		ahead: prometheus.NewCounter(prometheus.CounterOpts{Name: "peftd_steps_ahead_total",
			Help: "Steps planned and prepared while the step before them ran on the device (their decode rows took its tokens once back)."}),
		chained: prometheus.NewCounter(prometheus.CounterOpts{Name: "peftd_steps_chained_total",
			Help: "Steps launched before the tokens of the step before them were back, their decode rows reading those tokens on the device " +
				"(graph replays only; also counted in peftd_steps_ahead_total): the device had the next step queued when the last one ended."}),
		kvUsage: prometheus.NewGauge(prometheus.GaugeOpts{Name: "peftd_kv_cache_usage_ratio",
			Help: "Fraction of KV cache pages in use at the last engine step."}),
		loraInfo: newLoRAInfo(maxLoRA),
		stalls: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "peftd_runtime_stall_seconds",
			Help:    "How late the process ran its goroutines, for each wake of the stall watcher later than its threshold (a stop-the-world pause waiting on a long copy, a starved scheduler, a descheduled process).",
			Buckets: []float64{0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5}}),
		panics: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "peftd_panics_total",
			Help: "Panics recovered (the request failed with a 500, the server went on), by where: http, stream, engine."}, []string{"where"}),
		prefixQueries: prometheus.NewCounter(prometheus.CounterOpts{Name: "peftd_prefix_cache_queries_tokens_total",
			Help: "Prompt tokens looked up in the prefix cache."}),
		prefixHits: prometheus.NewCounter(prometheus.CounterOpts{Name: "peftd_prefix_cache_hits_tokens_total",
			Help: "Prompt tokens found in the prefix cache (their KV was reused, not computed)."}),
		vllmPrefixQueries: prometheus.NewCounter(prometheus.CounterOpts{Name: "vllm:prefix_cache_queries_total",
			Help: "Prefix cache queries in tokens (vLLM-compatible; same as peftd_prefix_cache_queries_tokens_total)."}),
		vllmPrefixHits: prometheus.NewCounter(prometheus.CounterOpts{Name: "vllm:prefix_cache_hits_total",
			Help: "Prefix cache hits in tokens (vLLM-compatible; same as peftd_prefix_cache_hits_tokens_total)."}),
		prefixPages: prometheus.NewGauge(prometheus.GaugeOpts{Name: "peftd_prefix_cache_pages",
			Help: "KV pages kept by the prefix cache at the last step."}),
		vllmWaiting: prometheus.NewGauge(prometheus.GaugeOpts{Name: "vllm:num_requests_waiting",
			Help: "Requests waiting for admission (vLLM-compatible; same as peftd_queue_depth)."}),
		vllmRunning: prometheus.NewGauge(prometheus.GaugeOpts{Name: "vllm:num_requests_running",
			Help: "Sequences running on the engine (vLLM-compatible; same as peftd_running_requests)."}),
		vllmKV: prometheus.NewGauge(prometheus.GaugeOpts{Name: "vllm:kv_cache_usage_perc",
			Help: "KV cache usage, 0 to 1 (1 means 100 percent; vLLM-compatible; same as peftd_kv_cache_usage_ratio)."}),
	}
	r.MustRegister(m.requests, m.generated, m.prompt, m.ttft, m.coldTTFT, m.itl, m.e2e, m.inflight, m.waiting, m.running,
		m.batchRows, m.batchSeqs, m.adapters, m.stepTime, m.stepDevice, m.stepKind, m.kindRows, m.stepHost, m.preempt, m.ahead, m.chained, m.kvUsage, m.loraInfo,
		m.vllmWaiting, m.vllmRunning, m.vllmKV, m.panics, m.stalls,
		m.prefixQueries, m.prefixHits, m.vllmPrefixQueries, m.vllmPrefixHits, m.prefixPages,
		collectors.NewGoCollector(collectors.WithGoCollectorRuntimeMetrics(
			// how long runnable goroutines waited to run, and GC pauses
			collectors.GoRuntimeMetricsRule{Matcher: regexp.MustCompile(`^/sched/latencies:seconds$|^/sched/pauses/total/gc:seconds$`)})),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	for _, w := range []string{"http", "stream", "engine"} {
		m.panics.WithLabelValues(w) // export zeros
	}
	for _, src := range []string{"store", "disk", "host"} {
		m.coldTTFT.WithLabelValues(src)
	}
	m.setLoRA(nil, nil)
	return m
}

// Stall records a late wake of the stall watcher (internal/stallwatch).
func (m *Metrics) Stall(late time.Duration) { m.stalls.Observe(late.Seconds()) }

// Panic counts a recovered panic; where is http, stream or engine.
func (m *Metrics) Panic(where string) { m.panics.WithLabelValues(where).Inc() }

// Panics is how many panics were recovered where.
func (m *Metrics) Panics(where string) float64 { return counterValue(m.panics.WithLabelValues(where)) }

// Refused counts a request that ended before it began generating (its
// status says why).
func (m *Metrics) Refused(adapter string, status int) {
	m.requests.WithLabelValues(adapterLabel(adapter), strconv.Itoa(status)).Inc()
}

// FirstToken observes the time from a request's arrival to its first token.
func (m *Metrics) FirstToken(adapter string, d time.Duration) {
	m.ttft.WithLabelValues(adapterLabel(adapter)).Observe(d.Seconds())
}

// ColdFirstToken observes the time to the first token of a request whose
// adapter was loaded for it from source (store, disk or host).
func (m *Metrics) ColdFirstToken(source string, d time.Duration) {
	m.coldTTFT.WithLabelValues(source).Observe(d.Seconds())
}

// NextToken observes the time between two tokens of a request.
func (m *Metrics) NextToken(adapter string, d time.Duration) {
	m.itl.WithLabelValues(adapterLabel(adapter)).Observe(d.Seconds())
}

func counterValue(c prometheus.Counter) float64 {
	var d dto.Metric
	if err := c.Write(&d); err != nil {
		return 0
	}
	return d.GetCounter().GetValue()
}

// stepKind is a step's labels in peftd_step_kind_device_seconds: decode
// when no sequence feeds a prompt chunk, else mixed; lora yes when some
// sequence runs an adapter.
func stepKind(s scheduler.StepStats) (kind, lora string) {
	kind, lora = "mixed", "no"
	if s.Prefill == 0 {
		kind = "decode"
	}
	if s.LoRA {
		lora = "yes"
	}
	return kind, lora
}

// OnStep records one scheduler step.
func (m *Metrics) OnStep(s scheduler.StepStats) {
	if s.Rows > 0 { // a report of an idle scheduler ran no step
		m.batchRows.Observe(float64(s.Rows))
		m.batchSeqs.Observe(float64(s.Sequences))
		m.adapters.Observe(float64(s.Adapters))
		m.stepTime.Observe(s.Duration.Seconds())
		if s.Device > 0 {
			m.stepDevice.Observe(s.Device.Seconds())
			kind, lora := stepKind(s)
			m.stepKind.WithLabelValues(kind, lora).Observe(s.Device.Seconds())
			m.kindRows.WithLabelValues(kind, lora).Add(float64(s.Rows))
		}
		for _, p := range []struct {
			name string
			d    time.Duration
		}{{"plan", s.Plan}, {"prepare", s.Prepare}, {"issue", s.Issue}, {"wait", s.Wait}, {"emit", s.Emit}} {
			m.stepHost.WithLabelValues(p.name).Observe(p.d.Seconds())
		}
		if s.Ahead { // planned during the step before: what lay between the two
			m.stepHost.WithLabelValues("settle").Observe(s.Settle.Seconds())
		}
	}
	m.preempt.Add(float64(s.Preempted))
	if s.Ahead {
		m.ahead.Inc()
	}
	if s.Chained {
		m.chained.Inc()
	}
	m.prefixQueries.Add(float64(s.PrefixQueries))
	m.vllmPrefixQueries.Add(float64(s.PrefixQueries))
	m.prefixHits.Add(float64(s.PrefixHits))
	m.vllmPrefixHits.Add(float64(s.PrefixHits))
	m.prefixPages.Set(float64(s.CachedPages))
	m.setQueue(s.Waiting, s.Running)
	if s.TotalBlocks > 0 {
		// Pages only the prefix cache holds are free for the taking (as vLLM counts them).
		u := 1 - float64(s.FreeBlocks+s.EvictablePages)/float64(s.TotalBlocks)
		m.kvUsage.Set(u)
		m.vllmKV.Set(u)
	}
	m.setLoRA(s.RunningAdapters, s.WaitingAdapters)
}

func (m *Metrics) setLoRA(running, waiting []string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.lastRun = running
	m.loraInfo.set(running, waiting, time.Now())
}

// Begin counts a request that begins generating.
func (m *Metrics) Begin() {
	m.inflight.Inc()
	m.mu.Lock()
	m.active++
	m.mu.Unlock()
}

// End closes a request that began; when none is left the LoRA info shows no adapters
// and the queue and KV gauges read 0 (the scheduler reports no step while
// idle).
func (m *Metrics) End(adapter string, status int, prompt, completion int, dur time.Duration) {
	m.inflight.Dec()
	m.requests.WithLabelValues(adapterLabel(adapter), strconv.Itoa(status)).Inc()
	if prompt > 0 {
		m.prompt.WithLabelValues(adapterLabel(adapter)).Add(float64(prompt))
	}
	m.generated.WithLabelValues(adapterLabel(adapter)).Add(float64(completion))
	m.e2e.WithLabelValues(adapterLabel(adapter)).Observe(dur.Seconds())
	m.mu.Lock()
	m.active--
	idle := m.active == 0
	m.mu.Unlock()
	if idle {
		m.setLoRA(nil, nil)
		m.setQueue(0, 0)
		m.kvUsage.Set(0) // sequences free their pages when they end
		m.vllmKV.Set(0)
	}
}

// setQueue sets peftd's and the vLLM-compatible queue gauges.
func (m *Metrics) setQueue(waiting, running int) {
	m.waiting.Set(float64(waiting))
	m.running.Set(float64(running))
	m.vllmWaiting.Set(float64(waiting))
	m.vllmRunning.Set(float64(running))
}

func adapterLabel(a string) string {
	if a == "" {
		return "base"
	}
	return a
}
