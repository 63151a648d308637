package gpu

import (
	"testing"

	"github.com/peftd/peftd/runtime/cuda"
)

// TestBFSkinnyPlan: the variant gemm_skinny takes for the 8B shapes and
// others on an H100/H200 (132 SMs) and an A100 (108).
func TestBFSkinnyPlan(t *testing.T) {
	rows := func(vs []streamVariant, sms int) *streamRows {
		return &streamRows{vs: vs, fn: make([]*cuda.Function, len(vs)), sms: sms}
	}
	h := &bfSkinny{streamRows: rows(bfSkinnyVariants, 132)}
	a := &bfSkinny{streamRows: rows(bfSkinnyVariants, 108)}
	for _, c := range []struct {
		g       *bfSkinny
		M, N, K int
		bn      int // 0: none (cuBLASLt)
	}{
		{h, 1, 6144, 4096, 48},    // qkv: 128 blocks
		{h, 16, 4096, 4096, 32},   // o: 128
		{h, 16, 28672, 4096, 224}, // gate_up: 128
		{h, 8, 4096, 14336, 32},   // down: 128
		{h, 17, 4096, 4096, 0},    // too many rows
		{h, 8, 128256, 4096, 0},   // lm_head: more blocks than SMs at any width
		{h, 8, 4096, 4000, 0},     // K no multiple of 256
		{h, 8, 4100, 4096, 0},     // N no multiple of 224, 48 or 32
		{h, 8, 2048, 2048, 0},     // 64 blocks of 32: under half the SMs
		{h, 8, 3072, 3072, 32},    // a 3B's o: 64 blocks of 48 fill under half the SMs, 96 of 32
		{a, 8, 4096, 4096, 0},     // 108 SMs: 4096 / 48 is no integer; / 32 = 128 > 108
		{a, 8, 6144, 4096, 0},     // 128 blocks of 48 > 108, 192 of 32
		{a, 8, 2304, 4096, 32},    // 72 blocks of 32 (48 would be 48: under half)
		{a, 8, 28672, 4096, 0},    // 128 blocks of 224 > 108
	} {
		p, ok := c.g.plan(c.M, c.N, c.K)
		if ok != (c.bn > 0) || ok && p.bn != c.bn {
			t.Errorf("%d x %d x %d on %d SMs: plan %d ok %v, want %d", c.M, c.N, c.K, c.g.sms, p.bn, ok, c.bn)
		}
	}
	var none *bfSkinny
	if _, ok := none.plan(1, 4096, 4096); ok {
		t.Error("a nil bfSkinny planned a product")
	}
}

// TestSkinnyPlanShared: which products of a step take gemm_skinny: up to
// 16 rows on the whole card with nothing held back; cuBLASLt on its SM
// target when SMs are held for the LoRA stream (an explicit
// Options.LoRASMs), above 16 rows, or with kernelForce.noSkinny.
func TestSkinnyPlanShared(t *testing.T) {
	sk := &bfSkinny{streamRows: &streamRows{vs: bfSkinnyVariants, fn: make([]*cuda.Function, len(bfSkinnyVariants)), sms: 132}}
	for _, c := range []struct {
		rows   int
		shared bool // SMs held back for the LoRA stream
		force  kernelForce
		N, K   int
		bn     int // 0: cuBLASLt
	}{
		{rows: 1, N: 6144, K: 4096, bn: 48},
		{rows: 16, N: 28672, K: 4096, bn: 224},
		{rows: 8, N: 4096, K: 14336, bn: 32},
		{rows: 17, N: 6144, K: 4096},
		{rows: 5, shared: true, N: 6144, K: 4096},
		{rows: 8, shared: true, N: 28672, K: 4096},
		{rows: 1, force: kernelForce{noSkinny: true}, N: 6144, K: 4096},
	} {
		b := &Backend{sk: sk, nRows: c.rows, force: c.force}
		p, ok := b.skinnyPlan(c.N, c.K, c.shared)
		if ok != (c.bn > 0) || ok && p.bn != c.bn {
			t.Errorf("%d rows, %d x %d, shared %v, %+v: plan %d ok %v, want %d", c.rows, c.N, c.K, c.shared, c.force, p.bn, ok, c.bn)
		}
	}
}
