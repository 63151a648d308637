package gpu

import (
	"strings"
	"testing"

	"github.com/peftd/peftd/kernels"
)

// TestLoRADeltaBytes: the LoRA update's element size follows the macro the
// kernels switch lora_delta on, and every module that writes or reads the
// update is compiled with that switch (common.cuh, which llama.cu and
// sgmv.cu include).
func TestLoRADeltaBytes(t *testing.T) {
	for _, c := range []struct {
		defines string
		want    int
	}{{"", 4}, {"-DPEFTD_WG", 4}, {"-D" + deltaBF16, 2}, {"-DPEFTD_WG -D" + deltaBF16 + "=1", 2}, {"-D" + deltaBF16 + "X", 4}} {
		t.Setenv(kernels.DefinesEnv, c.defines)
		if got := loraDeltaBytes(); got != c.want {
			t.Errorf("%s=%q: %d bytes a value, want %d", kernels.DefinesEnv, c.defines, got, c.want)
		}
	}
	for _, name := range []string{kernels.Llama, kernels.Sgmv} {
		src, err := kernels.Source(name)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(src, "#ifdef "+deltaBF16+"\n") || !strings.Contains(src, "typedef bf16 lora_delta;") {
			t.Errorf("%s: no lora_delta switched by %s", name, deltaBF16)
		}
	}
}
