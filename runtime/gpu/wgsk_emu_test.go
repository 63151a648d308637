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
// values; then the same for fp8_wgsk2's pairs (each block's producer
// multicasting its half of the activation rows into both blocks' buffers
// and barriers, whose phase must be that stage's; each consumer warp
// freeing a buffer on both blocks' empty barriers; a buffer's every box
// must hold the stage a consumer reads).
func TestWgskEmulated(t *testing.T) {
	for _, inflight := range []int{0, 1} {
		for _, c := range []struct{ M, N, K, G int }{
			{65, 256, 128*5 + 64, 1}, {65, 256, 128*5 + 64, 3}, {100, 128, 128 * 7, 5}, {128, 384, 256, 6},
			{129, 256, 128 * 3, 2}, {200, 128, 128*4 + 16, 7}, {256, 256, 128 * 2, 4}, {90, 128, 128 * 9, 9},
			{70, 256, 128 * 11, 21}, {250, 128, 128 * 10, 10},
		} {
			wgskEmulate(t, c.M, c.N, c.K, c.G, inflight, 1)
		}
		// fp8_wgsk2: pairs (G blocks, G / 2 clusters) on 256-row tiles
		for _, c := range []struct{ M, N, K, G int }{
			{65, 256, 128*5 + 64, 2}, {65, 256, 128*5 + 64, 6}, {100, 256, 128 * 9, 10}, {129, 512, 128 * 3, 4},
			{200, 256, 128*4 + 16, 14}, {256, 512, 256, 8}, {70, 512, 128 * 11, 42}, {250, 256, 128 * 10, 20},
			{65, 256, 128 * 20, 2}, {200, 512, 128*9 + 32, 2}, {129, 256, 128 * 13, 4}, // the rings wrap
		} {
			wgskEmulate(t, c.M, c.N, c.K, c.G, inflight, 2)
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

// wgskEmulate is one shape of TestWgskEmulated on G blocks in clusters of
// cl (1: fp8_wgsk; 2: fp8_wgsk2, G / 2 pairs, each block its 128 rows of
// the pair's 256-row tiles and half the activation rows, multicast to
// both blocks' buffers and barriers; every consumer warp arrives on both
// blocks' empty barriers).
func wgskEmulate(t *testing.T, M, N, K, G, inflight, cl int) {
	const rb, BM = wgRowBytes, wgskBM
	TR := wgskRows[0]
	if M > TR {
		TR = wgskRows[1]
	}
	NT, TB, XH := TR/8, BM*cl, TR/cl
	WB, SB, ST := BM*rb, wgskStageBytes(TR), wgskStages(TR)
	rng := rand.New(rand.NewPCG(uint64(M*7+G+cl), uint64(K)))
	qw, qx := emuOperands(rng, M, N, K)
	SPT := (K + rb - 1) / rb
	tiles := N / TB
	Gc := max(1, min(G/cl, tiles*SPT)) // clusters (the split's blocks)
	G = cl * Gc
	sps := make([]*emuSplit, cl) // each rank's split and partial slots (the kernel's part + rank Gc 2 BM TR)
	for r := range sps {
		sps[r] = newEmuSplit(tiles*SPT, Gc, SPT, BM, TR)
	}
	first := sps[0].first
	if cl*len(sps[0].part)*4 > wgskPartBytes(G) {
		t.Fatalf("M=%d N=%d K=%d: the partials of %d blocks overrun wgskPartBytes", M, N, K, G)
	}
	addr := emuSwizzled
	out, written, done := make([]int, M*N), make([]int, M*N), make([]int, N/BM) // rank r's counter of tile t at done[cl t + r]
	NV := (M + 7) / 8
	type waiter struct {
		b, r, tile int
		own        []int // wk_keep's values of the block's share, at wgskPartAt's places
	}
	var waiting []waiter // blocks at wk_sum's wait, their last tile
	// share is wk_sum's float4s [i0, i1) of a tile for cluster b's block
	// of rank r, and the tile's clusters b0..b1, C of them, P summing it
	share := func(r, b, tile int) (i0, i1, b0, b1, C, P int) {
		sp := sps[r]
		b0, b1 = sp.blockOf(tile*SPT), sp.blockOf((tile+1)*SPT-1)
		C, P = b1-b0+1, b1-b0
		if sp.first(b1+1) == (tile+1)*SPT {
			P++
		}
		p := b - b0
		return p * NV / P, (p + 1) * NV / P, b0, b1, C, P
	}
	emptyCount, arrival := wgskConsumers, 128 // a warpgroup's arrivals on its block's barrier
	if cl > 1 {
		emptyCount, arrival = cl*wgskConsumers/32, 4 // a warp's on each block's
	}
	for _, b := range rng.Perm(Gc) {
		u0, n := first(b), first(b+1)-first(b)
		// each block's buffers, the stage each box of them holds (box 0
		// the weights, 1 + h activation half h; -1: none), barriers
		smem, holds := make([][]int, cl), make([][][]int, cl)
		full, empty := make([][]emuBarrier, cl), make([][]emuBarrier, cl)
		for r := range cl {
			smem[r] = make([]int, ST*SB)
			for i := range smem[r] {
				smem[r][i] = 1 << 20 // never copied: would show in the sums
			}
			holds[r] = make([][]int, ST)
			full[r], empty[r] = make([]emuBarrier, ST), make([]emuBarrier, ST)
			for i := range ST {
				holds[r][i] = make([]int, 1+cl)
				for h := range holds[r][i] {
					holds[r][i][h] = -1
				}
				full[r][i] = emuBarrier{count: 1, pending: 1}
				empty[r][i] = emuBarrier{count: emptyCount, pending: emptyCount}
			}
		}
		// tma lands stage j's box of rows [r0, r0+rows) of src (lim rows of
		// K bytes), bytes [k0, k0 + 128), at offset dst of block c's buffer
		// s (its box `box`), counted in at c's full barrier, whose phase
		// must be stage j's
		tma := func(c, s, j, box, dst int, src []int, lim, r0, rows, k0 int) {
			if full[c][s].phases != j/ST {
				t.Fatalf("M=%d N=%d K=%d G=%d cl %d cluster %d: stage %d's box lands on block %d's barrier in phase %d", M, N, K, G, cl, b, j, c, full[c][s].phases)
			}
			for r := range rows {
				for k := range rb {
					val := 0
					if r0+r < lim && k0+k < K {
						val = src[(r0+r)*K+k0+k]
					}
					smem[c][s*SB+addr(dst, r, k)] = val
				}
			}
			holds[c][s][box] = j
			full[c][s].land(rows * rb)
		}
		nextJ := make([]int, cl) // each producer's next stage
		produce := func(r int) bool {
			j := nextJ[r]
			if j >= n {
				return false
			}
			s := j % ST
			if j >= ST && !empty[r][s].passed(((j/ST)&1)^1) {
				return false
			}
			u := u0 + j
			tile, ks := u/SPT, u%SPT
			full[r][s].arrive(1, SB) // expect_tx
			tma(r, s, j, 0, 0, qw, N, tile*TB+r*BM, BM, ks*rb)
			for c := range cl { // cl 2: this block's half, into both
				tma(c, s, j, 1+r, WB+r*XH*rb, qx, M, r*XH, XH, ks*rb)
			}
			nextJ[r]++
			return true
		}
		// a consumer warpgroup's state
		type consumer struct {
			j, pend      int     // its next stage; the stage it is done with but has not freed (-1: none; WK_INFLIGHT 1)
			tile, ks, k0 int     // the tile it accumulates, its stage there, the block's first stage of it
			D            [][]int // D[weight row - 64 c][activation row]
			atSync       bool    // waiting at the tile's end for the other
		}
		zero := func(c *consumer) {
			c.D = make([][]int, 64)
			for r := range c.D {
				c.D[r] = make([]int, TR)
			}
		}
		cs := make([][]*consumer, cl) // cs[block][warpgroup]
		for r := range cl {
			cs[r] = make([]*consumer, 2)
			for i := range cs[r] {
				cs[r][i] = &consumer{pend: -1, tile: u0 / SPT, ks: u0 % SPT, k0: u0 % SPT}
				zero(cs[r][i])
			}
		}
		group := func(r, c, j int) { // block r's consumer c's wgmma group on stage j
			s := j % ST
			for box, h := range holds[r][s] {
				if h != j {
					t.Fatalf("M=%d N=%d K=%d G=%d cl %d cluster %d: block %d's consumer %d reads stage %d but its buffer's box %d holds %d", M, N, K, G, cl, b, r, c, j, box, h)
				}
			}
			wb, xb := s*SB+64*c*rb, s*SB+WB
			for q := range rb / 32 {
				for row := range 64 {
					for nn := range TR {
						sum := 0
						for k := range 32 {
							sum += smem[r][addr(wb+32*q, row, k)] * smem[r][addr(xb+32*q, nn, k)]
						}
						cs[r][c].D[row][nn] += sum
					}
				}
			}
		}
		release := func(s int) { // a warpgroup is done with buffer s: its arrivals on every block's empty barrier
			for c := range cl {
				empty[c][s].arrive(arrival, 0)
			}
		}
		// flush: block r's consumers' accumulators of tile, held from stage
		// k0 to k1, through each thread's registers as frag_out and the
		// slots use them (rows 16 warp + l/4 (+8) of each warpgroup's 64)
		flush := func(r, tile, k0, k1 int, final bool) {
			whole := k0 == 0 && k1 == SPT-1
			o0, o1 := 0, 0 // the share this block sums and keeps (final)
			if !whole && final {
				o0, o1, _, _, _, _ = share(r, b, tile)
			}
			own := make([]int, BM*TR)
			for i := range own {
				own[i] = 1 << 22 // not kept: would show in the sums
			}
			for c := range 2 {
				emuFragRegs(NT, func(tid, i, row, m int) {
					val, nn := cs[r][c].D[row][m], tile*TB+r*BM+64*c+row
					at := ((i/4)*wgskConsumers+128*c+tid)*4 + i%4 // float4 i/4 of consumer thread 128 c + tid
					switch {
					case whole && m < M:
						out[m*N+nn] = val
						written[m*N+nn]++
					case !whole && i/4 >= o0 && i/4 < o1: // wk_keep
						own[at] = val
					case !whole && i/4 < NV: // wk_store_part
						sps[r].part[sps[r].slot(b, tile)+at] = val
					}
				})
			}
			if !whole {
				done[cl*tile+r]++
				if final {
					waiting = append(waiting, waiter{b, r, tile, own})
				}
			}
		}
		consume := func(r, ci int) bool {
			c := cs[r][ci]
			if c.atSync || c.j >= n {
				return false
			}
			j, s := c.j, c.j%ST
			if !full[r][s].passed((j / ST) & 1) {
				return false
			}
			if c.pend >= 0 { // WK_INFLIGHT 1: the group before still read its buffer until this wait
				group(r, ci, c.pend)
			}
			end := c.ks == SPT-1 || j == n-1
			if c.pend >= 0 {
				release(c.pend % ST)
			}
			c.pend = j
			if inflight == 0 || end {
				group(r, ci, j)
				release(s)
				c.pend = -1
			}
			c.j++
			c.atSync = end
			if !end {
				c.ks++
			}
			return true
		}
		// each actor's weight in the order they are tried: some run far
		// ahead of others (a slow consumer of one block, a fast producer
		// of the other), as the protocol must allow
		weight := make([]float64, 3*cl)
		for i := range weight {
			weight[i] = []float64{1, 8, 64}[rng.IntN(3)]
		}
		busy := func() bool {
			for r := range cl {
				for _, c := range cs[r] {
					if c.j < n || c.atSync {
						return true
					}
				}
			}
			return false
		}
		for busy() {
			met := false
			for r := range cl {
				c0, c1 := cs[r][0], cs[r][1]
				if c0.atSync && c1.atSync { // wk_sync: both at the tile's end
					if c0.tile != c1.tile || c0.ks != c1.ks || c0.k0 != c1.k0 {
						t.Fatalf("M=%d N=%d K=%d G=%d cl %d cluster %d block %d: the consumers meet at different tiles", M, N, K, G, cl, b, r)
					}
					flush(r, c0.tile, c0.k0, c0.ks, c0.j == n)
					for _, c := range cs[r] {
						zero(c)
						c.atSync = false
						c.tile, c.ks, c.k0 = c.tile+1, 0, 0
					}
					met = true
				}
			}
			if met {
				continue
			}
			progressed := false
			for _, a := range emuOrder(rng, weight) { // per block: its producer (0) and two consumers
				r, who := a/3, a%3
				if who == 0 && produce(r) || who > 0 && consume(r, who-1) {
					progressed = true
					break
				}
			}
			if !progressed {
				t.Fatalf("M=%d N=%d K=%d G=%d cl %d inflight %d cluster %d: deadlock (producers at %v, consumers at %d %d ...)", M, N, K, G, cl, inflight, b, nextJ, cs[0][0].j, cs[0][1].j)
			}
		}
	}
	for _, i := range rng.Perm(len(waiting)) {
		w := waiting[i]
		b, r, tile := w.b, w.r, w.tile
		i0, i1, b0, b1, C, P := share(r, b, tile)
		d := &done[cl*tile+r]
		if *d < C {
			t.Fatalf("M=%d N=%d K=%d G=%d cl %d: cluster %d's block %d waits for tile %d's %d partials, %d counted: it would wait forever", M, N, K, G, cl, b, r, tile, C, *d)
		}
		if *d++; *d == C+P {
			*d = 0
		}
		for f := i0; f < i1; f++ { // wk_sum: float4 f of every consumer thread
			for row := range BM {
				for m := 8 * f; m < min(8*f+8, M); m++ {
					sum := 0
					for bb := b0; bb <= b1; bb++ {
						if bb == b {
							sum += w.own[wgskPartAt(row, m)]
						} else {
							sum += sps[r].part[sps[r].slot(bb, tile)+wgskPartAt(row, m)]
						}
					}
					out[m*N+tile*TB+r*BM+row] = sum
					written[m*N+tile*TB+r*BM+row]++
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
