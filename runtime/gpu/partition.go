package gpu

import (
	"errors"
	"fmt"

	"github.com/peftd/peftd/runtime/cuda"
)

// smPartition is Options.LoRAPartition: the device's SMs split by green
// contexts between the compute stream (the base model) and the LoRA
// stream, so that neither's blocks take the other's SMs. The published
// design this follows runs the base model on ~75% of the SMs and the LoRA
// path on the rest; the default instead hints cuBLASLt to leave SMs free
// (Options.LoRASMs), which the custom kernels do not heed and the LoRA
// blocks may not find.
//
// While on, both streams are the green contexts' (s, ls); the primary
// context's (s0, ls0) are kept so the partition can be turned off again
// (TestDecodeBench's A/B rows). Every step runs inside it while it is on,
// steps without adapters too: they then have base.SMs() SMs.
type smPartition struct {
	lora, base *cuda.GreenContext
	s, ls      *cuda.Stream // compute and LoRA streams in base and lora
	s0, ls0    *cuda.Stream // the primary context's
	asked      int          // the SMs asked for the LoRA stream
	on         bool
}

// ErrPartition: Options.LoRAPartition cannot be honoured.
var ErrPartition = errors.New("gpu: LoRA SM partition")

// openPartition splits the SMs: loraSMs (rounded up by the driver) for the
// LoRA stream, the rest for the compute stream; the streams take PDL as
// the primary ones have it. It leaves the partition off.
func (b *Backend) openPartition(loraSMs int) error {
	if !b.ctxFree {
		return fmt.Errorf("%w: the kernels were loaded as modules of the primary context (kernels.Options.ContextFree)", ErrPartition)
	}
	sms := b.ctx.Device().SMs
	if loraSMs < 1 || loraSMs > sms/2 {
		return fmt.Errorf("%w: %d SMs for the LoRA stream of %d (1 to half of them)", ErrPartition, loraSMs, sms)
	}
	lora, base, err := b.ctx.SplitSMs(loraSMs)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrPartition, err)
	}
	p := &smPartition{lora: lora, base: base, s0: b.s, ls0: b.la.s, asked: loraSMs}
	if err := p.streams(b.pdl); err != nil {
		return errors.Join(fmt.Errorf("%w: %w", ErrPartition, err), p.close(b))
	}
	b.smPart = p
	return b.applyL2Window() // the partition's streams launch with the window too
}

// streams creates the compute and LoRA streams in the green contexts, with
// PDL when pdl.
func (p *smPartition) streams(pdl bool) error {
	var err error
	if p.s, err = p.base.NewStream(false); err != nil {
		return fmt.Errorf("compute stream: %w", err)
	}
	if p.ls, err = p.lora.NewStream(true); err != nil {
		return fmt.Errorf("LoRA stream: %w", err)
	}
	if pdl {
		if err := p.s.SetProgrammaticLaunch(true); err != nil {
			return err
		}
		return p.ls.SetProgrammaticLaunch(true)
	}
	return nil
}

// setPartition turns the partition on or off: the work on the streams in
// use is finished first, the recordings (made on them, with grids planned
// for their SM counts) are dropped, and the attention split plan is redone
// for the SMs the compute stream now has.
func (b *Backend) setPartition(on bool) error {
	p := b.smPart
	if p == nil {
		if on {
			return fmt.Errorf("%w: none was opened (Options.LoRAPartition)", ErrPartition)
		}
		return nil
	}
	if p.on == on {
		return nil
	}
	if err := errors.Join(b.s.Synchronize(), b.la.s.Synchronize()); err != nil {
		return err
	}
	if err := b.dropGraphs(); err != nil {
		return err
	}
	b.usePartition(on)
	return b.sizeDecode()
}

// usePartition points the backend's streams at the partition's (on) or the
// primary context's, and the products' plans at their SMs; setPartition
// first finishes the work the streams in use hold.
func (b *Backend) usePartition(on bool) {
	p := b.smPart
	p.on = on
	if on {
		b.s, b.la.s = p.s, p.ls
	} else {
		b.s, b.la.s = p.s0, p.ls0
	}
	b.planFor()
}

// planFor points the products at the compute stream in use and has them
// plan their grids (variant choice, splits, warps a block) for its SMs.
func (b *Backend) planFor() {
	sms := b.baseSMs()
	if b.sk != nil && b.sk.streamRows != nil {
		b.sk.sms = sms
	}
	if f := b.f8; f != nil {
		f.s, f.sms = b.s, sms
		if f.stream != nil && f.stream.streamRows != nil {
			f.stream.sms = sms
		}
		if f.wg != nil {
			f.wg.sms = min(sms, f.wg.smsMax)
		}
		if f.wgsk != nil {
			f.wgsk.sms = min(sms, f.wgsk.smsMax)
		}
	}
}

// baseSMs is how many SMs the compute stream's kernels run on.
func (b *Backend) baseSMs() int {
	if base, _, ok := b.Partition(); ok {
		return base
	}
	return b.ctx.Device().SMs
}

// loraStreamSMs is how many SMs the LoRA stream's kernels may take (all of
// them without a partition: the hold-back is only a hint to cuBLASLt).
func (b *Backend) loraStreamSMs() int {
	if _, lora, ok := b.Partition(); ok {
		return lora
	}
	return b.ctx.Device().SMs
}

// Partition reports the SMs of the compute and LoRA streams' green
// contexts while the partition is on (ok false otherwise).
func (b *Backend) Partition() (base, lora int, ok bool) {
	if p := b.smPart; p != nil && p.on {
		return p.base.SMs(), p.lora.SMs(), true
	}
	return 0, 0, false
}

// close releases the partition's streams and contexts (the primary ones
// are the backend's again).
func (p *smPartition) close(b *Backend) error {
	if p == nil {
		return nil
	}
	if p.on {
		b.usePartition(false)
	}
	return errors.Join(p.s.Destroy(), p.ls.Destroy(), p.lora.Destroy(), p.base.Destroy())
}
