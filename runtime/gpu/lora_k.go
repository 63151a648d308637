package gpu

import (
	"errors"

	"github.com/peftd/peftd/kernels"
	"github.com/peftd/peftd/runtime/cuda"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
)

// The LoRA update inside the product's K (ws_body's LORA in
// kernels/common.cuh: fp8_wsl_n*, gemm_wsl_n*).
//
// Beside a decode step's products the LoRA stream costs more than its
// bytes: PERFORMANCE v0.84's FP8 16-row trace has four rank-32 adapters
// adding 16.6 µs a layer against 7.2 for their 21 MB, most of it the
// products running beside the shrink and expand on fewer SMs, the expand
// writing an update and the op after it reading it back. A product of at
// most 64 rows on a ws kernel can instead take the update as more of its
// K: each row's shrink S (its own adapter's columns, zero elsewhere) times
// the adapters' B rows, added by the same MMAs into the same sums before
// they are rounded. The shrink runs in the same launch (a shrink warp a
// block takes ticketed items beside the product: see common.cuh), so the
// group is one kernel on every SM, with no update buffer, no fork and
// join, and no SMs held back.
//
// loraK takes a group where its product has a ws plan (1-64 rows; the
// plain kernels, not the half-row or fused ones) and the table fits the
// kernel's bounds (loraKFits); everything else keeps the other paths.

// LX_* in kernels/common.cuh.
const (
	lxMaxSlots = 32    // table slots
	lxMaxRank  = 64    // an entry's rank
	lxCols     = 1024  // S's columns: slices x the slots' ranks rounded to 8
	lxKMax     = 16384 // K at most
	lxCtr      = 4 + 3*lxMaxSlots
)

// lxKC is LX_KC, the K values a shrink item sums (512 unless
// PEFTD_KERNEL_DEFINES sets it), lxKSMax the K chunks at most, lxWarps
// LX_WARPS, the shrink warps a block beside the warpgroup (1 unless set):
// the A/Bs of the shrink's shape.
var (
	lxKC    = max(8, kernels.DefinedInt("LX_KC", 512))
	lxKSMax = lxKMax / lxKC
	lxWarps = max(1, kernels.DefinedInt("LX_WARPS", 1))
)

// lxStatic is room for a wsl kernel's static shared memory (WsLoraMap and
// the ws scales: 6 KB as compiled) beside its stages within the card's
// limit.
const lxStatic = 8 << 10

// loraKAuto is kernelForce.loraK's default: off until measured
// (PERFORMANCE v0.86).
const loraKAuto = false

// loraKDefault is loraKAuto, or what PEFTD_LORA_K=on|off says (the whole
// engine's A/B).
func loraKDefault() bool { return envOnOff("PEFTD_LORA_K", loraKAuto) }

// lxBuffers are the wsl kernels' scratch: the shrink's partials and sums
// and the launch's counters (zero between launches: the last block leaves
// them so).
type lxBuffers struct{ part, s, ctr *cuda.DeviceBuffer }

// newLXBuffers allocates a wsl launcher's scratch (8.1 MB with LX_KC 512).
func newLXBuffers(ctx *cuda.Context, s *cuda.Stream) (lxBuffers, error) {
	var l lxBuffers
	var err error
	if l.part, err = ctx.Alloc(4 * lxKSMax * wsMaxRows * lxCols); err != nil {
		return l, err
	}
	if l.s, err = ctx.Alloc(2 * wsMaxRows * lxCols); err != nil {
		return l, errors.Join(err, l.free())
	}
	if l.ctr, err = allocZero(ctx, s, 4*lxCtr); err != nil {
		return l, errors.Join(err, l.free())
	}
	return l, nil
}

// free releases the scratch (nil-safe).
func (l *lxBuffers) free() error {
	var err error
	for _, d := range []**cuda.DeviceBuffer{&l.part, &l.s, &l.ctr} {
		if e := (*d).Free(); e != nil && err == nil {
			err = e
		}
		*d = nil
	}
	return err
}

// wslArgs is what a wsl launch reads of the step's LoRA: x in bf16 (the
// shrink's input), the table and each row's slot, the layer's entries
// (entry(slot, slice) = table[base + slot stride + ms[slice]]), the
// slices' first output columns (off1, off2: N past the last) and the
// table's slots.
type wslArgs struct {
	x, table, rows      cuda.DevicePtr
	base, stride        int
	ms                  [3]int
	nslices, off1, off2 int
	slots               int
}

// launchLoRA enqueues out [T, N] = x [T, K] . w [N, K]^T (times sx[t]
// sw[n] where sx is set) plus each row's LoRA update (la) with plan p on s:
// the plan's wsl kernel (loaded), the plain kernel's plan.
func (g *wsProduct) launchLoRA(s *cuda.Stream, p wsPlan, out, x, sx, w, sw cuda.DevicePtr, T, N, K int, la wslArgs) error {
	if err := g.check(p, out, x, w, T, N, K); err != nil {
		return err
	}
	if g.lfn[p.i] == nil || g.lx.ctr == nil {
		return errors.New("gpu: ws product with the LoRA update: kernel not loaded")
	}
	bn := wsWidths[p.i]
	return g.lfn[p.i].Launch(s, cuda.Dim3{X: N / bn, Y: p.split, Z: 1}, cuda.Dim3{X: 128 + 32*lxWarps, Y: 1, Z: 1}, wsShared(bn, g.esize),
		g.args(out, x, sx, w, sw, T, N, K, uint64(la.x), uint64(la.table), uint64(la.rows), la.base, la.stride, la.ms[0], la.ms[1], la.ms[2],
			la.nslices, la.off1, la.off2, la.slots, uint64(g.lx.part.Ptr()), uint64(g.lx.s.Ptr()), uint64(g.lx.ctr.Ptr()))...)
}

// loraKFits reports whether the table fits a wsl launch of a group of
// nslices slices reading k values a row: at most lxMaxSlots slots, every
// loaded adapter's ranks multiples of 8 of at most lxMaxRank, their
// columns (each slot's largest rank) within lxCols for every slice, and K
// within the shrink's chunks.
func (b *Backend) loraKFits(nslices, k int) bool {
	if len(b.slots) > lxMaxSlots || k%8 != 0 || k > lxKMax {
		return false
	}
	cols := 0
	for _, st := range b.slots {
		if st == nil {
			continue
		}
		if st.odd || st.maxRank > lxMaxRank {
			return false
		}
		cols += (st.maxRank + 7) &^ 7
	}
	return nslices*cols <= lxCols
}

// loraK enqueues the product of w and the group's update in one wsl
// launch and reports whether it did: where kernelForce.loraK (or its
// default) says so, the step has adapters, the product has a ws plan
// with the kernel loaded, and the table fits (loraKFits); false leaves
// the group to the other paths.
func (b *Backend) loraK(out, in engine.Buffer, w engine.Weight, layer int, mods []llama.Module) bool {
	if !forcedOn(b.force.loraK, b.loraKOn) || b.err != nil || !b.stepLoRA() || layer < 0 || layer >= b.cfg.Layers || len(mods) > 3 {
		return false
	}
	g := b.wsFor(w)
	if g == nil {
		return false
	}
	o, x := buf(out), buf(in)
	n, k := weightShape(w)
	offs, ms, inF, same := b.groupSlices(mods)
	if !same || inF != k || offs[len(mods)] != n || x.cols != k || o.cols != n || o == x || !o.whole() || !x.whole() || !b.loraKFits(len(mods), k) {
		return false
	}
	T := b.rows()
	g.half, g.early = false, b.wsEarly(x)
	g.SetSMTarget(0) // nothing runs beside it
	p, ok := g.planFrom(T, n, k, 1)
	if !ok || g.lfn[p.i] == nil {
		return false
	}
	b.join()
	b.wrote(out)
	b.la.forkIn = 0 // no update on the LoRA stream
	b.gateLayer(b.s, layer)
	base, stride := b.tableRows(layer)
	off1, off2 := slices12(offs)
	la := wslArgs{x: ptr(x), table: b.table.Ptr(), rows: b.rowLora(), base: base, stride: stride, ms: ms, nslices: len(mods),
		off1: off1, off2: off2, slots: len(b.slots)}
	b.loraKs++
	if fw, isFP8 := w.(*fp8Weight); isFP8 {
		f := b.f8
		if err := f.dropStaging(); err != nil {
			b.fail(err)
			return true
		}
		if err := f.prepare(ptr(x), T, k, b.gen); err != nil {
			b.fail(err)
			return true
		}
		b.fail(g.launchLoRA(b.s, p, ptr(o), f.actQ.Ptr(), f.actS.Ptr(), fw.q.Ptr(), fw.scale.Ptr(), T, n, k, la))
		return true
	}
	b.fail(g.launchLoRA(b.s, p, ptr(o), ptr(x), 0, w.(*weight).mem.Ptr(), 0, T, n, k, la))
	return true
}
