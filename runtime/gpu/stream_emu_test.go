package gpu

import (
	"fmt"
	"testing"
)

// TestStreamRowsEmulated runs the index arithmetic of the weight-streaming
// kernels for a few rows (gemm_skinny_n{32,48,224} in kernels/llama.cu, fp8_stream_n{32,48,224}_e1 in kernels/fp8.cu) on the
// CPU, with the kernels' expressions, thread by thread:
//   - each tile's cp.async copies land in a shared-memory image (sk_slot's
//     swizzle), tagged with the global row and byte they came from;
//   - every ldmatrix of every warp is read back from that image the way the
//     hardware hands it out (lane l addresses row l%8 of matrix l/8; thread
//     t receives bytes 4(t%4)..+3 of row t/4 of each matrix), and each MMA
//     operand register must hold the bytes the m16n8k16 (bf16) or m16n8k32
//     (e4m3) fragment needs: A rows m and m+8, B column n, at the k step's
//     bytes (the two fragment layouts are the same in bytes); rows of x past
//     M may hold anything (their outputs are dropped);
//   - every (n8 tile, k step) of a tile is multiplied exactly once
//     over the block's warps;
//   - the epilogue's shared-memory sums gather, for each output of the M
//     rows, exactly one accumulator of each warp for that output (or, for
//     gemm_skinny_n224, each output is written once by its warp).
func TestStreamRowsEmulated(t *testing.T) {
	type family struct {
		name        string
		bn, rb      int  // output columns a block, bytes of each row a tile
		warps       int  // warps a block
		wk          bool // the warps split each tile's columns (else its outputs)
		shared, thr int  // the Go side's shared memory and threads
	}
	var fams []family
	for _, v := range bfSkinnyVariants {
		wk := v.tile == 256 // SkShape: BK 256 with the warps along K, else 64 (n224)
		fams = append(fams, family{fmt.Sprintf("gemm_skinny_n%d", v.bn), v.bn, 2 * v.tile, 4, wk, bfSkinnyShared(v), 128})
	}
	for _, v := range fp8StreamVariants {
		fams = append(fams, family{fmt.Sprintf("fp8_stream_n%d_e1", v.bn), v.bn, v.tile, 4, true, fp8StreamShared(v), 128})
	}
	type src struct {
		x         bool // x (activations) or w (weights)
		row, byte int  // the global row and the byte of it the slot's first byte came from
		ok        bool
	}
	for _, f := range fams {
		threads := 32 * f.warps
		if threads != f.thr {
			t.Fatalf("%s: %d threads, the Go side launches %d", f.name, threads, f.thr)
		}
		ch := f.rb / 16
		stage := (f.bn + 16) * f.rb // the weight tile, then x's 16 rows
		st := min(8, 190*1024/stage)
		if st*stage != f.shared || st < 3 {
			t.Fatalf("%s: %d stages of %d bytes, the Go side gives %d bytes", f.name, st, stage, f.shared)
		}
		nt := f.bn / 8 // n8 tiles a warp multiplies
		if !f.wk {
			nt = f.bn / (8 * f.warps)
		}
		if f.wk && f.warps*16*f.bn*4 > st*stage {
			t.Fatalf("%s: the warps' sums (%d bytes) do not fit the stages", f.name, f.warps*16*f.bn*4)
		}
		kSteps := f.rb / 32 // 32-byte k steps of a tile (k16 bf16, k32 e4m3)
		for _, M := range []int{1, 5, 16} {
			for _, blk := range []int{0, 3} {
				for _, tile := range []int{0, 1, st} { // stage 0, 1, and stage 0 again
					n0 := blk * f.bn
					smem := map[int]src{}
					base := (tile % st) * stage
					slot := func(tb, r, c int) int { return tb + r*f.rb + ((c ^ (r & 7)) << 4) } // sk_slot
					// issue_w, issue_x
					for tid := range threads {
						for i := 0; i < f.bn*ch/threads; i++ {
							idx := tid + i*threads
							r, c := idx/ch, idx%ch
							smem[slot(base, r, c)] = src{false, n0 + r, tile*f.rb + c*16, true}
						}
						for idx := tid; idx < M*ch; idx += threads {
							r, c := idx/ch, idx%ch
							smem[slot(base+f.bn*f.rb, r, c)] = src{true, r, tile*f.rb + c*16, true}
						}
					}
					if f.bn*ch%threads != 0 {
						t.Fatalf("%s: %d weight chunks a tile over %d threads", f.name, f.bn*ch, threads)
					}
					covered := map[[2]int]int{}
					wb, xb := base, base+f.bn*f.rb
					for warp := range f.warps {
						// this warp's k steps (first chunk of each) and first output row
						var kcs []int
						r0 := 0
						switch {
						case !f.wk:
							for kk := range kSteps {
								kcs = append(kcs, 2*kk)
							}
							r0 = warp * 8 * nt
						default:
							per := ch / f.warps // chunks a warp takes
							for kk := 0; kk < per/2; kk++ {
								kcs = append(kcs, warp*per+2*kk)
							}
						}
						for _, kc := range kcs {
							ldsm := func(addr func(lane int) int) [32][4]src {
								var regs [32][4]src
								for tt := range 32 {
									for i := range 4 {
										s := smem[addr(8*i+tt/4)]
										if s.ok {
											s.byte += 4 * (tt % 4)
										}
										regs[tt][i] = s
									}
								}
								return regs
							}
							a := ldsm(func(l int) int { return slot(xb, l&15, kc+(l>>4)) })
							for tt := range 32 {
								for i := range 4 {
									row := (i&1)*8 + tt/4
									want := src{true, row, tile*f.rb + kc*16 + (i>>1)*16 + 4*(tt%4), true}
									if row < M && a[tt][i] != want {
										t.Fatalf("%s M %d block %d tile %d warp %d: A reg %d of thread %d holds %+v, want %+v", f.name, M, blk, tile, warp, i, tt, a[tt][i], want)
									}
								}
							}
							for j := 0; j < nt; j += 2 {
								b := ldsm(func(l int) int {
									jj := j
									if j+1 < nt {
										jj = j + (l >> 4)
									}
									return slot(wb, r0+jj*8+(l&7), kc+((l>>3)&1))
								})
								for h := range 2 { // tile j (regs 0, 1), j + 1 (regs 2, 3)
									if j+h >= nt {
										continue
									}
									for tt := range 32 {
										for half := range 2 {
											want := src{false, n0 + r0 + (j+h)*8 + tt/4, tile*f.rb + kc*16 + half*16 + 4*(tt%4), true}
											if got := b[tt][2*h+half]; got != want {
												t.Fatalf("%s M %d block %d tile %d warp %d: B reg %d of thread %d (n tile %d) holds %+v, want %+v", f.name, M, blk, tile, warp, 2*h+half, tt, j+h, got, want)
											}
										}
									}
									covered[[2]int{r0/8 + j + h, kc / 2}]++
								}
							}
						}
					}
					for j := range f.bn / 8 {
						for k := range kSteps {
							if n := covered[[2]int{j, k}]; n != 1 {
								t.Fatalf("%s M %d: n tile %d, k step %d multiplied %d times", f.name, M, j, k, n)
							}
						}
					}
				}
				// the epilogue: which accumulator each output gathers
				type acc struct{ warp, m, n int }
				if !f.wk {
					writes := map[[2]int]int{}
					for warp := range f.warps {
						for tt := range 32 {
							g, c2 := tt/4, 2*(tt%4)
							for j := range nt {
								n := warp*8*nt + j*8 + c2
								for _, m := range []int{g, g + 8} {
									if m < M {
										writes[[2]int{m, n}]++
										writes[[2]int{m, n + 1}]++
									}
								}
							}
						}
					}
					for m := range M {
						for n := range f.bn {
							if writes[[2]int{m, n}] != 1 {
								t.Fatalf("%s M %d: output [%d,%d] written %d times", f.name, M, m, n, writes[[2]int{m, n}])
							}
						}
					}
					continue
				}
				red := map[int]acc{}
				for warp := range f.warps {
					for tt := range 32 {
						g, c2 := tt/4, 2*(tt%4)
						for j := range nt {
							n, m := j*8+c2, g
							for _, mm := range []int{m, m + 8} {
								i := (warp*16+mm)*f.bn + n
								red[i], red[i+1] = acc{warp, mm, n}, acc{warp, mm, n + 1}
							}
						}
					}
				}
				for p := 0; p < M*f.bn/2; p++ {
					m := 2 * p / f.bn
					n := 2*p - m*f.bn
					for q := range f.warps {
						for e := range 2 {
							if got, want := red[(q*16+m)*f.bn+n+e], (acc{q, m, n + e}); got != want {
								t.Fatalf("%s M %d: output [%d,%d] gathers %+v from warp %d's sums, want %+v", f.name, M, m, n+e, got, q, want)
							}
						}
					}
				}
			}
		}
	}
}
