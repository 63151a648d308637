package gpu

import (
	"testing"

	"github.com/peftd/peftd/runtime/cuda"
	"github.com/peftd/peftd/runtime/llama"
)

// TestSiluFold: the gate/up group of the rank-32 class is left for
// silu_mul_fold only where kernelForce.siluFold (or siluFoldAuto) asks
// and the kernel loaded; other groups, other ranks and odd widths never.
func TestSiluFold(t *testing.T) {
	cfg := &llama.Config{Hidden: 4096, Intermediate: 14336, Heads: 32, KVHeads: 8, HeadDim: 128}
	gu, qkv := []llama.Module{llama.Gate, llama.Up}, []llama.Module{llama.Q, llama.K, llama.V}
	for _, c := range []struct {
		name   string
		force  int
		loaded bool
		inter  int
		mods   []llama.Module
		tc     int
		want   bool
	}{
		{"forced, gate/up, rank 32", 1, true, 14336, gu, 1, true},
		{"default (siluFoldOn false)", 0, true, 14336, gu, 1, false},
		{"off", -1, true, 14336, gu, 1, false},
		{"rank 64 class", 1, true, 14336, gu, 2, false},
		{"no tensor-core expand", 1, true, 14336, gu, 0, false},
		{"q/k/v", 1, true, 14336, qkv, 1, false},
		{"gate alone", 1, true, 14336, gu[:1], 1, false},
		{"kernel not loaded", 1, false, 14336, gu, 1, false},
		{"width not a multiple of 8", 1, true, 14340, gu, 1, false},
	} {
		cc := *cfg
		cc.Intermediate = c.inter
		b := &Backend{cfg: &cc}
		b.force.siluFold = c.force
		if c.loaded {
			b.fn.siluFold = &cuda.Function{}
		}
		if got := b.siluFold(c.mods, c.tc); got != c.want {
			t.Errorf("%s: siluFold = %v, want %v", c.name, got, c.want)
		}
	}
	b := &Backend{cfg: cfg, siluFoldOn: true} // PEFTD_LORA_SILU_FOLD=on
	b.fn.siluFold = &cuda.Function{}
	if !b.siluFold(gu, 1) {
		t.Error("siluFoldOn: gate/up not folded")
	}
	if b.force.siluFold = -1; b.siluFold(gu, 1) {
		t.Error("siluFoldOn with kernelForce.siluFold -1: folded")
	}
}

// TestTakeGU: silu_mul takes a pending unexpanded gate/up update only when
// its g and u are the update's two slices of one output (same row stride)
// and out is a whole buffer of their width; anything else leaves it
// pending (join then adds it in place).
func TestTakeGU(t *testing.T) {
	const I = 352
	pend := func() pendingDelta {
		return pendingDelta{base: 0, ld: 2 * I, cols: 2 * I, local: true, lora: &loraPend{tc: 1, ks: 2, tStride: 64, offs: []int{0, I, 2 * I}}}
	}
	view := func(off, cols, ld int) *Buffer { return &Buffer{rows: 16, cols: cols, off: off, ld: ld} }
	out := &Buffer{rows: 16, cols: I, ld: I}
	for _, c := range []struct {
		name string
		o    *Buffer
		g, u *Buffer
		tc   int
		want bool
	}{
		{"the two slices", out, view(0, I, 2*I), view(I, I, 2*I), 1, true},
		{"swapped", out, view(I, I, 2*I), view(0, I, 2*I), 1, false},
		{"another row stride", out, view(0, I, 3*I), view(I, I, 3*I), 1, false},
		{"narrower views", out, view(0, I-8, 2*I), view(I, I-8, 2*I), 1, false},
		{"out a view", view(0, I, 2*I), view(0, I, 2*I), view(I, I, 2*I), 1, false},
		{"rank-64 class", out, view(0, I, 2*I), view(I, I, 2*I), 2, false},
	} {
		b := &Backend{}
		b.la.pend = pend()
		b.la.pend.lora.tc = c.tc
		l, ok := b.takeGU(c.o, c.g, c.u)
		if ok != c.want {
			t.Errorf("%s: took %v, want %v", c.name, ok, c.want)
			continue
		}
		if ok && (b.la.pend.lora != nil || l.ks != 2) {
			t.Errorf("%s: taken, but the update is still pending or not the one pending (%+v)", c.name, l)
		}
		if !ok && b.la.pend.lora == nil {
			t.Errorf("%s: not taken, but no longer pending", c.name)
		}
	}
}
