package kernels

import (
	"strings"
	"testing"
)

func TestSgmvSource(t *testing.T) {
	src, err := Source(Sgmv)
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"sgmv_fused1", "sgmv_fused4"} {
		if !strings.Contains(src, `extern "C" __global__ void __launch_bounds__(SG_FU_THREADS, 2) `+k+`(`) {
			t.Errorf("kernel %s missing from %s", k, Sgmv)
		}
	}
	// struct LoraEntry (common.cuh) is the backend's table layout: both
	// sources get the one definition
	ll, err := Source(Llama)
	if err != nil {
		t.Fatal(err)
	}
	const entry = "struct LoraEntry {\n    const bf16* a;\n    const bf16* b;\n    int rank;\n    float scale;\n    int pad[2];\n};"
	for name, s := range map[string]string{Sgmv: src, Llama: ll} {
		if n := strings.Count(s, entry); n != 1 {
			t.Errorf("%s: struct LoraEntry defined %d times, want once (from common.cuh)", name, n)
		}
	}
}
