package gpu

import "testing"

// TestDecodeOptsEmulated runs the index arithmetic of attn_decode's
// opts (kernels/llama.cu, Backend.attnOpts) on the CPU for
// many contexts and splits:
//   - bit 0: the tiles a warp issues before griddepcontrol.wait never hold
//     the newest position (ctx - 1, which rope_store, or with bit 3 the
//     kernel itself, writes after the wait), and are the warp's first
//     tiles in order;
//   - bit 3: exactly one split stores the newest K/V row, and its chunk
//     holds that position;
//   - bit 2: the blocks of a cluster write each of the G * HD outputs
//     exactly once (dec_cluster_merge's ranges), whatever the split count.
func TestDecodeOptsEmulated(t *testing.T) {
	const decTile, decWarps, stages = 16, 4, 3
	for ctx := 1; ctx <= 700; ctx++ {
		for _, nsplit := range []int{1, 2, 3, 5, 8, 17, 33, 64} {
			chunk := max(32, ((ctx+nsplit-1)/nsplit+7)&^7)
			stores := 0
			for sp := range nsplit {
				p0 := sp * chunk
				p1 := min(ctx, p0+chunk)
				ntiles := 0
				if p0 < p1 {
					ntiles = (p1 - p0 + decTile - 1) / decTile
				}
				if sp == (ctx-1)/chunk {
					stores++
					if !(p0 <= ctx-1 && ctx-1 < p1) {
						t.Fatalf("ctx %d, %d splits: split %d stores the newest row but holds [%d, %d)", ctx, nsplit, sp, p0, p1)
					}
				}
				for warp := range decWarps {
					nk := 0
					if ntiles > warp {
						nk = (ntiles - warp + decWarps - 1) / decWarps
					}
					if nk == 0 {
						continue
					}
					// the kernel's safe(): past the warp's tiles, or ending before ctx - 1
					safe := func(k int) bool {
						return k >= nk || min(p1, p0+(warp+k*decWarps)*decTile+decTile) <= ctx-1
					}
					for k := 0; k < stages-1 && safe(k); k++ {
						if k >= nk {
							continue
						}
						first := p0 + (warp+k*decWarps)*decTile
						last := min(p1, first+decTile) - 1
						if first <= ctx-1 && ctx-1 <= last {
							t.Fatalf("ctx %d, %d splits: split %d warp %d issues tile %d [%d, %d] before the wait, holding the newest position", ctx, nsplit, sp, warp, k, first, last)
						}
					}
				}
			}
			if stores != 1 {
				t.Fatalf("ctx %d, %d splits: %d splits store the newest row", ctx, nsplit, stores)
			}
		}
	}
	// dec_cluster_merge: block r of S writes outputs [r*per, min(n, (r+1)*per))
	for _, G := range []int{1, 2, 4, 8} {
		for _, hd := range []int{32, 64, 128, 256} {
			n := G * hd
			for S := 2; S <= decClusterMax; S++ {
				per := (n + S - 1) / S
				seen := make([]int, n)
				for r := range S {
					for idx := r * per; idx < min(n, (r+1)*per); idx++ {
						seen[idx]++
					}
				}
				for i, c := range seen {
					if c != 1 {
						t.Fatalf("G %d hd %d S %d: output %d written %d times", G, hd, S, i, c)
					}
				}
			}
		}
	}
}
