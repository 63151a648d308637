package cuda

import (
	"fmt"
	"unsafe"
)

// TensorMap is a CUtensorMap: the 128-byte descriptor of a tiled view of
// a global array that Hopper's tensor memory accelerator (TMA) copies
// boxes of into shared memory (cp.async.bulk.tensor). A kernel takes it by
// value (`const __grid_constant__` parameter of 128 bytes, 64-aligned);
// Launch and Graph.AddKernel take a *TensorMap argument for it.
type TensorMap struct{ v [16]uint64 }

// TensorMap element types and shared-memory swizzles (cuda.h's
// CUtensorMapDataType and CUtensorMapSwizzle).
const (
	TMapUint8    = 0
	TMapBFloat16 = 9

	TMapSwizzleNone = 0
	TMapSwizzle128B = 3
)

// tmaMaxArgs is the most *TensorMap arguments one launch takes.
const tmaMaxArgs = 4

// TMA reports whether the driver encodes tensor maps (CUDA 12+).
func TMA() bool { return drv.cuTensorMapEncodeTiled != nil }

// EncodeTiled2D fills m with a two-dimensional tiled view of the array at
// base: rows rows of inner elements of type dtype (TMapUint8 or
// TMapBFloat16), rows rowBytes apart, copied in boxes of boxInner x
// boxRows elements with the given swizzle; elements past the array read
// as zeros. The driver checks the constraints (base 16-byte aligned,
// rowBytes a multiple of 16, box dimensions at most 256, the swizzled
// inner box at most the swizzle's span) and reports what it refuses.
// The driver wants a current context: it encodes on the executor thread
// of the stream s the map is for.
func EncodeTiled2D(s *Stream, m *TensorMap, dtype int, base DevicePtr, inner, rows, rowBytes uint64, boxInner, boxRows uint32, swizzle int) error {
	return s.c.Do(func() error { return encodeTiled2D(m, dtype, base, inner, rows, rowBytes, boxInner, boxRows, swizzle) })
}

func encodeTiled2D(m *TensorMap, dtype int, base DevicePtr, inner, rows, rowBytes uint64, boxInner, boxRows uint32, swizzle int) error {
	if !TMA() {
		return fmt.Errorf("%w: tensor maps need cuTensorMapEncodeTiled (CUDA 12+)", ErrNotSupported)
	}
	dims := &[2]uint64{inner, rows}
	strides := &[1]uint64{rowBytes}
	box := &[2]uint32{boxInner, boxRows}
	estr := &[2]uint32{1, 1}
	const interleaveNone, l2Promote256, oobZero = 0, 3, 0
	r := drv.cuTensorMapEncodeTiled(unsafe.Pointer(m), int32(dtype), 2, uintptr(base), unsafe.Pointer(dims), unsafe.Pointer(strides),
		unsafe.Pointer(box), unsafe.Pointer(estr), interleaveNone, int32(swizzle), l2Promote256, oobZero)
	if err := check("cuTensorMapEncodeTiled", r); err != nil {
		return fmt.Errorf("tensor map %d x %d (rows %d bytes apart) at %#x, box %d x %d: %w", inner, rows, rowBytes, uint64(base), boxInner, boxRows, err)
	}
	return nil
}
