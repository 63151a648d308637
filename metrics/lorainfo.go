package metrics

import (
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// loraInfo is vllm:lora_requests_info: exactly one sample whose labels list
// the running and waiting adapters and whose value is the time of the update.
// A GaugeVec would need Reset then Set to change the labels, and a scrape
// between the two would see no sample at all; this collector swaps the one
// sample under a lock, so every scrape sees exactly one.
type loraInfo struct {
	desc *prometheus.Desc
	max  string

	mu               sync.Mutex
	running, waiting string
	at               float64
}

func newLoRAInfo(maxLoRA int) *loraInfo {
	return &loraInfo{
		desc: prometheus.NewDesc("vllm:lora_requests_info",
			"Running and waiting LoRA adapters (vLLM-compatible; value is a unix timestamp).",
			[]string{"running_lora_adapters", "waiting_lora_adapters", "max_lora"}, nil),
		max: strconv.Itoa(maxLoRA),
		at:  float64(time.Now().UnixNano()) / 1e9,
	}
}

func (l *loraInfo) set(running, waiting []string, now time.Time) {
	r, w := strings.Join(running, ","), strings.Join(waiting, ",")
	l.mu.Lock()
	l.running, l.waiting, l.at = r, w, float64(now.UnixNano())/1e9
	l.mu.Unlock()
}

func (l *loraInfo) Describe(ch chan<- *prometheus.Desc) { ch <- l.desc }

func (l *loraInfo) Collect(ch chan<- prometheus.Metric) {
	l.mu.Lock()
	r, w, at := l.running, l.waiting, l.at
	l.mu.Unlock()
	ch <- prometheus.MustNewConstMetric(l.desc, prometheus.GaugeValue, at, r, w, l.max)
}
