package gpu

import "testing"

// TestLoRAKFits: a wsl launch takes a table of at most lxMaxSlots slots
// whose loaded adapters' ranks are multiples of 8 of at most lxMaxRank,
// their columns (each slot's largest rank) within lxCols for every slice
// of the group, and K a multiple of 8 within lxKMax; empty slots cost no
// columns.
func TestLoRAKFits(t *testing.T) {
	slots := func(n int, rank int, odd bool) []*slotState {
		s := make([]*slotState, n)
		for i := range s {
			s[i] = &slotState{maxRank: rank, odd: odd}
		}
		return s
	}
	for _, c := range []struct {
		name    string
		slots   []*slotState
		nslices int
		k       int
		want    bool
	}{
		{"four rank-32 adapters, q/k/v", slots(4, 32, false), 3, 4096, true},
		{"down's K", slots(4, 32, false), 1, 14336, true},
		{"K past the shrink's chunks", slots(4, 32, false), 1, lxKMax + 8, false},
		{"K not a multiple of 8", slots(4, 32, false), 1, 4100, false},
		{"a rank not a multiple of 8", slots(2, 12, true), 1, 4096, false},
		{"rank 128", slots(1, 128, false), 1, 4096, false},
		{"32 rank-32 slots, one slice: 1,024 columns", slots(32, 32, false), 1, 4096, true},
		{"the same, two slices: 2,048", slots(32, 32, false), 2, 4096, false},
		{"more slots than the kernel maps", slots(lxMaxSlots+1, 8, false), 1, 4096, false},
		{"empty slots cost nothing", append(slots(4, 64, false), make([]*slotState, 20)...), 3, 4096, true},
		{"mixed ranks: 8 + 16 + 24 + 64 = 112 columns a slice", []*slotState{{maxRank: 8}, {maxRank: 16}, {maxRank: 24}, {maxRank: 64}}, 3, 4096, true},
	} {
		b := &Backend{slots: c.slots}
		if got := b.loraKFits(c.nslices, c.k); got != c.want {
			t.Errorf("%s: loraKFits = %v, want %v", c.name, got, c.want)
		}
	}
}
