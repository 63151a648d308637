package gpu

import (
	"errors"
	"fmt"
	"math"
	"runtime"
	"sync"
	"sync/atomic"

	"github.com/peftd/peftd/runtime/cuda"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/lora"
)

// Asynchronous adapter loads (engine.AdapterPreparer). PrepareAdapter runs on
// the caller's goroutine while steps run: it converts the adapter to bf16
// into a pinned host buffer laid out as the slot's device image (pinned on
// the context's second thread, so the step thread is not held). LoadPrepared
// runs on the engine goroutine between steps: it allocates the slot, points
// the LoRA table at it, enqueues the host-to-device copy on a copy stream
// and records an event. The compute stream waits on that event in Begin of
// the first step whose LoRA segments use the slot; steps that do not use it
// never wait.

// adapterAlign is the element alignment of each A and B matrix in a slot image.
const adapterAlign = 128

type prepEntry struct {
	layer, module, aOff, bOff, rank int
	scale                           float32
}

// slotLayout checks an adapter against the model and lays out its slot image.
func (b *Backend) slotLayout(a *lora.Adapter) (total, maxRank int, ents []prepEntry, err error) {
	if b.cfg == nil {
		return 0, 0, nil, fmt.Errorf("gpu: backend not initialized")
	}
	if len(a.Layers) != b.cfg.Layers {
		return 0, 0, nil, fmt.Errorf("gpu: adapter %s has %d layers, model has %d", a.Name, len(a.Layers), b.cfg.Layers)
	}
	for l, lay := range a.Layers {
		for m, p := range lay {
			if p == nil {
				continue
			}
			in, out := b.cfg.Dims(llama.Module(m))
			if len(p.A) != p.Rank*in || len(p.B) != out*p.Rank {
				return 0, 0, nil, fmt.Errorf("gpu: adapter %s: %s has A %d and B %d values for rank %d, want %d and %d",
					a.Name, llama.Module(m), len(p.A), len(p.B), p.Rank, p.Rank*in, out*p.Rank)
			}
			e := prepEntry{layer: l, module: m, aOff: total, rank: p.Rank, scale: p.Scale}
			total += (len(p.A) + adapterAlign - 1) / adapterAlign * adapterAlign
			e.bOff = total
			total += (len(p.B) + adapterAlign - 1) / adapterAlign * adapterAlign
			ents = append(ents, e)
			maxRank = max(maxRank, p.Rank)
		}
	}
	return max(total, 1), maxRank, ents, nil
}

// preparedAdapter is an adapter's slot image in pinned host memory.
type preparedAdapter struct {
	b       *Backend
	name    string
	host    *cuda.HostBuffer
	n       int // bf16 values
	maxRank int
	ents    []prepEntry
	done    atomic.Bool // committed or released: the host buffer is no longer ours
}

// Release returns the staging buffer if the adapter was never committed.
func (p *preparedAdapter) Release() {
	if p != nil && !p.done.Swap(true) {
		p.b.putHost(p.host)
	}
}

// Bytes is the size of the slot image.
func (p *preparedAdapter) Bytes() int { return 2 * p.n }

// PrepareAdapter stages a for LoadPrepared. Safe to call from any goroutine
// while the engine goroutine runs steps.
func (b *Backend) PrepareAdapter(a *lora.Adapter) (engine.PreparedAdapter, error) {
	total, maxRank, ents, err := b.slotLayout(a)
	if err != nil {
		return nil, err
	}
	h, err := b.getHost(2 * total)
	if err != nil {
		return nil, fmt.Errorf("gpu: adapter %s: pinned staging: %w", a.Name, err)
	}
	dst := h.Uint16s()[:total]
	// Convert in parallel over the projections (a few hundred MB at 8B shapes).
	workers := min(max(runtime.GOMAXPROCS(0)/2, 1), 8, len(ents))
	var wg sync.WaitGroup
	var next atomic.Int64
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= len(ents) {
					return
				}
				e := ents[i]
				p := a.Layers[e.layer][e.module]
				f32ToBF16(dst[e.aOff:e.aOff+len(p.A)], p.A)
				clear(dst[e.aOff+len(p.A) : e.bOff])
				f32ToBF16(dst[e.bOff:e.bOff+len(p.B)], p.B)
				end := total
				if i+1 < len(ents) {
					end = ents[i+1].aOff
				}
				clear(dst[e.bOff+len(p.B) : end])
			}
		}()
	}
	wg.Wait()
	return &preparedAdapter{b: b, name: a.Name, host: h, n: total, maxRank: maxRank, ents: ents}, nil
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
	// Nothing in flight may read the old slot (between steps the stream is idle).
	if err := b.s.Synchronize(); err != nil {
		p.Release()
		return err
	}
	if err := b.settle(slot); err != nil {
		p.Release()
		return err
	}
	for len(b.slots) <= slot {
		b.slots = append(b.slots, nil)
	}
	if err := b.growTable(len(b.slots)); err != nil {
		p.Release()
		return err
	}
	b.clearSlot(slot)
	st := &slotState{maxRank: p.maxRank}
	var err error
	if st.mem, err = b.ctx.Alloc(2 * p.n); err != nil {
		p.Release()
		b.syncTable()
		return fmt.Errorf("gpu: adapter %s: %w", p.name, err)
	}
	base := st.mem.Ptr()
	for _, e := range p.ents {
		i := b.entry(slot, e.layer, llama.Module(e.module)) * entryWords
		b.tableHost[i] = base + uint64(2*e.aOff)
		b.tableHost[i+1] = base + uint64(2*e.bOff)
		b.tableHost[i+2] = uint64(uint32(e.rank)) | uint64(math.Float32bits(e.scale))<<32
	}
	b.slots[slot] = st
	// Table and scratch first: syncTable may free and reallocate the LoRA
	// scratch, which must not wait behind the copy below.
	if err := b.syncTable(); err != nil {
		st.mem.Free()
		b.slots[slot] = nil
		b.clearSlot(slot)
		p.Release()
		return err
	}
	ev, err := b.getEvent()
	if err == nil {
		if err = cuda.CopyHtoD(b.cs, base, p.host.Uint16s()[:p.n]); err == nil {
			err = ev.Record(b.cs)
		}
	}
	if err != nil {
		b.cs.Synchronize()
		b.clearSlot(slot)
		b.syncTable()
		p.Release()
		return err
	}
	p.done.Store(true) // the host buffer now belongs to the pending load
	b.loads = append(b.loads, &pendingLoad{slot: slot, ev: ev, host: p.host})
	return nil
}

// pendingLoad is a copy in flight on the copy stream.
type pendingLoad struct {
	slot   int
	ev     *cuda.Event
	host   *cuda.HostBuffer
	waited bool // the compute stream already waits on ev
}

// waitLoads (Begin) makes the compute stream wait for the pending copy of
// every slot the step's LoRA segments use, and recycles finished copies.
func (b *Backend) waitLoads(meta *engine.StepMeta) error {
	if len(b.loads) == 0 {
		return nil
	}
	keep := b.loads[:0]
	for _, l := range b.loads {
		if !l.waited {
			for _, g := range meta.LoRA {
				if g.Slot == l.slot && g.End > g.Start {
					if err := b.s.Wait(l.ev); err != nil {
						return err
					}
					l.waited = true
					break
				}
			}
		}
		done, err := l.ev.Done()
		if err != nil {
			return err
		}
		if done {
			b.putHost(l.host)
			b.events = append(b.events, l.ev)
			continue
		}
		keep = append(keep, l)
	}
	clear(b.loads[len(keep):])
	b.loads = keep
	return nil
}

// settle waits for any copy still filling slot (before the slot is freed or
// replaced) and recycles it.
func (b *Backend) settle(slot int) error {
	keep := b.loads[:0]
	var errs []error
	for _, l := range b.loads {
		if l.slot != slot {
			keep = append(keep, l)
			continue
		}
		errs = append(errs, l.ev.Synchronize())
		b.putHost(l.host)
		b.events = append(b.events, l.ev)
	}
	clear(b.loads[len(keep):])
	b.loads = keep
	return errors.Join(errs...)
}

func (b *Backend) getEvent() (*cuda.Event, error) {
	if n := len(b.events); n > 0 {
		ev := b.events[n-1]
		b.events = b.events[:n-1]
		return ev, nil
	}
	return b.ctx.NewEvent(false)
}

// maxPooled pinned staging buffers are kept for reuse; pinning is slow.
const maxPooled = 2

// getHost takes a pooled pinned buffer of at least n bytes or pins a new one
// on the context's second thread.
func (b *Backend) getHost(n int) (*cuda.HostBuffer, error) {
	b.hostMu.Lock()
	best := -1
	for i, h := range b.hostPool {
		if h.Size() >= n && (best < 0 || h.Size() < b.hostPool[best].Size()) {
			best = i
		}
	}
	if best >= 0 {
		h := b.hostPool[best]
		b.hostPool = append(b.hostPool[:best], b.hostPool[best+1:]...)
		b.hostMu.Unlock()
		return h, nil
	}
	b.hostMu.Unlock()
	return b.ctx.AllocHostAside(n)
}

func (b *Backend) putHost(h *cuda.HostBuffer) {
	if h == nil {
		return
	}
	b.hostMu.Lock()
	b.hostPool = append(b.hostPool, h)
	var drop *cuda.HostBuffer
	if len(b.hostPool) > maxPooled { // drop the smallest
		s := 0
		for i, x := range b.hostPool {
			if x.Size() < b.hostPool[s].Size() {
				s = i
			}
		}
		drop = b.hostPool[s]
		b.hostPool = append(b.hostPool[:s], b.hostPool[s+1:]...)
	}
	b.hostMu.Unlock()
	if drop != nil {
		drop.Free()
	}
}

// closeLoads waits for every copy and frees the staging buffers and events.
func (b *Backend) closeLoads() error {
	var errs []error
	if b.cs != nil {
		errs = append(errs, b.cs.Synchronize())
	}
	for _, l := range b.loads {
		errs = append(errs, l.host.Free(), l.ev.Destroy())
	}
	b.loads = nil
	for _, ev := range b.events {
		errs = append(errs, ev.Destroy())
	}
	b.events = nil
	b.hostMu.Lock()
	pool := b.hostPool
	b.hostPool = nil
	b.hostMu.Unlock()
	for _, h := range pool {
		errs = append(errs, h.Free())
	}
	return errors.Join(errs...)
}

var _ engine.AdapterPreparer = (*Backend)(nil)
