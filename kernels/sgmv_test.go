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
	// struct LoraEntry is shared with llama.cu and the backend's table layout
	ll, err := Source(Llama)
	if err != nil {
		t.Fatal(err)
	}
	const entry = "struct LoraEntry {\n    const bf16* a;\n    const bf16* b;\n    int rank;\n    float scale;\n    int pad[2];\n};"
	if !strings.Contains(src, entry) || !strings.Contains(ll, entry) {
		t.Error("struct LoraEntry differs between sgmv.cu and llama.cu")
	}
}
