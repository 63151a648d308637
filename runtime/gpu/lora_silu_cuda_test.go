//go:build cuda

package gpu

import "testing"

// TestSiluFoldMatches: with the gate/up update expanded inside silu_mul
// (silu_mul_fold, forced on) every logits row of the fixture's prefill,
// mixed and decode steps (recorded and eager, matchSteps) is the same as
// the default path's (sgmv_expand_tch1 on the LoRA stream and silu_mul_h),
// with bf16 weights and with FP8 weights (where the down projection then
// quantizes silu_mul's output itself, as silu_mul's own quantization
// would); the rank-32 class alone, rows with no adapter among them.
func TestSiluFoldMatches(t *testing.T) {
	if err := Available(); err != nil {
		t.Skipf("no GPU: %v", err)
	}
	m, all, _ := loadFixture(t)
	adapters := rank32Adapters(t, all)
	for _, wf := range []string{WeightsBF16, WeightsFP8} {
		t.Run(wf, func(t *testing.T) {
			ed, bd := newMatchEngine(t, m, adapters, Options{WeightFormat: wf})
			if wf == WeightsFP8 && bd.f8 == nil {
				t.Skip("no FP8 weights on this GPU")
			}
			if bd.siluFolds != 0 {
				t.Fatalf("silu_mul_fold launched %d times by default (siluFoldAuto off)", bd.siluFolds)
			}
			ev, bv := newMatchEngine(t, m, adapters, Options{WeightFormat: wf})
			bv.force.siluFold = 1
			if err := bv.dropGraphs(); err != nil {
				t.Fatal(err)
			}
			if err := ev.Warmup(); err != nil { // recorded again, with the fold
				t.Fatal(err)
			}
			matchSteps(t, m, len(adapters), ev, ed, "silu_mul_fold and the default ("+wf+")")
			if bv.siluFolds == 0 {
				t.Error("silu_mul_fold: no launch in the recordings or the steps")
			}
			t.Logf("%s: %d silu_mul_fold launches", wf, bv.siluFolds)
		})
	}
}
