package gpu

import (
	"fmt"
	"log/slog"
	"os"
	"strconv"

	"github.com/peftd/peftd/runtime/cuda"
)

// The LoRA update buffer (loraAside.delta) in L2. The LoRA stream's expand
// writes a group's float32 update there while the group's product streams
// its weights through L2 beside it; the op after the product (silu_mul,
// add_rmsnorm, RoPE) reads it back. Written plainly, the update's lines
// are evicted by the weights before that read: at 64 rows the gate/up
// update is 7.3 MB written to DRAM and read again, every layer (29 MB at
// 256). With the buffer's first loraL2Bytes an L2 persisting window
// (every kernel of both streams launched with it; cuda.AccessWindow) and
// that much of L2 set aside, those lines stay in L2 from the expand to
// their reader, and the next layer's update overwrites the same lines.
//
// The set-aside is not free: measured on the H200 (PERFORMANCE v0.50),
// 28 MB of its 60 MB set aside slowed steps with no LoRA update by 2-3%
// (the same with no window at all), more than the update gained; 8 MB
// costs them nothing measurable and takes four rank-32 adapters' steps
// 0.7-1.0% faster at 64-256 rows.

// loraL2Default is whether a Backend keeps the LoRA update in L2 where the
// card can (kernelForce.l2Win and PEFTD_LORA_L2=on|off override it).
const loraL2Default = true

// loraL2Bytes is the most of the update buffer the window covers and the
// L2 set aside for it (kernelForce.l2Win 3: the whole buffer, as far as
// the card allows; PEFTD_LORA_L2_MB=N: N MB, for the sweep of PERFORMANCE
// v0.50's Next 1).
const loraL2Bytes = 8 << 20

// l2Bytes is loraL2Bytes, or PEFTD_LORA_L2_MB's size where it is a whole
// number of MB from 1 to 1024 (else the default, with a warning).
func l2Bytes() int {
	v := os.Getenv("PEFTD_LORA_L2_MB")
	if v == "" {
		return loraL2Bytes
	}
	mb, err := strconv.Atoi(v)
	if err != nil || mb < 1 || mb > 1024 {
		slog.Warn("gpu: PEFTD_LORA_L2_MB is not 1 to 1024 MB; using the default", "value", v, "default_mb", loraL2Bytes>>20)
		return loraL2Bytes
	}
	return mb << 20
}

// loraL2On reports whether the update buffer should be an L2 window.
func (b *Backend) loraL2On() bool {
	switch {
	case b.force.l2Win > 0:
		return true
	case b.force.l2Win < 0:
		return false
	}
	return envOnOff("PEFTD_LORA_L2", loraL2Default)
}

// envOnOff is environment variable name's switch: on or 1, off or 0, or
// def where it is unset (and, with a warning, where it is anything else).
func envOnOff(name string, def bool) bool {
	switch v := os.Getenv(name); v {
	case "":
		return def
	case "on", "1":
		return true
	case "off", "0":
		return false
	default:
		slog.Warn("gpu: "+name+" is not on or off; using the default", "value", v, "default", def)
		return def
	}
}

// l2Window is the window over the update buffer: its first loraL2Bytes
// (the rows of a step fill it from its start), at most what the card may
// set aside and a window may span, all of them persisting; zero where the
// card has no L2 persistence or there is no buffer.
func (b *Backend) l2Window() cuda.AccessWindow {
	dev := b.ctx.Device()
	if b.la.delta == nil || dev.PersistL2Max == 0 || dev.WindowMax == 0 {
		return cuda.AccessWindow{}
	}
	n := min(b.la.delta.Size(), dev.PersistL2Max, dev.WindowMax)
	if b.force.l2Win != 3 {
		n = min(n, l2Bytes())
	}
	return cuda.AccessWindow{Base: b.la.delta.Ptr(), Bytes: n, HitRatio: 1}
}

// applyL2Window sets the window (or none, loraL2On false) on every stream
// the backend launches kernels on (again after they change: an SM
// partition's) and sets aside the L2 it needs (or none). Recordings keep
// the window they were captured with: call dropGraphs after a change. A
// card or driver that refuses it (an MPS client cannot change the
// set-aside) is not an error: a warning, and the steps run without it.
func (b *Backend) applyL2Window() error {
	w := cuda.AccessWindow{}
	if b.loraL2On() && !b.l2Refused {
		w = b.l2Window()
	}
	err := b.setL2Window(w)
	if err == nil || w.Bytes == 0 {
		return err
	}
	slog.Warn("gpu: the LoRA update is not kept in L2; steps run without it", "err", err)
	b.l2Refused = true
	return b.setL2Window(cuda.AccessWindow{})
}

// setL2Window sets aside w.Bytes of L2 and gives every launch stream w.
func (b *Backend) setL2Window(w cuda.AccessWindow) error {
	if w.Bytes != b.l2Aside {
		// 0 first: the lines an earlier window marked persisting go back to normal
		if b.l2Aside > 0 {
			if err := b.ctx.SetPersistingL2(0); err != nil {
				return fmt.Errorf("gpu: L2 set-aside for the LoRA update: %w", err)
			}
			b.l2Aside = 0
		}
		if w.Bytes > 0 {
			if err := b.ctx.SetPersistingL2(w.Bytes); err != nil {
				return fmt.Errorf("gpu: L2 set-aside for the LoRA update: %w", err)
			}
			b.l2Aside = w.Bytes
		}
		slog.Debug("gpu: LoRA update buffer in L2", "bytes", w.Bytes, "persisting_max", b.ctx.Device().PersistL2Max)
	}
	for _, s := range b.launchStreams() {
		if err := s.SetAccessWindow(w); err != nil {
			return fmt.Errorf("gpu: L2 window over the LoRA update: %w", err)
		}
	}
	return nil
}

// launchStreams is every stream the backend launches kernels on: the
// compute and LoRA streams, or with an SM partition those of its either
// side (the compute and LoRA streams are two of them, whichever side is
// on).
func (b *Backend) launchStreams() []*cuda.Stream {
	if p := b.smPart; p != nil {
		return []*cuda.Stream{p.s, p.ls, p.s0, p.ls0}
	}
	return []*cuda.Stream{b.s, b.la.s}
}
