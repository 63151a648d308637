package gpu

import (
	"encoding/binary"
	"fmt"
	"unsafe"

	"github.com/peftd/peftd/internal/parallel"
	"github.com/peftd/peftd/runtime/cuda"
	"github.com/peftd/peftd/runtime/safetensors"
)

// Weights reach the device through two pinned staging buffers used in turn:
// a piece of a tensor is converted to bf16 into one (on several goroutines)
// while the copy stream moves the other's piece to the device, and the
// compute stream waits for every copy before its next work. The buffers
// are freed before the first step.

// uploadStage is the bytes of one staging buffer.
const uploadStage = 64 << 20

type staging struct {
	buf  [2]*cuda.HostBuffer
	done [2]*cuda.Event // the last copy out of each buffer
	next int
}

// stageUpload copies the n values of raw (dtype) to dst as bf16.
func (b *Backend) stageUpload(dst cuda.DevicePtr, raw []byte, dt safetensors.DType, n int) error {
	if dt.Size() == 0 || len(raw) != n*dt.Size() {
		return fmt.Errorf("%w: %d bytes of %s for %d values", safetensors.ErrDType, len(raw), dt, n)
	}
	sz := dt.Size()
	return b.staged(dst, 2*n, func(piece []byte, off int) error {
		i0, cnt := off/2, len(piece)/2
		return encodeBF16Parallel(asUint16s(piece), raw[i0*sz:(i0+cnt)*sz], dt)
	})
}

// stageBytes copies raw to dst as it is, through the staging buffers: the
// pieces are copied into pinned memory on several goroutines (raw is
// usually a mapped file: one thread faulting its pages in, as a pageable
// cuMemcpy does, reads a few GB/s).
func (b *Backend) stageBytes(dst cuda.DevicePtr, raw []byte) error {
	return b.staged(dst, len(raw), func(piece []byte, off int) error {
		return parallel.Ranges(len(piece), 4<<20, func(lo, hi int) error {
			copy(piece[lo:hi], raw[off+lo:off+hi])
			return nil
		})
	})
}

// staged moves total bytes to dst in pieces of up to uploadStage: fill
// writes the piece that lands at byte off of dst into a pinned staging
// buffer, while the copy stream moves the other buffer's piece to the
// device; the compute stream waits for every copy before its next work.
func (b *Backend) staged(dst cuda.DevicePtr, total int, fill func(piece []byte, off int) error) error {
	st := b.stage
	if st == nil {
		st = &staging{}
		for i := range st.buf {
			var err error
			if st.buf[i], err = b.ctx.AllocHost(uploadStage); err != nil {
				b.stage = st
				return fmt.Errorf("gpu: upload staging: %w", err)
			}
			if st.done[i], err = b.ctx.NewEvent(false); err != nil {
				b.stage = st
				return fmt.Errorf("gpu: upload staging: %w", err)
			}
		}
		b.stage = st
	}
	for off := 0; off < total; off += uploadStage {
		end := min(total, off+uploadStage)
		k := st.next
		st.next ^= 1
		if err := st.done[k].Synchronize(); err != nil { // its previous piece has left
			return err
		}
		piece := st.buf[k].Bytes()[:end-off]
		if err := fill(piece, off); err != nil {
			return err
		}
		if err := cuda.CopyHtoD(b.cs, dst+cuda.DevicePtr(off), piece); err != nil {
			return err
		}
		if err := st.done[k].Record(b.cs); err != nil {
			return err
		}
		if err := b.s.Wait(st.done[k]); err != nil {
			return err
		}
	}
	return nil
}

// freeStaging waits for the last copies and frees the staging buffers.
func (b *Backend) freeStaging() error {
	st := b.stage
	if st == nil {
		return nil
	}
	b.stage = nil
	var first error
	keep := func(err error) {
		if first == nil {
			first = err
		}
	}
	if b.cs != nil {
		keep(b.cs.Synchronize())
	}
	for i := range st.buf {
		keep(st.buf[i].Free())
		if st.done[i] != nil {
			keep(st.done[i].Destroy())
		}
	}
	return first
}

// encodeBF16Parallel is encodeBF16 over ranges of at least 1M values on
// several goroutines.
func encodeBF16Parallel(dst []uint16, raw []byte, dt safetensors.DType) error {
	sz := dt.Size()
	if sz == 0 || len(raw) != len(dst)*sz {
		return encodeBF16(dst, raw, dt) // reports the mismatch
	}
	return parallel.Ranges(len(dst), 1<<20, func(lo, hi int) error {
		return encodeBF16(dst[lo:hi], raw[lo*sz:hi*sz], dt)
	})
}

// littleEndian: bf16 safetensors bytes are the host's uint16s as they are.
var littleEndian = binary.NativeEndian.Uint16([]byte{1, 0}) == 1

// asUint16s is b's memory as uint16s (len(b) even, 2-byte aligned: pinned
// staging memory is page-aligned).
func asUint16s(b []byte) []uint16 {
	if len(b) == 0 {
		return nil
	}
	return unsafe.Slice((*uint16)(unsafe.Pointer(unsafe.SliceData(b))), len(b)/2)
}

// asBytes is v's memory as bytes.
func asBytes[T uint16 | float32](v []T) []byte {
	if len(v) == 0 {
		return nil
	}
	return unsafe.Slice((*byte)(unsafe.Pointer(unsafe.SliceData(v))), int(unsafe.Sizeof(v[0]))*len(v))
}
