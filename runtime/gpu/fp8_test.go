package gpu

import (
	"testing"
)

func TestParseWeightFormat(t *testing.T) {
	for in, want := range map[string]string{"": WeightsBF16, "bf16": WeightsBF16, "FP8": WeightsFP8, " fp8 ": WeightsFP8, "e4m3": WeightsFP8} {
		if got, err := ParseWeightFormat(in); err != nil || got != want {
			t.Errorf("%q: %q, %v; want %q", in, got, err, want)
		}
	}
	if _, err := ParseWeightFormat("int4"); err == nil {
		t.Error("int4 accepted")
	}
}

func TestFP8Projection(t *testing.T) {
	for _, c := range []struct {
		name  string
		shape []int
		want  bool
	}{
		{"model.layers.0.self_attn.q_proj.weight", []int{4096, 4096}, true},
		{"model.layers.31.mlp.down_proj.weight", []int{4096, 14336}, true},
		{"model.layers.0.self_attn.k_proj.weight", []int{100, 4096}, false}, // N % 8
		{"model.layers.0.mlp.up_proj.weight", []int{352, 120}, false},       // K % 16
		{"model.embed_tokens.weight", []int{128256, 4096}, false},
		{"lm_head.weight", []int{128256, 4096}, false},
		{"model.layers.0.input_layernorm.weight", []int{4096}, false},
	} {
		if got := fp8Projection(c.name, c.shape); got != c.want {
			t.Errorf("%s %v: %v, want %v", c.name, c.shape, got, c.want)
		}
	}
}

// TestGemvFits: fp8_gemv takes 1-16 rows when K is a multiple of 64 and N
// of 16; everything else goes to cuBLASLt.
func TestGemvFits(t *testing.T) {
	for _, c := range []struct {
		T, N, K int
		want    bool
	}{{1, 4096, 4096, true}, {16, 28672, 4096, true}, {17, 4096, 4096, false}, {0, 4096, 4096, false},
		{4, 4096, 14336, true}, {4, 100, 4096, false}, {4, 96, 272, false}, {8, 16, 64, true}} {
		if got := gemvFits(c.T, c.N, c.K); got != c.want {
			t.Errorf("gemvFits(%d, %d, %d) = %v, want %v", c.T, c.N, c.K, got, c.want)
		}
	}
}

// TestGemvWarpsFor: 16 warps for the small grids (8B o and down on 132
// SMs), 8 for the large ones.
func TestGemvWarpsFor(t *testing.T) {
	for _, c := range []struct{ N, sms, want int }{
		{4096, 132, 16}, {6144, 132, 8}, {28672, 132, 8}, {4096, 100, 8}, {1024, 8, 8}, {240, 8, 16},
	} {
		if got := gemvWarpsFor(c.N, c.sms); got != c.want {
			t.Errorf("gemvWarpsFor(N=%d, %d SMs) = %d, want %d", c.N, c.sms, got, c.want)
		}
	}
}
