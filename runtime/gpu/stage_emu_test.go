package gpu

import (
	"fmt"
	"testing"
)

// TestHalfStageEmulated runs sgmv_expand_tch1s's output path
// (expand_tc_body in kernels/llama.cu with KC 1, MT 1, ST and HS) on the
// CPU with the kernel's own index expressions, lane by lane: the MMA
// fragment's bf16 pairs (warp w, lane g*4+q, column group ng, half h: row
// g + 8h, columns col0 + 8ng + 2q and + 1) into the staged tile os (rows
// OW values apart), then after the barrier the tile out in 16-byte pieces
// (piece i: row i / (COLS/8), columns bcol0 + 8 (i % (COLS/8)) .. + 7).
// For every slice layout of the 8B gate/up, q/k/v and o/down groups and
// small ones, every block and tile height 1-16: each element of the
// block's rows and columns must reach the output exactly once and from
// the lane that computed it, no piece may carry a value no lane wrote, no
// element outside the block's rows and its slice's columns is written,
// and each fragment store instruction's 32 lanes fall on 32 distinct
// shared-memory banks.
func TestHalfStageEmulated(t *testing.T) {
	const (
		groupsPerWarp = 8                     // TcShape<1, 1>::NG
		cols          = 8 * 8 * groupsPerWarp // TcShape<1, 1>::COLS: 512
		ow            = cols + 8              // OW: rows padded by 16 bytes
	)
	groups := [][]int{{14336, 14336}, {4096, 1024, 1024}, {4096}, {352, 352}, {128, 32, 32}, {8}, {520, 8}}
	for _, widths := range groups {
		offs := []int{0}
		for _, w := range widths {
			offs = append(offs, offs[len(offs)-1]+w)
		}
		total := offs[len(offs)-1]
		// blocks a slice: ceil(width / COLS), as expandTC plans them
		var blockSlice, blockChunk []int
		for s, w := range widths {
			for c := 0; c < (w+cols-1)/cols; c++ {
				blockSlice, blockChunk = append(blockSlice, s), append(blockChunk, c)
			}
		}
		for n := 1; n <= 16; n++ {
			name := fmt.Sprintf("slices %v, %d rows", widths, n)
			written := make([]int, n*total) // times each output element was stored
			for bx := range blockSlice {
				s, chunk := blockSlice[bx], blockChunk[bx]
				sOff, sEnd := offs[s], offs[s+1]
				bcol0 := sOff + chunk*cols
				// os: which element (row, column) each staged value holds; -1 none
				os := make([]int, 16*ow)
				for i := range os {
					os[i] = -1
				}
				for w := 0; w < 8; w++ {
					col0 := sOff + chunk*cols + w*8*groupsPerWarp
					for ng := range groupsPerWarp {
						for h := 0; h < 2; h++ {
							banks := map[int]bool{}
							for lane := 0; lane < 32; lane++ {
								g, q := lane>>2, lane&3
								r, col := g+8*h, col0+ng*8+2*q
								if col >= sEnd || r >= n {
									continue
								}
								at := r*ow + col - bcol0 // bf16 values; the pair is one 4-byte word
								if at%2 != 0 {
									t.Fatalf("%s: block %d warp %d: pair at %d is not word-aligned", name, bx, w, at)
								}
								if banks[(at/2)%32] {
									t.Fatalf("%s: block %d warp %d group %d half %d: two lanes on bank %d", name, bx, w, ng, h, (at/2)%32)
								}
								banks[(at/2)%32] = true
								for j := range 2 {
									if os[at+j] != -1 {
										t.Fatalf("%s: block %d: staged value %d written twice", name, bx, at+j)
									}
									os[at+j] = r*total + col + j
								}
							}
						}
					}
				}
				// the barrier, then whole rows in 16-byte pieces
				for i := 0; i < 16*(cols/8); i++ {
					r, col := i/(cols/8), bcol0+8*(i%(cols/8))
					if r >= n || col >= sEnd {
						continue
					}
					if col%8 != 0 {
						t.Fatalf("%s: block %d piece %d at column %d: not 16-byte aligned", name, bx, i, col)
					}
					for j := range 8 {
						v := os[r*ow+col-bcol0+j]
						if v != r*total+col+j {
							t.Fatalf("%s: block %d: output (%d, %d) gets staged value of element %d", name, bx, r, col+j, v)
						}
						written[v]++
					}
				}
			}
			for e, c := range written {
				if c != 1 {
					t.Fatalf("%s: output (%d, %d) written %d times", name, e/total, e%total, c)
				}
			}
		}
	}
}
