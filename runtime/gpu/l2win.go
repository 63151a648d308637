package gpu

import (
	"fmt"
	"log/slog"
	"os"

	"github.com/peftd/peftd/runtime/cuda"
)

// The LoRA update buffer (loraAside.delta) in L2. The LoRA stream's expand
// writes a group's float32 update there while the group's product streams
// its weights through L2 beside it; the op after the product (silu_mul,
// add_rmsnorm, RoPE) reads it back. Written plainly, the update's lines
// are evicted by the weights before that read: at 256 rows the gate/up
// update alone is 29 MB written to DRAM and read again, every layer. With
// the buffer as an L2 persisting window (every kernel of both streams
// launched with it; cuda.AccessWindow) and that much of L2 set aside, the
// update stays in L2 from the expand to its reader, and the next layer's
// update overwrites the same lines.

// loraL2Default is whether a Backend keeps the LoRA update in L2 where the
// card can (kernelForce.l2Win and PEFTD_LORA_L2=on|off override it).
const loraL2Default = false

// loraL2On reports whether the update buffer should be an L2 window.
func (b *Backend) loraL2On() bool {
	switch {
	case b.force.l2Win > 0:
		return true
	case b.force.l2Win < 0:
		return false
	}
	switch os.Getenv("PEFTD_LORA_L2") {
	case "on", "1":
		return true
	case "off", "0":
		return false
	}
	return loraL2Default
}

// l2Window is the window over the update buffer: its first bytes, as many
// as the card may set aside and a window may span (the rows of a step
// fill it from its start; kernelForce.l2Win 3: 8 MB at most), all of them
// persisting; zero where the card has no L2 persistence or there is no
// buffer.
func (b *Backend) l2Window() cuda.AccessWindow {
	dev := b.ctx.Device()
	if b.la.delta == nil || dev.PersistL2Max == 0 || dev.WindowMax == 0 {
		return cuda.AccessWindow{}
	}
	n := min(b.la.delta.Size(), dev.PersistL2Max, dev.WindowMax)
	if b.force.l2Win == 3 {
		n = min(n, 8<<20)
	}
	return cuda.AccessWindow{Base: b.la.delta.Ptr(), Bytes: n, HitRatio: 1}
}

// applyL2Window sets the window (or none, loraL2On false) on every stream
// the backend launches kernels on (again after they change: an SM
// partition's) and sets aside the L2 it needs (or none).
// Recordings keep the window they were captured with: call dropGraphs
// after a change.
func (b *Backend) applyL2Window() error {
	w := cuda.AccessWindow{}
	if b.loraL2On() {
		w = b.l2Window()
	}
	if w.Bytes != b.l2Set.Bytes {
		// 0 first: the lines an earlier window marked persisting go back to normal
		if err := b.ctx.SetPersistingL2(0); err != nil {
			return fmt.Errorf("gpu: L2 set-aside for the LoRA update: %w", err)
		}
		if w.Bytes > 0 {
			if err := b.ctx.SetPersistingL2(w.Bytes); err != nil {
				return fmt.Errorf("gpu: L2 set-aside for the LoRA update: %w", err)
			}
		}
	}
	for i, s := range b.launchStreams() {
		sw := w
		// timing modes (kernelForce.l2Win): 2 the window on the LoRA
		// streams' launches only (odd indexes), 4 the L2 set aside and no window
		if b.force.l2Win == 4 || b.force.l2Win == 2 && i%2 == 0 {
			sw = cuda.AccessWindow{}
		}
		if err := s.SetAccessWindow(sw); err != nil {
			return fmt.Errorf("gpu: L2 window over the LoRA update: %w", err)
		}
	}
	if w != b.l2Set {
		slog.Debug("gpu: LoRA update buffer in L2", "bytes", w.Bytes, "persisting_max", b.ctx.Device().PersistL2Max)
	}
	b.l2Set = w
	return nil
}

// launchStreams is every stream the backend launches kernels on: the
// compute and LoRA streams, and those of an SM partition's either side
// (compute streams at even indexes, LoRA streams at odd).
func (b *Backend) launchStreams() []*cuda.Stream {
	ss := []*cuda.Stream{b.s, b.la.s}
	if p := b.smPart; p != nil {
		ss = append(ss, p.s, p.ls, p.s0, p.ls0)
	}
	return ss
}
