package gpu

import (
	"fmt"

	"github.com/peftd/peftd/runtime/cuda"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
)

// Dense LoRA: in steps of many rows, each fused group's update as cuBLASLt
// products over every adapter slot at once, instead of the SGMV kernels.
//
// Every (layer, module) keeps a stacked copy of the slots' adapters: A
// stacked by rows, [slots*rc][in] (slot s's rank rows at s*rc, zeros past
// its rank), and B side by side, [out][slots*rc]. A group's update is then
//
//	sraw = x A_stack^T                  (float32, T x slices*slots*rc)
//	sb   = lora_dense_mask(sraw)        (bf16: the row's own slot's columns, scaled; zeros elsewhere)
//	out[:, slice] (+)= sb[:, slice] B_stack^T   (one product per slice)
//
// so each row gets its own adapter's update, as SGMV computes it, with the
// rank values rounded to bf16 once (as PEFT rounds lora_A's output). The
// products read every slot's columns: slots*rc of them (denseMaxCols at
// most) cost FLOPs, not bytes, so the path pays off where the SGMV kernels
// are slow, at hundreds of rows (docs/PERFORMANCE.md v0.31).
//
// The stacks are copies of the slot images (lora_stack_fill, on the
// compute stream, once a slot's image is complete: refreshStacks), so
// adapter uploads stay as they are. A slot whose copy is stale (its upload
// still in flight) keeps the steps that use it on SGMV.

const (
	// denseMaxCols is the most stacked rank columns (slots x rank class) a
	// slice may have for the dense path: beyond it the products' FLOPs over
	// other slots' columns outgrow what SGMV costs.
	denseMaxCols = 256
	// denseRankMin is the smallest rank class of the stacks: adapters of
	// rank up to 32 share one layout (no re-stacking as ranks vary).
	denseRankMin = 32
	// denseMinRowsDefault is the fewest rows a step needs for the dense
	// path when Options.LoRADenseRows is 0.
	denseMinRowsDefault = 128
	// denseWorkspace is the dense products' own cuBLASLt workspace: they
	// run on the LoRA stream beside the compute stream's products.
	denseWorkspace = 8 << 20
)

// denseDst is one (layer, module)'s stacks: struct StackDst in llama.cu.
type denseDst struct {
	a, b    uint64
	in, out int32
}

// denseLoRA is the dense path's state.
type denseLoRA struct {
	minRows int          // steps of at least this many rows take it
	mm      *cuda.Matmul // the dense products' handle and workspace
	slots   int          // stacked slots (the engine's adapter slots)
	rc      int          // rank class of the stacks (0: none: the path is off)
	mem     *cuda.DeviceBuffer
	dst     *cuda.DeviceBuffer // denseDst per (layer, module)
	aOff    []uint64           // byte offset of (layer, module)'s A stack in mem
	bOff    []uint64           // and of its B stack
	sraw    *cuda.DeviceBuffer // float32 shrink output, maxT x 3*slots*rc
	sb      *cuda.DeviceBuffer // bf16 masked rank values, same shape
	fresh   []bool             // slot's stacks hold its adapter
	step    bool               // the step's LoRA ops take the dense path
	err     error              // why the stacks could not be made (the path stays off)
	fills   int                // stack fills enqueued (tests)
	ops     int                // group updates enqueued (tests)
}

// denseRank is the stacks' rank class for adapters of rank up to maxRank.
func denseRank(maxRank int) int { return max(denseRankMin, (maxRank+15)&^15) }

// denseOffsets lays out the stacks of slots slots at rank class rc: per
// layer, the A stacks of the seven modules in module order (a fused
// group's slices adjacent, so one product covers the group), then their B
// stacks. It returns each (layer, module)'s offsets and the total, in bytes.
func denseOffsets(cfg *llama.Config, slots, rc int) (aOff, bOff []uint64, total uint64) {
	n := cfg.Layers * int(llama.NumModules)
	aOff, bOff = make([]uint64, n), make([]uint64, n)
	for l := range cfg.Layers {
		for m := llama.Module(0); m < llama.NumModules; m++ {
			in, _ := cfg.Dims(m)
			aOff[l*int(llama.NumModules)+int(m)] = total
			total += uint64(2 * slots * rc * in)
		}
		for m := llama.Module(0); m < llama.NumModules; m++ {
			_, out := cfg.Dims(m)
			bOff[l*int(llama.NumModules)+int(m)] = total
			total += uint64(2 * out * slots * rc)
		}
	}
	return aOff, bOff, total
}

// denseBytes is the device memory of the dense path's stacks and scratch
// for slots adapter slots at rank class rc and maxT rows (0 when
// slots*rc exceeds denseMaxCols: the path is off).
func denseBytes(cfg *llama.Config, maxT, slots, rc int) uint64 {
	if slots <= 0 || slots*rc > denseMaxCols {
		return 0
	}
	_, _, total := denseOffsets(cfg, slots, rc)
	return total + uint64(maxT*3*slots*rc)*(4+2) + denseWorkspace
}

// denseOn reports whether steps of rows rows take the dense path (every
// slot they use fresh aside).
func (b *Backend) denseOn(rows int) bool {
	d := b.dense
	return d != nil && d.rc > 0 && d.minRows > 0 && rows >= d.minRows
}

// sizeDense makes (or re-makes, for a higher rank class) the stacks for
// the engine's slots. Called between steps; a failure turns the path off
// (d.err) and is not the step's.
func (b *Backend) sizeDense() {
	d := b.dense
	if d == nil || d.minRows <= 0 || d.err != nil {
		return
	}
	rc := denseRank(b.maxRank)
	if d.rc == rc || (d.rc > rc && d.rc > 0) {
		return
	}
	if d.slots*rc > denseMaxCols {
		d.freeStacks()
		return
	}
	if err := b.allocDense(rc); err != nil {
		d.freeStacks()
		d.err = err
	}
}

// allocDense allocates zeroed stacks of rank class rc (every slot stale).
func (b *Backend) allocDense(rc int) error {
	d := b.dense
	d.freeStacks()
	aOff, bOff, total := denseOffsets(b.cfg, d.slots, rc)
	var err error
	if d.mem, err = b.ctx.Alloc(int(total)); err != nil {
		return fmt.Errorf("gpu: dense LoRA stacks (%d MB): %w", total>>20, err)
	}
	// zeros: a slot never filled must add nothing (a NaN in B would reach
	// every row through the expand's zero rank values)
	if err := b.s.Memset8(d.mem.Ptr(), 0, int(total)); err != nil {
		return err
	}
	w := b.maxT * 3 * d.slots * rc
	if d.sraw, err = b.ctx.Alloc(4 * w); err != nil {
		return err
	}
	if d.sb, err = b.ctx.Alloc(2 * w); err != nil {
		return err
	}
	dst := make([]denseDst, len(aOff))
	for i := range dst {
		in, out := b.cfg.Dims(llama.Module(i % int(llama.NumModules)))
		dst[i] = denseDst{a: d.mem.Ptr() + aOff[i], b: d.mem.Ptr() + bOff[i], in: int32(in), out: int32(out)}
	}
	if d.dst, err = b.ctx.Alloc(24 * len(dst)); err != nil {
		return err
	}
	if err := cuda.CopyHtoD(b.s, d.dst.Ptr(), dst); err != nil {
		return err
	}
	if err := b.s.Synchronize(); err != nil { // dst's host copy goes out of scope
		return err
	}
	d.rc, d.aOff, d.bOff = rc, aOff, bOff
	clear(d.fresh)
	return nil
}

func (d *denseLoRA) freeStacks() {
	for _, p := range []**cuda.DeviceBuffer{&d.mem, &d.dst, &d.sraw, &d.sb} {
		(*p).Free()
		*p = nil
	}
	d.rc, d.step = 0, false
	clear(d.fresh)
}

// close frees the stacks and the handle.
func (d *denseLoRA) close() error {
	if d == nil {
		return nil
	}
	d.freeStacks()
	return d.mm.Close()
}

// staleSlot marks slot's stacks out of date (its table entries changed).
func (b *Backend) staleSlot(slot int) {
	if d := b.dense; d != nil && slot >= 0 && slot < len(d.fresh) {
		d.fresh[slot] = false
	}
}

// refreshStacks (before a step's ops, after waitLoads) copies every loaded
// slot whose stacks are stale and whose image is complete into the
// stacks, on the compute stream (after the image's copies and the table
// upload), and reports whether every slot meta uses is fresh.
func (b *Backend) refreshStacks(meta *engine.StepMeta) (bool, error) {
	d := b.dense
	if d == nil {
		return false, nil
	}
	b.sizeDense()
	if d.rc == 0 {
		return false, nil
	}
	for slot, st := range b.slots {
		if st == nil || slot >= len(d.fresh) || d.fresh[slot] || b.imageInFlight(slot) {
			continue
		}
		per := b.cfg.Layers * int(llama.NumModules)
		if err := b.fn.stackFill.Launch(b.s, cuda.Dim3{X: 64, Y: per}, cuda.Dim3{X: 256}, 0,
			b.table, d.dst, slot, d.slots, d.rc, per); err != nil {
			return false, err
		}
		d.fresh[slot] = true
		d.fills++
	}
	for _, g := range meta.LoRA {
		if g.End > g.Start && (g.Slot >= len(d.fresh) || !d.fresh[g.Slot]) {
			return false, nil
		}
	}
	return true, nil
}

// imageInFlight reports whether slot's image may still be copying: a
// pending load the compute stream does not yet wait for as a whole.
func (b *Backend) imageInFlight(slot int) bool {
	for _, l := range b.loads {
		if l.slot == slot && !l.waited {
			return true
		}
	}
	return false
}

// loraDense is loraSlices' dense path: group mods' update of x into the
// output at outPtr (float32 rows outStride apart, or with accum bf16 rows
// it adds to), on stream st; offs are the slices' output offsets.
func (b *Backend) loraDense(st *cuda.Stream, outPtr cuda.DevicePtr, outStride int, x *Buffer, layer int, mods []llama.Module, offs []int, accum bool) {
	d := b.dense
	d.ops++
	T, sr := b.rows(), d.slots*d.rc
	w := len(mods) * sr
	inF, _ := b.cfg.Dims(mods[0])
	e := layer*int(llama.NumModules) + int(mods[0])
	sms := 0
	if st == b.la.s {
		sms = b.loraSMs() // the SMs the compute stream's products leave
	}
	d.mm.SetSMTarget(sms)
	b.fail(d.mm.GemmTNStrided(st, d.sraw.Ptr(), cuda.R32F, w, ptr(x), cuda.R16BF, x.ld, d.mem.Ptr()+d.aOff[e], cuda.R16BF, inF, T, w, inF, 1, 0))
	ms := [3]int{int(mods[0]), -1, -1}
	for i := 1; i < len(mods); i++ {
		ms[i] = int(mods[i])
	}
	base, stride := layer*int(llama.NumModules), b.cfg.Layers*int(llama.NumModules)
	b.launchOn(st, b.fn.denseMask, cuda.Dim3{X: (w + 255) / 256, Y: T}, cuda.Dim3{X: 256},
		d.sb.Ptr(), d.sraw.Ptr(), b.rowLora(), b.table, d.slots, d.rc, w, base, stride, ms[0], ms[1], ms[2])
	outType, elem, beta := cuda.R32F, 4, float32(0)
	if accum {
		outType, elem, beta = cuda.R16BF, 2, 1
	}
	for i, m := range mods {
		if b.err != nil {
			return
		}
		_, outF := b.cfg.Dims(m)
		bp := d.mem.Ptr() + d.bOff[layer*int(llama.NumModules)+int(m)]
		b.fail(d.mm.GemmTNStrided(st, outPtr+uint64(elem*offs[i]), outType, outStride, d.sb.Ptr()+uint64(2*i*sr), cuda.R16BF, w, bp, cuda.R16BF, sr, T, outF, sr, 1, beta))
	}
}
