package gpu

import "testing"

// TestAttnFits: on Hopper (227 KB a block) every attention variant fits; on
// sm_86/sm_89 (99 KB) attn_decode_d256 (128 KB) does not, and that head
// size falls back to the per-row kernel instead of failing New; with FP8
// keys the same (attn_decode8_d128 takes 89.5 KB).
func TestAttnFits(t *testing.T) {
	for _, tc := range []struct {
		name      string
		maxShared int
		k8        bool
		dec       [4]bool
		pre       [3]bool
	}{
		{"H100/H200", 232448, false, [4]bool{true, true, true, true}, [3]bool{true, true, true}},
		{"A100", 166912, false, [4]bool{true, true, true, true}, [3]bool{true, true, true}},
		{"L40S/RTX 4090", 101376, false, [4]bool{true, true, true, false}, [3]bool{true, true, true}},
		{"H100/H200, fp8 keys", 232448, true, [4]bool{true, true, true, true}, [3]bool{true, true, true}},
		{"L40S/RTX 4090, fp8 keys", 101376, true, [4]bool{true, true, true, false}, [3]bool{true, true, true}},
	} {
		dec, pre := attnFits(tc.maxShared, tc.k8)
		if dec != tc.dec || pre != tc.pre {
			t.Errorf("%s (%d B): decode %v prefill %v, want %v %v", tc.name, tc.maxShared, dec, pre, tc.dec, tc.pre)
		}
	}
	for hd, want := range map[int]int{32: 0, 64: 1, 128: 2, 256: 3} {
		if got := headIndex(hd); got != want {
			t.Errorf("headIndex(%d) = %d, want %d", hd, got, want)
		}
	}
}
