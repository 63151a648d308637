package cuda

import (
	"fmt"
	"unsafe"
)

// R8FE4M3 is CUDA_R_8F_E4M3 (FP8, 4 exponent bits, 3 mantissa bits, max 448).
const R8FE4M3 DataType = 28

// cuBLASLt attributes and enums for scaled FP8 products (cublasLt.h, CUDA
// 12.9+/13.x; TestFP8Enums checks them against the header on the device).
const (
	descAScalePointer = 17 // CUBLASLT_MATMUL_DESC_A_SCALE_POINTER
	descBScalePointer = 18 // CUBLASLT_MATMUL_DESC_B_SCALE_POINTER
	descFastAccum     = 25 // CUBLASLT_MATMUL_DESC_FAST_ACCUM
	descAScaleMode    = 31 // CUBLASLT_MATMUL_DESC_A_SCALE_MODE
	descBScaleMode    = 32 // CUBLASLT_MATMUL_DESC_B_SCALE_MODE
	scaleOuterVec32F  = 3  // CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F
)

// FP8Enums lists the cuBLASLt names and values the FP8 path relies on (for
// checking against cublasLt.h).
func FP8Enums() map[string]int {
	return map[string]int{
		"CUDA_R_8F_E4M3":                             int(R8FE4M3),
		"CUBLASLT_MATMUL_DESC_A_SCALE_POINTER":       descAScalePointer,
		"CUBLASLT_MATMUL_DESC_B_SCALE_POINTER":       descBScalePointer,
		"CUBLASLT_MATMUL_DESC_FAST_ACCUM":            descFastAccum,
		"CUBLASLT_MATMUL_DESC_A_SCALE_MODE":          descAScaleMode,
		"CUBLASLT_MATMUL_DESC_B_SCALE_MODE":          descBScaleMode,
		"CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F": scaleOuterVec32F,
	}
}

// scaledKey marks a plan for the scaled FP8 product in the plan map (its
// gemmKey has both operand types R8FE4M3; beta0 is always true).
func scaledKey(T, N, K int, out DataType, sms int32, fast bool) gemmKey {
	return gemmKey{t: T, n: N, k: K, in: R8FE4M3, w: R8FE4M3, out: out, beta0: true, sms: sms, fast: fast}
}

// SetFastAccum makes the FP8 products planned from now on accumulate the
// tensor cores' way (CUBLASLT_MATMUL_DESC_FAST_ACCUM = 1: no periodic
// promotion of the partial sums to float32 in the CUDA cores, so more of
// the algorithms' time goes to the MMAs), or (false, the default) with
// cuBLASLt's promotion. Products of other types ignore it. peftd's own
// wgmma and mma.sync FP8 kernels never promote: with it, cuBLASLt's
// products accumulate as theirs do.
func (m *Matmul) SetFastAccum(on bool) { m.fast = on }

// FastAccum reports SetFastAccum's setting.
func (m *Matmul) FastAccum() bool { return m.fast }

// fastFor is SetFastAccum's setting for a product of these operand types.
func (m *Matmul) fastFor(in, w DataType) bool { return m.fast && in == R8FE4M3 && w == R8FE4M3 }

func setFastAccum(desc uintptr, on bool) error {
	if !on {
		return nil
	}
	v := int8(1) // CUBLASLT_MATMUL_DESC_FAST_ACCUM is an int8_t
	return checkBLAS("cublasLtMatmulDescSetAttribute", blas.cublasLtMatmulDescSetAttribute(desc, descFastAccum, unsafe.Pointer(&v), 1))
}

// planScaled makes (or finds) the plan of a scaled FP8 product. The scale
// pointers are set before the heuristic runs: cuBLASLt refuses (INVALID_VALUE)
// an outer-vector scale mode whose pointers are still null.
func (m *Matmul) planScaled(k gemmKey, inScale, wScale DevicePtr) (*gemmPlan, error) {
	if p := m.plans[k]; p != nil {
		return p, nil
	}
	p := &gemmPlan{}
	fail := func(err error) (*gemmPlan, error) {
		m.destroyPlan(p)
		return nil, err
	}
	set := func(attr int32, v int32) error {
		return checkBLAS("cublasLtMatmulDescSetAttribute", blas.cublasLtMatmulDescSetAttribute(p.desc, attr, unsafe.Pointer(&v), 4))
	}
	if err := checkBLAS("cublasLtMatmulDescCreate", blas.cublasLtMatmulDescCreate(&p.desc, cublasCompute32F, int32(R32F))); err != nil {
		return fail(err)
	}
	for _, a := range [][2]int32{{descTransA, opT}, {descTransB, opN}} {
		if err := set(a[0], a[1]); err != nil {
			return fail(fmt.Errorf("%w (attribute %d = %d)", err, a[0], a[1]))
		}
	}
	if err := setScales(p.desc, inScale, wScale); err != nil {
		return fail(err)
	}
	if err := setSMTarget(p.desc, k.sms); err != nil {
		return fail(err)
	}
	if err := setFastAccum(p.desc, k.fast); err != nil {
		return fail(err)
	}
	for _, a := range [][2]int32{{descAScaleMode, scaleOuterVec32F}, {descBScaleMode, scaleOuterVec32F}} {
		if err := set(a[0], a[1]); err != nil {
			return fail(fmt.Errorf("%w (attribute %d = %d)", err, a[0], a[1]))
		}
	}
	// Same column-major view as GemmTN: A = W (K x N, ld K) transposed, B = in (K x T, ld K), D = out (N x T, ld N).
	if err := checkBLAS("cublasLtMatrixLayoutCreate", blas.cublasLtMatrixLayoutCreate(&p.a, int32(R8FE4M3), uint64(k.k), uint64(k.n), int64(k.k))); err != nil {
		return fail(err)
	}
	if err := checkBLAS("cublasLtMatrixLayoutCreate", blas.cublasLtMatrixLayoutCreate(&p.b, int32(R8FE4M3), uint64(k.k), uint64(k.t), int64(k.k))); err != nil {
		return fail(err)
	}
	if err := checkBLAS("cublasLtMatrixLayoutCreate", blas.cublasLtMatrixLayoutCreate(&p.d, int32(k.out), uint64(k.n), uint64(k.t), int64(k.n))); err != nil {
		return fail(err)
	}
	var ret int32
	if err := checkBLAS("cublasLtMatmulAlgoGetHeuristic", blas.cublasLtMatmulAlgoGetHeuristic(m.h, p.desc, p.a, p.b, p.d, p.d, m.pref, 1, unsafe.Pointer(&p.algo[0]), &ret)); err != nil {
		return fail(fmt.Errorf("%w (FP8 T=%d N=%d K=%d -> %s)", err, k.t, k.n, k.k, k.out))
	}
	if ret == 0 {
		return fail(fmt.Errorf("%w: cuBLASLt has no FP8 outer-vector-scaled algorithm for T=%d N=%d K=%d -> %s", ErrNotSupported, k.t, k.n, k.k, k.out))
	}
	m.plans[k] = p
	return p, nil
}

// GemmTNScaled enqueues out[T,N] = (inScale[t] * wScale[n]) * sum_k in[t,k] * W[n,k]
// with in [T,K] and W [N,K] row-major FP8 e4m3, inScale ([T]) and wScale ([N])
// float32 device vectors (cuBLASLt's outer-vector scale mode on both
// operands), float32 accumulation, out row-major of outType (bf16 or f32).
// K must be a multiple of 16 (cuBLASLt's FP8 alignment rule).
func (m *Matmul) GemmTNScaled(s *Stream, out DevicePtr, outType DataType, in, inScale, w, wScale DevicePtr, T, N, K int) error {
	if T <= 0 || N <= 0 || K <= 0 || K%16 != 0 {
		return fmt.Errorf("%w: GemmTNScaled T=%d N=%d K=%d (K must be a positive multiple of 16)", ErrInvalidValue, T, N, K)
	}
	return m.c.Do(func() error {
		p, err := m.planScaled(scaledKey(T, N, K, outType, m.sms, m.fast), inScale, wScale)
		if err != nil {
			return err
		}
		// The scale pointers are read when the product is enqueued, so one
		// plan serves every weight of the shape.
		if err := setScales(p.desc, inScale, wScale); err != nil {
			return err
		}
		return m.enqueue(s, p, &p.algo, out, in, w, 1, 0)
	})
}

// setScales points the descriptor's A scale at the weight's row scales and
// its B scale at the activation's row scales.
func setScales(desc uintptr, inScale, wScale DevicePtr) error {
	a, b := wScale, inScale
	if err := checkBLAS("cublasLtMatmulDescSetAttribute", blas.cublasLtMatmulDescSetAttribute(desc, descAScalePointer, unsafe.Pointer(&a), 8)); err != nil {
		return err
	}
	return checkBLAS("cublasLtMatmulDescSetAttribute", blas.cublasLtMatmulDescSetAttribute(desc, descBScalePointer, unsafe.Pointer(&b), 8))
}
