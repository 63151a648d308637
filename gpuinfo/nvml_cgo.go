//go:build cgo && linux

package gpuinfo

import (
	"fmt"
	"sync"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
)

// Monitor holds NVML initialized until Close.
type Monitor struct {
	mu     sync.Mutex
	closed bool
}

// Open initializes NVML; without a driver it returns an error wrapping
// ErrUnavailable that says why in one line.
func Open() (m *Monitor, err error) {
	defer func() {
		if r := recover(); r != nil { // go-nvml panics when the library cannot be loaded at all
			m, err = nil, fmt.Errorf("%w: %v", ErrUnavailable, r)
		}
	}()
	if ret := nvml.Init(); ret != nvml.SUCCESS {
		return nil, fmt.Errorf("%w: nvml.Init: %s", ErrUnavailable, nvml.ErrorString(ret))
	}
	return &Monitor{}, nil
}

// Close shuts NVML down.
func (m *Monitor) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil
	}
	m.closed = true
	if ret := nvml.Shutdown(); ret != nvml.SUCCESS {
		return fmt.Errorf("gpuinfo: nvml.Shutdown: %s", nvml.ErrorString(ret))
	}
	return nil
}

var throttleNames = []struct {
	bit  uint64
	name string
}{
	{nvml.ClocksThrottleReasonSwPowerCap, "sw_power_cap"},
	{nvml.ClocksThrottleReasonHwSlowdown, "hw_slowdown"},
	{nvml.ClocksThrottleReasonSwThermalSlowdown, "sw_thermal"},
	{nvml.ClocksThrottleReasonHwThermalSlowdown, "hw_thermal"},
	{nvml.ClocksThrottleReasonHwPowerBrakeSlowdown, "hw_power_brake"},
}

// Devices reads every GPU's state. Fields NVML cannot report stay zero.
func (m *Monitor) Devices() ([]Device, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil, fmt.Errorf("%w: monitor closed", ErrUnavailable)
	}
	n, ret := nvml.DeviceGetCount()
	if ret != nvml.SUCCESS {
		return nil, fmt.Errorf("gpuinfo: DeviceGetCount: %s", nvml.ErrorString(ret))
	}
	out := make([]Device, 0, n)
	for i := 0; i < n; i++ {
		h, ret := nvml.DeviceGetHandleByIndex(i)
		if ret != nvml.SUCCESS {
			return nil, fmt.Errorf("gpuinfo: device %d: %s", i, nvml.ErrorString(ret))
		}
		d := Device{Index: i}
		d.Name, _ = h.GetName()
		d.UUID, _ = h.GetUUID()
		if mem, ret := h.GetMemoryInfo(); ret == nvml.SUCCESS {
			d.MemTotal, d.MemUsed, d.MemFree = mem.Total, mem.Used, mem.Free
		}
		if u, ret := h.GetUtilizationRates(); ret == nvml.SUCCESS {
			d.UtilGPU, d.UtilMem = u.Gpu, u.Memory
		}
		if t, ret := h.GetTemperature(nvml.TEMPERATURE_GPU); ret == nvml.SUCCESS {
			d.TempC = t
		}
		if p, ret := h.GetPowerUsage(); ret == nvml.SUCCESS {
			d.PowerW = float64(p) / 1000
		}
		if r, ret := h.GetCurrentClocksEventReasons(); ret == nvml.SUCCESS {
			for _, t := range throttleNames {
				if r&t.bit != 0 {
					d.Throttle = append(d.Throttle, t.name)
				}
			}
		}
		out = append(out, d)
	}
	return out, nil
}
