package kernels

import (
	"strings"
	"testing"
)

func TestSourceAndKey(t *testing.T) {
	src, err := Source(Llama)
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"embed", "add_rmsnorm", "rmsnorm_rows", "rope_store", "attention", "attn_decode_d32", "attn_decode_d64", "attn_decode_d128", "attn_decode_d256", "silu_mul", "lora_shrink", "lora_expand"} {
		if !strings.Contains(src, "extern \"C\" __global__ void "+k+"(") && !strings.Contains(src, ") "+k+"(") {
			t.Errorf("kernel %s missing from %s", k, Llama)
		}
	}
	a := Key(Llama, src, []string{"-arch=sm_90a"}, "sm_90a", 13, 0)
	if a != Key(Llama, src, []string{"-arch=sm_90a"}, "sm_90a", 13, 0) {
		t.Error("key not stable")
	}
	for _, b := range []string{Key(Llama, src+" ", []string{"-arch=sm_90a"}, "sm_90a", 13, 0),
		Key(Llama, src, []string{"-arch=sm_90a", "-G"}, "sm_90a", 13, 0),
		Key(Llama, src, []string{"-arch=sm_90a"}, "sm_90a", 13, 1)} {
		if a == b {
			t.Error("key ignores a change")
		}
	}
	if !strings.HasPrefix(a, "llama-") || !strings.HasSuffix(a, "-sm_90a-nvrtc13.0.cubin") {
		t.Errorf("key %s", a)
	}
}
