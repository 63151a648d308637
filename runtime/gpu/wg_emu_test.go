package gpu

import (
	"math/rand/v2"
	"testing"
)

// TestWgTilingEmulated runs fp8_wg's index arithmetic (kernels/fp8.cu,
// PEFTD_WG) on the CPU with integers for the e4m3 values: each
// stage's cp.async chunks land where the kernel puts them (each thread's
// chunk c = tid % 8 of rows tid / 8 + 16k at one swizzled offset plus 2 KB
// a k; zeros where it asks for 0 bytes), which must be row r at r * 128,
// chunk c at c ^ (r % 8) for the descriptor reads to find them; each
// wgmma reads its 64 x 32 A and N x 32 B slices by descriptor as the PTX
// ISA defines the K-major 128-byte swizzle (the byte at row r, column k
// of a slice starting at a is at a + 1024 (r / 8) + 128 (r % 8) + k, its
// 16-byte chunk bits XOR-ed with that address's bits 7-9); each thread's
// accumulators d[4t + e] are the fragment the kernel's epilogue assumes
// (weight row 16 warp + lane/4 (+8), activation row 8t + 2 (lane%4)
// (+1)); then the split partials and the last block's sum. The result
// must be the plain product once per output for every shape class: split
// and unsplit, a last stage with one span, activation rows past M.
func TestWgTilingEmulated(t *testing.T) {
	for _, wgs := range []int{1, 2} { // warpgroups a block (fp8_wg, fp8_wg2)
		for _, c := range []struct{ M, N, K, sms int }{
			{17, 128, 64 * 13, 8}, {33, 128, 64 * 9, 4}, {64, 256, 64 * 16, 2}, {20, 128, 64, 8}, {40, 256, 64 * 5, 100},
			{65, 128, 64 * 7, 8}, {128, 128, 64 * 10, 16}, {100, 384, 64 * 3, 2}, {48, 64, 64 * 6, 3},
		} {
			if c.N%(wgs*skinnyRows) != 0 {
				continue
			}
			wgEmulate(t, wgs, c.M, c.N, c.K, c.sms)
		}
	}
}

// wgEmulate is one shape of TestWgTilingEmulated with wgs warpgroups a block.
func wgEmulate(t *testing.T, wgs, M, N, K, sms int) {
	const rb = wgRowBytes
	v := 0
	for skinnyVariants[v].rows < M {
		v++
	}
	NT := skinnyVariants[v].rows / 8
	TR := 8 * NT
	BM := wgs * skinnyRows // weight rows a block
	WB := BM * rb
	SB := WB + TR*rb
	CH := rb / 16
	threads := wgs * skinnyThreads
	rng := rand.New(rand.NewPCG(uint64(M), uint64(K)+uint64(wgs)))
	qw, qx := make([]int, N*K), make([]int, M*K)
	for i := range qw {
		qw[i] = rng.IntN(15) - 7
	}
	for i := range qx {
		qx[i] = rng.IntN(15) - 7
	}
	S := tileSplit(N/BM, K, sms, wgPerSM(TR, wgs))
	tiles := N / skinnyRows // 64-row tiles (a warpgroup's)
	part := make([]int, tiles*S*skinnyRows*TR)
	out, written, done := make([]int, M*N), make([]int, M*N), make([]int, tiles)
	// read is the byte a wgmma descriptor starting at a gives for row r,
	// column k of its slice (K-major, 128-byte swizzle, 8-row groups 1024
	// bytes apart; a - a % 1024 is 1024-aligned in the kernel)
	read := func(smem []int, a, r, k int) int {
		lin := a + 1024*(r/8) + 128*(r%8) + k
		return smem[lin^(((lin>>7)&7)<<4)]
	}
	// the kernel's copies: thread tid, chunk c = tid % 8 of rows r0 +
	// rstep k (r0 = tid / 8, rstep = 16 wgs), weight rows for k < wk, one
	// shared offset dst0 (the rows of a thread share their swizzle)
	rstep := threads / CH
	cpt, wk := (BM+TR)/rstep, BM/rstep
	for bx := range N / BM {
		for sp := range S {
			n0 := bx * BM
			spans := K / 64
			per := (spans + S - 1) / S
			s0 := min(spans, sp*per)
			s1 := min(spans, s0+per)
			nst := (s1 - s0 + 1) / 2
			smem := make([]int, wgStages*SB)
			for i := range smem {
				smem[i] = 1 << 20 // never copied: would show in the sums
			}
			copyStage := func(j, k0, k1 int) {
				if j >= nst {
					return
				}
				b := (j % wgStages) * SB
				sa := s0 + 2*j
				for tid := range threads {
					c, r0 := tid%CH, tid/CH
					dst0 := r0*rb + ((c ^ (r0 & 7)) << 4)
					for k := k0; k < k1; k++ {
						r := r0 + rstep*k // staged row: weight rows 0..BM-1, then activation rows
						for by := range 16 {
							smem[b+dst0+k*rstep*rb+by] = emuChunkByte(qw, qx, r, c, by, sa, s1, n0, BM, M, K)
						}
					}
				}
			}
			for j := range wgStages - 1 {
				copyStage(j, 0, wk)
			}
			for j := range wgStages - 1 {
				copyStage(j, wk, cpt)
			}
			D := make([][][]int, wgs) // D[warpgroup][weight row][activation row], as wgmma accumulates it
			for g := range D {
				D[g] = make([][]int, skinnyRows)
				for r := range D[g] {
					D[g][r] = make([]int, TR)
				}
			}
			for j := range nst {
				copyStage(j+wgStages-1, 0, cpt)
				b := (j % wgStages) * SB
				for g := range wgs {
					for ks := range rb / 32 {
						for r := range skinnyRows {
							for n := range TR {
								for k := range 32 {
									D[g][r][n] += read(smem, b+g*skinnyRows*rb+32*ks, r, k) * read(smem, b+WB+32*ks, n, k)
								}
							}
						}
					}
				}
			}
			// each warpgroup's threads' d[4t + e], through skinny_store's indices
			for g := range wgs {
				tile := wgs*bx + g
				tn0 := tile * skinnyRows
				for tid := range skinnyThreads {
					warp, lane := tid/32, tid%32
					gg, tig := lane/4, lane%4
					for tt := range NT {
						for e := range 4 {
							row := 16*warp + gg
							if e >= 2 {
								row += 8
							}
							m := 8*tt + 2*tig + (e & 1)
							val := D[g][row][8*tt+2*tig+(e&1)] // d[4tt + e]
							if S == 1 {
								if m < M {
									out[m*N+tn0+row] = val
									written[m*N+tn0+row]++
								}
								continue
							}
							part[tile*S*skinnyRows*TR+sp*skinnyRows*TR+row*TR+m] = val
						}
					}
				}
				if S == 1 {
					continue
				}
				done[tile]++
				if done[tile] != S {
					continue
				}
				emuLastSum(part[tile*S*skinnyRows*TR:], out, written, S, TR, M, N, tn0)
				done[tile] = 0
			}
		}
	}
	emuCheck(t, qx, qw, out, written, done, M, N, K, sms, S)
}
