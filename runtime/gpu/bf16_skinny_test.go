package gpu

import "testing"

// TestBFSkinnyPlan: the variant and K split gemm_skinny takes for the 8B
// shapes and others, on an H100/H200 (132 SMs, clusters) and on a card
// without clusters.
func TestBFSkinnyPlan(t *testing.T) {
	h := &bfSkinny{sms: 132, cluster: true}
	a := &bfSkinny{sms: 108}
	for _, c := range []struct {
		g         *bfSkinny
		M, N, K   int
		ok        bool
		mt, nw, s int
	}{
		{h, 1, 6144, 4096, true, 1, 6, 4},    // qkv: 32 x 4 blocks
		{h, 16, 4096, 4096, true, 1, 4, 4},   // o: 32 x 4
		{h, 17, 28672, 4096, true, 2, 7, 1},  // gate_up: 128 x 1
		{h, 64, 4096, 14336, true, 4, 4, 4},  // down: 32 x 4
		{h, 33, 4096, 14336, true, 4, 4, 4},  // 33 rows: the 64-row variant
		{h, 65, 4096, 4096, false, 0, 0, 0},  // too many rows
		{h, 8, 128256, 4096, false, 0, 0, 0}, // lm_head: more blocks than SMs at any width
		{h, 8, 4096, 4000, false, 0, 0, 0},   // K no multiple of 64
		{h, 8, 4100, 4096, false, 0, 0, 0},   // N no multiple of 128, 192 or 224
		{h, 8, 2048, 2048, true, 1, 4, 8},    // a 1B's o: 16 x 8
		{h, 8, 512, 512, false, 0, 0, 0},     // 4 x 8 blocks: under half the SMs
		{a, 8, 28672, 4096, false, 0, 0, 0},  // no clusters, 108 SMs: 128 or 224 blocks, more than a wave
		{a, 8, 12288, 4096, true, 1, 4, 1},   // no clusters: 96 blocks of 128 (64 of 192 fill fewer)
	} {
		p, ok := c.g.plan(c.M, c.N, c.K)
		if ok != c.ok || ok && (p.mt != c.mt || p.nw != c.nw || p.s != c.s) {
			t.Errorf("%d x %d x %d on %d SMs: plan %+v ok %v, want mt %d nw %d s %d ok %v", c.M, c.N, c.K, c.g.sms, p, ok, c.mt, c.nw, c.s, c.ok)
		}
	}
	var none *bfSkinny
	if _, ok := none.plan(1, 4096, 4096); ok {
		t.Error("a nil bfSkinny planned a product")
	}
}
