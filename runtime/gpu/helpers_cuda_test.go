//go:build cuda

package gpu

import "github.com/peftd/peftd/runtime/cuda"

func copyHtoD(b *Backend, x *Buffer, h []uint16) error {
	if err := cuda.CopyHtoD(b.s, x.mem.Ptr(), h); err != nil {
		return err
	}
	x.isF32 = false
	b.gen++ // the FP8 path must not re-use a quantized copy of x
	return b.s.Synchronize()
}
