package cuda

import (
	"fmt"
	"runtime"
	"unsafe"
)

// DataType is a cudaDataType.
type DataType int32

// Data types for matrix products.
const (
	R32F  DataType = 0
	R16F  DataType = 2
	R16BF DataType = 14
)

// Size is the element size in bytes.
func (t DataType) Size() int {
	switch t {
	case R32F:
		return 4
	case R8FE4M3:
		return 1
	}
	return 2
}

func (t DataType) String() string {
	switch t {
	case R32F:
		return "f32"
	case R16F:
		return "f16"
	case R16BF:
		return "bf16"
	case R8FE4M3:
		return "e4m3"
	}
	return fmt.Sprintf("cudaDataType(%d)", int32(t))
}

const (
	cublasCompute32F            = 68
	descTransA                  = 3 // CUBLASLT_MATMUL_DESC_TRANSA
	descTransB                  = 4
	descSMCountTarget           = 15 // CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET, int32
	prefMaxWorkspaceBytes       = 1  // CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES
	opN, opT              int32 = 0, 1
	heuristicResultSize         = 96 // sizeof(cublasLtMatmulHeuristicResult_t)
)

type cublasLtLib struct {
	path                                 string
	cublasLtCreate                       func(h *uintptr) int32
	cublasLtDestroy                      func(h uintptr) int32
	cublasLtGetVersion                   func() uint64
	cublasLtMatmulDescCreate             func(d *uintptr, compute, scale int32) int32
	cublasLtMatmulDescDestroy            func(d uintptr) int32
	cublasLtMatmulDescSetAttribute       func(d uintptr, attr int32, buf unsafe.Pointer, n uint64) int32
	cublasLtMatrixLayoutCreate           func(l *uintptr, typ int32, rows, cols uint64, ld int64) int32
	cublasLtMatrixLayoutDestroy          func(l uintptr) int32
	cublasLtMatrixLayoutSetAttribute     func(l uintptr, attr int32, buf unsafe.Pointer, n uint64) int32
	cublasLtMatmulPreferenceCreate       func(p *uintptr) int32
	cublasLtMatmulPreferenceDestroy      func(p uintptr) int32
	cublasLtMatmulPreferenceSetAttribute func(p uintptr, attr int32, buf unsafe.Pointer, n uint64) int32
	cublasLtMatmulAlgoGetHeuristic       func(h, desc, a, b, c, d, pref uintptr, req int32, results unsafe.Pointer, ret *int32) int32
	cublasLtMatmul                       func(h, desc uintptr, alpha unsafe.Pointer, A DevicePtr, Ad uintptr, B DevicePtr, Bd uintptr, beta unsafe.Pointer, C DevicePtr, Cd uintptr, D DevicePtr, Dd uintptr, algo unsafe.Pointer, ws DevicePtr, wsSize uint64, s cuStream) int32
	// an algorithm's configuration and capabilities (configVariants)
	cublasLtMatmulAlgoConfigGetAttribute func(algo unsafe.Pointer, attr int32, buf unsafe.Pointer, n uint64, written *uint64) int32
	cublasLtMatmulAlgoConfigSetAttribute func(algo unsafe.Pointer, attr int32, buf unsafe.Pointer, n uint64) int32
	cublasLtMatmulAlgoCapGetAttribute    func(algo unsafe.Pointer, attr int32, buf unsafe.Pointer, n uint64, written *uint64) int32
	cublasLtMatmulAlgoCheck              func(h, desc, a, b, c, d uintptr, algo unsafe.Pointer, result unsafe.Pointer) int32
}

var (
	blas     cublasLtLib
	blasLoad lazy
)

func loadCublasLt() error {
	return blasLoad.do(func() error {
		h, path, err := dlopen("cuBLASLt (libcublasLt.so.13/.12)", toolkitWhere(), libCandidates("libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"))
		if err != nil {
			return fmt.Errorf("%w: %v", ErrNoLibrary, err)
		}
		l := cublasLtLib{path: path}
		b := &binder{lib: path, h: h}
		b.fn(&l.cublasLtCreate, "cublasLtCreate")
		b.fn(&l.cublasLtDestroy, "cublasLtDestroy")
		b.fn(&l.cublasLtGetVersion, "cublasLtGetVersion")
		b.fn(&l.cublasLtMatmulDescCreate, "cublasLtMatmulDescCreate")
		b.fn(&l.cublasLtMatmulDescDestroy, "cublasLtMatmulDescDestroy")
		b.fn(&l.cublasLtMatmulDescSetAttribute, "cublasLtMatmulDescSetAttribute")
		b.fn(&l.cublasLtMatrixLayoutCreate, "cublasLtMatrixLayoutCreate")
		b.fn(&l.cublasLtMatrixLayoutDestroy, "cublasLtMatrixLayoutDestroy")
		b.fn(&l.cublasLtMatrixLayoutSetAttribute, "cublasLtMatrixLayoutSetAttribute")
		b.fn(&l.cublasLtMatmulPreferenceCreate, "cublasLtMatmulPreferenceCreate")
		b.fn(&l.cublasLtMatmulPreferenceDestroy, "cublasLtMatmulPreferenceDestroy")
		b.fn(&l.cublasLtMatmulPreferenceSetAttribute, "cublasLtMatmulPreferenceSetAttribute")
		b.fn(&l.cublasLtMatmulAlgoGetHeuristic, "cublasLtMatmulAlgoGetHeuristic")
		b.fn(&l.cublasLtMatmul, "cublasLtMatmul")
		b.fn(&l.cublasLtMatmulAlgoConfigGetAttribute, "cublasLtMatmulAlgoConfigGetAttribute")
		b.fn(&l.cublasLtMatmulAlgoConfigSetAttribute, "cublasLtMatmulAlgoConfigSetAttribute")
		b.fn(&l.cublasLtMatmulAlgoCapGetAttribute, "cublasLtMatmulAlgoCapGetAttribute")
		b.fn(&l.cublasLtMatmulAlgoCheck, "cublasLtMatmulAlgoCheck")
		if b.err != nil {
			return fmt.Errorf("%w: %v", ErrNoLibrary, b.err)
		}
		blas = l
		return nil
	})
}

// CublasLtPath is the loaded cuBLASLt library ("" before use).
func CublasLtPath() string { return blas.path }

// CublasLtVersion is cublasLtGetVersion (e.g. 130100).
func CublasLtVersion() (int, error) {
	if err := loadCublasLt(); err != nil {
		return 0, err
	}
	return int(blas.cublasLtGetVersion()), nil
}

type gemmKey struct {
	t, n, k    int
	in, w, out DataType
	beta0      bool
	sms        int32 // CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET (0: every SM)
	split      int   // > 1: GemmTNSplitK's batch of K slices (f32 partials)
	fast       bool  // CUBLASLT_MATMUL_DESC_FAST_ACCUM (FP8 operands only: SetFastAccum)
}

type gemmPlan struct {
	desc, a, b, d uintptr
	algo          [heuristicResultSize]byte
}

// Matmul runs matrix products through cuBLASLt on one context, caching a plan
// (descriptors and the heuristic's algorithm) per shape.
type Matmul struct {
	c           *Context
	h           uintptr
	ws          *DeviceBuffer
	pref        uintptr
	plans       map[gemmKey]*gemmPlan
	alpha, beta *[1]float32
	sms         int32 // SetSMTarget
	fast        bool  // SetFastAccum
	pin         runtime.Pinner
	track       bool          // TrackCaptures: note each product's place in a capture
	calls       []LibraryCall // the products enqueued on capturing streams since TrackCaptures
}

// LibraryCall is where one product cuBLASLt enqueued on a capturing stream
// sits in the capture: the nodes its first operation depends on (Before)
// and those the stream's next work would (After: its last kernel).
// cuBLASLt may put a memset of its workspace first (a Before dependant that
// is not a kernel of its own call's GEMM); see runtime/gpu's hoist.
type LibraryCall struct {
	Before, After []GraphNode
}

// TrackCaptures turns on (or off) noting each product enqueued on a
// capturing stream, and returns (and forgets) those noted so far.
func (m *Matmul) TrackCaptures(on bool) []LibraryCall {
	calls := m.calls
	m.track, m.calls = on, nil
	return calls
}

// NewMatmul creates a cuBLASLt handle and a workspace of wsBytes.
func (c *Context) NewMatmul(wsBytes int) (*Matmul, error) {
	if err := loadCublasLt(); err != nil {
		return nil, err
	}
	m := &Matmul{c: c, plans: map[gemmKey]*gemmPlan{}, alpha: new([1]float32), beta: new([1]float32)}
	m.pin.Pin(m.alpha)
	m.pin.Pin(m.beta)
	var err error
	if m.ws, err = c.Alloc(wsBytes); err != nil {
		return nil, err
	}
	err = c.Do(func() error {
		if err := checkBLAS("cublasLtCreate", blas.cublasLtCreate(&m.h)); err != nil {
			return err
		}
		if err := checkBLAS("cublasLtMatmulPreferenceCreate", blas.cublasLtMatmulPreferenceCreate(&m.pref)); err != nil {
			return err
		}
		ws := uint64(wsBytes)
		return checkBLAS("cublasLtMatmulPreferenceSetAttribute",
			blas.cublasLtMatmulPreferenceSetAttribute(m.pref, prefMaxWorkspaceBytes, unsafe.Pointer(&ws), 8))
	})
	if err != nil {
		m.Close()
		return nil, err
	}
	return m, nil
}

func (m *Matmul) plan(k gemmKey) (*gemmPlan, error) {
	if p := m.plans[k]; p != nil {
		return p, nil
	}
	p := &gemmPlan{}
	fail := func(err error) (*gemmPlan, error) {
		m.destroyPlan(p)
		return nil, err
	}
	if err := checkBLAS("cublasLtMatmulDescCreate", blas.cublasLtMatmulDescCreate(&p.desc, cublasCompute32F, int32(R32F))); err != nil {
		return fail(err)
	}
	if err := setSMTarget(p.desc, k.sms); err != nil {
		return fail(err)
	}
	if err := setFastAccum(p.desc, k.fast); err != nil {
		return fail(err)
	}
	ta, tb := opT, opN
	if err := checkBLAS("cublasLtMatmulDescSetAttribute", blas.cublasLtMatmulDescSetAttribute(p.desc, descTransA, unsafe.Pointer(&ta), 4)); err != nil {
		return fail(err)
	}
	if err := checkBLAS("cublasLtMatmulDescSetAttribute", blas.cublasLtMatmulDescSetAttribute(p.desc, descTransB, unsafe.Pointer(&tb), 4)); err != nil {
		return fail(err)
	}
	// Column-major view: D[N,T] = W^T-view... A = W as (K x N, ld K) transposed,
	// B = in as (K x T, ld K), D = out as (N x T, ld N).
	// A split product (GemmTNSplitK) walks K/split columns of the same rows
	// (ld K) per batch entry, the entries K/split apart; its partials are
	// [split][T][N].
	kc := k.k / max(k.split, 1)
	if err := checkBLAS("cublasLtMatrixLayoutCreate", blas.cublasLtMatrixLayoutCreate(&p.a, int32(k.w), uint64(kc), uint64(k.n), int64(k.k))); err != nil {
		return fail(err)
	}
	if err := checkBLAS("cublasLtMatrixLayoutCreate", blas.cublasLtMatrixLayoutCreate(&p.b, int32(k.in), uint64(kc), uint64(k.t), int64(k.k))); err != nil {
		return fail(err)
	}
	if err := checkBLAS("cublasLtMatrixLayoutCreate", blas.cublasLtMatrixLayoutCreate(&p.d, int32(k.out), uint64(k.n), uint64(k.t), int64(k.n))); err != nil {
		return fail(err)
	}
	if k.split > 1 {
		for _, b := range []struct {
			l      uintptr
			stride int64
		}{{p.a, int64(kc)}, {p.b, int64(kc)}, {p.d, int64(k.t) * int64(k.n)}} {
			if err := setBatch(b.l, int32(k.split), b.stride); err != nil {
				return fail(fmt.Errorf("%w (split %d)", err, k.split))
			}
		}
	}
	var ret int32
	if err := checkBLAS("cublasLtMatmulAlgoGetHeuristic", blas.cublasLtMatmulAlgoGetHeuristic(m.h, p.desc, p.a, p.b, p.d, p.d, m.pref, 1, unsafe.Pointer(&p.algo[0]), &ret)); err != nil {
		return fail(fmt.Errorf("%w (T=%d N=%d K=%d split %d %s x %s -> %s)", err, k.t, k.n, k.k, max(k.split, 1), k.in, k.w, k.out))
	}
	if ret == 0 {
		return fail(fmt.Errorf("%w: cuBLASLt has no algorithm for T=%d N=%d K=%d split %d %s x %s -> %s", ErrNotSupported, k.t, k.n, k.k, max(k.split, 1), k.in, k.w, k.out))
	}
	m.plans[k] = p
	return p, nil
}

// SetSMTarget makes the products enqueued from now on plan for n
// multiprocessors (cuBLASLt's SM count target: its heuristic and grid
// then leave the rest to work on another stream); 0 restores every SM.
func (m *Matmul) SetSMTarget(n int) { m.sms = int32(max(n, 0)) }

func setSMTarget(desc uintptr, n int32) error {
	if n == 0 {
		return nil
	}
	return checkBLAS("cublasLtMatmulDescSetAttribute", blas.cublasLtMatmulDescSetAttribute(desc, descSMCountTarget, unsafe.Pointer(&n), 4))
}

func (m *Matmul) destroyPlan(p *gemmPlan) {
	for _, l := range []uintptr{p.a, p.b, p.d} {
		if l != 0 {
			blas.cublasLtMatrixLayoutDestroy(l)
		}
	}
	if p.desc != 0 {
		blas.cublasLtMatmulDescDestroy(p.desc)
	}
}

// GemmTN enqueues out[T,N] = alpha * in[T,K] @ W[N,K]^T + beta * out, all
// row-major and densely packed, accumulating in float32.
func (m *Matmul) GemmTN(s *Stream, out DevicePtr, outType DataType, in DevicePtr, inType DataType, w DevicePtr, wType DataType, T, N, K int, alpha, beta float32) error {
	if T <= 0 || N <= 0 || K <= 0 {
		return fmt.Errorf("%w: GemmTN T=%d N=%d K=%d", ErrInvalidValue, T, N, K)
	}
	return m.c.Do(func() error {
		p, err := m.plan(gemmKey{t: T, n: N, k: K, in: inType, w: wType, out: outType, beta0: beta == 0, sms: m.sms, fast: m.fastFor(inType, wType)})
		if err != nil {
			return err
		}
		return m.enqueue(s, p, &p.algo, out, in, w, alpha, beta)
	})
}

// enqueue runs plan p's product with algorithm algo on s: out = alpha *
// in @ w^T + beta * out. On the context's thread (Context.Do).
func (m *Matmul) enqueue(s *Stream, p *gemmPlan, algo *[heuristicResultSize]byte, out, in, w DevicePtr, alpha, beta float32) error {
	m.alpha[0], m.beta[0] = alpha, beta
	var before []GraphNode
	if m.track {
		before, _ = s.captureLeaves() // not capturing (an error): nothing to note
	}
	err := checkBLAS("cublasLtMatmul", blas.cublasLtMatmul(m.h, p.desc, unsafe.Pointer(m.alpha), w, p.a, in, p.b,
		unsafe.Pointer(m.beta), out, p.d, out, p.d, unsafe.Pointer(&algo[0]), m.ws.Ptr(), uint64(m.ws.Size()), s.s))
	if err == nil {
		s.afterKernel = true // cuBLASLt's last operation is its GEMM (or split-K reduce) kernel
		if len(before) > 0 {
			if after, lerr := s.captureLeaves(); lerr == nil {
				m.calls = append(m.calls, LibraryCall{Before: before, After: after})
			}
		}
	}
	return err
}

// Close releases the handle, the plans and the workspace.
func (m *Matmul) Close() error {
	if m == nil || m.c == nil {
		return nil
	}
	err := m.c.Do(func() error {
		for _, p := range m.plans {
			m.destroyPlan(p)
		}
		m.plans = nil
		if m.pref != 0 {
			blas.cublasLtMatmulPreferenceDestroy(m.pref)
			m.pref = 0
		}
		if m.h != 0 {
			r := blas.cublasLtDestroy(m.h)
			m.h = 0
			return checkBLAS("cublasLtDestroy", r)
		}
		return nil
	})
	if e := m.ws.Free(); err == nil {
		err = e
	}
	m.pin.Unpin()
	m.c = nil
	return err
}
