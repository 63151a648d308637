package cuda

import (
	"errors"
	"fmt"
	"unsafe"
)

// cuBLASLt matrix layout attributes of a strided batch (cublasLt.h).
const (
	layoutBatchCount  = 5 // CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, int32
	layoutBatchStride = 6 // CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, int64 (elements)
)

// setBatch makes layout l a strided batch of count matrices, stride
// elements apart.
func setBatch(l uintptr, count int32, stride int64) error {
	if err := checkBLAS("cublasLtMatrixLayoutSetAttribute", blas.cublasLtMatrixLayoutSetAttribute(l, layoutBatchCount, unsafe.Pointer(&count), 4)); err != nil {
		return err
	}
	return checkBLAS("cublasLtMatrixLayoutSetAttribute", blas.cublasLtMatrixLayoutSetAttribute(l, layoutBatchStride, unsafe.Pointer(&stride), 8))
}

// GemmTNSplitK enqueues the partial products of a K split splits ways:
//
//	part[s, t, n] = sum_{k in slice s} in[t, k] * W[n, k]
//
// with in [T,K] and W [N,K] row-major of inType and wType (bf16, or FP8
// e4m3 for both, unscaled), float32 accumulation and float32 partials
// part [splits, T, N]: slice s is K/splits columns starting at s*K/splits.
// One strided-batched cuBLASLt product (the batch is the split), so a
// product of few rows and few output tiles fills more SMs than one walk over
// K; the caller sums the partials (and applies any scales). K/splits must
// be a multiple of 16 (FP8 alignment). An error wrapping ErrNotSupported
// means cuBLASLt has no plan for it, and nothing was enqueued.
func (m *Matmul) GemmTNSplitK(s *Stream, part DevicePtr, in DevicePtr, inType DataType, w DevicePtr, wType DataType, T, N, K, splits int) error {
	if T <= 0 || N <= 0 || K <= 0 || splits < 1 || K%(16*splits) != 0 {
		return fmt.Errorf("%w: GemmTNSplitK T=%d N=%d K=%d split %d (K/split must be a positive multiple of 16)", ErrInvalidValue, T, N, K, splits)
	}
	return m.c.Do(func() error {
		p, err := m.plan(gemmKey{t: T, n: N, k: K, in: inType, w: wType, out: R32F, beta0: true, sms: m.sms, split: splits, fast: m.fastFor(inType, wType)})
		if err != nil {
			if errors.Is(err, ErrNotSupported) {
				return err
			}
			return fmt.Errorf("%w: %w", ErrNotSupported, err) // nothing was enqueued: the caller may take another way
		}
		return m.enqueue(s, p, &p.algo, part, in, w, 1, 0)
	})
}

// SMTarget is the SM count target of the products enqueued now (0: every
// SM; SetSMTarget).
func (m *Matmul) SMTarget() int { return int(m.sms) }
