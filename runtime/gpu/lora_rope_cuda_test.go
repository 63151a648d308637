//go:build cuda

package gpu

import (
	"fmt"
	"testing"

	fx "github.com/peftd/peftd/internal/fixture"
	"github.com/peftd/peftd/runtime/engine"
)

// TestRopeLoRAFixture: the q/k/v LoRA update expanded inside RoPE
// (rope_store_lora, lora_rope.go) against the reference. The tiny
// fixture's cases run co-batched and teacher-forced with the expand inside
// RoPE forced on and off, with bf16 weights (the shrink inside gemm_skinny),
// FP8 weights (the shrink on the LoRA stream) and FP8 keys (the kernel
// quantizes the rotated keys): on must launch rope_store_lora and off must
// not; bf16 must meet the fixture's limit; and on may not move a
// configuration's worst error by more than 0.005 (it sums the update in
// float32 in another order than the tensor-core expand: last-bit
// differences, which e4m3 roundings may turn into larger ones).
func TestRopeLoRAFixture(t *testing.T) {
	forcedFixture(t, "expand in RoPE", "rope_store_lora launches",
		func(_ *testing.T, b *Backend, on int) { b.force.ropeLoRA = on }, func(b *Backend) int { return b.ropeLoRALaunches })
}

// forcedFixture runs the tiny fixture's cases co-batched and teacher-forced
// with a kernel choice forced off and on (set, -1 then 1; it may skip), for bf16
// weights, FP8 weights and FP8 keys: on must launch the kernel (count) and
// off must not; bf16 must meet the fixture's limit; and on may not move a
// configuration's worst error by more than 0.005.
func forcedFixture(t *testing.T, what, launches string, set func(t *testing.T, b *Backend, on int), count func(b *Backend) int) {
	m, adapters, cases := loadFixture(t)
	V := m.Config.VocabSize
	for _, c := range []struct {
		name string
		bo   Options
	}{{"bf16", Options{}}, {"fp8", Options{WeightFormat: WeightsFP8}}, {"fp8keys", Options{KVFormat: KVFP8}}} {
		t.Run(c.name, func(t *testing.T) {
			var worst [2]float64
			for i, on := range []int{-1, 1} {
				opts := engine.DefaultOptions()
				opts.AdapterSlots = len(adapters)
				e, b := newEngineBackend(t, m, opts, c.bo)
				set(t, b, on)
				slots := loadSlots(t, e, adapters, fx.AdapterNames, 0)
				var match, total int
				worst[i], match, total = fixtureErrors(t, e, slots, cases, V)
				name := fmt.Sprintf("%s, %s %v", c.name, what, on > 0)
				t.Logf("%s: worst case-level relative error %.4g, greedy %d/%d, %d %s", name, worst[i], match, total, count(b), launches)
				if (count(b) > 0) != (on > 0) {
					t.Errorf("%s: %d %s", name, count(b), launches)
				}
			}
			if c.name == "bf16" && !(worst[1] <= fixtureTol) {
				t.Errorf("bf16, %s: worst case %.3g > %.0e", what, worst[1], fixtureTol)
			}
			if !(worst[1] <= worst[0]+0.005) {
				t.Errorf("%s: %s moves the worst case from %.4g to %.4g", c.name, what, worst[0], worst[1])
			}
			t.Logf("maxrel=%.4g (on) vs %.4g (off)", worst[1], worst[0])
		})
	}
}

// TestNormClFixture: add_rmsnorm_cl adding the o and down LoRA updates
// (norm_cl.go) against the reference, as TestRopeLoRAFixture runs the
// q/k/v fold: the tiny fixture's cases co-batched and teacher-forced with
// add_rmsnorm_cl forced on (every step's adds, prefill rows too) and off,
// bf16 weights, FP8 weights and FP8 keys, with float32 updates (outHalf
// off: its add_rmsnorm_h stands in for add_rmsnorm_cl, by default with FP8
// weights); on must add updates in
// add_rmsnorm_cl and off must not; bf16 must meet the fixture's limit, and
// on may not move a configuration's worst error by more than 0.005 (the
// row's sum of squares is summed in another order).
func TestNormClFixture(t *testing.T) {
	forcedFixture(t, "add_rmsnorm_cl", "add_rmsnorm_cl launches adding an update",
		func(t *testing.T, b *Backend, on int) {
			if b.ctx.Device().Major < 9 {
				t.Skip("no thread-block clusters before sm_90")
			}
			b.force.addCl, b.force.outHalf = on, -1
		}, func(b *Backend) int { return b.addClUpdates })
}
