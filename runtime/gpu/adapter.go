package gpu

import (
	"errors"
	"fmt"
	"math"
	"sort"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/peftd/peftd/internal/parallel"

	"github.com/peftd/peftd/runtime/cuda"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/lora"
)

// Asynchronous adapter loads (engine.AdapterPreparer). PrepareAdapter runs on
// the caller's goroutine while steps run: it allocates the slot's device
// image and starts streaming the adapter into it through the uploader's
// ring of pinned chunks (converting each chunk to bf16 as the previous one
// is copied) on a goroutine of its own, the driver calls on the context's
// second thread, so neither a step nor the thread that issues it waits for
// it, and no memory is pinned after Init. It returns at once.
// LoadPrepared runs on the engine goroutine between steps: it points the
// LoRA table at the image. Steps that do not use the slot never wait for
// it. The first step whose LoRA segments use it while the upload is under
// way runs its ops eagerly (in the layout its graph would have) and waits
// layer by layer: before a layer's LoRA ops the host waits until that
// layer's part of the image (laid out in layer order) is enqueued, and the
// stream until it has landed, so the step's first layers overlap the fill
// and the copies of the last ones.

// The uploader's ring: 4 pinned chunks of 16 MiB (64 MiB pinned at Init).
const (
	stageChunks     = 4
	stageChunkBytes = 16 << 20
)

// StagingRingBytes is the pinned host memory of the adapter staging ring.
const StagingRingBytes = stageChunks * stageChunkBytes

// adapterAlign is the element alignment of each A and B matrix in a slot image.
const adapterAlign = 128

type prepEntry struct {
	layer, module, aOff, bOff, rank int
	scale                           float32
}

// slotImage is the layout of an adapter's slot image: total bf16 values,
// each A and B at its entry's offsets.
type slotImage struct {
	total, maxRank int
	odd            bool // some rank is not a multiple of 8 (no tensor-core expand)
	ents           []prepEntry
}

// slotLayout checks an adapter against the model and lays out its slot image.
func (b *Backend) slotLayout(a *lora.Adapter) (slotImage, error) {
	var img slotImage
	if b.cfg == nil {
		return img, fmt.Errorf("gpu: backend not initialized")
	}
	if len(a.Layers) != b.cfg.Layers {
		return img, fmt.Errorf("gpu: adapter %s has %d layers, model has %d", a.Name, len(a.Layers), b.cfg.Layers)
	}
	for l, lay := range a.Layers {
		for m, p := range lay {
			if p == nil {
				continue
			}
			in, out := b.cfg.Dims(llama.Module(m))
			na, nb := p.Len()
			if na != p.Rank*in || nb != out*p.Rank {
				return img, fmt.Errorf("gpu: adapter %s: %s has A %d and B %d values for rank %d, want %d and %d",
					a.Name, llama.Module(m), na, nb, p.Rank, p.Rank*in, out*p.Rank)
			}
			e := prepEntry{layer: l, module: m, aOff: img.total, rank: p.Rank, scale: p.Scale}
			img.total += (na + adapterAlign - 1) / adapterAlign * adapterAlign
			e.bOff = img.total
			img.total += (nb + adapterAlign - 1) / adapterAlign * adapterAlign
			img.ents = append(img.ents, e)
			img.maxRank = max(img.maxRank, p.Rank)
			img.odd = img.odd || p.Rank%8 != 0
		}
	}
	img.total = max(img.total, 1)
	return img, nil
}

// fill writes elements [lo, lo+len(dst)) of a's slot image into dst, split
// over goroutines (a few hundred MB at 8B shapes).
func (img *slotImage) fill(dst []uint16, lo int, a *lora.Adapter) {
	parallel.Ranges(len(dst), 1<<18, func(i, j int) error {
		fillImage(dst[i:j], lo+i, a, img.ents, img.total)
		return nil
	})
}

// emptySlot readies slot for a new image: nothing in flight reads it (the
// compute stream is idle between steps) nor an upload still fills it, the
// table has room for it, and its old image is freed.
func (b *Backend) emptySlot(slot int) error {
	if err := b.s.Synchronize(); err != nil {
		return err
	}
	if err := b.settle(slot); err != nil {
		return err
	}
	for len(b.slots) <= slot {
		b.slots = append(b.slots, nil)
	}
	if err := b.growTable(len(b.slots)); err != nil {
		return err
	}
	b.clearSlot(slot)
	return nil
}

// pointSlot points slot's table entries at the image at base.
func (b *Backend) pointSlot(slot int, base cuda.DevicePtr, ents []prepEntry) {
	for _, e := range ents {
		i := b.entry(slot, e.layer, llama.Module(e.module)) * entryWords
		b.tableHost[i] = base + uint64(2*e.aOff)
		b.tableHost[i+1] = base + uint64(2*e.bOff)
		b.tableHost[i+2] = uint64(uint32(e.rank)) | uint64(math.Float32bits(e.scale))<<32
	}
}

// preparedAdapter is an adapter's slot image on the device, its upload
// possibly still in flight (tr: Through(l) is layer l's part).
type preparedAdapter struct {
	b    *Backend
	name string
	mem  *cuda.DeviceBuffer
	tr   *cuda.Transfer
	img  slotImage
	pin  *pinnedImage // the kept image the upload reads or fills (nil: through the ring)
	done atomic.Bool  // committed or released: the image is no longer ours
}

// Release frees the device image if the adapter was never committed (after
// its upload, on the second thread).
func (p *preparedAdapter) Release() {
	if p != nil && !p.done.Swap(true) {
		p.tr.Cancel() // nobody reads the image: stop filling it
		p.tr.Quiesce()
		p.tr.Destroy()
		p.mem.Free()
	}
}

// layerMarks are the byte offsets in img where each layer's part ends: the
// bytes before marks[l] hold every A and B of layers 0..l (the entries are
// in layer order). A layer without entries ends where the one before it
// does (0 before the first: nothing to wait for).
func (img *slotImage) layerMarks(layers int) []int {
	marks := make([]int, layers)
	for i, e := range img.ents {
		end := img.total
		if i+1 < len(img.ents) {
			end = img.ents[i+1].aOff
		}
		marks[e.layer] = 2 * end
	}
	for l := 1; l < layers; l++ {
		marks[l] = max(marks[l], marks[l-1])
	}
	return marks
}

// Bytes is the size of the slot image.
func (p *preparedAdapter) Bytes() int { return 2 * p.img.total }

// PrepareAdapter uploads a's slot image for LoadPrepared. Safe to call from
// any goroutine while the engine goroutine runs steps.
func (b *Backend) PrepareAdapter(a *lora.Adapter) (engine.PreparedAdapter, error) {
	img, err := b.slotLayout(a)
	if err != nil {
		return nil, err
	}
	b.life.RLock() // Close waits for this call (not for the upload it starts)
	defer b.life.RUnlock()
	if b.closed {
		return nil, fmt.Errorf("gpu: adapter %s: %w", a.Name, cuda.ErrClosed)
	}
	if b.up == nil {
		return nil, fmt.Errorf("gpu: adapter %s: backend not initialized", a.Name)
	}
	mem, err := b.ctx.AllocAside(2 * img.total)
	if err != nil {
		return nil, fmt.Errorf("gpu: adapter %s: %w", a.Name, err)
	}
	fill := func(chunk []byte, off int) error {
		img.fill(unsafe.Slice((*uint16)(unsafe.Pointer(&chunk[0])), len(chunk)/2), off/2, a)
		if d := b.force.slowFill; d > 0 {
			time.Sleep(d)
		}
		return nil
	}
	// The fill and the copies go on after the return: the first step that
	// uses the slot waits, layer by layer, for them to be enqueued and to land.
	tr, pin, err := b.startUpload(a, mem.Ptr(), 2*img.total, fill, img.layerMarks(b.cfg.Layers))
	if err != nil {
		mem.Free()
		return nil, fmt.Errorf("gpu: adapter %s: upload: %w", a.Name, err)
	}
	return &preparedAdapter{b: b, name: a.Name, mem: mem, tr: tr, img: img, pin: pin}, nil
}

// startUpload starts the upload of a's n-byte image to dst: by DMA alone
// from its kept image when the image cache holds it, else filled into kept
// blocks (the image kept after), else through the ring (pinned.go). pin is
// the kept image the upload reads or fills, nil through the ring.
func (b *Backend) startUpload(a *lora.Adapter, dst cuda.DevicePtr, n int, fill func([]byte, int) error, marks []int) (*cuda.Transfer, *pinnedImage, error) {
	if pin := b.pins.hit(a, n); pin != nil {
		tr, err := b.up.StartBlocks(dst, n, pin.blocks, nil, marks...)
		if err != nil {
			b.pins.read(pin)
			return nil, nil, err
		}
		go func() { // the blocks may be refilled once the copies from them are enqueued
			tr.Done()
			b.pins.read(pin)
		}()
		return tr, pin, nil
	}
	if pin := b.pins.reserve(a, n, b.up.ChunkBytes()); pin != nil {
		tr, err := b.up.StartBlocks(dst, n, pin.blocks, fill, marks...)
		if err != nil {
			b.pins.filled(pin, false)
			return nil, nil, err
		}
		go func() { // usable once every chunk is filled (and enqueued)
			_, err := tr.Done()
			b.pins.filled(pin, err == nil)
		}()
		return tr, pin, nil
	}
	b.ringUploads.Add(1)
	tr, err := b.up.Start(dst, n, fill, marks...)
	return tr, nil, err
}

// fillImage writes elements [lo, lo+len(dst)) of a's slot image (layout
// ents, total elements: each A and B in bf16 at its offset, zeros between)
// into dst.
func fillImage(dst []uint16, lo int, a *lora.Adapter, ents []prepEntry, total int) {
	hi := lo + len(dst)
	put := func(f32 []float32, bf []uint16, off int) { // the matrix's elements at off, clipped to [lo, hi)
		n := max(len(f32), len(bf))
		if s, t := max(off, lo), min(off+n, hi); s < t {
			putBF16(dst[s-lo:t-lo], f32, bf, s-off)
		}
	}
	zero := func(from, to int) {
		if s, t := max(from, lo), min(to, hi); s < t {
			clear(dst[s-lo : t-lo])
		}
	}
	// the first entry whose regions reach lo: entries are in image order
	i := sort.Search(len(ents), func(i int) bool {
		next := total
		if i+1 < len(ents) {
			next = ents[i+1].aOff
		}
		return next > lo
	})
	if i == 0 {
		zero(0, min(total, firstOff(ents, total)))
	}
	for ; i < len(ents) && ents[i].aOff < hi; i++ {
		e := ents[i]
		p := a.Layers[e.layer][e.module]
		na, nb := p.Len()
		put(p.A, p.A16, e.aOff)
		zero(e.aOff+na, e.bOff)
		put(p.B, p.B16, e.bOff)
		next := total
		if i+1 < len(ents) {
			next = ents[i+1].aOff
		}
		zero(e.bOff+nb, next)
	}
}

// putBF16 writes len(dst) values of a matrix from its element from on, as
// bf16: a copy of its bf16 bits when it has them (bf), else its float32
// values (f32) rounded.
func putBF16(dst []uint16, f32 []float32, bf []uint16, from int) {
	if f32 == nil {
		copy(dst, bf[from:from+len(dst)])
		return
	}
	f32ToBF16(dst, f32[from:from+len(dst)])
}

// firstOff is where the first entry starts (total when there is none).
func firstOff(ents []prepEntry, total int) int {
	if len(ents) == 0 {
		return total
	}
	return ents[0].aOff
}

// LoadPrepared commits a prepared adapter to slot (engine goroutine, between
// steps). The copy runs on the copy stream; only the first step that uses
// the slot waits for it.
func (b *Backend) LoadPrepared(slot int, pa engine.PreparedAdapter) error {
	p, ok := pa.(*preparedAdapter)
	if !ok || p == nil || p.b != b {
		return fmt.Errorf("gpu: LoadPrepared: not prepared by this backend")
	}
	if slot < 0 {
		p.Release()
		return fmt.Errorf("gpu: slot %d", slot)
	}
	if p.done.Load() {
		return fmt.Errorf("gpu: adapter %s: prepared image already used or released", p.name)
	}
	if _, err := p.tr.Finished(); err != nil { // its upload failed already
		p.Release()
		return fmt.Errorf("gpu: adapter %s: upload: %w", p.name, err)
	}
	if err := b.emptySlot(slot); err != nil {
		p.Release()
		return err
	}
	st := &slotState{mem: p.mem, maxRank: p.img.maxRank, odd: p.img.odd, pin: p.pin}
	b.pointSlot(slot, st.mem.Ptr(), p.img.ents)
	b.slots[slot] = st
	b.pins.onSlot(p.pin, 1)
	p.done.Store(true) // the image is the slot's now; its upload may still be in flight
	b.loads = append(b.loads, &pendingLoad{slot: slot, tr: p.tr})
	if err := b.syncTable(); err != nil {
		b.settle(slot)
		b.clearSlot(slot)
		return err
	}
	return nil
}

// pendingLoad is an adapter image whose upload may be in flight.
type pendingLoad struct {
	slot   int
	tr     *cuda.Transfer // the upload (its own events: destroyed when done)
	waited bool           // the compute stream already waits for all of it
	// gated step: the last layer event each stream waited for
	onCompute, onLoRA *cuda.Event
}

// waitLoads (before a step's ops) orders the step after the pending copy
// of every slot its LoRA segments use, and recycles finished copies. With
// gate, the step's ops run eagerly: a copy still in flight is waited for
// layer by layer (gateLayer, then endGates after the ops) and gated reports
// that some is; else the compute stream waits for the whole copy now.
func (b *Backend) waitLoads(meta *engine.StepMeta, gate bool) (gated bool, err error) {
	b.gates = b.gates[:0]
	if len(b.loads) == 0 {
		return false, nil
	}
	gate = gate && !b.force.wholeLoad
	keep := b.loads[:0]
	var failed error
	for _, l := range b.loads {
		done, err := l.tr.Finished()
		if err != nil {
			// the slot's image is incomplete: every step that uses the
			// slot fails (until it is unloaded), the others go on
			keep = append(keep, l)
			if usesSlot(meta, l.slot) && failed == nil {
				failed = &engine.SlotError{Slot: l.slot, Err: fmt.Errorf("gpu: adapter image for slot %d: %w", l.slot, err)}
			}
			continue
		}
		if done {
			if err := l.tr.Destroy(); err != nil && failed == nil {
				failed = err
			}
			continue
		}
		keep = append(keep, l)
		if l.waited || !usesSlot(meta, l.slot) {
			continue
		}
		if gate {
			l.onCompute, l.onLoRA = nil, nil
			b.gates = append(b.gates, l)
			continue
		}
		ev, err := l.tr.Done()
		if err == nil {
			err = b.s.Wait(ev)
		}
		if err != nil {
			if failed == nil {
				failed = err
			}
			continue
		}
		l.waited = true
	}
	clear(b.loads[len(keep):])
	b.loads = keep
	if failed != nil {
		b.gates = b.gates[:0]
		return false, failed
	}
	if len(b.gates) > 0 {
		b.gatedSteps++
	}
	return len(b.gates) > 0, nil
}

// usesSlot reports whether some LoRA segment of meta has rows on slot.
func usesSlot(meta *engine.StepMeta, slot int) bool {
	for _, g := range meta.LoRA {
		if g.Slot == slot && g.End > g.Start {
			return true
		}
	}
	return false
}

// gateLayer makes st wait for layer's part of every gated image before the
// LoRA ops of layer it is about to enqueue.
func (b *Backend) gateLayer(st *cuda.Stream, layer int) {
	for _, l := range b.gates {
		if b.err != nil {
			return
		}
		ev, err := l.tr.Through(layer) // waits for the layer's copies to be enqueued
		if err != nil {
			b.fail(&engine.SlotError{Slot: l.slot, Err: fmt.Errorf("gpu: adapter image for slot %d, layer %d: %w", l.slot, layer, err)})
			return
		}
		last := &l.onCompute
		if st != b.s {
			last = &l.onLoRA
		}
		if ev == nil || ev == *last || b.err != nil {
			continue
		}
		b.fail(st.Wait(ev))
		*last = ev
	}
}

// endGates (after a gated step's ops) makes the compute stream wait for
// the whole of every gated image, so that later steps, which do not wait,
// come after it.
func (b *Backend) endGates() {
	for _, l := range b.gates {
		ev, err := l.tr.Done()
		if err != nil {
			b.fail(&engine.SlotError{Slot: l.slot, Err: fmt.Errorf("gpu: adapter image for slot %d: %w", l.slot, err)})
			continue
		}
		if err := b.s.Wait(ev); err != nil {
			b.fail(err)
			continue
		}
		l.waited = true
	}
	b.gates = b.gates[:0]
}

// settle stops any upload still filling slot (before the slot is freed or
// replaced: nobody will read that image), waits until none of its copies is
// in flight, and recycles it. An upload that failed is not an error here:
// its image is being dropped.
func (b *Backend) settle(slot int) error {
	keep := b.loads[:0]
	var errs []error
	for _, l := range b.loads {
		if l.slot != slot {
			keep = append(keep, l)
			continue
		}
		l.tr.Cancel()
		errs = append(errs, l.tr.Quiesce(), l.tr.Destroy())
	}
	clear(b.loads[len(keep):])
	b.loads = keep
	return errors.Join(errs...)
}

// closeLoads stops every upload, waits for their copies in flight and
// frees the uploader. b.up stays: an upload started later (PrepareAdapter
// on another goroutine) fails with cuda.ErrClosed.
func (b *Backend) closeLoads() error {
	var errs []error
	for _, l := range b.loads {
		l.tr.Cancel()
		errs = append(errs, l.tr.Quiesce(), l.tr.Destroy())
	}
	b.loads, b.gates = nil, nil
	errs = append(errs, b.up.Close())
	return errors.Join(errs...)
}

var _ engine.AdapterPreparer = (*Backend)(nil)
