package gpu

import "testing"

// TestFP8StreamPlan: the variant fp8_stream takes for the 8B shapes and
// others on an H100/H200 (132 SMs).
func TestFP8StreamPlan(t *testing.T) {
	g := &fp8Stream{streamRows: &streamRows{vs: fp8StreamVariants, sms: 132}}
	for _, c := range []struct {
		M, N, K int
		bn      int // 0: none (fp8_gemv)
	}{
		{1, 6144, 4096, 48},
		{16, 4096, 4096, 32},
		{16, 28672, 4096, 224},
		{8, 4096, 14336, 32},
		{17, 4096, 4096, 0},   // too many rows
		{8, 128256, 4096, 0},  // more blocks than SMs
		{8, 4096, 4000, 0},    // K no multiple of 512
		{8, 28672, 4224, 224}, // K a multiple of 128 (n224's tile), not of 512
		{8, 4096, 4224, 0},    // ... where only n32 and n48 (512) could take N
	} {
		p, ok := g.plan(c.M, c.N, c.K)
		bn := 0
		if ok {
			bn = g.vs[p.i].bn
		}
		if bn != c.bn {
			t.Errorf("%d x %d x %d: %d columns a block, want %d", c.M, c.N, c.K, bn, c.bn)
		}
	}
	var none *fp8Stream
	if _, ok := none.plan(1, 4096, 4096); ok {
		t.Error("a nil fp8Stream planned a product")
	}
}
