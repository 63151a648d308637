package metrics

import "github.com/prometheus/client_golang/prometheus"

// UploadCounts are a GPU backend's adapter image uploads by path, and its
// pinned image cache (runtime/gpu PinnedStats).
type UploadCounts struct {
	Kept, Filled, Ring int64 // DMA from a kept pinned image; filled into kept blocks; through the staging ring
	Evictions          int64 // kept images dropped to make room
	CacheBytes         int64 // pinned host memory kept for images
}

// Uploads exports UploadCounts read at scrape time.
type Uploads struct {
	read                      func() UploadCounts
	uploads, evicted, capHost *prometheus.Desc
}

// NewUploads makes the collector over read; register it on Metrics.Registry.
func NewUploads(read func() UploadCounts) *Uploads {
	return &Uploads{read: read,
		uploads: prometheus.NewDesc("peftd_adapter_uploads_total", "Adapter images uploaded to the GPU, by path: kept (DMA alone from the image kept in pinned host memory), "+
			"filled (host copy into pinned blocks that keep the image after), ring (host copy through the staging ring: no room to keep it).", []string{"path"}, nil),
		evicted: prometheus.NewDesc("peftd_adapter_pinned_evictions_total", "Adapter images dropped from pinned host memory to make room for others.", nil, nil),
		capHost: prometheus.NewDesc("peftd_adapter_pinned_bytes", "Pinned host memory kept for adapter images (--pinned-cache-bytes).", nil, nil),
	}
}

// Describe implements prometheus.Collector.
func (c *Uploads) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.uploads
	ch <- c.evicted
	ch <- c.capHost
}

// Collect implements prometheus.Collector.
func (c *Uploads) Collect(ch chan<- prometheus.Metric) {
	u := c.read()
	ch <- prometheus.MustNewConstMetric(c.uploads, prometheus.CounterValue, float64(u.Kept), "kept")
	ch <- prometheus.MustNewConstMetric(c.uploads, prometheus.CounterValue, float64(u.Filled), "filled")
	ch <- prometheus.MustNewConstMetric(c.uploads, prometheus.CounterValue, float64(u.Ring), "ring")
	ch <- prometheus.MustNewConstMetric(c.evicted, prometheus.CounterValue, float64(u.Evictions))
	ch <- prometheus.MustNewConstMetric(c.capHost, prometheus.GaugeValue, float64(u.CacheBytes))
}
