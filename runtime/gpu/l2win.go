package gpu

import (
	"fmt"
	"log/slog"
	"os"
	"strconv"

	"github.com/peftd/peftd/runtime/cuda"
	"github.com/peftd/peftd/runtime/engine"
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
func l2Bytes() int { return envMB("PEFTD_LORA_L2_MB", loraL2Bytes) }

// envMB is environment variable name's size in bytes where it is a whole
// number of MB from 1 to 1024, def where it is unset (and, with a
// warning, where it is anything else).
func envMB(name string, def int) int {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	mb, err := strconv.Atoi(v)
	if err != nil || mb < 1 || mb > 1024 {
		slog.Warn("gpu: "+name+" is not 1 to 1024 MB; using the default", "value", v, "default_mb", def>>20)
		return def
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

// guL2Bytes is the most of the gate/up output the compute streams' window
// covers with kernelForce.l2Win 5 (KeepCached's buffer; its rows from the
// step's first: 16 MB is 280 rows of an 8B model's 28,672 bf16 columns);
// PEFTD_GU_L2_MB=N sets N MB (1 to 1024).
const guL2Bytes = 16 << 20

// KeepCached is engine.CacheHinter: buf (the gate/up output) is what the
// compute streams' window covers with kernelForce.l2Win 5.
func (b *Backend) KeepCached(buf engine.Buffer) {
	if gb, ok := buf.(*Buffer); ok && gb.whole() {
		b.l2Keep = gb
	}
}

// guWindow is the compute streams' window with kernelForce.l2Win 5: the
// first guL2Bytes (or PEFTD_GU_L2_MB) of KeepCached's buffer, at most what
// the card allows beside the LoRA update's window (lw); zero where there
// is no such buffer.
func (b *Backend) guWindow(lw cuda.AccessWindow) cuda.AccessWindow {
	dev := b.ctx.Device()
	if b.l2Keep == nil || dev.PersistL2Max <= lw.Bytes || dev.WindowMax == 0 {
		return cuda.AccessWindow{}
	}
	n := min(envMB("PEFTD_GU_L2_MB", guL2Bytes), b.l2Keep.mem.Size(), dev.PersistL2Max-lw.Bytes, dev.WindowMax)
	return cuda.AccessWindow{Base: b.l2Keep.mem.Ptr(), Bytes: n, HitRatio: 1}
}

// applyL2Window sets the window (or none, loraL2On false) on every stream
// the backend launches kernels on (again after they change: an SM
// partition's) and sets aside the L2 it needs (or none); with
// kernelForce.l2Win 5 the compute streams' window is guWindow's instead
// and the set-aside holds both. Recordings keep the window they were
// captured with: call dropGraphs after a change. A card or driver that
// refuses it (an MPS client cannot change the set-aside) is not an error:
// a warning, and the steps run without it.
func (b *Backend) applyL2Window() error {
	w := cuda.AccessWindow{}
	if b.loraL2On() && !b.l2Refused {
		w = b.l2Window()
	}
	cw := w
	if b.force.l2Win == 5 && !b.l2Refused {
		cw = b.guWindow(w)
	}
	err := b.setL2Window(cw, w)
	if err == nil || w.Bytes == 0 && cw.Bytes == 0 {
		return err
	}
	slog.Warn("gpu: the LoRA update is not kept in L2; steps run without it", "err", err)
	b.l2Refused = true
	return b.setL2Window(cuda.AccessWindow{}, cuda.AccessWindow{})
}

// setL2Window sets aside the L2 both windows need (one where they are the
// same) and gives the compute streams cw, the LoRA streams lw.
func (b *Backend) setL2Window(cw, lw cuda.AccessWindow) error {
	aside := cw.Bytes + lw.Bytes
	if cw == lw {
		aside = lw.Bytes
	}
	if aside != b.l2Aside {
		// 0 first: the lines an earlier window marked persisting go back to normal
		if b.l2Aside > 0 {
			if err := b.ctx.SetPersistingL2(0); err != nil {
				return fmt.Errorf("gpu: L2 set-aside for the LoRA update: %w", err)
			}
			b.l2Aside = 0
		}
		if aside > 0 {
			if err := b.ctx.SetPersistingL2(aside); err != nil {
				return fmt.Errorf("gpu: L2 set-aside for the LoRA update: %w", err)
			}
			b.l2Aside = aside
		}
		slog.Debug("gpu: L2 windows", "lora_update_bytes", lw.Bytes, "compute_bytes", cw.Bytes, "persisting_max", b.ctx.Device().PersistL2Max)
	}
	compute, lora := b.launchStreams()
	for _, s := range compute {
		if err := s.SetAccessWindow(cw); err != nil {
			return fmt.Errorf("gpu: L2 window on the compute stream: %w", err)
		}
	}
	for _, s := range lora {
		if err := s.SetAccessWindow(lw); err != nil {
			return fmt.Errorf("gpu: L2 window over the LoRA update: %w", err)
		}
	}
	return nil
}

// launchStreams is every stream the backend launches kernels on, the
// compute streams and the LoRA streams: b.s and b.la.s, or with an SM
// partition those of its either side (the compute and LoRA streams are
// two of them, whichever side is on).
func (b *Backend) launchStreams() (compute, lora []*cuda.Stream) {
	if p := b.smPart; p != nil {
		return []*cuda.Stream{p.s, p.s0}, []*cuda.Stream{p.ls, p.ls0}
	}
	return []*cuda.Stream{b.s}, []*cuda.Stream{b.la.s}
}
