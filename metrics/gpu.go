package metrics

import (
	"strconv"

	"github.com/peftd/peftd/gpuinfo"
	"github.com/prometheus/client_golang/prometheus"
)

// GPU exports NVML readings at scrape time.
type GPU struct {
	mon                                      *gpuinfo.Monitor
	memUsed, memTotal, util, temp, power, ok *prometheus.Desc
}

// NewGPU makes the collector over mon; register it on Metrics.Registry.
func NewGPU(mon *gpuinfo.Monitor) *GPU {
	l := []string{"gpu", "name"}
	return &GPU{mon: mon,
		memUsed:  prometheus.NewDesc("peftd_gpu_memory_used_bytes", "GPU memory in use (NVML).", l, nil),
		memTotal: prometheus.NewDesc("peftd_gpu_memory_total_bytes", "GPU memory (NVML).", l, nil),
		util:     prometheus.NewDesc("peftd_gpu_utilization_ratio", "Fraction of the last sample period a kernel ran (NVML).", l, nil),
		temp:     prometheus.NewDesc("peftd_gpu_temperature_celsius", "GPU temperature (NVML).", l, nil),
		power:    prometheus.NewDesc("peftd_gpu_power_watts", "GPU power draw (NVML).", l, nil),
		ok:       prometheus.NewDesc("peftd_gpu_healthy", "1 unless NVML reports hardware or thermal throttling.", l, nil),
	}
}

// Describe implements prometheus.Collector.
func (c *GPU) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.memUsed, c.memTotal, c.util, c.temp, c.power, c.ok} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *GPU) Collect(ch chan<- prometheus.Metric) {
	ds, err := c.mon.Devices()
	if err != nil {
		return
	}
	for _, d := range ds {
		l := []string{strconv.Itoa(d.Index), d.Name}
		healthy := 1.0
		for _, t := range d.Throttle {
			if t != "sw_power_cap" {
				healthy = 0
			}
		}
		ch <- prometheus.MustNewConstMetric(c.memUsed, prometheus.GaugeValue, float64(d.MemUsed), l...)
		ch <- prometheus.MustNewConstMetric(c.memTotal, prometheus.GaugeValue, float64(d.MemTotal), l...)
		ch <- prometheus.MustNewConstMetric(c.util, prometheus.GaugeValue, float64(d.UtilGPU)/100, l...)
		ch <- prometheus.MustNewConstMetric(c.temp, prometheus.GaugeValue, float64(d.TempC), l...)
		ch <- prometheus.MustNewConstMetric(c.power, prometheus.GaugeValue, d.PowerW, l...)
		ch <- prometheus.MustNewConstMetric(c.ok, prometheus.GaugeValue, healthy, l...)
	}
}
