package gpu

import (
	"fmt"
	"math/rand/v2"
	"testing"
)

// TestWskTilingEmulated runs wsk_body's stream-K bookkeeping (kernels/
// common.cuh, PEFTD_WS_SK: fp8_wsk, gemm_wsk) on the CPU with integers for
// the operands: each block's share of the units (b U / G on, wg_first),
// the tile and K stage each of its stages copies (copy_w's addressing:
// weight row tile BN + r, bytes (stage KA + a) 128 on, atoms past K
// zero), the loop's own tile / stage count and its flushes (a tile whole
// in the block stored; a part to the block's slot, 0 for its first tile
// and 1 otherwise, and the tile's last block to count in, by done[tile],
// summing the slots of wg_block's blocks b0..b1 in order). Blocks run
// whole in a shuffled order so any of a shared tile's blocks may finish
// it. The result must be the plain product, each output written once,
// every counter back at zero, no slot written twice, and no block over
// WSK_TILES tiles, for grids smaller and larger than the tiles, shares
// inside one tile and over several, and a K that leaves the last atom
// of a stage empty.
func TestWskTilingEmulated(t *testing.T) {
	for _, c := range []struct{ T, N, K, BN, KA, G int }{
		{64, 256, 2048, 32, 2, 6},    // shares over several tiles
		{16, 128, 14336, 64, 2, 100}, // many blocks a tile (down's K)
		{17, 192, 4096, 48, 2, 10},
		{8, 448, 4096, 224, 1, 7},
		{33, 256, 384, 64, 2, 7},
		{5, 96, 1152, 32, 2, 11}, // 9 atoms: the last stage's second empty
		{64, 128, 256, 32, 1, 8},
		{20, 64, 1024, 32, 4, 3},
	} {
		t.Run(fmt.Sprintf("%dx%dx%d_n%d_ka%d_g%d", c.T, c.N, c.K, c.BN, c.KA, c.G), func(t *testing.T) {
			wskEmulate(t, c.T, c.N, c.K, c.BN, c.KA, c.G)
		})
	}
}

func wskEmulate(t *testing.T, T, N, K, BN, KA, G int) {
	const atom = wsAtom
	rng := rand.New(rand.NewPCG(uint64(N), uint64(K*G)))
	x := make([]int64, T*K)
	w := make([]int64, N*K)
	for i := range x {
		x[i] = int64(rng.IntN(7)) - 3
	}
	for i := range w {
		w[i] = int64(rng.IntN(7)) - 3
	}
	KB := K // one-byte operands
	SPT := (KB + KA*atom - 1) / (KA * atom)
	tiles := N / BN
	U := tiles * SPT
	if G > U {
		t.Fatalf("%d blocks for %d units", G, U)
	}
	first := func(b int) int { return b * U / G }         // wg_first
	block := func(u int) int { return ((u+1)*G - 1) / U } // wg_block
	part := make([][2][]int64, G)                         // part[b][slot]: 64 x BN
	partTile := make([][2]int, G)                         // the tile each slot holds (-1: none)
	done := make([]int, tiles)
	out := make([]int64, T*N)
	written := make([]int, T*N)
	for b := range partTile {
		partTile[b] = [2]int{-1, -1}
	}
	put := func(d []int64, tile int) {
		for m := 0; m < T; m++ {
			for r := 0; r < BN; r++ {
				out[m*N+tile*BN+r] = d[m*BN+r]
				written[m*N+tile*BN+r]++
			}
		}
	}
	for _, b := range rng.Perm(G) {
		u0, n := first(b), first(b+1)-first(b)
		if n <= 0 {
			t.Fatalf("block %d of %d has no units", b, G)
		}
		t0 := u0 / SPT
		if nt := (u0+n-1)/SPT - t0 + 1; nt > wskTiles {
			t.Fatalf("block %d touches %d tiles", b, nt)
		}
		d := make([]int64, T*BN)
		ks, k0, tt := u0-t0*SPT, u0-t0*SPT, 0
		for j := 0; j < n; j++ {
			// copy_w / copy_x's addressing for stage j
			u := u0 + j
			tile, kst := u/SPT, u%SPT
			if tile != t0+tt || kst != ks {
				t.Fatalf("block %d stage %d: copies tile %d stage %d, the loop is at tile %d stage %d", b, j, tile, kst, t0+tt, ks)
			}
			for a := 0; a < KA; a++ {
				col := (kst*KA + a) * atom
				if col >= KB {
					continue // zero-filled
				}
				for m := 0; m < T; m++ {
					for r := 0; r < BN; r++ {
						var s int64
						for k := col; k < min(col+atom, KB); k++ {
							s += x[m*K+k] * w[(tile*BN+r)*K+k]
						}
						d[m*BN+r] += s
					}
				}
			}
			if ks != SPT-1 && j != n-1 {
				ks++
				continue
			}
			// flush(t0 + tt, tt, k0, ks)
			ft := t0 + tt
			if k0 == 0 && ks == SPT-1 {
				put(d, ft)
			} else {
				slot := 1
				if first(b)/SPT == ft {
					slot = 0
				}
				if partTile[b][slot] != -1 {
					t.Fatalf("block %d writes slot %d for tile %d, holding tile %d", b, slot, ft, partTile[b][slot])
				}
				partTile[b][slot] = ft
				part[b][slot] = append([]int64(nil), d...)
				b0, b1 := block(ft*SPT), block((ft+1)*SPT-1)
				if b < b0 || b > b1 {
					t.Fatalf("block %d flushes tile %d of blocks %d-%d", b, ft, b0, b1)
				}
				done[ft]++
				if done[ft]-1 == b1-b0 { // the last to count in
					sum := make([]int64, T*BN)
					for bb := b0; bb <= b1; bb++ {
						s := 1
						if first(bb)/SPT == ft {
							s = 0
						}
						if partTile[bb][s] != ft {
							t.Fatalf("tile %d: block %d's slot %d holds tile %d", ft, bb, s, partTile[bb][s])
						}
						for i, v := range part[bb][s] {
							sum[i] += v
						}
					}
					put(sum, ft)
					done[ft] = 0
				}
			}
			for i := range d {
				d[i] = 0
			}
			tt, ks, k0 = tt+1, 0, 0
		}
	}
	for i, n := range done {
		if n != 0 {
			t.Errorf("tile %d: counter left at %d", i, n)
		}
	}
	for m := 0; m < T; m++ {
		for c := 0; c < N; c++ {
			if written[m*N+c] != 1 {
				t.Fatalf("out[%d][%d] written %d times", m, c, written[m*N+c])
			}
			var want int64
			for k := 0; k < K; k++ {
				want += x[m*K+k] * w[c*K+k]
			}
			if out[m*N+c] != want {
				t.Fatalf("out[%d][%d] = %d, want %d", m, c, out[m*N+c], want)
			}
		}
	}
}
