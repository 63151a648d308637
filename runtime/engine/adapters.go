package engine

import (
	"fmt"

	"github.com/peftd/peftd/runtime/lora"
)

// LoadAdapter places a in slot, replacing any adapter there.
func (e *Engine) LoadAdapter(slot int, a *lora.Adapter) error {
	if slot < 0 || slot >= len(e.slots) {
		return fmt.Errorf("%w: %d (have %d)", ErrNoSlot, slot, len(e.slots))
	}
	if len(a.Layers) != e.cfg.Layers {
		return fmt.Errorf("%w: adapter %s has %d layers, model has %d", lora.ErrMismatch, a.Name, len(a.Layers), e.cfg.Layers)
	}
	if err := e.b.LoadAdapter(slot, a); err != nil {
		return fmt.Errorf("engine: load adapter %s into slot %d: %w", a.Name, slot, err)
	}
	e.setSlot(slot, a)
	return nil
}

// Prepared is an adapter made ready for Engine.LoadPrepared by
// Engine.PrepareAdapter.
type Prepared struct {
	a  *lora.Adapter
	bp PreparedAdapter // nil when the backend has no AdapterPreparer
}

// Release frees what PrepareAdapter staged if LoadPrepared never took it.
// Safe to call more than once.
func (p *Prepared) Release() {
	if p != nil && p.bp != nil {
		p.bp.Release()
	}
}

// PrepareAdapter starts the host-side part of loading a (conversion and
// staging on backends that are AdapterPreparers, which may go on after it
// returns; nothing on others). Unlike the other methods it may be called
// from any goroutine, also while another runs steps.
func (e *Engine) PrepareAdapter(a *lora.Adapter) (*Prepared, error) {
	if a == nil {
		return nil, fmt.Errorf("%w: nil adapter", ErrBadInput)
	}
	if len(a.Layers) != e.cfg.Layers {
		return nil, fmt.Errorf("%w: adapter %s has %d layers, model has %d", lora.ErrMismatch, a.Name, len(a.Layers), e.cfg.Layers)
	}
	p := &Prepared{a: a}
	if ap, ok := e.b.(AdapterPreparer); ok {
		bp, err := ap.PrepareAdapter(a)
		if err != nil {
			return nil, fmt.Errorf("engine: prepare adapter %s: %w", a.Name, err)
		}
		p.bp = bp
	}
	return p, nil
}

// LoadPrepared places a prepared adapter in slot, replacing any adapter
// there, like LoadAdapter; on an AdapterPreparer backend it does not wait
// for the upload (the first step that uses the slot does). It consumes p.
func (e *Engine) LoadPrepared(slot int, p *Prepared) error {
	if p == nil || p.a == nil {
		return fmt.Errorf("%w: nil prepared adapter", ErrBadInput)
	}
	if slot < 0 || slot >= len(e.slots) {
		p.Release()
		return fmt.Errorf("%w: %d (have %d)", ErrNoSlot, slot, len(e.slots))
	}
	if p.bp == nil {
		return e.LoadAdapter(slot, p.a)
	}
	if err := e.b.(AdapterPreparer).LoadPrepared(slot, p.bp); err != nil {
		return fmt.Errorf("engine: load adapter %s into slot %d: %w", p.a.Name, slot, err)
	}
	e.setSlot(slot, p.a)
	return nil
}

// UnloadAdapter empties slot.
func (e *Engine) UnloadAdapter(slot int) error {
	if slot < 0 || slot >= len(e.slots) {
		return fmt.Errorf("%w: %d (have %d)", ErrNoSlot, slot, len(e.slots))
	}
	if err := e.b.UnloadAdapter(slot); err != nil {
		return err
	}
	e.setSlot(slot, nil)
	return nil
}

func (e *Engine) setSlot(slot int, a *lora.Adapter) {
	for _, ad := range []*lora.Adapter{e.slots[slot], a} {
		if ad == nil {
			continue
		}
		d := 1
		if ad == e.slots[slot] {
			d = -1
		}
		for l := range ad.Layers {
			for m, p := range ad.Layers[l] {
				if p != nil {
					e.loraUse[l][m] += d
				}
			}
		}
	}
	e.slots[slot] = a
}

// loraMask is the Shape.LoRA of a step with adapters: every projection that
// some loaded adapter changes in some layer.
func (e *Engine) loraMask() uint8 {
	var m uint8
	for l := range e.loraUse {
		for p, n := range e.loraUse[l] {
			if n > 0 {
				m |= 1 << p
			}
		}
	}
	return m
}
