package gpu

import (
	"math/rand/v2"
	"testing"
)

// TestSkinnyTilingEmulated runs fp8_gemm_skinny's index arithmetic on the
// CPU, as written in kernels/fp8.cu (the same expressions, block by block
// and thread by thread, with integers for the e4m3 values): each stage's
// cp.async copies into a shared-memory image (zero-filled where the kernel
// asks for 0 bytes), each warp's span products from that image (the MMA's
// fragments together cover a span's 64 bytes of one weight row and one
// activation row, so a product is that dot product), the split-K partials
// and the last block's sum. The result must be the plain product for every
// shape class: one and several splits, an empty split, a last stage with
// one span, activation rows past M.
func TestSkinnyTilingEmulated(t *testing.T) {
	const (
		skWarps  = 4
		skRows   = skinnyRows
		skU      = 2
		skStages = skinnyStages
		skLD     = skinnyLD
	)
	for _, c := range []struct{ M, N, K, sms int }{
		{17, 128, 64 * 13, 8}, {33, 64, 64 * 9, 4}, {64, 192, 64 * 16, 2}, {20, 64, 64, 8}, {40, 256, 64 * 5, 100}, {64, 64, 64 * 11, 40},
		{65, 128, 64 * 7, 8}, {128, 64, 64 * 10, 16}, {100, 192, 64 * 3, 2},
	} {
		M, N, K := c.M, c.N, c.K
		v := skinnyVariantFor(M) // the launch's choice
		NT := skinnyVariants[v].rows / 8
		TR := 8 * NT
		WB := skRows * skLD
		SB := WB + TR*skLD
		CH := skU * 4
		rng := rand.New(rand.NewPCG(uint64(M), uint64(K)))
		qw := make([]int, N*K)
		qx := make([]int, M*K)
		for i := range qw {
			qw[i] = rng.IntN(15) - 7
		}
		for i := range qx {
			qx[i] = rng.IntN(15) - 7
		}
		S := skinnySplit(N, K, c.sms, 2)
		tiles := N / skRows
		part := make([]int, tiles*S*skRows*TR)
		out := make([]int, M*N)
		written := make([]int, M*N)
		done := make([]int, tiles)
		for bx := range tiles {
			for sp := range S {
				n0 := bx * skRows
				spans := K / 64
				per := (spans + S - 1) / S
				s0 := min(spans, sp*per)
				s1 := min(spans, s0+per)
				nst := (s1 - s0 + skU - 1) / skU
				smem := make([]int, skStages*SB) // one int per byte
				copyStage := func(j, lo, hi int) {
					if j >= nst {
						return
					}
					b := (j % skStages) * SB
					sa := s0 + j*skU
					for tid := range skWarps * 32 {
						for i := lo*CH + tid; i < hi*CH; i += skWarps * 32 {
							r, cc := i/CH, i%CH
							for by := range 16 {
								smem[b+r*skLD+cc*16+by] = emuChunkByte(qw, qx, r, cc, by, sa, s1, n0, skRows, M, K)
							}
						}
					}
				}
				acc := make([][]int, skRows) // [weight row in tile][activation row]
				for r := range acc {
					acc[r] = make([]int, TR)
				}
				for j := range skStages - 1 {
					copyStage(j, 0, skRows)
				}
				for j := range skStages - 1 {
					copyStage(j, skRows, skRows+TR)
				}
				for j := range nst {
					copyStage(j+skStages-1, 0, skRows+TR) // the kernel issues it before computing stage j (another buffer)
					b := (j % skStages) * SB
					for warp := range skWarps {
						for g := range 8 {
							for half := range 2 { // rows g and g + 8 of the warp
								row := warp*16 + g + 8*half
								for u := range skU {
									for t := range NT {
										for gc := range 8 { // activation row 8t + gc
											dot := 0
											for tig := range 4 {
												for by := range 16 {
													a := smem[b+row*skLD+tig*16+u*64+by]
													x := smem[b+WB+(8*t+gc)*skLD+tig*16+u*64+by]
													dot += a * x
												}
											}
											acc[row][8*t+gc] += dot
										}
									}
								}
							}
						}
					}
				}
				if S == 1 {
					for r := range skRows {
						for m := range M {
							out[m*N+n0+r] = acc[r][m]
							written[m*N+n0+r]++
						}
					}
					continue
				}
				tile := bx * S * skRows * TR
				for r := range skRows {
					for m := range TR {
						part[tile+sp*skRows*TR+r*TR+m] = acc[r][m]
					}
				}
				done[bx]++
				if done[bx] != S { // not the last block of the tile
					continue
				}
				emuLastSum(part[tile:], out, written, S, TR, M, N, n0)
				done[bx] = 0
			}
		}
		emuCheck(t, qx, qw, out, written, done, M, N, K, c.sms, S)
	}
}

// emuLastSum is the emulated last block of a split tile (fp8.cu's
// skinny_store): the S partials of the tile at part (S x skinnyRows x TR,
// split-major) summed in split order into out's columns n0.., rows < M,
// each counted in written.
func emuLastSum(part, out, written []int, S, TR, M, N, n0 int) {
	for i := range skinnyRows * TR {
		r, m := i/TR, i%TR
		if m >= M {
			continue
		}
		v := 0
		for s := range S {
			v += part[s*skinnyRows*TR+i]
		}
		out[m*N+n0+r] = v
		written[m*N+n0+r]++
	}
}

// emuCheck fails t where an emulated product (emuWrong) is wrong or a
// split tile's counter was not left at zero.
func emuCheck(t *testing.T, qx, qw, out, written, done []int, M, N, K, sms, S int) {
	t.Helper()
	if bad := emuWrong(qx, qw, out, written, M, N, K); bad > 0 {
		t.Errorf("M=%d N=%d K=%d (%d SMs, %d blocks or K splits): %d of %d outputs wrong or not written once", M, N, K, sms, S, bad, M*N)
	}
	for i, d := range done {
		if d != 0 {
			t.Errorf("M=%d N=%d K=%d: tile %d's counter left at %d", M, N, K, i, d)
		}
	}
}

// emuWrong counts the outputs of an emulated M x N product of qx [M, K]
// and qw [N, K] that differ from the plain product or were not written
// exactly once.
func emuWrong(qx, qw, out, written []int, M, N, K int) int {
	bad := 0
	for m := range M {
		for n := range N {
			want := 0
			for k := range K {
				want += qx[m*K+k] * qw[n*K+k]
			}
			if out[m*N+n] != want || written[m*N+n] != 1 {
				bad++
			}
		}
	}
	return bad
}

// emuChunkByte is byte by of the 16-byte chunk cc (spans sa + cc/4 on)
// that fp8_gemm_skinny's and wg_body's copies put in staged row r (weight
// row n0 + r below bm, the block's weight rows, then activation row r -
// bm): 0 where the kernels ask cp.async for no bytes (a span at or past
// s1, an activation row at or past M).
func emuChunkByte(qw, qx []int, r, cc, by, sa, s1, n0, bm, M, K int) int {
	s, xr := sa+cc/4, r-bm
	if s >= s1 || r >= bm && xr >= M {
		return 0
	}
	col := s*64 + (cc&3)*16 + by
	if r < bm {
		return qw[(n0+r)*K+col]
	}
	return qx[xr*K+col]
}
