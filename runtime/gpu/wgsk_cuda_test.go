//go:build cuda

package gpu

import (
	"fmt"
	"testing"
)

// TestFP8Wgsk: fp8_wgsk (wgsk.go) against the float64 product of the
// dequantized operands and the default route, and a second launch bit for
// bit, at grids from one block (every tile whole) to one an SM (tiles
// shared by many blocks, the partials summed by the last), rows on both
// sides of the variants' 128 and 256, K not a multiple of the 128-byte
// stage (the TMA's zeros past K), and the 8B o and down shapes at 240 rows
// (a mixed step's) with the SM target a LoRA stream's hold leaves.
func TestFP8Wgsk(t *testing.T) {
	r := newFP8Rig(t)
	if r.f.wgsk == nil {
		if r.ctx.Device().Arch() == "sm_90a" {
			t.Fatal("no fp8_wgsk kernel loaded on an sm_90a card (the rig loads the wgmma build there)")
		}
		t.Skip("fp8_wgsk is compiled only in the wgmma build, for sm_90a")
	}
	g := r.f.wgsk
	defer func() { r.f.wgskOn, g.forceG, g.target = false, 0, 0 }()
	on := func(b bool) { r.f.wgskOn = b }
	sms := r.ctx.Device().SMs
	for _, sz := range []struct {
		T, N, K int
		grids   []int // forceG values (0: one block an SM)
	}{
		{65, 384, 1040, []int{1, 2, 5, 0}},
		{128, 256, 512, []int{1, 3, 0}},
		{129, 1024, 4096, []int{1, 7, 0}},
		{200, 640, 2048, []int{2, 9, 0}},
		{256, 512, 14336, []int{1, 4, 0}},
		{240, 4096, 4096, []int{0}},
		{240, 4096, 14336, []int{0}},
	} {
		if !g.fits(sz.T, sz.N, sz.K) {
			t.Fatalf("fp8_wgsk does not take %d x %d x %d", sz.T, sz.N, sz.K)
		}
		c := newFP8Case(t, r, sz.T, sz.N, sz.K)
		for _, G := range sz.grids {
			g.forceG = G
			c.check(fmt.Sprintf("fp8_wgsk grid %d", g.grid(sz.N, sz.K)), on)
		}
		if sz.T == 240 { // beside a LoRA stream holding 48 SMs
			g.forceG, g.target = 0, sms-48
			c.check(fmt.Sprintf("fp8_wgsk grid %d (target %d)", g.grid(sz.N, sz.K), g.target), on)
			g.target = 0
		}
		c.close()
	}
	// the grid: one block an SM of the target, no more than the units
	g.forceG = 0
	for _, tc := range []struct{ N, K, target, want int }{
		{4096, 14336, 0, min(sms, 32*112)},
		{4096, 14336, 84, 84},
		{128, 256, 0, 2},
	} {
		g.target = tc.target
		if got := g.grid(tc.N, tc.K); got != tc.want {
			t.Errorf("grid(%d, %d) with target %d: %d blocks, want %d", tc.N, tc.K, tc.target, got, tc.want)
		}
	}
	g.target = 0
}
