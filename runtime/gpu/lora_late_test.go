package gpu

import "testing"

// TestExpandLate: kernelForce.expandLate leaves a group's expand to the
// compute stream from that many LoRA rows, only for ranks the tensor-core
// expand takes (tc > 0), and an update so left is neither RoPE's
// (rope_store_lora) nor silu_mul's (silu_mul_lora): both decline it and it
// stays pending for join, which expands it in place.
func TestExpandLate(t *testing.T) {
	b := &Backend{}
	for _, c := range []struct {
		late, rows, tc int
		want           bool
	}{
		{0, 256, 1, false}, {128, 256, 1, true}, {128, 128, 1, true}, {128, 127, 1, false},
		{1, 1, 2, true}, {1, 64, 0, false}, {-1, 256, 1, false},
	} {
		b.force.expandLate, b.nLora = c.late, c.rows
		if got := b.expandLate(c.tc); got != c.want {
			t.Errorf("expandLate %d, %d LoRA rows, tc %d: %v, want %v", c.late, c.rows, c.tc, got, c.want)
		}
	}
	// views over one output at device address 0 that RoPE (q, k, v) and
	// silu_mul (gate, up) would take the update of, were it not late; the
	// update local, so that taking it waits for no stream
	view := func(off, cols, ld int) *Buffer { return &Buffer{rows: 1, cols: cols, off: off, ld: ld} }
	for _, late := range []bool{true, false} {
		b.la.pend = pendingDelta{ld: 6144, cols: 6144, local: true, lora: &loraPend{tc: 1, offs: []int{0, 4096, 5120, 6144}, late: late}}
		_, took := b.takeQKV(view(0, 4096, 6144), view(4096, 1024, 6144), view(5120, 1024, 6144))
		if took == late {
			t.Errorf("late %v: RoPE took the q/k/v update: %v", late, took)
		}
		if late && (b.la.pend.lora == nil || !b.la.pend.lora.late) {
			t.Errorf("the late q/k/v update is no longer pending")
		}
		const I = 14336
		b.la.pend = pendingDelta{ld: 2 * I, cols: 2 * I, local: true, lora: &loraPend{tc: 1, offs: []int{0, I, 2 * I}, late: late}}
		took = b.siluLoRA(view(0, I, I), view(0, I, 2*I), view(I, I, 2*I))
		if took == late {
			t.Errorf("late %v: silu_mul took the gate/up update: %v", late, took)
		}
		if late && (b.la.pend.lora == nil || !b.la.pend.lora.late) {
			t.Errorf("the late gate/up update is no longer pending")
		}
	}
}
