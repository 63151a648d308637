package llama

import (
	"math"
	"strings"
	"testing"
)

func TestE4M3Decode(t *testing.T) {
	for _, c := range []struct {
		b    byte
		want float64
	}{{0x00, 0}, {0x38, 1}, {0xb8, -1}, {0x7e, 448}, {0xfe, -448}, {0x01, math.Ldexp(1, -9)}, {0x08, math.Ldexp(1, -6)},
		{0x3c, 1.5}, {0x40, 2}, {0x07, 7 * math.Ldexp(1, -9)}} {
		if got := float64(e4m3[c.b]); got != c.want {
			t.Errorf("e4m3(%#02x) = %v, want %v", c.b, got, c.want)
		}
	}
	for _, b := range []byte{0x7f, 0xff} {
		if !math.IsNaN(float64(e4m3[b])) {
			t.Errorf("e4m3(%#02x) = %v, want NaN", b, e4m3[b])
		}
	}
}

func TestQuantizationConfig(t *testing.T) {
	for _, c := range []struct {
		q    Quantization
		want string // "" accepted
	}{
		{Quantization{QuantMethod: "fbgemm_fp8"}, ""},
		{Quantization{QuantMethod: "fp8"}, ""},
		{Quantization{QuantMethod: "compressed-tensors", Format: "float-quantized", ConfigGroups: map[string]quantGroup{"g": group(8, "float", "channel")}}, ""},
		{Quantization{QuantMethod: "compressed-tensors", Format: "float-quantized", ConfigGroups: map[string]quantGroup{"g": group(8, "float", "tensor")}}, ""},
		{Quantization{QuantMethod: "compressed-tensors", Format: "pack-quantized", ConfigGroups: map[string]quantGroup{"g": group(4, "int", "group")}}, "format \"pack-quantized\""},
		{Quantization{QuantMethod: "compressed-tensors", Format: "float-quantized", ConfigGroups: map[string]quantGroup{"g": group(8, "float", "block")}}, "by block"},
		{Quantization{QuantMethod: "gptq"}, "quant_method \"gptq\""},
	} {
		err := c.q.check()
		switch {
		case c.want == "" && err != nil:
			t.Errorf("%+v: %v", c.q, err)
		case c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want)):
			t.Errorf("%+v: %v, want an error saying %q", c.q, err, c.want)
		}
	}
}

func group(bits int, typ, strategy string) quantGroup {
	var g quantGroup
	g.Weights = &struct {
		NumBits  int    `json:"num_bits"`
		Type     string `json:"type"`
		Strategy string `json:"strategy"`
	}{bits, typ, strategy}
	return g
}
