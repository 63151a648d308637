package gpuinfo

import (
	"errors"
	"os"
	"testing"
)

// TestOpen: on a machine with an NVIDIA driver Open works and reports the
// GPUs; elsewhere it fails with ErrUnavailable, never a panic.
func TestOpen(t *testing.T) {
	m, err := Open()
	if err != nil {
		if !errors.Is(err, ErrUnavailable) {
			t.Fatalf("Open: %v, want ErrUnavailable", err)
		}
		if os.Getenv("PEFTD_EXPECT_GPU") == "1" {
			t.Fatalf("PEFTD_EXPECT_GPU=1 but %v", err)
		}
		t.Logf("no GPU here: %v", err)
		return
	}
	defer m.Close()
	ds, err := m.Devices()
	if err != nil {
		t.Fatal(err)
	}
	if len(ds) == 0 || ds[0].MemTotal == 0 || ds[0].Name == "" {
		t.Fatalf("devices %+v", ds)
	}
	for _, d := range ds {
		t.Logf("GPU %d: %s, %.1f of %.1f GiB used, %d%% busy, %d C, %.0f W, throttle %v", d.Index, d.Name,
			float64(d.MemUsed)/(1<<30), float64(d.MemTotal)/(1<<30), d.UtilGPU, d.TempC, d.PowerW, d.Throttle)
	}
}
