package gpu

import "testing"

// TestLoRAL2On: kernelForce.l2Win decides over PEFTD_LORA_L2, which
// decides over loraL2Default.
func TestLoRAL2On(t *testing.T) {
	for _, tc := range []struct {
		force int
		env   string
		want  bool
	}{
		{0, "", loraL2Default},
		{0, "on", true},
		{0, "1", true},
		{0, "off", false},
		{0, "0", false},
		{0, "bogus", loraL2Default},
		{1, "off", true},
		{3, "off", true},
		{-1, "on", false},
	} {
		t.Setenv("PEFTD_LORA_L2", tc.env)
		b := &Backend{}
		b.force.l2Win = tc.force
		if got := b.loraL2On(); got != tc.want {
			t.Errorf("l2Win %d, PEFTD_LORA_L2=%q: %v, want %v", tc.force, tc.env, got, tc.want)
		}
	}
}

// TestL2Bytes: PEFTD_LORA_L2_MB sizes the window in whole MB; anything
// else keeps loraL2Bytes.
func TestL2Bytes(t *testing.T) {
	for _, tc := range []struct {
		env  string
		want int
	}{
		{"", loraL2Bytes},
		{"12", 12 << 20},
		{"1", 1 << 20},
		{"1024", 1 << 30},
		{"0", loraL2Bytes},
		{"-4", loraL2Bytes},
		{"2048", loraL2Bytes},
		{"16MB", loraL2Bytes},
	} {
		t.Setenv("PEFTD_LORA_L2_MB", tc.env)
		if got := l2Bytes(); got != tc.want {
			t.Errorf("PEFTD_LORA_L2_MB=%q: %d, want %d", tc.env, got, tc.want)
		}
	}
}
