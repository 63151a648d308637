package gpu

import (
	"math/rand/v2"
	"sort"
	"testing"
)

// TestWgskEmulated runs wgsk_body's index arithmetic and its ring's
// mbarrier protocol (kernels/wgsk.cuh: fp8_wgsk) on the CPU with integers
// for the operands, each block in turn (in a shuffled order, so any of a
// shared tile's blocks may finish it), its producer and two consumer
// warpgroups interleaved at random:
//   - the producer asks for stage j once its `empty` barrier's phase of
//     parity ((j / ST) & 1) ^ 1 has completed (j >= ST), as the kernel's
//     try_wait.parity does; the TMA's boxes land in the buffer in the
//     128-byte swizzle (row r at r * 128, its 16-byte chunk c at c ^
//     (r % 8)), zeros past K and past M's activation rows; `full`
//     completes when its one arrival and both boxes' bytes are in;
//   - a consumer waits for full's phase of parity (j / ST) & 1, its group
//     reads the stage by descriptor as the PTX ISA defines the K-major
//     128-byte swizzle (its 64 weight rows from 64 c, the TR activation
//     rows after the WK_BM weight rows), and with WK_INFLIGHT 1 the group
//     still reads the buffer until the consumer's next wait: the buffer
//     must hold the same stage then;
//   - it arrives on empty (128 arrivals a warpgroup, 256 complete a phase)
//     as the kernel does, and at a tile's end both meet (wk_sync) to store
//     it whole or through the partial slots (the float4s of rows below M)
//     and the per-tile counters;
//   - a block whose last tile is shared waits (wk_sum's spread): once
//     every block has run, the waiting ones go on in a shuffled order,
//     each finding its tile's count complete (else it would wait forever),
//     counting a second time (the last to count clears the counter) and
//     summing its share of the tile's float4s, its own values of that
//     share from where it kept them (wk_keep), not from its slot.
//
// The result must be the plain product, each output written once and every
// counter back at zero, for a tile inside one block, tiles shared by two or
// more blocks (more than wk_sum's WS_C = 4 slots a round too), a last stage
// past K, activation rows past M, both variants and both WK_INFLIGHT
// values. The producer and consumers are tried in a weighted random order
// (weights fixed per block), so one can run far ahead of another.
func TestWgskEmulated(t *testing.T) {
	for _, inflight := range []int{0, 1} {
		for _, c := range []struct{ M, N, K, G int }{
			{65, 256, 128*5 + 64, 1}, {65, 256, 128*5 + 64, 3}, {100, 128, 128 * 7, 5}, {128, 384, 256, 6},
			{129, 256, 128 * 3, 2}, {200, 128, 128*4 + 16, 7}, {256, 256, 128 * 2, 4}, {90, 128, 128 * 9, 9},
			{70, 256, 128 * 11, 21}, {250, 128, 128 * 10, 10},
			{100, 256, 128 * 20, 2}, {200, 256, 128*9 + 32, 1}, // the ring wraps several times
		} {
			wgskEmulate(t, c.M, c.N, c.K, c.G, inflight)
		}
	}
}

// emuBarrier is an mbarrier as the emulation needs it: the arrivals a phase
// takes, those and the bytes still pending in the current one, and the
// phases completed.
type emuBarrier struct{ count, pending, tx, phases int }

func (b *emuBarrier) arrive(n, bytes int) {
	b.pending -= n
	b.tx += bytes
	b.settle()
}

// land counts bytes in (a TMA box's complete_tx).
func (b *emuBarrier) land(bytes int) {
	b.tx -= bytes
	b.settle()
}

func (b *emuBarrier) settle() {
	if b.pending == 0 && b.tx == 0 {
		b.phases++
		b.pending = b.count
	}
}

// passed is try_wait.parity(p): the phase of parity p has completed (the
// current phase's parity differs from p).
func (b *emuBarrier) passed(p int) bool { return b.phases&1 != p }

// wgskEmulate is one shape of TestWgskEmulated on G blocks.
func wgskEmulate(t *testing.T, M, N, K, G, inflight int) {
	const rb, BM = wgRowBytes, wgskBM
	TR := wgskRows[0]
	if M > TR {
		TR = wgskRows[1]
	}
	NT := TR / 8
	WB, SB, ST := BM*rb, wgskStageBytes(TR), wgskStages(TR)
	rng := rand.New(rand.NewPCG(uint64(M*7+G), uint64(K)))
	qw, qx := emuOperands(rng, M, N, K)
	SPT := (K + rb - 1) / rb
	tiles := N / BM
	G = min(G, tiles*SPT)
	sp := newEmuSplit(tiles*SPT, G, SPT, BM, TR)
	first, part, slot, addr := sp.first, sp.part, sp.slot, emuSwizzled
	if len(part)*4 > wgskPartBytes(G) {
		t.Fatalf("M=%d N=%d K=%d: the partials of %d blocks overrun wgskPartBytes", M, N, K, G)
	}
	out, written, done := make([]int, M*N), make([]int, M*N), make([]int, tiles)
	NV := (M + 7) / 8
	type waiter struct {
		b, tile int
		own     []int // wk_keep's values of the block's share, at wgskPartAt's places
	}
	var waiting []waiter // blocks at wk_sum's wait, their last tile
	// share is wk_sum's float4s [i0, i1) of a tile for block b, and the
	// tile's blocks b0..b1, C of them, P summing it
	share := func(b, tile int) (i0, i1, b0, b1, C, P int) {
		b0, b1 = sp.blockOf(tile*SPT), sp.blockOf((tile+1)*SPT-1)
		C, P = b1-b0+1, b1-b0
		if sp.first(b1+1) == (tile+1)*SPT {
			P++
		}
		p := b - b0
		return p * NV / P, (p + 1) * NV / P, b0, b1, C, P
	}
	for _, b := range rng.Perm(G) {
		u0, n := first(b), first(b+1)-first(b)
		smem := make([]int, ST*SB)
		stageOf := make([]int, ST) // the stage j a buffer holds (-1: none)
		for i := range smem {
			smem[i] = 1 << 20 // never copied: would show in the sums
		}
		for i := range stageOf {
			stageOf[i] = -1
		}
		full, empty := make([]emuBarrier, ST), make([]emuBarrier, ST)
		for i := range ST {
			full[i] = emuBarrier{count: 1, pending: 1}
			empty[i] = emuBarrier{count: wgskConsumers, pending: wgskConsumers}
		}
		// tma lands a box of rows [r0, r0+rows) of src (lim rows of K
		// bytes), bytes [k0, k0 + 128), at the stage offset dst of buffer s
		tma := func(s, dst int, src []int, lim, r0, rows, k0 int) {
			for r := range rows {
				for k := range rb {
					val := 0
					if r0+r < lim && k0+k < K {
						val = src[(r0+r)*K+k0+k]
					}
					smem[s*SB+addr(dst, r, k)] = val
				}
			}
			full[s].land(rows * rb)
		}
		nextJ := 0 // the producer's next stage
		produce := func() bool {
			j := nextJ
			if j >= n {
				return false
			}
			s := j % ST
			if j >= ST && !empty[s].passed(((j/ST)&1)^1) {
				return false
			}
			u := u0 + j
			tile, ks := u/SPT, u%SPT
			full[s].arrive(1, SB) // expect_tx
			stageOf[s] = j
			tma(s, 0, qw, N, tile*BM, BM, ks*rb)
			tma(s, WB, qx, M, 0, TR, ks*rb)
			nextJ++
			return true
		}
		// a consumer warpgroup's state
		type consumer struct {
			j, pend      int     // its next stage; the stage it is done with but has not freed (-1: none; WK_INFLIGHT 1)
			tile, ks, k0 int     // the tile it accumulates, its stage there, the block's first stage of it
			D            [][]int // D[weight row - 64 c][activation row]
			atSync       bool    // waiting at the tile's end for the other
		}
		cs := make([]*consumer, 2)
		zero := func(c *consumer) {
			c.D = make([][]int, 64)
			for r := range c.D {
				c.D[r] = make([]int, TR)
			}
		}
		for i := range cs {
			cs[i] = &consumer{pend: -1, tile: u0 / SPT, ks: u0 % SPT, k0: u0 % SPT}
			zero(cs[i])
		}
		group := func(c int, j int) { // consumer c's wgmma group on stage j
			s := j % ST
			if stageOf[s] != j {
				t.Fatalf("M=%d N=%d K=%d G=%d block %d: consumer %d reads stage %d but its buffer holds %d", M, N, K, G, b, c, j, stageOf[s])
			}
			wb, xb := s*SB+64*c*rb, s*SB+WB
			for q := range rb / 32 {
				for r := range 64 {
					for nn := range TR {
						sum := 0
						for k := range 32 {
							sum += smem[addr(wb+32*q, r, k)] * smem[addr(xb+32*q, nn, k)]
						}
						cs[c].D[r][nn] += sum
					}
				}
			}
		}
		// flush: both consumers' accumulators of tile, held from stage k0
		// to k1, through each thread's registers as frag_out and the slots
		// use them (rows 16 warp + l/4 (+8) of each warpgroup's 64)
		flush := func(tile, k0, k1 int, final bool) {
			whole := k0 == 0 && k1 == SPT-1
			o0, o1 := 0, 0 // the share this block sums and keeps (final)
			if !whole && final {
				o0, o1, _, _, _, _ = share(b, tile)
			}
			own := make([]int, BM*TR)
			for i := range own {
				own[i] = 1 << 22 // not kept: would show in the sums
			}
			for c := range 2 {
				emuFragRegs(NT, func(tid, i, row, m int) {
					val, n := cs[c].D[row][m], tile*BM+64*c+row
					at := ((i/4)*wgskConsumers+128*c+tid)*4 + i%4 // float4 i/4 of consumer thread 128 c + tid
					switch {
					case whole && m < M:
						out[m*N+n] = val
						written[m*N+n]++
					case !whole && i/4 >= o0 && i/4 < o1: // wk_keep
						own[at] = val
					case !whole && i/4 < NV: // wk_store_part
						part[slot(b, tile)+at] = val
					}
				})
			}
			if !whole {
				done[tile]++
				if final {
					waiting = append(waiting, waiter{b, tile, own})
				}
			}
		}
		consume := func(ci int) bool {
			c := cs[ci]
			if c.atSync || c.j >= n {
				return false
			}
			j, s := c.j, c.j%ST
			if !full[s].passed((j / ST) & 1) {
				return false
			}
			if c.pend >= 0 { // WK_INFLIGHT 1: the group before still read its buffer until this wait
				group(ci, c.pend)
			}
			end := c.ks == SPT-1 || j == n-1
			if c.pend >= 0 {
				empty[c.pend%ST].arrive(128, 0)
			}
			c.pend = j
			if inflight == 0 || end {
				group(ci, j)
				empty[s].arrive(128, 0)
				c.pend = -1
			}
			c.j++
			c.atSync = end
			if !end {
				c.ks++
			}
			return true
		}
		weight := make([]float64, 3) // the consumers' and the producer's, in the order they are tried
		for i := range weight {
			weight[i] = []float64{1, 8, 64}[rng.IntN(3)]
		}
		for cs[0].j < n || cs[1].j < n || cs[0].atSync || cs[1].atSync {
			if cs[0].atSync && cs[1].atSync { // wk_sync: both at the tile's end
				if cs[0].tile != cs[1].tile || cs[0].ks != cs[1].ks || cs[0].k0 != cs[1].k0 {
					t.Fatalf("M=%d N=%d K=%d G=%d block %d: the consumers meet at different tiles", M, N, K, G, b)
				}
				flush(cs[0].tile, cs[0].k0, cs[0].ks, cs[0].j == n)
				for _, c := range cs {
					zero(c)
					c.atSync = false
					c.tile, c.ks, c.k0 = c.tile+1, 0, 0
				}
				continue
			}
			progressed := false
			for _, a := range emuOrder(rng, weight) {
				if a == 2 && produce() || a < 2 && consume(a) {
					progressed = true
					break
				}
			}
			if !progressed {
				t.Fatalf("M=%d N=%d K=%d G=%d inflight %d block %d: deadlock (producer at stage %d, consumers at %d and %d)", M, N, K, G, inflight, b, nextJ, cs[0].j, cs[1].j)
			}
		}
	}
	for _, i := range rng.Perm(len(waiting)) {
		b, tile := waiting[i].b, waiting[i].tile
		i0, i1, b0, b1, C, P := share(b, tile)
		if done[tile] < C {
			t.Fatalf("M=%d N=%d K=%d G=%d: block %d waits for tile %d's %d partials, %d counted: it would wait forever", M, N, K, G, b, tile, C, done[tile])
		}
		if done[tile]++; done[tile] == C+P {
			done[tile] = 0
		}
		for t := i0; t < i1; t++ { // wk_sum: float4 t of every consumer thread
			for row := range BM {
				for m := 8 * t; m < min(8*t+8, M); m++ {
					sum := 0
					for bb := b0; bb <= b1; bb++ {
						if bb == b {
							sum += waiting[i].own[wgskPartAt(row, m)]
						} else {
							sum += part[slot(bb, tile)+wgskPartAt(row, m)]
						}
					}
					out[m*N+tile*BM+row] = sum
					written[m*N+tile*BM+row]++
				}
			}
		}
	}
	emuCheck(t, qx, qw, out, written, done, M, N, K, G, G)
}

// emuOrder is a random order of len(w) actors, actor a coming early in
// proportion to w[a] (an exponential race).
func emuOrder(rng *rand.Rand, w []float64) []int {
	key := make([]float64, len(w))
	order := make([]int, len(w))
	for i := range w {
		key[i], order[i] = rng.ExpFloat64()/w[i], i
	}
	sort.Slice(order, func(i, j int) bool { return key[order[i]] < key[order[j]] })
	return order
}

// wgskPartAt is where wk_store_part puts the value of a tile's weight row
// row (of WK_BM) and activation row m in a partial slot: float4 i / 4 of
// the consumer thread holding it (warpgroup row / 64, warp, lane as
// emuFrag's), component i % 4.
func wgskPartAt(row, m int) int {
	c, r := row/64, row%64
	warp, g, hi := r/16, r%8, (r%16)/8
	t, tig, lo := m/8, (m%8)/2, m%2
	ct := 128*c + 32*warp + 4*g + tig
	return (t*wgskConsumers+ct)*4 + 2*hi + lo
}
