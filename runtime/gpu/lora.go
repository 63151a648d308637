package gpu

import (
	"fmt"
	"math/bits"

	"github.com/peftd/peftd/kernels"
	"github.com/peftd/peftd/runtime/cuda"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/lora"
)

const entryWords = 4 // a, b, rank|scale, pad: struct LoraEntry in llama.cu

func (b *Backend) entry(slot, layer int, m llama.Module) int {
	return (slot*b.cfg.Layers+layer)*int(llama.NumModules) + int(m)
}

// tableRows is where layer's entries start in the table (base: slot 0's)
// and the entries between consecutive slots (stride), as the SGMV kernels
// take them: entry(slot, layer, m) = base + slot*stride + m.
func (b *Backend) tableRows(layer int) (base, stride int) {
	return layer * int(llama.NumModules), b.cfg.Layers * int(llama.NumModules)
}

// LoadAdapter copies an adapter's A and B matrices (bf16, exact ranks) into
// one device allocation for the slot and points the slot's table entries at
// them, on the engine goroutine (PrepareAdapter and LoadPrepared do the same
// off it).
func (b *Backend) LoadAdapter(slot int, a *lora.Adapter) error {
	if slot < 0 {
		return fmt.Errorf("gpu: slot %d", slot)
	}
	img, err := b.slotLayout(a)
	if err != nil {
		return err
	}
	if err := b.emptySlot(slot); err != nil {
		return err
	}
	host := make([]uint16, img.total)
	img.fill(host, 0, a)
	st := &slotState{maxRank: img.maxRank, odd: img.odd}
	if st.mem, err = b.ctx.Alloc(2 * len(host)); err != nil {
		return fmt.Errorf("gpu: adapter %s: %w", a.Name, err)
	}
	b.pointSlot(slot, st.mem.Ptr(), img.ents)
	if err := cuda.CopyHtoD(b.s, st.mem.Ptr(), host); err != nil {
		st.mem.Free()
		b.clearSlot(slot)
		return err
	}
	b.slots[slot] = st
	return b.syncTable()
}

func (b *Backend) clearSlot(slot int) {
	if slot < len(b.slots) && b.slots[slot] != nil {
		b.slots[slot].mem.Free()
		b.pins.onSlot(b.slots[slot].pin, -1)
		b.slots[slot] = nil
	}
	n := b.cfg.Layers * int(llama.NumModules) * entryWords
	clear(b.tableHost[slot*n : (slot+1)*n])
}

func (b *Backend) growTable(slots int) error {
	n := slots * b.cfg.Layers * int(llama.NumModules) * entryWords
	if len(b.tableHost) >= n {
		return nil
	}
	b.tableHost = append(b.tableHost, make([]uint64, n-len(b.tableHost))...)
	b.table.Free()
	var err error
	b.table, err = b.ctx.Alloc(8 * n)
	return err
}

// syncTable uploads the LoRA table and sizes the shrink scratch for the largest rank.
func (b *Backend) syncTable() error {
	b.maxRank, b.oddRank = 0, false
	for _, s := range b.slots {
		if s != nil {
			b.maxRank = max(b.maxRank, s.maxRank)
			b.oddRank = b.oddRank || s.odd
		}
	}
	if need := b.tmpFloats()*4 + sgCtrBytes; b.loraTmp == nil || b.loraTmp.Size() < need {
		// sized for the rank class (64, 128, ...: rankClass, scratchRank at least), so that loads up to it
		// never free the old scratch: cuMemFree waits for the whole device,
		// an adapter upload still in flight included (LoadPrepared would
		// wait for the image it commits early)
		b.loraTmp.Free()
		var err error
		if b.loraTmp, err = b.ctx.Alloc(4*b.tmpFloatsFor(max(rankClass(b.maxRank), scratchRank)) + sgCtrBytes); err != nil {
			return err
		}
	}
	// the fused kernels' counters sit after the scratch, whose size follows
	// maxRank: zero them where they now are (stream-ordered after any launch)
	if err := b.s.Memset32(b.loraCtr(), 0, sgCtrBytes/4); err != nil {
		return err
	}
	if !b.sgTried && b.maxRank > 0 {
		b.sgTried = true
		b.loadSgmv()
	}
	if err := cuda.CopyHtoD(b.s, b.table.Ptr(), b.tableHost); err != nil {
		return err
	}
	return b.s.Synchronize()
}

// UnloadAdapter frees the slot's device weights.
func (b *Backend) UnloadAdapter(slot int) error {
	if slot < 0 || slot >= len(b.slots) || b.slots[slot] == nil {
		return nil
	}
	if err := b.s.Synchronize(); err != nil {
		return err
	}
	if err := b.settle(slot); err != nil {
		return err
	}
	b.clearSlot(slot)
	return b.syncTable()
}

// LoRA adds each row's adapter update for the fused group mods (their
// outputs side by side in out). When the LoRA stream may take it (aside),
// the update runs there beside the group's GEMM, into the delta buffer, and
// the next op that reads out adds it; otherwise shrink and expand run on
// the compute stream and add it in place.
func (b *Backend) LoRA(out, in engine.Buffer, layer int, mods []llama.Module) {
	b.join()
	b.wrote(out)
	if !b.ok() || !b.stepLoRA() {
		return
	}
	o, x := buf(out), buf(in)
	if !b.check(len(mods) >= 1 && len(mods) <= 3, "lora: %d projections in one group", len(mods)) {
		return
	}
	offs, _, inF, same := b.groupSlices(mods)
	if !b.check(same, "lora: %v read different widths", mods) {
		return
	}
	total := offs[len(mods)]
	if !b.check(x.cols == inF && o.cols == total, "lora %v: widths %d -> %d, want %d -> %d", mods, x.cols, o.cols, inF, total) {
		return
	}
	if b.asideOK() && b.la.forkIn == ptr(x) && b.sgmvOK(x, mods, total, 0) {
		b.loraAside(o, x, layer, mods, total)
		return
	}
	b.loraSlices(b.s, ptr(o), o.ld, x, layer, mods, accAdd)
}

// loraAside is the LoRA stream and the update it computes beside a GEMM.
//
// Linear records fork on the compute stream just before a GEMM (forkIn is
// the GEMM's input); LoRA of the same input then has the LoRA stream wait
// for fork, compute the group's update into delta (float32, so that adding
// it later rounds once, as the update in place does; zero for projections
// an adapter lacks; rows without an adapter are not written and the ops
// skip them) and record join. The update is pending until an op reads the
// projection's output: SiLUMul, Attention (rope_store) and AddRMSNorm fold
// it into their own reads (fuse); any other op first adds it with
// add_delta (join). Either way the compute
// stream waits for join first, so recorded graphs fork and join the LoRA
// stream the same way. The next group's update starts only after the next
// GEMM's fork, which follows the op that consumed this one: delta and the
// LoRA scratch are free again by then.
type loraAside struct {
	on         bool // Options.SerialLoRA unset
	sms        int  // Options.LoRASMs (-1: autoLoRASMs)
	s          *cuda.Stream
	fork, join *cuda.Event
	forkIn     cuda.DevicePtr // input of the GEMM fork was recorded before (0: none)
	delta      *cuda.DeviceBuffer
	rows, cols int // delta holds rows x cols float32 values
	pend       pendingDelta
}

// pendingDelta is an update on the LoRA stream not yet added to its output:
// columns [0, cols) of the rows at base (ld values apart) get delta
// (float32, rows cols apart).
type pendingDelta struct {
	base, delta cuda.DevicePtr
	ld, cols    int
	half        bool      // delta holds bf16 values (guHalf): only SiLUMul reads it (silu_mul_h / _o2h / _clh)
	local       bool      // computed on the compute stream (lora_inline.go): nothing to wait for
	lora        *loraPend // not expanded (delta 0): rope_store_lora expands it (lora_rope.go), any other op in place
}

// alloc sizes delta for rows rows of the widest fused group.
func (a *loraAside) alloc(ctx *cuda.Context, rows int, cfg *llama.Config) error {
	cols := 0
	for _, g := range llama.FusedGroups {
		w := 0
		for _, m := range g {
			_, out := cfg.Dims(m)
			w += out
		}
		cols = max(cols, w)
	}
	var err error
	if a.delta, err = ctx.Alloc(max(4*rows*cols, 256)); err != nil {
		return fmt.Errorf("gpu: LoRA update buffer: %w", err)
	}
	a.rows, a.cols = rows, cols
	return nil
}

// loraSMsFor is the SMs the GEMMs of a step of rows rows leave to the LoRA
// stream (productSMs: the q/k/v product's may differ).
func (b *Backend) loraSMsFor(rows int) int {
	if b.la.sms < 0 {
		return autoLoRASMs(rows)
	}
	return b.la.sms
}

// asideOK reports whether the step's LoRA updates may run on the LoRA stream.
func (b *Backend) asideOK() bool {
	return b.la.on && b.la.delta != nil && b.stepLoRA() && b.rows() <= b.la.rows
}

// forkAt marks the compute stream's position before a GEMM reading x: a
// LoRA update of x may start there.
func (b *Backend) forkAt(x *Buffer) {
	b.la.forkIn = 0
	if !b.asideOK() || b.err != nil {
		return
	}
	if b.joinMode() > 2 {
		b.g.capture.source(b.s) // the fork's source: the op before the GEMM (pdljoin.go)
	}
	if err := b.la.fork.Record(b.s); err != nil {
		b.fail(err)
		return
	}
	b.la.forkIn = ptr(x)
}

// loraAside enqueues the update of group mods on the LoRA stream into delta.
func (b *Backend) loraAside(o, x *Buffer, layer int, mods []llama.Module, total int) {
	b.la.forkIn = 0
	d := b.la.delta.Ptr()
	if b.joinMode() > 2 {
		b.g.capture.waits(b.la.s) // the fork's consumer: the update's first kernel (pdljoin.go)
	}
	b.fail(b.la.s.Wait(b.la.fork))
	pend := pendingDelta{base: ptr(o), delta: d, ld: o.ld, cols: total}
	if b.la.s.ProgrammaticLaunch() && b.oNoPDL(mods) {
		b.fail(b.la.s.SetProgrammaticLaunch(false))
		defer func() { b.fail(b.la.s.SetProgrammaticLaunch(true)) }()
	}
	// The shrink alone where RoPE expands the update (lora_rope.go); else
	// shrink and expand into delta.
	if tc := b.tcChunks(mods); b.ropeFold(mods, tc) {
		pend = b.pendLoRA(o, layer, mods, tc, b.loraShrink(b.la.s, x, layer, mods), false)
	} else {
		acc := accFloat
		if pend.half = b.halfUpdate(mods, tc); pend.half {
			acc = accHalf
		}
		b.loraSlices(b.la.s, d, total, x, layer, mods, acc)
	}
	if b.err == nil {
		b.fail(b.la.join.Record(b.la.s))
	}
	if b.err == nil {
		b.la.pend = pend
	}
}

// oNoPDL reports whether group mods is o and its LoRA kernels launch
// without PDL (kernelForce.oNoPDL; by default in FP8 steps of more than
// fp8MidRows rows). In an FP8 step the o product launches after
// quant_rows_e4m3, a few µs after the attention the LoRA stream forks at:
// the update's expand, launched programmatically under its shrink, had its
// blocks on nearly every SM by then, and the product (a block a whole SM)
// waited for them to leave (PERFORMANCE v0.78's trace: 4.9 µs a layer in
// 240-row mixed steps; without PDL mixed steps 9.26 -> 9.14 ms, 256 rows
// 13.42 -> 13.28, 16 and 64 rows within 0.3%).
func (b *Backend) oNoPDL(mods []llama.Module) bool {
	return len(mods) == 1 && mods[0] == llama.O && forcedOn(b.force.oNoPDL, b.f8 != nil && b.rows() > fp8MidRows)
}

// join adds a pending update to its output (after the LoRA stream's work).
func (b *Backend) join() {
	p := b.la.pend
	if p.delta == 0 && p.lora == nil {
		return
	}
	b.la.pend = pendingDelta{}
	if b.err != nil {
		return
	}
	b.waitUpdate(p)
	if l := p.lora; l != nil { // an op other than RoPE reads it: expanded in place
		b.expandTC(b.s, l.tc, p.base, p.ld, l.offs, l.ms, l.base, l.stride, l.tStride, l.ks, accAdd)
		b.gen++
		return
	}
	n := b.rows() * p.cols
	f := b.fn.addDelta
	if p.half { // a bf16 update (halfUpdate) no op fused
		f = b.fn.addDeltaH
	}
	b.launch(f, cuda.Dim3{X: max(1, min((n+255)/256, 4096))}, cuda.Dim3{X: 256}, p.base, p.delta, b.rowLora(), b.rows(), p.cols, p.ld)
	b.gen++
}

// waitUpdate has the compute stream wait for the LoRA stream's update; in a
// recording the wait's source and the kernel after it are noted for
// pdljoin.go.
func (b *Backend) waitUpdate(p pendingDelta) {
	if p.local {
		return
	}
	b.g.capture.source(b.la.s)
	b.g.capture.waits(b.s)
	b.fail(b.s.Wait(b.la.join))
}

// fuse hands an op that reads views (which together cover the pending
// update's output exactly) each view's part of the update and the
// update's row stride, after the LoRA stream's work; with no pending
// update it returns nil; with one the views do not cover, it joins it
// first and returns nil. The update is float32 (fuseHalf: SiLUMul,
// AddRMSNorm and RoPE may also take a bf16 one).
func (b *Backend) fuse(views ...*Buffer) ([]cuda.DevicePtr, int) {
	d, ld, _ := b.fuseHalf(false, views...)
	return d, ld
}

// fuseHalf is fuse for an op that reads bf16 updates too where half is
// set; it reports whether the update it hands over is bf16.
func (b *Backend) fuseHalf(half bool, views ...*Buffer) ([]cuda.DevicePtr, int, bool) {
	p := b.la.pend
	if p.lora != nil || (p.half && !half) {
		b.join()
		return nil, 0, false
	}
	if p.delta == 0 {
		return nil, 0, false
	}
	size := cuda.DevicePtr(4) // bytes an update value
	if p.half {
		size = 2
	}
	d := make([]cuda.DevicePtr, len(views))
	n := 0
	for i, v := range views {
		if v == nil || ptr(v) < p.base || v.ld != p.ld || int(ptr(v)-p.base)/2+v.cols > p.cols {
			b.join()
			return nil, 0, false
		}
		d[i] = p.delta + size*((ptr(v)-p.base)/2) // the update of a bf16 view
		n += v.cols
	}
	if n != p.cols {
		b.join()
		return nil, 0, false
	}
	b.la.pend = pendingDelta{}
	if b.err != nil {
		return nil, 0, false
	}
	b.waitUpdate(p)
	return d, p.cols, p.half
}

// rowLora is the device array of each row's adapter slot (-1: none).
func (b *Backend) rowLora() cuda.DevicePtr { return b.i32(b.off.rowLora) }

// opStart is where an op that may write a buffer begins: a pending update
// lands first and no GEMM input is marked any more.
func (b *Backend) opStart() {
	b.join()
	b.gen++
	b.la.forkIn = 0
}

// wrote tells the FP8 path that x may change (a Linear or LoRA output):
// a quantized copy of it is stale.
func (b *Backend) wrote(x engine.Buffer) {
	if b.f8 != nil && x != nil && b.f8.cIn == ptr(buf(x)) {
		b.f8.invalidate()
	}
}

// sgTileRows is SG_TR in llama.cu: rows per SGMV tile.
const sgTileRows = 16

// SGMV v2 limits, as in kernels/sgmv.cu: threads per block, output columns
// per expand item, tiles and slots*slices staged in shared memory.
const (
	sgFuThreads  = 256
	sgFuCols     = 2 * sgFuThreads
	sgFuMaxTiles = 128
	sgFuMaxEnt   = 192
	sgCtrBytes   = 64 // ticket, shrink items done, blocks done (+ pad)
	// v2 is chosen when the step's LoRA rows fill its tiles to at least this
	// many rows on average: below it (T = 1; 4 adapters at T = 8; 16 adapters
	// up to T = 64) v2 measured 0.82-0.97x of v1 on the H100, above it
	// 1.02-1.36x (docs/PERFORMANCE.md, v0.6).
	sgV2MinRows = 6
)

// sgLoaded is the fused SGMV module's load, started by New.
type sgLoaded struct {
	m   *cuda.Module
	err error
}

// loadSgmv takes the fused SGMV module New started loading (waiting for it
// if it is still compiling), or loads it (compiling it on a cold cache,
// default kernel options). A failure is kept in sgErr, not returned: v1
// then runs. It must not run on the context's executor (inside Run or
// Do): the load New started needs that thread to finish, so waiting for
// it there would never end. Adapter loads and unloads call it from the
// engine goroutine, outside Run.
func (b *Backend) loadSgmv() {
	var m *cuda.Module
	var err error
	if b.sgLoad != nil {
		r := <-b.sgLoad
		b.sgLoad = nil
		m, err = r.m, r.err
	} else {
		m, _, err = kernels.Load(b.ctx, kernels.Sgmv, kernels.Options{ContextFree: b.ctxFree})
	}
	if err == nil {
		var f1, f4 *cuda.Function
		if f1, err = m.Function("sgmv_fused1"); err == nil {
			if f4, err = m.Function("sgmv_fused4"); err == nil {
				b.sgMod, b.sgFused = m, [2]*cuda.Function{f1, f4}
				return
			}
		}
		m.Unload()
	}
	b.sgErr = fmt.Errorf("gpu: SGMV v2 unavailable, using v1: %w", err)
}

// loraCtr is the fused kernels' counters: sgCtrBytes after the scratch.
func (b *Backend) loraCtr() cuda.DevicePtr { return b.loraTmp.Ptr() + uint64(4*b.tmpFloats()) }

// tmpFloats is the size of the LoRA scratch: room for three fused slices at
// the largest rank for every row, times 4 for K-split partial sums.
func (b *Backend) tmpFloats() int { return b.tmpFloatsFor(b.maxRank) }

// loraAcc is how an SGMV expand writes its update to the output rows: the
// kernels' acc argument.
type loraAcc int

const (
	accFloat loraAcc = 0 // written as float32, for a later fused add (pendingDelta)
	accAdd   loraAcc = 1 // added in place to the bf16 output
	accHalf  loraAcc = 2 // written as bf16 (sgmv_expand_tch*, guHalf)
)

// tmpFloatsFor is tmpFloats for adapters of rank up to r.
func (b *Backend) tmpFloatsFor(r int) int { return 4 * b.maxT * 3 * max(r, 1) }

// loraSlices adds the LoRA updates of up to three projections that read the
// same input x (fused q/k/v or gate/up) to the output rows at outPtr (row
// stride outStride elements), the projections' outputs side by side in
// mods order. Segments come from the step's metadata.
func (b *Backend) loraSlices(st *cuda.Stream, outPtr cuda.DevicePtr, outStride int, x *Buffer, layer int, mods []llama.Module, acc loraAcc) {
	if !b.ok() || !b.stepLoRA() {
		return
	}
	if !b.check(len(mods) >= 1 && len(mods) <= 3 && layer >= 0 && layer < b.cfg.Layers && acc >= accFloat && acc <= accHalf, "lora: %d slices, layer %d, acc %d", len(mods), layer, acc) {
		return
	}
	b.gateLayer(st, layer)
	offs, ms, inF, same := b.groupSlices(mods)
	if !b.check(same, "lora: fused projections read different widths") {
		return
	}
	total := offs[len(mods)]
	if !b.check(x.cols >= inF && outStride >= total, "lora: input width %d < %d or output stride %d < %d", x.cols, inF, outStride, total) {
		return
	}
	base, stride := b.tableRows(layer)
	if !b.sgmvOK(x, mods, outStride, outPtr) {
		if !b.check(acc == accAdd, "lora: the row-at-a-time kernels only add in place") {
			return
		}
		rows, slots := b.i32(b.off.loraRows), b.i32(b.off.loraSlots)
		for i, m := range mods {
			_, outF := b.cfg.Dims(m)
			b.launchOn(st, b.fn.shrink, cuda.Dim3{X: b.nLora, Y: (b.stepRank + 7) / 8}, cuda.Dim3{X: 256},
				b.stepTmp, ptr(x), b.table, rows, slots, base+int(m), stride, inF, x.ld, b.stepRank)
			b.launchOn(st, b.fn.expand, cuda.Dim3{X: b.nLora, Y: (outF + 255) / 256}, cuda.Dim3{X: 256},
				outPtr+uint64(2*offs[i]), b.stepTmp, b.table, rows, slots, base+int(m), stride, outF, outStride, b.stepRank)
		}
		return
	}
	off1, off2 := slices12(offs)
	T := b.rows()
	tStride := len(mods) * b.stepRank
	sp := b.shrinkPlan(st, inF, len(mods))
	nb, rankTiles, ks, kchunk := sp.nb, sp.rankTiles, sp.ks, sp.kchunk
	tiles := b.i32(b.off.tiles)
	// v2: one launch, blocks taking shrink items first and expand items
	// (512 output columns of one tile) after them; see kernels/sgmv.cu.
	tc := b.tcChunks(mods)
	v2 := !b.graphLayout && (b.force.loraV2 || (!b.force.loraV1 && tc == 0 && b.nLora >= sgV2MinRows*b.nTiles))
	if !b.check(acc != accHalf || (tc > 0 && !v2), "lora: a bf16 update (accHalf) needs the tensor-core expand") {
		return
	}
	if f := b.sgFused[nb/32]; f != nil && v2 && b.nTiles <= sgFuMaxTiles && len(b.slots)*len(mods) <= sgFuMaxEnt {
		nShrink := b.nTiles * len(mods) * rankTiles * ks
		grid := nShrink + b.nTiles*((total+sgFuCols-1)/sgFuCols)
		shmem := max(8*sgTileRows*nb*4, sgTileRows*len(mods)*((b.stepRank+7)&^7)*4)
		if shmem > 39<<10 && shmem > b.fusedShmem { // 8.2 KB of static shared memory besides
			for _, g := range b.sgFused {
				if err := g.SetMaxDynamicShared(shmem); err != nil {
					b.fail(err)
					return
				}
			}
			b.fusedShmem = shmem
		}
		if b.err != nil {
			return
		}
		b.fail(f.Launch(st, cuda.Dim3{X: grid}, cuda.Dim3{X: sgFuThreads}, shmem,
			outPtr, b.stepTmp, ptr(x), b.table, tiles, b.loraCtr(), b.nTiles, len(b.slots), base, stride,
			ms[0], ms[1], ms[2], len(mods), rankTiles, ks, kchunk, nShrink, off1, off2, total,
			b.stepRank, inF, x.ld, outStride, tStride, T, int(acc)))
		return
	}
	b.launchShrink(st, sp, x, base, stride, ms, inF, len(mods))
	if tc > 0 {
		b.expandTC(st, tc, outPtr, outStride, offs, ms, base, stride, tStride, ks, acc)
		return
	}
	shmem := sgTileRows * len(mods) * ((b.stepRank + 7) &^ 7) * 4 // [16][slices * rank rounded up to 8] floats
	if shmem > 48<<10 && shmem > b.expandShmem {
		if err := b.fn.sgExpand.SetMaxDynamicShared(shmem); err != nil {
			b.fail(err)
			return
		}
		b.expandShmem = shmem
	}
	if b.err != nil {
		return
	}
	b.fail(b.fn.sgExpand.Launch(st, cuda.Dim3{X: b.nTiles, Y: (total + 255) / 256}, cuda.Dim3{X: 128}, shmem,
		outPtr, b.stepTmp, b.table, tiles, base, stride, ms[0], ms[1], ms[2], len(mods), off1, off2, total,
		b.stepRank, outStride, tStride, T, ks, int(acc)))
}

// stepLoRA reports whether the step runs a LoRA update: rows with an
// adapter, and a rank class for them.
func (b *Backend) stepLoRA() bool { return b.nLora > 0 && b.stepRank > 0 }

// sgShrinkPlan is an SGMV shrink launch's shape: the kernel, its rank rows
// a block (nb), rank tiles, K parts (ks) and K columns a part (kchunk); big:
// sgmv_shrink64 on the step's tiles of sgBigRows rows.
type sgShrinkPlan struct {
	f                         *cuda.Function
	nb, rankTiles, ks, kchunk int
	big                       bool
	shmem                     int // dynamic shared memory (sgmv_shrink64p's ring)
}

// sgBigRows is sgmv_shrink64's rows a tile (SB_ROWS in llama.cu), and
// sgBigMinRows the LoRA rows from which a step's shrinks take it. H200,
// FP8, four rank-32 adapters, device ms a step with it and without: 128
// rows 6.96 vs 6.73, 256 rows 11.13 vs 11.22; the 4 x 512 prefill's LoRA
// 317.7 vs 327.5 µs a layer (v0.61).
const (
	sgBigRows    = 64
	sgBigMinRows = 256
)

// sbpShared is sgmv_shrink64p's dynamic shared memory (SBP_SHARED in
// llama.cu: 4 stages x 12 pieces x 256 threads x 16 bytes), and
// shrinkPipeAuto whether the big shrinks take it by default where a block
// may have that much (sm_90, sm_100: 227 KB; not sm_86 / sm_89 / sm_120).
const (
	sbpShared      = 4 * 12 * 256 * 16
	shrinkPipeAuto = true
)

// shrinkBig reports whether the step's shrinks run as sgmv_shrink64
// (kernelForce.shrink64: 1 always, -1 never). It gives sgmv_shrink's bits,
// so this is a choice of speed alone.
func (b *Backend) shrinkBig() bool {
	return b.fn.sgShrink64 != nil && forcedOn(b.force.shrink64, b.nLora >= sgBigMinRows)
}

// fp8KChunk is the shrinks' K piece in FP8 decode steps of fp8KChunkRows
// rows (the LoRA stream beside fp8_ws): fewer, longer shrink blocks than
// covering the SMs twice. H200, four rank-32 adapters, device ms a step at
// 24 / 32 / 48 rows: 3.85 / 4.03 / 4.44 against 3.92 / 4.08 / 4.50
// (PERFORMANCE v0.70; v0.69 measured the same at 32 / 48 twice); 64 rows
// even, 16 rows 1.6% slower; bf16 steps within 0.2%.
const fp8KChunk = 2048

var fp8KChunkRows = [2]int{wsMinRows, 48}

// fp8KChunkBig is the shrinks' K piece in FP8 steps of more than
// fp8KChunkBigAbove rows (mixed steps, large decode batches), in place of
// bigShrinkSplit's parts. H100, four rank-32 adapters, device ms a step
// (PERFORMANCE v0.96): mixed (64 decode rows + a 176-token prompt) 7.09 /
// 7.06 -> 6.96 / 6.96 in two runs (K pieces of 2,048: 7.00, of 4,096:
// 7.29, of 512: 7.07), 128 rows 8.50 -> 8.48, 256 rows 12.80 -> 12.70.
const (
	fp8KChunkBig      = 1024
	fp8KChunkBigAbove = 64
)

// shrinkPlan is the shrink of a group of n projections reading inF
// columns, on stream st.
func (b *Backend) shrinkPlan(st *cuda.Stream, inF, n int) sgShrinkPlan {
	T := b.rows()
	tStride := n * b.stepRank
	// Rank rows per shrink block: 32 when the tiles are well filled (each x
	// tile is then read once per 32 ranks, not per 8), else 8 for more blocks.
	p := sgShrinkPlan{f: b.fn.sgShrink, nb: 8}
	tiles := b.nTiles
	switch {
	case b.shrinkBig():
		p.f, p.nb, p.big, tiles = b.fn.sgShrink64, 32, true, b.nBig
		if b.sbpFits && forcedOn(b.force.shrinkPipe, shrinkPipeAuto) {
			p.f, p.shmem = b.fn.sgShrink64P, sbpShared
		}
	case !b.graphLayout && b.nLora >= 8*b.nTiles && b.nTiles*n >= 16:
		p.f, p.nb = b.fn.sgShrink4, 32
	}
	p.rankTiles = (b.stepRank + p.nb - 1) / p.nb
	blocks := tiles * n * p.rankTiles
	// Split K across blocks until the grid covers the SMs about twice over
	// (sgmv_shrink64: whole waves, bigShrinkSplit), keeping at least 512
	// columns per block and the partials in the scratch.
	groups := (inF + 255) / 256
	sms := b.baseSMs() // the SMs st's kernels run on
	if st == b.la.s {
		sms = b.loraStreamSMs()
	}
	ksMax := min(max(1, groups/2), max(1, b.stepTmpFloats/(T*tStride)))
	ks := max(1, (2*sms+blocks-1)/blocks)
	if p.big {
		ks = bigShrinkSplit(blocks, sms, ksMax)
	}
	kc := b.force.loraKChunk
	if kc == 0 && b.f8 != nil && T >= fp8KChunkRows[0] && T <= fp8KChunkRows[1] {
		kc = fp8KChunk
	}
	if kc == 0 && b.f8 != nil && T > fp8KChunkBigAbove {
		kc = fp8KChunkBig
	}
	if kc > 0 {
		ks = (inF + kc - 1) / kc
	}
	ks = min(ks, ksMax)
	p.kchunk = (groups + ks - 1) / ks * 256
	p.ks = (inF + p.kchunk - 1) / p.kchunk
	return p
}

// bigShrinkSplit is the K parts of a sgmv_shrink64 grid of blocks tiles x
// slices x rank tiles on sms SMs (one block an SM: sgmv_shrink64's 200
// registers a thread, sgmv_shrink64p's 192 KB), at most ksMax: the one with the least time in waves of equal
// blocks, ceil(blocks*ks/sms) * (1/ks + 1/16) in units of one unsplit
// block's work (1/16: a block's fixed cost, its start, A's first loads
// and the reduction; the fewest parts among equal times). Rounding
// blocks*ks up to whole waves is what this weighs: the 4 x 512 prefill's
// q/k/v shrink (96 blocks) took 2 parts (192 blocks: two waves on 132
// SMs, the second 45% full) where 4 give three full waves; gate/up (64
// blocks) 3 -> 2 parts, down (32) 5 -> 4.
func bigShrinkSplit(blocks, sms, ksMax int) int {
	const fixed = 16 // a block's fixed cost: 1/fixed of an unsplit block
	best, bestWaves := 1, (blocks+sms-1)/sms
	for ks := 2; ks <= ksMax; ks++ {
		waves := (blocks*ks + sms - 1) / sms
		// waves * (fixed + ks) / ks < bestWaves * (fixed + best) / best
		if waves*(fixed+ks)*best < bestWaves*(fixed+best)*ks {
			best, bestWaves = ks, waves
		}
	}
	return best
}

// launchShrink enqueues shrink plan sp on st: the ranks of group slices
// ms (n of them, table entries from base, stride apart a slot) of x's
// inF columns, into the step's LoRA scratch (sp.ks K parts).
func (b *Backend) launchShrink(st *cuda.Stream, sp sgShrinkPlan, x *Buffer, base, stride int, ms [3]int, inF, n int) {
	tiles, nTiles := b.off.tiles, b.nTiles
	if sp.big {
		tiles, nTiles = b.off.bigTiles, b.nBig
	}
	switch sp.f {
	case b.fn.sgShrink64:
		b.shrinkBigs++
	case b.fn.sgShrink64P:
		b.shrinkPipes++
	}
	b.launchShmOn(st, sp.f, cuda.Dim3{X: nTiles, Y: n * sp.rankTiles, Z: sp.ks}, cuda.Dim3{X: 256}, sp.shmem,
		b.stepTmp, ptr(x), b.table, b.i32(tiles), base, stride, ms[0], ms[1], ms[2], sp.rankTiles, b.stepRank,
		inF, x.ld, n*b.stepRank, b.rows(), sp.kchunk)
}

// expandTC launches sgmv_expand_tc{tc} on st: the update of the group
// whose projections' outputs start at offs (offs[len] is the width) in rows
// outStride values apart at outPtr, from the step's LoRA scratch (ks K
// parts, tStride floats a row), written as acc says (accHalf:
// sgmv_expand_tch{tc}).
func (b *Backend) expandTC(st *cuda.Stream, tc int, outPtr cuda.DevicePtr, outStride int, offs []int, ms [3]int, base, stride, tStride, ks int, acc loraAcc) {
	n := len(offs) - 1
	total := offs[n]
	off1, off2 := slices12(offs)
	// sgmv_expand_tc64s (stageOut): the rank-32 class on the step's
	// 64-row tiles with the output tile staged, for an update added in
	// place into 16-byte aligned rows (sgmv_expand_tch1s, halfStage: a bf16
	// update into such rows)
	aligned := outStride%8 == 0 && outPtr%16 == 0
	big := acc == accAdd && aligned && forcedOn(b.force.stageOut, stageOutAuto && b.nLora >= stageOutMinRows) && tc == 1 && b.nBig > 0
	// blocks per slice of sgmv_expand_tc{tc}; blk1, blk2: where slices 1 and 2 start
	cols := tcBlockCols(tc)
	if big {
		cols = x64Cols
	}
	start := make([]int, n+1)
	for i := 0; i < n; i++ {
		start[i+1] = start[i] + (offs[i+1]-offs[i]+cols-1)/cols
	}
	grid := start[n]
	blk1, blk2 := slices12(start)
	f := b.fn.sgExpandTC[bits.TrailingZeros(uint(tc))]
	switch {
	case acc == accHalf && tc == 1 && aligned && forcedOn(b.force.halfStage, halfStageAuto && b.nLora >= halfStageMinRows):
		f = b.fn.sgExpandTCHS
		b.halfStageds++
	case acc == accHalf:
		f = b.fn.sgExpandTCH[bits.TrailingZeros(uint(tc))]
	}
	tiles, nTiles := b.off.tiles, b.nTiles
	if big {
		f, tiles, nTiles = b.fn.sgExpandTC64S, b.off.bigTiles, b.nBig
		b.expandStageds++
	}
	args := []any{outPtr, b.stepTmp, b.table, b.i32(tiles), base, stride, ms[0], ms[1], ms[2], blk1, blk2, off1, off2, total,
		b.stepRank, outStride, tStride, b.rows(), ks, int(acc)}
	if b.xtsBuild { // the PEFTD_EXPAND_TS build's stamps: the gate/up group's expand only
		var xts cuda.DevicePtr
		if b.expandTS != nil && n == 2 && offs[1] == b.cfg.Intermediate && total == 2*b.cfg.Intermediate && grid*nTiles <= xtsBlocks {
			xts = b.expandTS.Ptr()
		}
		args = append(args, xts)
	}
	b.launchOn(st, f, cuda.Dim3{X: grid, Y: nTiles}, cuda.Dim3{X: 256}, args...)
}

// xtsBlocks and xtsWords size the PEFTD_EXPAND_TS build's stamps: the
// blocks of a gate/up expand it records, and XTS_WORDS (llama.cu) a block.
const (
	xtsBlocks = 8192
	xtsWords  = 4
)

// stageOutMinRows is the LoRA rows from which the rank-32 class's expands
// adding in place run as sgmv_expand_tc64s where stageOutAuto is set.
// H100, TestLoRABench, four rank-32 adapters, µs a layer (PERFORMANCE
// v0.76, kernelForce.stageOut 1): the 4 x 512 prefill 292.2 against 345.5
// (tc1, the default) and 318.4 (tc64); at 8-256 rows it loses to tc1
// (256 rows 108.3 vs 77.8). v0.77 (H200, on by default): 4 x 256 = 1,024
// rows 159.6 against pre 169.2; 4 x 128 = 512 rows it would lose, 125.8
// against 107.6. The kernel gives tc1's bits (TestLoRAVariantsMatch,
// TestOpLoRAFused). kernelForce.stageOut 1 takes it at every row count,
// -1 at none.
const (
	stageOutMinRows = 1024
	stageOutAuto    = true
)

// halfStageAuto and halfStageMinRows are kernelForce.halfStage's default:
// the rank-32 class's bf16 updates (accHalf: gate/up always, o and down in
// FP8 steps) of steps of halfStageMinRows LoRA rows or more are written by
// sgmv_expand_tch1s, the output tile staged in shared memory and stored in
// 16-byte pieces of whole rows, not by tch1 (8 rows x 16 bytes a store
// instruction, half of each 32-byte sector). PERFORMANCE v0.94 (H100, four
// rank-32 adapters, device ms a step, `+hstage` against tch1): FP8 mixed
// steps (64 decode rows + a 176-token prompt) 7.11 against 7.28, FP8 64 /
// 256 rows 6.08 / 12.81 against 6.10 / 12.96, bf16 256 rows 15.08 against
// 15.23, FP8 serving with four adapters 9,368 against 9,153 tok/s; at 16
// rows the same (4.49 / 4.50); at one row it loses (3.74 against 3.61).
const (
	halfStageAuto    = true
	halfStageMinRows = 16
)

// x64Cols is X64_COLS in llama.cu: the output columns of an
// sgmv_expand_tc64s block.
const x64Cols = 128

// groupSlices is the layout of fused group mods (at most three
// projections): where each projection's output starts among the group's
// outputs (offs[len(mods)]: their width), the modules as the SGMV kernels
// take them (-1: the group has no such slice), and the width they read;
// same is false when the projections read different widths.
func (b *Backend) groupSlices(mods []llama.Module) (offs []int, ms [3]int, inF int, same bool) {
	ms = [3]int{-1, -1, -1}
	offs = make([]int, len(mods)+1)
	inF, _ = b.cfg.Dims(mods[0])
	for i, m := range mods {
		in, out := b.cfg.Dims(m)
		if in != inF {
			return offs, ms, inF, false
		}
		offs[i+1] = offs[i] + out
		ms[i] = int(m)
	}
	return offs, ms, inF, true
}

// slices12 is where slices 1 and 2 of a fused group begin, given the
// group's n+1 slice boundaries (the last: where the group ends, also the
// answer for a slice the group does not have).
func slices12(bounds []int) (int, int) {
	n := len(bounds) - 1
	a1, a2 := bounds[n], bounds[n]
	if n > 1 {
		a1 = bounds[1]
	}
	if n > 2 {
		a2 = bounds[2]
	}
	return a1, a2
}

// tcChunks is the 32-rank chunks of the tensor-core expand for the step's
// rank (1, 2 or 4), or 0 where it does not apply: a loaded adapter's rank
// is not a multiple of 8, or a projection's width is not, or the rank
// exceeds 128.
func (b *Backend) tcChunks(mods []llama.Module) int {
	if b.oddRank || b.force.loraV1 || b.stepRank > 128 {
		return 0
	}
	for _, m := range mods {
		if _, out := b.cfg.Dims(m); out%8 != 0 {
			return 0
		}
	}
	switch {
	case b.stepRank <= 32:
		return 1
	case b.stepRank <= 64:
		return 2
	}
	return 4
}

// tcBlockCols is the output columns one block of sgmv_expand_tc{kc} takes
// (TcShape in llama.cu): 8 warps x 8 columns x 8, 4 or 2 groups.
func tcBlockCols(kc int) int { return 64 * (8 / kc) }

// sgmvOK reports whether the SGMV kernels take group mods reading x into
// rows outStride values apart at outPtr (0: any aligned buffer): 16-byte
// input rows, even output widths, offsets and strides.
func (b *Backend) sgmvOK(x *Buffer, mods []llama.Module, outStride int, outPtr cuda.DevicePtr) bool {
	if b.force.loraRows || outStride%2 != 0 || outPtr%4 != 0 {
		return false
	}
	for _, m := range mods {
		if _, out := b.cfg.Dims(m); out%2 != 0 {
			return false
		}
	}
	return x.cols%8 == 0 && x.ld%8 == 0 && ptr(x)%16 == 0
}
