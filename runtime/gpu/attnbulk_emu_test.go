package gpu

import "testing"

// TestAttnBulkLayoutEmulated checks PEFTD_ATTN_BULK's shared-memory layout
// (DecShape with BULK in kernels/llama.cu) on the CPU, for each head_dim
// and both warp counts: every lane's bulk copy lands 16-byte aligned in its
// own row of its own tile, K and V rows of all stages and warps never
// overlap, the stages' mbarriers sit 8-byte aligned after the data and
// before the next warp's part, an ldmatrix's 8 rows (one 16-byte chunk
// each, rows PITCH bytes apart) fall in 8 different bank groups, and the
// block's bytes are decShared's. The formulas mirror DecShape's.
func TestAttnBulkLayoutEmulated(t *testing.T) {
	const tile = 16 // DEC_TILE
	for _, hd := range []int{32, 64, 128, 256} {
		for _, v := range []decVariant{decV4, decV2} {
			warps, st := v.warps(), decStages(hd)
			pitch := hd*2 + 16
			tileB := tile * pitch
			stageB := 2 * tileB
			warpB := (st*stageB + 8*st + 127) / 128 * 128
			if got := decShared(hd, false, v, true); got != warps*warpB {
				t.Fatalf("hd %d %v: decShared %d, the layout %d", hd, v, got, warps*warpB)
			}
			owner := make([]int8, warps*warpB) // 0 free, 1 data, 2 barrier
			for w := range warps {
				wb := w * warpB
				for s := range st {
					for lane := range 32 {
						base := wb + s*stageB // kt
						if lane >= 16 {
							base += tileB // vt
						}
						dst := base + (lane&15)*pitch
						if dst%16 != 0 {
							t.Fatalf("hd %d %v: warp %d stage %d lane %d copies to %d, not 16-byte aligned", hd, v, w, s, lane, dst)
						}
						for b := dst; b < dst+hd*2; b++ {
							if owner[b] != 0 {
								t.Fatalf("hd %d %v: byte %d written twice", hd, v, b)
							}
							owner[b] = 1
						}
					}
					bar := wb + st*stageB + 8*s
					if bar%8 != 0 || bar+8 > wb+warpB {
						t.Fatalf("hd %d %v: warp %d's barrier %d at %d", hd, v, w, s, bar)
					}
					for b := bar; b < bar+8; b++ {
						if owner[b] != 0 {
							t.Fatalf("hd %d %v: barrier %d of warp %d overlaps data", hd, v, s, w)
						}
						owner[b] = 2
					}
				}
			}
			// ldmatrix: 8 rows r0..r0+7 at chunk c; a 16-byte chunk spans 4
			// of the 32 4-byte banks, so 8 rows need 8 distinct groups
			for c := range hd / 8 {
				seen := map[int]bool{}
				for r := range 8 {
					g := ((r*pitch + c*16) / 16) % 8
					if seen[g] {
						t.Fatalf("hd %d: ldmatrix rows 0-7 at chunk %d share a bank group", hd, c)
					}
					seen[g] = true
				}
			}
		}
	}
	// two blocks of 4 warps still fit an H200's SM at head_dim 128 (227 KB
	// a block at most, 228 KB an SM less 1 KB a block for the driver)
	if b := decShared(128, false, decV4, true); 2*(b+1024) > 228<<10 {
		t.Errorf("head_dim 128: %d bytes a block, two no longer fit an SM", b)
	}
}
