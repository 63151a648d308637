package gpu

import (
	"math/rand/v2"
	"testing"
)

// TestWgTilingEmulated runs wg_body's index arithmetic (kernels/common.cuh,
// PEFTD_WG: fp8_wg) on the CPU with integers for the operands,
// one warpgroup a block, each block's whole pipeline in turn
// (in a shuffled order, so any of a shared tile's blocks may finish it):
// its stage units (b U / G on), each stage's cp.async chunks where the
// kernel puts them (each thread's chunk c = tid % 8 of rows tid / 8 +
// rstep k at one swizzled offset; zeros where it asks for 0 bytes), which
// must be row r at r * 128, chunk c at c ^ (r % 8) for the descriptor
// reads to find them; each wgmma group reading its stage buffer as late as
// the kernel lets it run (one group in flight: after the next stage's
// copies are issued), by descriptor as the PTX ISA defines the K-major
// 128-byte swizzle (the byte at row r, column k of a slice starting at a
// is at a + 1024 (r / 8) + 128 (r % 8) + k, its 16-byte chunk bits XOR-ed
// with that address's bits 7-9); the accumulators as each thread holds
// them (weight row 16 warp + lane/4 (+8), activation row 8t + 2 (lane%4)
// (+1)); whole tiles stored, shared ones through the partial slots and
// the counters. The result must be the plain product, each output written
// once, every counter back at zero, for every shape class: blocks inside
// one tile, tiles shared by two or more blocks, a last stage with one
// 64-byte span, activation rows past M.
func TestWgTilingEmulated(t *testing.T) {
	defer func(per, ka int) { wgPerSM, wgKA = per, ka }(wgPerSM, wgKA)
	// WG_PER_SM, WG_KA, WG_INFLIGHT: the default (its 128-row variant
	// takes 3 atoms a stage: wgAtoms), then the
	// A/B builds (v0.28's default first)
	for _, cfg := range []struct{ per, ka, inflight int }{{1, 4, 0}, {2, 1, 1}, {1, 1, 1}, {2, 2, 1}, {2, 1, 0}, {1, 4, 1}, {1, 3, 0}} {
		wgPerSM, wgKA = cfg.per, cfg.ka
		wgEmulateAll(t, cfg.inflight)
	}
}

func wgEmulateAll(t *testing.T, inflight int) {
	for _, c := range []struct{ M, N, K, sms int }{
		{17, 128, 64 * 13, 8}, {33, 128, 64 * 9, 4}, {64, 256, 64 * 16, 2}, {20, 128, 64, 8}, {40, 256, 64 * 5, 100},
		{65, 128, 64 * 7, 8}, {128, 128, 64 * 10, 16}, {100, 384, 64 * 3, 2}, {48, 64, 64 * 6, 3}, {24, 1024, 256, 5},
		{30, 512, 64 * 11, 1},
	} {
		wgEmulate(t, c.M, c.N, c.K, c.sms, inflight)
	}
}

// wgEmulate is one shape of TestWgTilingEmulated with inflight
// (WG_INFLIGHT) wgmma groups left running.
func wgEmulate(t *testing.T, M, N, K, sms, inflight int) {
	const rb = wgRowBytes
	v := skinnyVariantFor(M)
	NT := skinnyVariants[v].rows / 8
	TR := 8 * NT
	BM := skinnyRows // weight rows a tile
	WB := BM * rb
	AB := WB + TR*rb  // an atom
	ka := wgAtoms(TR) // atoms a stage (WgShape's KA)
	SB := ka * AB
	CH := rb / 16
	ST := wgStages(TR)
	ahead := ST - 1 - inflight // AHEAD
	threads := skinnyThreads
	rng := rand.New(rand.NewPCG(uint64(M), uint64(K)))
	qw, qx := emuOperands(rng, M, N, K)
	g := &wgProduct{sms: sms, esize: 1}
	SPT := (K + ka*rb - 1) / (ka * rb)
	tiles := N / BM
	G := g.grid(M, N, K)
	sp := newEmuSplit(tiles*SPT, G, SPT, BM, TR)
	first, part, slot := sp.first, sp.part, sp.slot
	if len(part)*4 > wgPartBytes(sms) {
		t.Fatalf("M=%d N=%d K=%d: the partials of %d blocks overrun wgPartBytes", M, N, K, G)
	}
	out, written, done := make([]int, M*N), make([]int, M*N), make([]int, tiles)
	read := func(smem []int, a, r, k int) int { return smem[emuSwizzled(a, r, k)] }
	rstep := threads / CH
	cpt, wk := (BM+TR)/rstep, BM/rstep
	for _, b := range rng.Perm(G) {
		u0, n := first(b), first(b+1)-first(b)
		smem := make([]int, ST*SB)
		for i := range smem {
			smem[i] = 1 << 20 // never copied: would show in the sums
		}
		copyStage := func(j, k0, k1 int) {
			if j >= n {
				return
			}
			u := u0 + j
			tile, ks := u/SPT, u%SPT
			buf := (j % ST) * SB
			for tid := range threads {
				c, r0 := tid%CH, tid/CH
				dst0 := r0*rb + ((c ^ (r0 & 7)) << 4)
				for k := k0; k < k1; k++ {
					r := r0 + rstep*k // staged row: weight rows 0..BM-1, then activation rows
					for a := range ka {
						for by := range 16 {
							smem[buf+a*AB+dst0+k*rstep*rb+by] = emuChunkByte(qw, qx, r, c, by, 2*(ks*ka+a), K/64, tile*BM, BM, M, K)
						}
					}
				}
			}
		}
		// D[weight row][activation row], as wgmma accumulates it
		var D [][]int
		zero := func() {
			D = make([][]int, skinnyRows)
			for r := range D {
				D[r] = make([]int, TR)
			}
		}
		zero()
		group := func(j int) { // stage j's wgmma group
			buf := (j % ST) * SB
			for a := range ka {
				for q := range rb / 32 {
					for r := range skinnyRows {
						for nn := range TR {
							for k := range 32 {
								D[r][nn] += read(smem, buf+a*AB+32*q, r, k) * read(smem, buf+a*AB+WB+32*q, nn, k)
							}
						}
					}
				}
			}
		}
		// flush: the accumulators of tile, held from stage k0 to k1, through
		// each thread's registers d[4t + e] as the kernel's put and slots use them
		flush := func(tile, k0, k1 int) {
			whole := k0 == 0 && k1 == SPT-1
			emuFrag(NT, func(row, m int) {
				val := D[row][m]
				if !whole {
					part[slot(b, tile)+row*TR+m] = val
				} else if m < M {
					out[m*N+tile*BM+row] = val
					written[m*N+tile*BM+row]++
				}
			})
			if !whole {
				sp.finish(tile, M, N, out, written, done)
			}
		}
		for j := range ahead {
			copyStage(j, 0, wk)
		}
		for j := range ahead {
			copyStage(j, wk, cpt)
		}
		tile, ks := u0/SPT, u0%SPT
		k0, pending := ks, -1
		for j := range n {
			copyStage(j+ahead, 0, cpt)
			if pending >= 0 {
				group(pending) // the group one stage back, as late as it may run
			}
			pending = j
			if inflight == 0 { // waited for before the next stage
				group(j)
				pending = -1
			}
			if ks == SPT-1 || j == n-1 {
				if pending >= 0 {
					group(j)
				}
				pending = -1
				flush(tile, k0, ks)
				zero()
				tile, ks, k0 = tile+1, 0, 0
			} else {
				ks++
			}
		}
	}
	emuCheck(t, qx, qw, out, written, done, M, N, K, sms, G)
}

// TestWgGridTarget: beside the LoRA stream a wgmma product's grid covers
// only its SM target (Backend.Linear sets it), never more SMs than it plans
// for, and all of them again once the target is cleared.
func TestWgGridTarget(t *testing.T) {
	g := &wgProduct{sms: 132, esize: 1}
	const T, N, K = 64, 6144, 4096 // q/k/v at 64 rows: more stage units than SMs
	for _, c := range []struct{ target, want int }{{0, wgPerSM * 132}, {116, wgPerSM * 116}, {84, wgPerSM * 84}, {200, wgPerSM * 132}, {0, wgPerSM * 132}} {
		g.SetSMTarget(c.target)
		if got := g.grid(T, N, K); got != c.want {
			t.Errorf("target %d: grid %d, want %d", c.target, got, c.want)
		}
	}
	g.SetSMTarget(116)
	if got := g.grid(17, 64, 64); got != 1 { // one stage unit: one block whatever the target
		t.Errorf("one unit: grid %d, want 1", got)
	}
}

// emuOperands are an emulated product's integer operands, qw [N, K] and
// qx [M, K], in -7..7.
func emuOperands(rng *rand.Rand, M, N, K int) (qw, qx []int) {
	qw, qx = make([]int, N*K), make([]int, M*K)
	for i := range qw {
		qw[i] = rng.IntN(15) - 7
	}
	for i := range qx {
		qx[i] = rng.IntN(15) - 7
	}
	return qw, qx
}

// emuSwizzled is where byte k of row r of a K-major slice starting at a (a
// 1024-aligned stage plus the slice's offset) sits in the 128-byte
// swizzle, as the PTX ISA defines it for wgmma's descriptors and the TMA
// writes it: the linear address's 16-byte chunk bits XOR-ed with its bits
// 7-9.
func emuSwizzled(a, r, k int) int {
	lin := a + 1024*(r/8) + 128*(r%8) + k
	return lin ^ (((lin >> 7) & 7) << 4)
}

// emuSplit is wg_body's and wgsk_body's stream-K split of U stage units
// (spt a tile of bm weight rows) over G blocks, and its partial slots of
// bm x tr values (two a block: its first tile's and its last's), each
// poisoned until written.
type emuSplit struct {
	U, G, spt, bm, tr int
	part              []int
}

func newEmuSplit(U, G, spt, bm, tr int) *emuSplit {
	e := &emuSplit{U: U, G: G, spt: spt, bm: bm, tr: tr, part: make([]int, 2*G*bm*tr)}
	for i := range e.part {
		e.part[i] = 1 << 24 // never written: would show in the sums
	}
	return e
}

// first is block b's first stage unit (wg_first).
func (e *emuSplit) first(b int) int { return b * e.U / e.G }

// blockOf is the block whose units hold unit u (wg_block).
func (e *emuSplit) blockOf(u int) int { return ((u+1)*e.G - 1) / e.U }

// slot is the first value of block b's partial slot for tile.
func (e *emuSplit) slot(b, tile int) int {
	w := 1
	if e.first(b)/e.spt == tile {
		w = 0
	}
	return (b*2 + w) * e.bm * e.tr
}

// finish is wg_body's end of a shared tile: it counts a block's partials
// of tile in (done) and, for the last of its blocks, sums every block's in
// block order (wg_body's slot layout: weight row row at row tr + m) into
// out's M rows of N (written counts each store) and leaves the counter at
// zero.
func (e *emuSplit) finish(tile, M, N int, out, written, done []int) {
	b0, b1 := e.blockOf(tile*e.spt), e.blockOf((tile+1)*e.spt-1)
	if done[tile]++; done[tile] != b1-b0+1 {
		return
	}
	for row := range e.bm {
		for m := range min(M, e.tr) {
			sum := 0
			for bb := b0; bb <= b1; bb++ {
				sum += e.part[e.slot(bb, tile)+row*e.tr+m]
			}
			out[m*N+tile*e.bm+row] = sum
			written[m*N+tile*e.bm+row]++
		}
	}
	done[tile] = 0
}

// emuFrag calls at(row, m) for each accumulator a warpgroup's 128 threads
// hold of an m64nN wgmma (N = 8 nt): thread (warp, lane) holds weight row
// 16 warp + lane/4 (+8) and activation row 8t + 2 (lane%4) (+1) in d[4t +
// e], as the kernels' frag_out and partial slots read them.
func emuFrag(nt int, at func(row, m int)) {
	emuFragRegs(nt, func(_, _, row, m int) { at(row, m) })
}

// emuFragRegs is emuFrag naming the thread too: at(tid, i, row, m) for
// thread tid's register d[i].
func emuFragRegs(nt int, at func(tid, i, row, m int)) {
	for tid := range 128 {
		warp, lane := tid/32, tid%32
		gg, tig := lane/4, lane%4
		for tt := range nt {
			for e := range 4 {
				row := 16*warp + gg
				if e >= 2 {
					row += 8
				}
				at(tid, 4*tt+e, row, 8*tt+2*tig+(e&1))
			}
		}
	}
}
