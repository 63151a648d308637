package gpu

import (
	"math/rand/v2"
	"testing"
)

// TestWgskEmulated runs wgsk_body's index arithmetic and its ring's
// mbarrier protocol (kernels/wgsk.cuh: fp8_wgsk) on the CPU with integers
// for the operands, each block in turn (in a shuffled order, so any of a
// shared tile's blocks may finish it), its producer and two consumer
// warpgroups interleaved at random:
//   - two producers, the weight boxes' (WST slots) and the activation
//     boxes' (XST slots), each ask for stage j's box once its slot's
//     `empty` barrier's phase of parity ((j / S) & 1) ^ 1 has completed (j
//     >= S, S its ring's slots), as the kernel's try_wait.parity does; the
//     TMA's boxes land in the slot in the 128-byte swizzle (row r at r *
//     128, its 16-byte chunk c at c ^ (r % 8)), zeros past K and past M's
//     activation rows; a slot's `full` completes when its one arrival and
//     its box's bytes are in;
//   - a consumer waits for both slots' full phases of parity (j / S) & 1,
//     its group reads them by descriptor as the PTX ISA defines the
//     K-major 128-byte swizzle (its 64 weight rows from 64 c of the weight
//     slot, the TR activation rows of the activation slot), and with
//     WK_INFLIGHT 1 the group still reads them until the consumer's next
//     wait: the slots must hold the same stage then;
//   - it arrives on both empties (128 arrivals a warpgroup, 256 complete a
//     phase) as the kernel does, and at a tile's end both meet (wk_sync)
//     to store it whole or through the partial slots and the per-tile
//     counters.
//
// The result must be the plain product, each output written once and every
// counter back at zero, for a tile inside one block, tiles shared by two or
// more blocks, a last stage past K, activation rows past M, both variants
// and both WK_INFLIGHT values.
func TestWgskEmulated(t *testing.T) {
	for _, inflight := range []int{0, 1} {
		for _, c := range []struct{ M, N, K, G int }{
			{65, 256, 128*5 + 64, 1}, {65, 256, 128*5 + 64, 3}, {100, 128, 128 * 7, 5}, {128, 384, 256, 6},
			{129, 256, 128 * 3, 2}, {200, 128, 128*4 + 16, 7}, {256, 256, 128 * 2, 4}, {90, 128, 128 * 9, 9},
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
	WB, XB, WST, XST := wgskWBytes(), wgskXBytes(TR), wgskWStages(TR), wgskXStages
	rng := rand.New(rand.NewPCG(uint64(M*7+G), uint64(K)))
	qw, qx := emuOperands(rng, M, N, K)
	SPT := (K + rb - 1) / rb
	tiles := N / BM
	G = min(G, tiles*SPT)
	sp := newEmuSplit(tiles*SPT, G, SPT, BM, TR)
	sp.at = wgskPartAt
	first, part, slot, addr := sp.first, sp.part, sp.slot, emuSwizzled
	if len(part)*4 > wgskPartBytes(G) {
		t.Fatalf("M=%d N=%d K=%d: the partials of %d blocks overrun wgskPartBytes", M, N, K, G)
	}
	out, written, done := make([]int, M*N), make([]int, M*N), make([]int, tiles)
	for _, b := range rng.Perm(G) {
		u0, n := first(b), first(b+1)-first(b)
		wr, xr := newEmuRing(WST, WB), newEmuRing(XST, XB)
		// produce: ring r's producer asks for its next stage's box (rows
		// [r0, r0+rows) of src, lim rows of K bytes, from row0(tile)) if
		// its slot is free
		produce := func(r *emuRing, src []int, lim, rows int, row0 func(tile int) int) bool {
			j := r.next
			if j >= n {
				return false
			}
			S := len(r.full)
			s := j % S
			if j >= S && !r.empty[s].passed(((j/S)&1)^1) {
				return false
			}
			u := u0 + j
			tile, ks := u/SPT, u%SPT
			r.full[s].arrive(1, r.bytes) // expect_tx
			r.stageOf[s] = j
			r0 := row0(tile)
			for rr := range rows {
				for k := range rb {
					val := 0
					if r0+rr < lim && ks*rb+k < K {
						val = src[(r0+rr)*K+ks*rb+k]
					}
					r.smem[s*r.bytes+addr(0, rr, k)] = val
				}
			}
			r.full[s].land(rows * rb)
			r.next++
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
			sw, sx := j%WST, j%XST
			if wr.stageOf[sw] != j || xr.stageOf[sx] != j {
				t.Fatalf("M=%d N=%d K=%d G=%d block %d: consumer %d reads stage %d but its slots hold %d and %d", M, N, K, G, b, c, j, wr.stageOf[sw], xr.stageOf[sx])
			}
			wb, xb := sw*WB+64*c*rb, sx*XB
			for q := range rb / 32 {
				for r := range 64 {
					for nn := range TR {
						sum := 0
						for k := range 32 {
							sum += wr.smem[addr(wb+32*q, r, k)] * xr.smem[addr(xb+32*q, nn, k)]
						}
						cs[c].D[r][nn] += sum
					}
				}
			}
		}
		// flush: both consumers' accumulators of tile, held from stage k0
		// to k1, through each thread's registers as frag_out and the slots
		// use them (rows 16 warp + l/4 (+8) of each warpgroup's 64)
		flush := func(tile, k0, k1 int) {
			whole := k0 == 0 && k1 == SPT-1
			for c := range 2 {
				emuFragRegs(NT, func(tid, i, row, m int) {
					val, n := cs[c].D[row][m], tile*BM+64*c+row
					if !whole { // wk_store_part: float4 i/4 of consumer thread 128 c + tid
						part[slot(b, tile)+((i/4)*wgskConsumers+128*c+tid)*4+i%4] = val
					} else if m < M {
						out[m*N+n] = val
						written[m*N+n]++
					}
				})
			}
			if !whole {
				sp.finish(tile, M, N, out, written, done)
			}
		}
		consume := func(ci int) bool {
			c := cs[ci]
			if c.atSync || c.j >= n {
				return false
			}
			j := c.j
			if !wr.full[j%WST].passed((j/WST)&1) || !xr.full[j%XST].passed((j/XST)&1) {
				return false
			}
			release := func(j int) { // both slots' empty, from this warpgroup's 128 threads
				wr.empty[j%WST].arrive(128, 0)
				xr.empty[j%XST].arrive(128, 0)
			}
			if c.pend >= 0 { // WK_INFLIGHT 1: the group before still read its buffer until this wait
				group(ci, c.pend)
			}
			end := c.ks == SPT-1 || j == n-1
			if c.pend >= 0 {
				release(c.pend)
			}
			c.pend = j
			if inflight == 0 || end {
				group(ci, j)
				release(j)
				c.pend = -1
			}
			c.j++
			c.atSync = end
			if !end {
				c.ks++
			}
			return true
		}
		for cs[0].j < n || cs[1].j < n || cs[0].atSync || cs[1].atSync {
			if cs[0].atSync && cs[1].atSync { // wk_sync: both at the tile's end
				if cs[0].tile != cs[1].tile || cs[0].ks != cs[1].ks || cs[0].k0 != cs[1].k0 {
					t.Fatalf("M=%d N=%d K=%d G=%d block %d: the consumers meet at different tiles", M, N, K, G, b)
				}
				flush(cs[0].tile, cs[0].k0, cs[0].ks)
				for _, c := range cs {
					zero(c)
					c.atSync = false
					c.tile, c.ks, c.k0 = c.tile+1, 0, 0
				}
				continue
			}
			progressed := false
			for _, a := range rng.Perm(4) {
				if a == 2 && produce(wr, qw, N, BM, func(tile int) int { return tile * BM }) ||
					a == 3 && produce(xr, qx, M, TR, func(int) int { return 0 }) || a < 2 && consume(a) {
					progressed = true
					break
				}
			}
			if !progressed {
				t.Fatalf("M=%d N=%d K=%d G=%d inflight %d block %d: deadlock (producers at stages %d and %d, consumers at %d and %d)", M, N, K, G, inflight, b, wr.next, xr.next, cs[0].j, cs[1].j)
			}
		}
	}
	emuCheck(t, qx, qw, out, written, done, M, N, K, G, G)
}

// emuRing is one of wgsk_body's rings: its slots' shared memory (bytes a
// slot), the stage each slot holds (-1: none), their full and empty
// barriers, and its producer's next stage.
type emuRing struct {
	bytes       int
	smem        []int
	stageOf     []int
	full, empty []emuBarrier
	next        int
}

func newEmuRing(slots, bytes int) *emuRing {
	r := &emuRing{bytes: bytes, smem: make([]int, slots*bytes), stageOf: make([]int, slots),
		full: make([]emuBarrier, slots), empty: make([]emuBarrier, slots)}
	for i := range r.smem {
		r.smem[i] = 1 << 20 // never copied: would show in the sums
	}
	for i := range slots {
		r.stageOf[i] = -1
		r.full[i] = emuBarrier{count: 1, pending: 1}
		r.empty[i] = emuBarrier{count: wgskConsumers, pending: wgskConsumers}
	}
	return r
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
