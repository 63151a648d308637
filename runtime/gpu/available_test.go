package gpu

import (
	"errors"
	"strings"
	"testing"

	"github.com/peftd/peftd/runtime/cuda"
)

// TestAvailableReportsNoDriver runs everywhere: without a driver, Available
// and New must fail cleanly (ErrNoDriver, one line); with one, Available
// must succeed or name what is missing.
func TestAvailableReportsNoDriver(t *testing.T) {
	err := Available()
	if err == nil {
		t.Skip("a usable GPU is present")
	}
	t.Logf("Available: %v", err)
	if strings.Contains(err.Error(), "\n") {
		t.Errorf("error spans several lines: %q", err)
	}
	if !errors.Is(err, cuda.ErrNoDriver) && !errors.Is(err, cuda.ErrNoDevice) && !errors.Is(err, cuda.ErrNoLibrary) {
		t.Errorf("Available error %v wraps no cuda sentinel", err)
	}
	if _, err := New(Options{}); err == nil {
		t.Error("New succeeded without a usable GPU")
	}
}

func TestBF16(t *testing.T) {
	if fromBF16(0x3f80) != 1 || fromBF16(0xc000) != -2 {
		t.Error("fromBF16")
	}
}
