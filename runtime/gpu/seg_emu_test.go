package gpu

import (
	"fmt"
	"math/rand/v2"
	"testing"
)

// TestSegEmulated runs fp8_gemv_seg (kernels/fp8.cu) on the CPU with the
// kernel's own index expressions, lane by lane, for every plan planSeg
// makes on the 8B shapes and some small ones: each lane's three 16-byte
// loads, the m16n8k32 fragments they fill (A rows g and g + 8 from the two
// weight loads, B column g from the activation load: bytes 0-3 at k 4 tig,
// 4-7 at k 16 + 4 tig, the second MMA bytes 8-15), the shuffle sums over
// aligned groups of 4 S lanes, the shared-memory slots the group leaders
// write and the epilogue reads. Small integer operands keep every sum exact:
// each output must equal the dot product of its rows, every output of the
// M rows must be written exactly once, and no shared slot may be read
// unwritten or written twice.
func TestSegEmulated(t *testing.T) {
	shapes := [][2]int{{6144, 4096}, {4096, 4096}, {28672, 4096}, {4096, 14336}, {64, 1024}, {32, 3584}, {48, 2048}, {16, 512}}
	rng := rand.New(rand.NewPCG(1, 2))
	for _, sh := range shapes {
		N, K := sh[0], sh[1]
		for M := 1; M <= segMaxRows; M++ {
			p, ok := planSeg(M, N, K)
			if !ok {
				continue
			}
			S, CH, KS, G := p.k.S, p.k.CH, p.KS, p.G
			name := fmt.Sprintf("fp8_gemv_seg_s%d_c%d %d x %d x %d (KS %d, G %d)", S, CH, M, N, K, KS, G)
			if KS*G > segMaxWarps || KS*CH*S*64 != K || N%p.rows() != 0 {
				t.Fatalf("%s: plan does not tile the product", name)
			}
			// emulate a few blocks of the big shapes, every block of the small
			blocks := N / p.rows()
			var bs []int
			if blocks <= 8 {
				for b := range blocks {
					bs = append(bs, b)
				}
			} else {
				bs = []int{0, 1, blocks / 2, blocks - 1}
			}
			w := func(r, k int) int { return (r*7+k*13)%9 - 4 }
			xs := make([][]int, 8/S)
			for m := range xs {
				xs[m] = make([]int, K)
				for k := range xs[m] {
					xs[m][k] = rng.IntN(7) - 3
				}
			}
			for _, bid := range bs {
				emulateSegBlock(t, name, bid, M, N, K, S, CH, KS, G, w, xs)
			}
		}
	}
}

// emulateSegBlock is one block of fp8_gemv_seg: w(r, k) the weights, xs the
// activation rows (those at M and above are never read).
func emulateSegBlock(t *testing.T, name string, bid, M, N, K, S, CH, KS, G int, w func(r, k int) int, xs [][]int) {
	t.Helper()
	RW, MX, CB := 16/S, 8/S, S*64
	RB := G * RW
	nwarps := KS * G
	red := make([]int, segMaxWarps*128/(S*S))
	wrote := make([]int, len(red))
	if KS*MX*RB > len(red) {
		t.Fatalf("%s: %d shared slots needed, %d declared", name, KS*MX*RB, len(red))
	}
	rb0 := bid * RB
	for warp := range nwarps {
		grp, ks := warp/KS, warp%KS
		// each lane's registers: A[c], B[c], X[c] as 16 bytes
		var A, B, X [32][][16]int
		for lane := range 32 {
			g, tig := lane>>2, lane&3
			seg, xm := g%S, g/S
			koff := ks*CH*CB + seg*64 + 16*tig
			r0 := rb0 + grp*RW + g/S
			r1 := r0 + MX
			if r1 >= N {
				t.Fatalf("%s: block %d lane %d reads weight row %d of %d", name, bid, lane, r1, N)
			}
			A[lane], B[lane], X[lane] = make([][16]int, CH), make([][16]int, CH), make([][16]int, CH)
			for c := range CH {
				for j := range 16 {
					k := koff + c*CB + j
					if k >= K {
						t.Fatalf("%s: lane %d reads byte %d of a %d-byte row", name, lane, k, K)
					}
					A[lane][c][j], B[lane][c][j] = w(r0, k), w(r1, k)
					if xm < M {
						X[lane][c][j] = xs[xm][k]
					}
				}
			}
		}
		// the MMAs: C[16][8] += A_frag . B_frag, two a chunk (bytes 0-7, 8-15)
		var C [16][8]int
		for c := range CH {
			for half := range 2 {
				var a [16][32]int
				var b [32][8]int
				for lane := range 32 {
					g, tig := lane>>2, lane&3
					for j := range 4 {
						// a0 A.x: row g k 4t+j; a1 B.x: row g+8; a2 A.y: row g, k 16+4t+j; a3 B.y
						a[g][4*tig+j] = A[lane][c][8*half+j]
						a[g+8][4*tig+j] = B[lane][c][8*half+j]
						a[g][16+4*tig+j] = A[lane][c][8*half+4+j]
						a[g+8][16+4*tig+j] = B[lane][c][8*half+4+j]
						b[4*tig+j][g] = X[lane][c][8*half+j]
						b[16+4*tig+j][g] = X[lane][c][8*half+4+j]
					}
				}
				for i := range 16 {
					for n := range 8 {
						for k := range 32 {
							C[i][n] += a[i][k] * b[k][n]
						}
					}
				}
			}
		}
		// the shuffle sums and the group leaders' shared slots
		for m := 0; m < MX && m < M; m++ {
			var tv, bv [32]int
			for lane := range 32 {
				g, tig := lane>>2, lane&3
				n := m*S + g%S
				if n == 2*tig {
					tv[lane], bv[lane] = C[g][2*tig], C[g+8][2*tig]
				}
				if n == 2*tig+1 {
					tv[lane], bv[lane] = C[g][2*tig+1], C[g+8][2*tig+1]
				}
			}
			for lane := range 32 {
				if lane&(4*S-1) != 0 {
					continue
				}
				st, sb := 0, 0
				for l := lane; l < lane+4*S; l++ { // the xor butterfly over o < 4 S sums the aligned group
					st += tv[l]
					sb += bv[l]
				}
				g := lane >> 2
				i := (ks*MX+m)*RB + grp*RW + g/S
				for _, q := range []struct{ i, v int }{{i, st}, {i + 8/S, sb}} {
					if wrote[q.i] != 0 {
						t.Fatalf("%s: shared slot %d written twice", name, q.i)
					}
					red[q.i], wrote[q.i] = q.v, 1
				}
			}
		}
	}
	// the epilogue
	for i := 0; i < RB*M; i++ {
		m, r := i/RB, i%RB
		v := 0
		for j := range KS {
			s := (j*MX+m)*RB + r
			if wrote[s] == 0 {
				t.Fatalf("%s: epilogue reads unwritten shared slot %d", name, s)
			}
			v += red[s]
		}
		n := rb0 + r
		want := 0
		for k := range K {
			want += w(n, k) * xs[m][k]
		}
		if v != want {
			t.Fatalf("%s: block %d output [%d, %d] = %d, want %d", name, bid, m, n, v, want)
		}
	}
}
