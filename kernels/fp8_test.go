package kernels

import (
	"strings"
	"testing"
)

func TestFP8Source(t *testing.T) {
	src, err := Source(FP8)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(src, `extern "C" __global__ void quant_rows_e4m3(`) {
		t.Errorf("kernel quant_rows_e4m3 missing from %s", FP8)
	}
	if !strings.HasPrefix(Key(FP8, src, nil, "sm_90a", 13, 0), "fp8-") {
		t.Error("cache key does not name the source")
	}
}
