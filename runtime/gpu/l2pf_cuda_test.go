//go:build cuda

package gpu

import "testing"

// TestL2PrefetchMatches: asking L2 for the next product's weight head
// (l2pf.go) is a hint: the tiny fixture model with its four adapters gives
// bit-identical logits with prefetches of 1 and 16 MB and without any,
// over prefill, mixed and decode steps, eager and replayed, with bf16 and
// FP8 weights; and the steps did carry prefetches.
func TestL2PrefetchMatches(t *testing.T) {
	m, adapters, _ := loadFixture(t)
	for _, format := range []string{"", "fp8"} {
		eo, bo := newMatchEngine(t, m, adapters, Options{WeightFormat: format})
		bo.force.l2pf = -1
		if err := bo.dropGraphs(); err != nil {
			t.Fatal(err)
		}
		if err := eo.Warmup(); err != nil {
			t.Fatal(err)
		}
		for _, mb := range []int{1, 16} {
			ep, bp := newMatchEngine(t, m, adapters, Options{WeightFormat: format})
			bp.force.l2pf = mb
			bp.pfLaunches = 0
			if err := bp.dropGraphs(); err != nil {
				t.Fatal(err)
			}
			if err := ep.Warmup(); err != nil {
				t.Fatal(err)
			}
			matchSteps(t, m, len(adapters), ep, eo, "weights "+format+": with and without L2 prefetches")
			if bp.pfLaunches == 0 {
				t.Errorf("weights %q, %d MB: no launch carried a prefetch", format, mb)
			}
			t.Logf("weights %q, %d MB: %d launches with a prefetch", format, mb, bp.pfLaunches)
		}
	}
}
