//go:build !(cgo && linux)

package gpuinfo

import "fmt"

// Monitor is unavailable in builds without cgo.
type Monitor struct{}

// Open reports that NVML needs a cgo build.
func Open() (*Monitor, error) {
	return nil, fmt.Errorf("%w: this binary was built without cgo", ErrUnavailable)
}

// Close does nothing.
func (m *Monitor) Close() error { return nil }

// Devices is never reached (Open fails).
func (m *Monitor) Devices() ([]Device, error) { return nil, ErrUnavailable }
