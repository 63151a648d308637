// Package gpuinfo reads NVIDIA GPU memory, health and utilization through
// NVML (github.com/NVIDIA/go-nvml, which dlopens libnvidia-ml at Init, so
// binaries build and start on machines without a driver). Builds without
// cgo get ErrUnavailable.
package gpuinfo

import "errors"

// ErrUnavailable means NVML could not be used: no driver, no library, or a
// build without cgo.
var ErrUnavailable = errors.New("gpuinfo: NVML unavailable")

// Device is one GPU's state.
type Device struct {
	Index                      int
	Name, UUID                 string
	MemTotal, MemUsed, MemFree uint64  // bytes
	UtilGPU, UtilMem           uint32  // percent over the last sample period
	TempC                      uint32  // degrees Celsius
	PowerW                     float64 // watts
	// Throttle names active clock-throttle reasons other than idle
	// (e.g. "hw_slowdown", "sw_thermal"); empty when healthy.
	Throttle []string
}
