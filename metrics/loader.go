package metrics

import (
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/peftd/peftd/loader"
)

// Loader exports the loader's Stats, read at scrape time, the replica's
// idleness and the adapter load latency histograms. Its source is set
// once the loader exists (Use); until then it exports the histograms only.
type Loader struct {
	src atomic.Pointer[loaderSource]

	evictions, adapters, bytes        *prometheus.Desc
	cacheLimit                        *prometheus.Desc
	fetches, diskHits, loads, invalid *prometheus.Desc
	idle, slots, slotsUsed            *prometheus.Desc
	loadSeconds, phaseSeconds         *prometheus.HistogramVec
}

var tiers = []loader.Tier{loader.TierStore, loader.TierDisk, loader.TierHost, loader.TierDevice}

// NewLoader makes the collector; register it on Metrics.Registry.
func NewLoader() *Loader {
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc(name, help, labels, nil)
	}
	c := &Loader{
		evictions: d("peftd_adapter_evictions_total", "Adapters evicted, by tier: device (LRU replacement or device TTL), host (memory budget or host TTL).", "tier"),
		adapters:  d("peftd_adapters", "Adapters (versions) by the nearest tier holding them: store, disk, host or device.", "tier"),
		bytes: d("peftd_adapter_bytes", "Bytes of adapters held at each tier (float32 weights on device and host; "+
			"file bytes on disk and in the store). An adapter on the device also counts on host and disk.", "tier"),
		cacheLimit: d("peftd_adapter_cache_limit_bytes", "Bound on the bytes of adapters at a cache tier (host: float32 weights in memory; "+
			"disk: files in the disk cache), to compare with peftd_adapter_bytes; absent when the tier is unbounded or disabled.", "tier"),
		fetches:   d("peftd_adapter_store_fetches_total", "Adapter downloads from the store."),
		diskHits:  d("peftd_adapter_disk_hits_total", "Adapters read from the local disk cache instead of the store."),
		loads:     d("peftd_adapter_loads_total", "Adapter loads into device slots."),
		invalid:   d("peftd_adapter_invalid_uploads_total", "Adapter uploads and store versions refused as invalid: corrupt, too large, unsupported, or not fitting the base model."),
		idle:      d("peftd_idle", "1 when no request is pending and no adapter is on the device or in host memory (the replica may be stopped)."),
		slots:     d("peftd_adapter_slots", "Device adapter slots."),
		slotsUsed: d("peftd_adapter_slots_used", "Device adapter slots holding an adapter."),
		loadSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "peftd_adapter_load_seconds",
			Help:    "Time from an adapter being needed to it sitting in a device slot, by where it came from (store, disk, host).",
			Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60}}, []string{"source"}),
	}
	c.phaseSeconds = prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "peftd_adapter_load_phase_seconds",
		Help:    "Where a cold adapter's time goes, by phase: fetch_store, fetch_disk (files read), validate (parsed and checked against the base model), disk_write (the disk tier written), device (staged and uploaded into its slot).",
		Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30}}, []string{"phase"})
	for _, t := range []loader.Tier{loader.TierStore, loader.TierDisk, loader.TierHost} {
		c.loadSeconds.WithLabelValues(t.String()) // export zeros before the first load
	}
	for _, p := range []string{"fetch_store", "fetch_disk", "validate", "disk_write", "device"} {
		c.phaseSeconds.WithLabelValues(p)
	}
	return c
}

type loaderSource struct {
	stats func() loader.Stats
	idle  func() bool
}

// Use sets where Collect reads: the loader's Stats and whether the replica
// is idle.
func (c *Loader) Use(stats func() loader.Stats, idle func() bool) {
	c.src.Store(&loaderSource{stats, idle})
}

// OnLoad observes an adapter load (loader.Options.OnLoad).
func (c *Loader) OnLoad(id string, source loader.Tier, d time.Duration) {
	c.loadSeconds.WithLabelValues(source.String()).Observe(d.Seconds())
}

// OnPhase observes a phase of a cold load (loader.Options.OnPhase).
func (c *Loader) OnPhase(id, phase string, d time.Duration) {
	c.phaseSeconds.WithLabelValues(phase).Observe(d.Seconds())
}

// Describe implements prometheus.Collector.
func (c *Loader) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.evictions, c.adapters, c.bytes, c.cacheLimit, c.fetches, c.diskHits, c.loads, c.invalid,
		c.idle, c.slots, c.slotsUsed} {
		ch <- d
	}
	c.loadSeconds.Describe(ch)
	c.phaseSeconds.Describe(ch)
}

// Collect implements prometheus.Collector.
func (c *Loader) Collect(ch chan<- prometheus.Metric) {
	c.loadSeconds.Collect(ch)
	c.phaseSeconds.Collect(ch)
	src := c.src.Load()
	if src == nil {
		return
	}
	s := src.stats()
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter(c.evictions, s.DeviceEvictions, "device")
	counter(c.evictions, s.HostEvictions, "host")
	counter(c.fetches, s.StoreFetches)
	counter(c.diskHits, s.DiskHits)
	counter(c.loads, s.DeviceLoads)
	counter(c.invalid, s.InvalidUploads)

	count := map[loader.Tier]int{}
	var storeBytes int64
	for _, a := range s.Adapters {
		// Replaced versions count while they still occupy memory.
		if a.Tier == loader.TierNone || (!a.Current && a.Tier < loader.TierHost) {
			continue
		}
		count[a.Tier]++
		if a.Current && !a.Deleted {
			storeBytes += a.StoreBytes
		}
	}
	for _, t := range tiers {
		gauge(c.adapters, float64(count[t]), t.String())
	}
	gauge(c.bytes, float64(storeBytes), loader.TierStore.String())
	gauge(c.bytes, float64(s.DiskBytes), loader.TierDisk.String())
	gauge(c.bytes, float64(s.HostBytes), loader.TierHost.String())
	gauge(c.bytes, float64(s.DeviceBytes), loader.TierDevice.String())
	if s.HostLimit > 0 {
		gauge(c.cacheLimit, float64(s.HostLimit), loader.TierHost.String())
	}
	if s.DiskLimit > 0 {
		gauge(c.cacheLimit, float64(s.DiskLimit), loader.TierDisk.String())
	}
	gauge(c.slots, float64(s.Slots))
	gauge(c.slotsUsed, float64(s.SlotsUsed))
	idle := 0.0
	if src.idle() {
		idle = 1
	}
	gauge(c.idle, idle)
}
