// common.cuh: what peftd's kernel sources share (llama.cu, sgmv.cu,
// fp8.cu): types, Programmatic Dependent Launch entry, warp and block
// reductions, cp.async, the bf16 MMA, and the LoRA table and SGMV helpers.
// kernels.Load puts it in place of the `#include "common.cuh"` line before
// NVRTC compiles a source (the cache key covers it); clang's
// kernels-check reads it from this folder.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp8.h>

typedef __nv_bfloat16 bf16;
typedef long long i64;

// pdl_wait and pdl_trigger: pdl_entry's two halves, also for a kernel
// that lets the next one be scheduled before it waits (attn_decode after
// attn_prefill: opts bit 5).
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// pdl_entry: with Programmatic Dependent Launch (runtime/cuda
// Stream.SetProgrammaticLaunch) a kernel's blocks may start while the kernel
// before it on the stream still runs. Every kernel calls this first (or
// after touching only what no kernel writes: fp8_gemv asks L2 for its
// weights first): it waits for that kernel to finish and its writes to be
// visible (so nothing is read early, nor overwritten while the other kernel
// still reads it), then lets the next kernel's blocks be scheduled as this
// one's finish. A no-op for a normal launch, and before sm_90.
// (Letting the next kernel be scheduled before the wait, so a chain of
// kernels is resident ahead of the one running, was measured in v0.24: no
// change in bf16 decode, FP8 at 16 rows 3.79 -> 3.99 ms.)
__device__ __forceinline__ void pdl_entry() {
    pdl_wait();
    pdl_trigger();
}

// globaltimer_ns: the GPU's global nanosecond clock (%globaltimer; 32 ns
// steps on Hopper), comparable across blocks and SMs.
__device__ __forceinline__ unsigned long long globaltimer_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// block_reduce: the sum (MAX: the max) over the block (blockDim.x a
// multiple of 32; 0 stands in for absent warps, so block_max is for values
// >= 0 such as amax); sh holds 33 floats. Every thread gets the result.
template <bool MAX> __device__ float block_reduce(float v, float* sh) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = MAX ? warp_max(v) : warp_sum(v);
    if (lane == 0) sh[w] = v;
    __syncthreads();
    if (w == 0) {
        float x = lane < nw ? sh[lane] : 0.f;
        x = MAX ? warp_max(x) : warp_sum(x);
        if (lane == 0) sh[32] = x;
    }
    __syncthreads();
    float r = sh[32];
    __syncthreads();
    return r;
}
__device__ __forceinline__ float block_sum(float v, float* sh) { return block_reduce<false>(v, sh); }
__device__ __forceinline__ float block_max(float v, float* sh) { return block_reduce<true>(v, sh); }

// cp_async16 copies 16 bytes from global to shared memory without passing
// through registers (n == 0: fills zeros, reads nothing); cp_async_commit
// closes a group, cp_async_wait<N> waits until at most N of this thread's
// groups are pending.
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, int n) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// lds16 reads 16 bytes of shared memory at shared-space address a (what
// cp_async16 wrote there).
__device__ __forceinline__ uint4 lds16(unsigned a) {
    uint4 v;
    asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(a));
    return v;
}
// cp_async4, cp_async8: the same for 4 and 8 bytes (through L1: .cg takes only 16).
__device__ __forceinline__ void cp_async4(unsigned dst, const void* src, int n) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async8(unsigned dst, const void* src, int n) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}

// mma_e4m3: c += a * b on the tensor cores (m16n8k32, e4m3 in, f32 out):
// a0..a3 A[g][4t..4t+3], A[g+8][4t..], A[g][16+4t..], A[g+8][16+4t..]
// (g = lane / 4, t = lane % 4); b0, b1 B[4t..4t+3][g], B[16+4t..][g].
__device__ __forceinline__ void mma_e4m3(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 890
    __trap(); // no FP8 tensor cores before sm_89 (the Go side never launches it there)
#else
    asm("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

// FP8_WIDE: on sm_90 `mma.sync ... e4m3` has no FP8 tensor-core
// instruction of its own: ptxas unpacks both operands to f16 (F2FP) and
// runs two f16 HMMAs, whose sums then take extra FADDs. So there the FP8
// products (fp8.cu) widen each operand once where it is loaded
// (e4m3x4_f16) and chain f16 MMAs straight into the accumulators
// (mma_e4m3w): the same exact products (f16 holds every e4m3 value) and
// f32 sums, fewer instructions. v0.27: fp8_stream_n32's SASS 88 -> 24
// FADDs, FP8 decode at 16 rows 3.74 -> 3.55 ms. Elsewhere (sm_89 has
// native FP8 MMAs; later cards are unmeasured) the e4m3 MMAs stay.
// PEFTD_KERNEL_DEFINES: PEFTD_FP8_E4M3MMA keeps the e4m3 MMAs on sm_90 too
// (the A/B), PEFTD_FP8_WIDE widens on any card from sm_89.
#if defined(PEFTD_FP8_WIDE) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900 && !defined(PEFTD_FP8_E4M3MMA))
#define FP8_WIDE 1
#else
#define FP8_WIDE 0
#endif
// e4m3x4_f16: the four e4m3 values of v as two f16x2 (bytes 0-1 in lo,
// bytes 2-3 in hi, the lower byte in the lower half).
__device__ __forceinline__ void e4m3x4_f16(unsigned v, unsigned& lo, unsigned& hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 890
    __trap();
    lo = hi = 0;
#else
    asm("{\n.reg .b16 l, h;\nmov.b32 {l, h}, %2;\ncvt.rn.f16x2.e4m3x2 %0, l;\ncvt.rn.f16x2.e4m3x2 %1, h;\n}\n"
        : "=r"(lo), "=r"(hi)
        : "r"(v));
#endif
}

// mma_e4m3w: mma_e4m3 on widened operands: w[2i], w[2i+1] are e4m3x4_f16
// of ai (i = 0..3), v[2j], v[2j+1] of bj. Two m16n8k16 f16 MMAs, each
// pairing the same k's of A and B (slot 2t+{0,1} holds k 4t+{0,1}, slot
// 8+2t+{0,1} holds k 4t+2+{0,1}, the second MMA the same from k = 16 on).
__device__ __forceinline__ void mma_e4m3w(float* c, const unsigned* w, const unsigned* v) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(w[0]), "r"(w[2]), "r"(w[1]), "r"(w[3]), "r"(v[0]), "r"(v[1]));
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(w[4]), "r"(w[6]), "r"(w[5]), "r"(w[7]), "r"(v[2]), "r"(v[3]));
}

// widen_e4m3<N>: e4m3x4_f16 of a[0..N) into w[0..2N).
template <int N> __device__ __forceinline__ void widen_e4m3(const unsigned* a, unsigned* w) {
#pragma unroll
    for (int i = 0; i < N; i++) e4m3x4_f16(a[i], w[2 * i], w[2 * i + 1]);
}

// e4m3x2_float2: two e4m3 values (the low byte first) as floats, exactly
// (through f16, which holds every e4m3 value). sm_89 and later.
__device__ __forceinline__ float2 e4m3x2_float2(unsigned short v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 890
    __trap();
    return make_float2(0.f, 0.f);
#else
    unsigned h2;
    unsigned short lo, hi;
    float a, b;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;\n" : "=r"(h2) : "h"(v));
    asm("mov.b32 {%0, %1}, %2;\n" : "=h"(lo), "=h"(hi) : "r"(h2));
    asm("cvt.f32.f16 %0, %1;\n" : "=f"(a) : "h"(lo));
    asm("cvt.f32.f16 %0, %1;\n" : "=f"(b) : "h"(hi));
    return make_float2(a, b);
#endif
}
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// mma.sync m16n8k16 bf16 -> f32: c += a * b.
__device__ __forceinline__ void mma16816(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// pack_bf2: (lo, hi) rounded to a bf16 pair in one word.
__device__ __forceinline__ unsigned pack_bf2(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
}

// split2: the bf16 pair of (a, b) and the bf16 pair of their residuals
// (the LoRA expands' A fragments: float32 precision from two bf16 MMAs).
__device__ __forceinline__ void split2(float a, float b, unsigned& hi, unsigned& lo) {
    hi = pack_bf2(a, b);
    const __nv_bfloat162 h = *reinterpret_cast<const __nv_bfloat162*>(&hi);
    const float2 f = __bfloat1622float2(h);
    lo = pack_bf2(a - f.x, b - f.y);
}

// ldsm4 / ldsm4t: four 8x8 matrices of 16-bit values (bf16, or e4m3
// byte pairs) from shared memory (lane l gives the address of row l%8 of
// matrix l/8), as mma fragments; t: transposed.
__device__ __forceinline__ void ldsm4(unsigned a, unsigned* r) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
__device__ __forceinline__ void ldsm4t(unsigned a, unsigned* r) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

// sk_slot (gemm_skinny, fp8_stream): the shared address of
// 16-byte chunk c of row r of a tile at t with rows of rb bytes (chunks
// XOR-swizzled by the row in groups of 8, so the 8 rows an ldmatrix reads
// fall in 8 different bank groups)
__device__ __forceinline__ unsigned sk_slot(unsigned t, int rb, int r, int c) { return t + r * rb + ((c ^ (r & 7)) << 4); }

// SGMV (LoRA) tiling shared by llama.cu's kernels and sgmv.cu's.
#define SG_TR 16       // rows per tile (the MMA's M)
#define SG_WARPS 8     // shrink: warps per block, splitting K
#ifndef SG_SU
#define SG_SU 4 // sgmv_shrink: K-iterations a warp has in flight (0: as the compiler orders them, one ahead)
#endif
#define SG_EX_CHUNKS 8 // expand: B loads kept in registers, ranks up to 64

// LoRA table entry, one per (slot, layer, module): A [rank, in], B [out, rank].
struct LoraEntry {
    const bf16* a;
    const bf16* b;
    int rank;
    float scale;
    int pad[2];
};

__device__ __forceinline__ int sg_mod(int s, int m0, int m1, int m2) { return s == 0 ? m0 : (s == 1 ? m1 : m2); }

__device__ __forceinline__ unsigned ld_acquire_u32(const unsigned* p) {
    unsigned v;
    asm volatile("ld.acquire.gpu.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ uint4 ldg16(const bf16* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

// ldg16_early: ldg16 for what a kernel reads before griddepcontrol.wait
// (adapter weights). A volatile asm, so that ptxas keeps it before the
// wait (also a volatile asm): plain __ldg loads were sunk past it (SASS of
// sgmv_expand_tc1 before v0.61: its B loads after ACQBULK). With
// -DPEFTD_LATE_EARLY the plain load, as before.
__device__ __forceinline__ uint4 ldg16_early(const bf16* p) {
#ifdef PEFTD_LATE_EARLY
    return ldg16(p);
#else
    uint4 v;
    asm volatile("ld.global.v4.u32 {%0,%1,%2,%3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p) : "memory");
    return v;
#endif
}

// shrink_round: one round of a shrink warp's loads and MMAs: U iterations
// of 32 columns, STEP apart from cb (each lane 8 contiguous columns of the
// rows x0, x1 and the rank row ar, zero where invalid or past kend), every
// load issued before the first MMA: dep makes that MMA wait for one word
// of each (a load's words land together) and, masked by zero (0, which the
// compiler cannot know), adds 0. c: the m16n8 C fragment (rows g, g + 8;
// ranks 2q, 2q + 1).
template <int U, int STEP>
__device__ __forceinline__ void shrink_round(float* c, const bf16* x0, const bf16* x1, const bf16* ar, int cb, int kend, int q,
                                             bool v0, bool v1, bool va, unsigned zero) {
    const uint4 z4 = make_uint4(0, 0, 0, 0);
    uint4 xa[U], xb[U], aa[U];
    unsigned dep = 0;
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int col = cb + u * STEP + q * 8;
        const bool in = col < kend;
        xa[u] = (in && v0) ? ldg16(x0 + col) : z4;
        xb[u] = (in && v1) ? ldg16(x1 + col) : z4;
        aa[u] = (in && va) ? ldg16(ar + col) : z4;
    }
#pragma unroll
    for (int u = 0; u < U; u++) dep |= xa[u].x ^ xb[u].x ^ aa[u].x;
    c[0] += __int_as_float(dep & zero); // + 0.0f
#pragma unroll
    for (int u = 0; u < U; u++) {
        mma16816(c, xa[u].x, xb[u].x, xa[u].y, xb[u].y, aa[u].x, aa[u].y);
        mma16816(c, xa[u].z, xb[u].z, xa[u].w, xb[u].w, aa[u].z, aa[u].w);
    }
}

// expand_chunk: acc{0,1}[r] += t[r*w + 0..7] . (8 bf16 of B row j, j+1) for rows r < n.
__device__ __forceinline__ void expand_chunk(float* acc0, float* acc1, const float* t, int w, int n, uint4 a, uint4 b) {
    float f0[8], f1[8];
    const __nv_bfloat162* p0 = reinterpret_cast<const __nv_bfloat162*>(&a);
    const __nv_bfloat162* p1 = reinterpret_cast<const __nv_bfloat162*>(&b);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const float2 x0 = __bfloat1622float2(p0[i]), x1 = __bfloat1622float2(p1[i]);
        f0[2 * i] = x0.x, f0[2 * i + 1] = x0.y, f1[2 * i] = x1.x, f1[2 * i + 1] = x1.y;
    }
#pragma unroll
    for (int r = 0; r < SG_TR; r++) {
        if (r < n) {
            const float4 ta = *reinterpret_cast<const float4*>(t + r * w);
            const float4 tb = *reinterpret_cast<const float4*>(t + r * w + 4);
            acc0[r] += ta.x * f0[0] + ta.y * f0[1] + ta.z * f0[2] + ta.w * f0[3] + tb.x * f0[4] + tb.y * f0[5] + tb.z * f0[6] + tb.w * f0[7];
            acc1[r] += ta.x * f1[0] + ta.y * f1[1] + ta.z * f1[2] + ta.w * f1[3] + tb.x * f1[4] + tb.y * f1[5] + tb.z * f1[6] + tb.w * f1[7];
        }
    }
}

// unpack8/pack8: 8 bf16 in a 16-byte word <-> 8 floats.
__device__ __forceinline__ void unpack8(uint4 u, float* f) {
    const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const float2 v = __bfloat1622float2(p[i]);
        f[2 * i] = v.x, f[2 * i + 1] = v.y;
    }
}
__device__ __forceinline__ uint4 pack8(const float* f) {
    uint4 u;
    __nv_bfloat162* p = reinterpret_cast<__nv_bfloat162*>(&u);
#pragma unroll
    for (int i = 0; i < 4; i++) p[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
    return u;
}

// amax8: the largest magnitude of the 8 stored bf16 values of w into m,
// bad set when one is not finite (the per-row FP8 quantization's scale).
__device__ __forceinline__ void amax8(uint4 w, float& m, int& bad) {
    float v[8];
    unpack8(w, v);
#pragma unroll
    for (int i = 0; i < 8; i++) {
        const float a = fabsf(v[i]);
        bad |= !(a <= 3.4e38f);
        m = fmaxf(m, a);
    }
}

// amax1: the max |v| (m) and non-finite flag (bad) over bf16 values one at a
// time, as amax8 keeps them for a word.
__device__ __forceinline__ void amax1(bf16 v, float& m, int& bad) {
    const float a = fabsf(__bfloat162float(v));
    bad |= !(a <= 3.4e38f);
    m = fmaxf(m, a);
}

// e4m3_scale: a row's scale *s from its max |v| (amax) and non-finite
// flag (bad), and the factor its values are multiplied by.
__device__ __forceinline__ float e4m3_scale(float amax, int bad, float* s) {
    if (bad) {
        *s = __int_as_float(0x7fc00000);
        return 0.f;
    }
    if (amax == 0.f) {
        *s = 1.f;
        return 0.f;
    }
    *s = amax / 448.f;
    return fminf(448.f / amax, 3.402823466e38f); // a subnormal amax: no Inf (0 * Inf is NaN)
}

// e4m3_inv: the row's scale from the block's max |v| (m, per thread) and
// non-finite flag (bad), as quant_row_e4m3 says, stored into *qscale by
// thread 0; returns the factor the values are multiplied by (0 for a zero
// or non-finite row). Every thread of the block calls it.
__device__ float e4m3_inv(float m, int bad, float* qscale, float* sh) {
    bad = __syncthreads_or(bad);
    float s;
    const float inv = e4m3_scale(block_max(m, sh), bad, &s);
    if (threadIdx.x == 0) *qscale = s;
    return inv;
}

// e4m3_word: the 8 bf16 values of a 16-byte word times inv, as 8 e4m3
// bytes (satfinite, round to nearest even).
__device__ __forceinline__ uint2 e4m3_word(uint4 u, float inv) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
    uint2 o;
    unsigned short* os = reinterpret_cast<unsigned short*>(&o);
#pragma unroll
    for (int j = 0; j < 4; j++) {
        float2 f = __bfloat1622float2(h[j]);
        f.x *= inv;
        f.y *= inv;
        os[j] = __nv_cvt_float2_to_fp8x2(f, __NV_SATFINITE, __NV_E4M3);
    }
    return o;
}

// quant_row_e4m3 quantizes the bf16 row out (n values, 16-byte words when
// vec) to e4m3 with one scale, for the FP8 projections (fp8.cu's
// quant_rows_e4m3, and the kernels that quantize the row they have just
// written: add_rmsnorm, silu_mul): scale = amax / 448 (1 for a zero row, NaN for a row
// holding Inf or NaN, whose values become zeros), q = e4m3_satfinite(v /
// scale; 448 / amax clamped to FLT_MAX). m and bad are this thread's max |v| and non-finite flag over the
// values it wrote; every thread of the block calls it.
__device__ void quant_row_e4m3(const bf16* out, unsigned char* q, float* qscale, int n, bool vec, float m, int bad, float* sh) {
    const float inv = e4m3_inv(m, bad, qscale, sh);
    if (vec) {
        const uint4* o8 = reinterpret_cast<const uint4*>(out);
        for (int c = threadIdx.x; c < n / 8; c += blockDim.x) *reinterpret_cast<uint2*>(q + 8 * c) = e4m3_word(o8[c], inv);
    } else {
        for (int i = threadIdx.x; i < n; i += blockDim.x) q[i] = __nv_cvt_float_to_fp8(__bfloat162float(out[i]) * inv, __NV_SATFINITE, __NV_E4M3);
    }
}

// quant_words_e4m3: quant_row_e4m3 of a row the block holds in registers:
// thread t's w[j] is 16-byte word t + j * blockDim.x of the row (those
// below n8 are the row's), so the row is not read back for its scale.
template <int NW>
__device__ void quant_words_e4m3(const uint4 (&w)[NW], int n8, unsigned char* q, float* qscale, float m, int bad, float* sh) {
    const float inv = e4m3_inv(m, bad, qscale, sh);
#pragma unroll
    for (int j = 0; j < NW; j++) {
        const int c = threadIdx.x + j * blockDim.x;
        if (c < n8) *reinterpret_cast<uint2*>(q + 8 * c) = e4m3_word(w[j], inv);
    }
}

// add_rmsnorm's pieces (llama.cu), here for ws_body's NORM end too.
// ADD_RC: 16-byte words of a row each thread of add_rmsnorm keeps in
// registers (rows of up to 32 * blockDim values).
#define ADD_RC 4 // 16-byte words of a row each thread keeps in registers (rows of up to 32 * blockDim values)

// add8: a += d (8 floats from 16-byte aligned d), each sum rounded to bf16
// (a LoRA update added to a projection's output, as an update in place would).
__device__ __forceinline__ void add8(float* a, const float* d) {
    const float4 d0 = *reinterpret_cast<const float4*>(d), d1 = *reinterpret_cast<const float4*>(d + 4);
    float f[8] = {a[0] + d0.x, a[1] + d0.y, a[2] + d0.z, a[3] + d0.w, a[4] + d1.x, a[5] + d1.y, a[6] + d1.z, a[7] + d1.w};
    unpack8(pack8(f), a);
}

// add8 of a bf16 update (8 values from 16-byte aligned d): the same sums
// of values already rounded to bf16 (silu_mul_h / _o2h / _clh's gate/up
// updates).
__device__ __forceinline__ void add8(float* a, const bf16* d) {
    __align__(16) float dv[8];
    unpack8(*reinterpret_cast<const uint4*>(d), dv);
    add8(a, dv);
}

// add_word: word c of row x8 plus d8's (and the update row's: e8 float32,
// or bf16 for add_rmsnorm_h; summed and rounded to bf16 first), rounded to
// bf16 and stored back when there is a delta.
__device__ __forceinline__ void add_upd(float* d, const float4* e8, int c) { add8(d, reinterpret_cast<const float*>(e8 + 2 * c)); }
__device__ __forceinline__ void add_upd(float* d, const bf16* e, int c) { add8(d, e + 8 * c); }
template <class E>
__device__ __forceinline__ uint4 add_word(uint4* x8, const uint4* d8, const E* e8, int c) {
    const uint4 xv = x8[c];
    if (!d8) return xv;
    float v[8], d[8];
    unpack8(xv, v);
    unpack8(d8[c], d);
    if (e8) add_upd(d, e8, c);
#pragma unroll
    for (int i = 0; i < 8; i++) v[i] += d[i];
    const uint4 b = pack8(v);
    x8[c] = b;
    return b;
}

__device__ __forceinline__ float sumsq8(uint4 b) {
    float v[8], s = 0.f;
    unpack8(b, v);
#pragma unroll
    for (int i = 0; i < 8; i++) s += v[i] * v[i];
    return s;
}

// norm_word: word c of o8 = w * x * inv (returned too); with q, the stored values' amax
// into m and bad set when one is not finite.
__device__ __forceinline__ uint4 norm_word(uint4* o8, int c, uint4 xb, uint4 wb, float inv, bool q, float& m, int& bad) {
    float v[8], g[8];
    unpack8(xb, v);
    unpack8(wb, g);
#pragma unroll
    for (int i = 0; i < 8; i++) v[i] = g[i] * (v[i] * inv);
    const uint4 b = pack8(v);
    o8[c] = b;
    if (q) amax8(b, m, bad);
    return b;
}

// The skinny products' tiling (fp8_gemm_skinny in fp8.cu; wg_body below
// per warpgroup): a block of SK_WARPS warps takes SK_ROWS weight rows.
#define SK_WARPS 4
#define SK_ROWS 64

// The skinny products' accumulator fragment: a thread (warp, lane; g, tig =
// lane / 4, lane % 4) of a 64-row tile holds v[4t + e] for weight row 16
// warp + g (+8 for e >= 2) and activation row 8t + 2tig + (e & 1).
// frag_out stores it scaled (sx[m] sw[n] where sx is set) and rounded,
// weight rows from n0 + r (r = 16 warp + g); frag_store_pairs and
// frag_add_pairs move its pairs (e, e + 1) as float2 to and from partials
// laid out [weight row][ld activation rows] at p (the thread's own
// position: r ld + 2tig), the reads through L2, all in flight at once.
template <int NT>
__device__ __forceinline__ void frag_out(bf16* __restrict__ out, const float* v, int M, int N, int n0, int r, int tig,
                                         const float* __restrict__ sx, const float* __restrict__ sw) {
#pragma unroll
    for (int t = 0; t < NT; t++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int m = 8 * t + 2 * tig + (e & 1), n = n0 + r + (e >= 2 ? 8 : 0);
            if (m < M) out[(i64)m * N + n] = __float2bfloat16_rn(sx ? v[4 * t + e] * sx[m] * sw[n] : v[4 * t + e]);
        }
}
template <int NT> __device__ __forceinline__ void frag_store_pairs(float* p, const float* v, int ld) {
#pragma unroll
    for (int t = 0; t < NT; t++)
#pragma unroll
        for (int h = 0; h < 2; h++)
            *reinterpret_cast<float2*>(p + h * 8 * ld + 8 * t) = make_float2(v[4 * t + 2 * h], v[4 * t + 2 * h + 1]);
}
template <int NT> __device__ __forceinline__ void frag_add_pairs(float* v, const float* p, int ld) {
#pragma unroll
    for (int t = 0; t < NT; t++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const float2 q = __ldcg(reinterpret_cast<const float2*>(p + h * 8 * ld + 8 * t));
            v[4 * t + 2 * h] += q.x, v[4 * t + 2 * h + 1] += q.y;
        }
}

// skinny_store: the end of fp8_gemm_skinny (fp8.cu), for the 64-row tile
// `tile` whose fragment (above) the 128 threads tid = 0..127 of a block
// hold in acc (n0 = tile * SK_ROWS). One block a tile (gridDim.y == 1):
// scaled, rounded and stored. Otherwise the partials go to part and the
// last of the tile's gridDim.y blocks to finish (done's counter; last: a
// __shared__ int of these 128 threads) sums them in split order and
// stores them, then leaves the counter at zero for the next launch. Every
// thread of the block calls it (its barriers are the block's). sx, sw: the
// activation and weight row scales.
template <int NT>
__device__ __forceinline__ void skinny_store(const float* acc, bf16* __restrict__ out, float* __restrict__ part,
                                             int* __restrict__ done, const float* __restrict__ sx,
                                             const float* __restrict__ sw, int M, int N, int* last, int tile, int tid) {
    constexpr int TR = 8 * NT;
    const int lane = tid & 31, warp = tid >> 5, g = lane >> 2, tig = lane & 3;
    const int n0 = tile * SK_ROWS, S = gridDim.y, sp = blockIdx.y;
    if (S == 1) {
        frag_out<NT>(out, acc, M, N, n0, 16 * warp + g, tig, sx, sw);
        return;
    }
    // Split: every block's partials go to part, [weight row][activation
    // row]; the last block of the tile reads the others' back at its own
    // positions and sums them in split order, its own taken from its
    // registers.
    float* parts = part + (i64)tile * S * SK_ROWS * TR;
    const int at = (16 * warp + g) * TR + 2 * tig;
    frag_store_pairs<NT>(parts + (i64)sp * SK_ROWS * TR + at, acc, TR);
    __threadfence();
    __syncthreads();
    if (tid == 0) *last = atomicAdd(done + tile, 1) == S - 1;
    __syncthreads();
    if (!*last) return;
    __threadfence();
    float v[4 * NT];
#pragma unroll
    for (int i = 0; i < 4 * NT; i++) v[i] = 0.f;
    for (int s = 0; s < S; s++) {
        if (s == sp) {
#pragma unroll
            for (int i = 0; i < 4 * NT; i++) v[i] += acc[i];
        } else {
            frag_add_pairs<NT>(v, parts + (i64)s * SK_ROWS * TR + at, TR);
        }
    }
    frag_out<NT>(out, v, M, N, n0, 16 * warp + g, tig, sx, sw);
    if (tid == 0) done[tile] = 0; // ready for the next launch
}


// ---------------------------------------------------------------------------
// wg_body<ES, NT>: the product of 17-128 activation rows with a
// weight matrix on Hopper's warpgroup MMAs (wgmma, sm_90a), stream-K:
// e4m3 operands with row scales (ES = 1: fp8_wg_n{32,64,128} in fp8.cu;
// mma.sync has no native FP8 there, FP8_WIDE above; ES = 2, bf16, was
// gemm_wg, removed in v0.80); one warpgroup a block (the two-warpgroup
// fp8_wg2_* left the module in v0.81).
//
// Work: the weight rows in tiles of BM = 64, each tile's K in stages
// of KA (WG_KA at most, WgShape) 128-byte atoms a row (SPT stages a tile; the last one
// zero-filled past K), U = tiles * SPT stage units in tile order.
// WG_PER_SM blocks an SM (grid G <= WG_PER_SM SMs, 200 / WG_PER_SM KB of
// stages each); block b takes units [b U / G, (b + 1) U / G), so every
// block streams the same bytes through one pipeline, across its tiles'
// boundaries, with no second wave and no refill. A tile a
// block holds whole is scaled, rounded and stored from registers; one
// that blocks share (at most the first and last of a block) goes through
// float32 partials (two slots a block), and the last of its blocks to
// finish it (a per-tile counter) sums them in block order (the same bits
// whichever finishes last) and stores it, leaving the counter at zero.
//
// A stage's atom: BM weight rows and TR = 8 NT activation rows (zeros past
// M) of 128 bytes, in the K-major 128-byte-swizzle layout wgmma reads (row r at
// r * 128 from a 1024-aligned stage, its 16-byte chunk c at chunk c ^ (r
// % 8)), written by cp.async; each thread fences its copies to the async
// proxy (fence.proxy.async) before the barrier that precedes the wgmma.
// Each 32-byte K slice is one wgmma.m64nN (k32 e4m3 or k16 bf16) a
// warpgroup: its 64 weight rows as A, the TR activation rows as B, both by
// descriptor (8-row groups 1024 bytes apart); f32 accumulators in
// registers. AHEAD = ST - 1 - WG_INFLIGHT stages are in flight ahead of
// the one multiplied; a copy fills the buffer the group WG_INFLIGHT + 1
// stages back read, which every warpgroup has waited for. Accumulators:
// thread (warp w, lane l) holds weight rows 16w + l/4 (+8) and activation
// rows 8t + 2(l%4) (+1) in d[4t..4t+3] (mma.sync's m16n8 layout per warp,
// fp8_gemm_skinny's c[t][e]). Compiled only with PEFTD_WG (or PEFTD_WS)
// (PEFTD_KERNEL_DEFINES): correct (TestFP8Wgmma, TestBF16Wgmma). With
// v0.28's shape (2 blocks an SM, 128 bytes a row a stage) it lost to the
// default products but for FP8 gate_up at 17-32 rows (ncu: ~40% of a
// 64-row qkv's stall samples in the tile flushes, ~20% in the fill); with
// v0.30's (the defaults below) it ties or beats them at 17-32 rows
// (gate_up 34.5 vs 40.9-45.2 us), and FP8 decode with it (`+wg`) is 5%
// faster at 32 rows and, with four adapters, at 64 (base 2% slower
// there). runtime/gpu/wg.go.
// ---------------------------------------------------------------------------
#if defined(PEFTD_WG) || defined(PEFTD_WS)
// defaults: v0.30's best at 17-64 rows (4 atoms, one block an SM, no
// group in flight): 512 bytes of K a row a stage, as fp8_stream reads
#ifndef WG_INFLIGHT
#define WG_INFLIGHT 0 // wgmma groups left running while the next stage starts (0 or 1)
#endif
#ifndef WG_PER_SM
#define WG_PER_SM 1 // blocks an SM (the grid: WG_PER_SM SMs)
#endif
#ifndef WG_KA
#define WG_KA 4 // 128-byte K atoms a stage at most (WgShape::KA: fewer where 3 stages would not fit)
#endif
#define WG_SMEM (200 * 1024 / WG_PER_SM) // a block's stage buffers at most
#define WG_RB 128 // bytes of K a stage holds per row (the swizzle's row)

// wg_desc: the wgmma shared memory descriptor of a K-major tile with the
// 128-byte swizzle at shared address a: start >> 4 (bits 0-13), leading
// offset 1 (unused by swizzled K-major tiles, bits 16-29), stride 1024 >> 4
// between 8-row groups (bits 32-45), base offset 0 (1024-aligned
// stages), swizzle mode 1 = 128 bytes (bits 62-63).
__device__ __forceinline__ unsigned long long wg_desc(unsigned a) {
    return (unsigned long long)((a & 0x3FFFF) >> 4) | (1ull << 16) | ((unsigned long long)(1024 >> 4) << 32) | (1ull << 62);
}

__device__ __forceinline__ void wg_fence() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wg_commit() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
// wg_wait<N>: at most N of this warpgroup's wgmma groups still running.
template <int N> __device__ __forceinline__ void wg_wait() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// fence_proxy_async: this thread's generic-proxy writes to shared memory
// (cp.async's included) are ordered before later async-proxy reads (wgmma).
__device__ __forceinline__ void fence_proxy_async() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
// wg_pin: an empty asm that reads and writes the accumulators, placed
// before the wgmma group and after its wait, so the compiler neither reads
// them early nor moves them while the MMAs own them.
template <int N> __device__ __forceinline__ void wg_pin(float* d) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+f"(d[i])::"memory");
}

// The wgmma wrappers: wg_mma_n{32,48,64,96,128,224,256} (e4m3) and
// wg_mma_bf16_n{...} (the same N), d[0..N/2) += A (descriptor a) * B (b),
// one instruction each. WG_MMA_FN builds one from the instruction, its
// accumulator list (WG_R*, WG_D*), the operand numbers of a, b and the
// scale-d predicate's source, and the trailing immediates (scale-a,
// scale-b; bf16 also the two transposes).
#define WG_R16 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}"
#define WG_R32 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define WG_R64 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define WG_D16 "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
#define WG_D32 WG_D16, "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define WG_D64 WG_D32, "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define WG_R24 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23}"
#define WG_R48 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47}"
#define WG_R112 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111}"
#define WG_D24 WG_D16, "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23])
#define WG_D48 WG_D32, "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47])
#define WG_D112 WG_D64, "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111])
#define WG_R56 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55}"
#define WG_D56 WG_D48, "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55])
#define WG_R128 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}"
#define WG_D128 WG_D112, "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define WG_MMA_FN(fn, op, regs, ia, ib, ip, tail, ...)                                                            \
    __device__ __forceinline__ void fn(float* d, unsigned long long a, unsigned long long b) {                    \
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" ip ", 0;\n" op " " regs ", %" ia ", %" ib ", p" tail ";\n}\n" \
                     : __VA_ARGS__                                                                                   \
                     : "l"(a), "l"(b), "r"(1));                                                                      \
    }
#else
#define WG_MMA_FN(fn, op, regs, ia, ib, ip, tail, ...) \
    __device__ __forceinline__ void fn(float* d, unsigned long long a, unsigned long long b) { __trap(); }
#endif
WG_MMA_FN(wg_mma_n32, "wgmma.mma_async.sync.aligned.m64n32k32.f32.e4m3.e4m3", WG_R16, "16", "17", "18", ", 1, 1", WG_D16)
WG_MMA_FN(wg_mma_n64, "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3", WG_R32, "32", "33", "34", ", 1, 1", WG_D32)
WG_MMA_FN(wg_mma_n128, "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3", WG_R64, "64", "65", "66", ", 1, 1", WG_D64)
WG_MMA_FN(wg_mma_bf16_n32, "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16", WG_R16, "16", "17", "18", ", 1, 1, 0, 0", WG_D16)
WG_MMA_FN(wg_mma_bf16_n64, "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16", WG_R32, "32", "33", "34", ", 1, 1, 0, 0", WG_D32)
WG_MMA_FN(wg_mma_bf16_n128, "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16", WG_R64, "64", "65", "66", ", 1, 1, 0, 0", WG_D64)
WG_MMA_FN(wg_mma_n48, "wgmma.mma_async.sync.aligned.m64n48k32.f32.e4m3.e4m3", WG_R24, "24", "25", "26", ", 1, 1", WG_D24)
WG_MMA_FN(wg_mma_n96, "wgmma.mma_async.sync.aligned.m64n96k32.f32.e4m3.e4m3", WG_R48, "48", "49", "50", ", 1, 1", WG_D48)
WG_MMA_FN(wg_mma_n224, "wgmma.mma_async.sync.aligned.m64n224k32.f32.e4m3.e4m3", WG_R112, "112", "113", "114", ", 1, 1", WG_D112)
WG_MMA_FN(wg_mma_bf16_n48, "wgmma.mma_async.sync.aligned.m64n48k16.f32.bf16.bf16", WG_R24, "24", "25", "26", ", 1, 1, 0, 0", WG_D24)
WG_MMA_FN(wg_mma_bf16_n96, "wgmma.mma_async.sync.aligned.m64n96k16.f32.bf16.bf16", WG_R48, "48", "49", "50", ", 1, 1, 0, 0", WG_D48)
WG_MMA_FN(wg_mma_bf16_n224, "wgmma.mma_async.sync.aligned.m64n224k16.f32.bf16.bf16", WG_R112, "112", "113", "114", ", 1, 1, 0, 0", WG_D112)
WG_MMA_FN(wg_mma_n112, "wgmma.mma_async.sync.aligned.m64n112k32.f32.e4m3.e4m3", WG_R56, "56", "57", "58", ", 1, 1", WG_D56)
WG_MMA_FN(wg_mma_bf16_n112, "wgmma.mma_async.sync.aligned.m64n112k16.f32.bf16.bf16", WG_R56, "56", "57", "58", ", 1, 1, 0, 0", WG_D56)
WG_MMA_FN(wg_mma_n256, "wgmma.mma_async.sync.aligned.m64n256k32.f32.e4m3.e4m3", WG_R128, "128", "129", "130", ", 1, 1", WG_D128)
WG_MMA_FN(wg_mma_bf16_n256, "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16", WG_R128, "128", "129", "130", ", 1, 1, 0, 0", WG_D128)

// wg_mma_n<ES, N>: one 32-byte K step of an m64nN wgmma, e4m3 (ES 1) or
// bf16 (ES 2): wg_body's N = 8 NT (32, 64, 128) and ws_body's widths.
template <int ES, int N> __device__ __forceinline__ void wg_mma_n(float* d, unsigned long long a, unsigned long long b) {
    static_assert(N == 32 || N == 48 || N == 64 || N == 96 || N == 112 || N == 128 || N == 224 || N == 256, "wg_mma_n: no wrapper for N");
    if constexpr (ES == 1) {
        if constexpr (N == 32) wg_mma_n32(d, a, b);
        else if constexpr (N == 48) wg_mma_n48(d, a, b);
        else if constexpr (N == 64) wg_mma_n64(d, a, b);
        else if constexpr (N == 96) wg_mma_n96(d, a, b);
        else if constexpr (N == 112) wg_mma_n112(d, a, b);
        else if constexpr (N == 128) wg_mma_n128(d, a, b);
        else if constexpr (N == 224) wg_mma_n224(d, a, b);
        else wg_mma_n256(d, a, b);
    } else {
        if constexpr (N == 32) wg_mma_bf16_n32(d, a, b);
        else if constexpr (N == 48) wg_mma_bf16_n48(d, a, b);
        else if constexpr (N == 64) wg_mma_bf16_n64(d, a, b);
        else if constexpr (N == 96) wg_mma_bf16_n96(d, a, b);
        else if constexpr (N == 112) wg_mma_bf16_n112(d, a, b);
        else if constexpr (N == 128) wg_mma_bf16_n128(d, a, b);
        else if constexpr (N == 224) wg_mma_bf16_n224(d, a, b);
        else wg_mma_bf16_n256(d, a, b);
    }
}

// WgShape: a variant's stage layout. KA: atoms a stage, WG_KA or as many
// as leave room for 3 stages in WG_SMEM (the 128-row variant takes 2 at
// WG_KA 4); ST: stages, as many as WG_SMEM holds
// (3 to 16); shared memory ST * SB + 1024 (the base rounded up to 1024
// bytes). runtime/gpu/wg.go's wgAtoms and wgStages must agree.
template <int NT> struct WgShape {
    static constexpr int TR = 8 * NT;                // activation rows staged
    static constexpr int BM = SK_ROWS;               // weight rows a tile
    static constexpr int WB = BM * WG_RB;            // weight bytes of an atom
    static constexpr int AB = WB + TR * WG_RB;       // bytes of an atom: weights, then activations (a multiple of 1024)
    static constexpr int KFIT = (WG_SMEM - 1024) / (3 * AB);
    static constexpr int KA = WG_KA < KFIT ? WG_KA : KFIT < 1 ? 1 : KFIT; // atoms a stage
    static constexpr int SB = KA * AB;               // bytes of a stage
    static constexpr int FIT = (WG_SMEM - 1024) / SB;
    static constexpr int ST = FIT < 3 ? 3 : FIT < 16 ? FIT : 16; // 3 at least (past the budget: fewer blocks an SM)
};

#if WG_KA == 4 && WG_PER_SM == 1 // the default: runtime/gpu TestWgShared's table
static_assert(WgShape<4>::KA == 4 && WgShape<8>::KA == 4 && WgShape<16>::KA == 2,
              "WgShape: atoms a stage differ from runtime/gpu's wgAtoms");
#endif

// wg_first: the first stage unit of block b of G over U units.
__device__ __forceinline__ int wg_first(int b, int U, int G) { return (int)((long long)b * U / G); }
// wg_block: the block of G whose units hold unit u.
__device__ __forceinline__ int wg_block(int u, int U, int G) { return (int)(((long long)(u + 1) * G - 1) / U); }

// wg_body: out [M, N] = x [M, K] . w [N, K]^T (times sx[m] sw[n] when sx
// is set), operands of ES bytes, rows K values apart, K * ES % 64 == 0, N
// % BM == 0; part: 2 G BM TR floats; done: N / BM counters, zero.
template <int ES, int NT>
__device__ __forceinline__ void wg_body(bf16* __restrict__ out, float* __restrict__ part, int* __restrict__ done,
                                        const unsigned char* __restrict__ qx, const float* __restrict__ sx,
                                        const unsigned char* __restrict__ qw, const float* __restrict__ sw, int M,
                                        int N, int K) {
    static_assert(NT == 4 || NT == 8 || NT == 16, "wg_body: 32, 64 or 128 activation rows");
    static_assert(ES == 1 || ES == 2, "wg_body: e4m3 or bf16 operands");
    using W = WgShape<NT>;
    constexpr int TR = W::TR, BM = W::BM, WB = W::WB, AB = W::AB, KA = W::KA, SB = W::SB, ST = W::ST;
    constexpr int CH = WG_RB / 16; // 16-byte chunks a staged row
    constexpr int AHEAD = ST - 1 - WG_INFLIGHT;
    static_assert(WG_INFLIGHT == 0 || WG_INFLIGHT == 1, "wg_body: WG_INFLIGHT");
    extern __shared__ __align__(16) unsigned char wgm[];
    __shared__ int last;
    __shared__ float sxs[TR]; // the activation rows' scales (FP8), loaded once
    const int tid = threadIdx.x;
    const int KB = K * ES;                 // bytes of an operand row
    const int SPT = (KB + KA * WG_RB - 1) / (KA * WG_RB); // stages a tile
    const int U = N / BM * SPT, G = gridDim.x, bid = blockIdx.x;
    const int u0 = wg_first(bid, U, G), n = wg_first(bid + 1, U, G) - u0;
    const unsigned base = ((unsigned)__cvta_generic_to_shared(wgm) + 1023u) & ~1023u;

    // The copies. Thread tid copies the same chunks of every stage: 16-byte
    // chunk c = tid % 8 of staged rows r0 + RSTEP k (r0 = tid / 8, RSTEP =
    // 16, k < CPT; the first WK are weight rows, then activation rows).
    // (r0 + RSTEP k) % 8 == r0 % 8, so the swizzled chunk is the same in
    // every row. Chunks past K and activation rows past M are zero-filled.
    constexpr int RSTEP = SK_WARPS * 32 / CH;
    constexpr int CPT = (BM + TR) / RSTEP, WK = BM / RSTEP;
    static_assert(RSTEP % 8 == 0 && BM % RSTEP == 0 && TR % RSTEP == 0, "wg_body: rows of a thread share their swizzle");
    const int c = tid % CH, r0 = tid / CH;
    const unsigned dst0 = r0 * WG_RB + ((c ^ (r0 & 7)) << 4);
    bool live[CPT]; // activation rows below M (weight rows: always)
#pragma unroll
    for (int k = 0; k < CPT; k++) live[k] = k < WK || r0 + RSTEP * k - BM < M;
    // copy(j, k0, k1): this thread's chunks [k0, k1) of local stage j (unit
    // u0 + j) into buffer j % ST
    auto copy = [&](int j, int k0, int k1) {
        if (j >= n) return;
        const int u = u0 + j, tile = u / SPT, col0 = (u - tile * SPT) * KA * WG_RB + 16 * c;
        const unsigned b = base + (j % ST) * SB + dst0;
#pragma unroll
        for (int k = k0; k < k1; k++) {
            const int r = r0 + RSTEP * k;
            const unsigned char* src = k < WK ? qw + (long long)(tile * BM + r) * KB : qx + (long long)(live[k] ? r - BM : 0) * KB;
#pragma unroll
            for (int a = 0; a < KA; a++) {
                const int col = col0 + a * WG_RB;
                const bool ok = col < KB && live[k];
                cp_async16(b + a * AB + k * RSTEP * WG_RB, src + (ok ? col : 0), ok ? 16 : 0);
            }
        }
    };
    const int lane = tid & 31, warp = (tid >> 5) & 3, g = lane >> 2, tig = lane & 3;
    // put: v (laid out as d) for weight tile `tile`, scaled, rounded and stored
    auto put = [&](const float* v, int tile) {
        frag_out<NT>(out, v, M, N, tile * BM, 16 * warp + g, tig, sx ? sxs : nullptr, sw);
    };
    // a slot of the partials: block b's first (0) or last (1) shared tile;
    // each warpgroup its 64 rows, each thread its fragment's pairs
    const int at = (16 * warp + g) * TR + 2 * tig;
    auto slot = [&](int b, int tile) {
        return part + ((long long)b * 2 + (wg_first(b, U, G) / SPT == tile ? 0 : 1)) * BM * TR + at;
    };
    // flush: the accumulators of tile `tile`, which this block holds from
    // its stage k0 to k1 (inclusive)
    float d[4 * NT];
    auto flush = [&](int tile, int k0, int k1) {
        if (k0 == 0 && k1 == SPT - 1) {
            put(d, tile);
            return;
        }
        frag_store_pairs<NT>(slot(bid, tile), d, TR);
        const int b0 = wg_block(tile * SPT, U, G), b1 = wg_block((tile + 1) * SPT - 1, U, G);
        // the block's partials, ordered before its count by one thread's
        // fence after the barrier (cumulative: CUTLASS's arrive_inc), and the
        // others' before the last block's reads by its fence after the count
        __syncthreads();
        if (tid == 0) {
            __threadfence();
            last = atomicAdd(done + tile, 1) == b1 - b0;
            if (last) __threadfence();
        }
        __syncthreads();
        if (!last) return;
        // the sum in block order, this block's own slot read back too (d's
        // registers are free for it)
#pragma unroll
        for (int i = 0; i < 4 * NT; i++) d[i] = 0.f;
        for (int b = b0; b <= b1; b++) frag_add_pairs<NT>(d, slot(b, tile), TR);
        put(d, tile);
        if (tid == 0) done[tile] = 0; // ready for the next launch
    };

#pragma unroll
    for (int i = 0; i < 4 * NT; i++) d[i] = 0.f;
    // the weights' first stages before the wait, as fp8_gemm_skinny
#pragma unroll
    for (int j = 0; j < AHEAD; j++) copy(j, 0, WK);
    pdl_entry();
    for (int i = tid; i < TR; i += blockDim.x) sxs[i] = sx && i < M ? sx[i] : 0.f; // seen after the loop's first barrier
#pragma unroll
    for (int j = 0; j < AHEAD; j++) {
        copy(j, WK, CPT);
        cp_async_commit();
    }
    int tile = u0 / SPT, ks = u0 - tile * SPT, k0 = ks;
    for (int j = 0; j < n; j++) {
        cp_async_wait<AHEAD - 1>(); // this thread's copies of stage j have landed
        fence_proxy_async();        // ... and are visible to wgmma
        __syncthreads();            // everyone's; and the group WG_INFLIGHT + 1 stages back is done in every warpgroup
        copy(j + AHEAD, 0, CPT);
        cp_async_commit();
        const unsigned b = base + (j % ST) * SB;
        wg_pin<4 * NT>(d); // nothing moves the accumulators across the MMAs (they are read and written asynchronously)
        wg_fence();
#pragma unroll
        for (int a = 0; a < KA; a++)
#pragma unroll
            for (int q = 0; q < WG_RB / 32; q++)
                wg_mma_n<ES, 8 * NT>(d, wg_desc(b + a * AB + 32 * q), wg_desc(b + a * AB + WB + 32 * q));
        wg_commit();
        if (ks == SPT - 1 || j == n - 1) { // this block's last stage of the tile
            wg_wait<0>();
            wg_pin<4 * NT>(d);
            flush(tile, k0, ks);
#pragma unroll
            for (int i = 0; i < 4 * NT; i++) d[i] = 0.f;
            tile++, ks = 0, k0 = 0;
        } else {
            wg_wait<WG_INFLIGHT>();
            wg_pin<4 * NT>(d);
            ks++;
        }
    }
    cp_async_wait<0>();
}

// ---------------------------------------------------------------------------
// ws_body<ES, BN>: the product of up to 64 activation rows with a weight
// matrix on wgmma, the way fp8_stream streams a few rows: one wave of
// blocks, each streaming BN whole weight rows through its own pipeline.
//   out[m, n] = sx[m] sw[n] sum_k x[m, k] w[n, k]   (ES 1: e4m3, row scales)
//   out[m, n] = sum_k x[m, k] w[n, k]               (ES 2: bf16, sx null)
// wg_body's roles swapped: the activation rows are the wgmma's M (64, rows
// past M zero) and BN weight rows its N (m64nBN), so a block reads each
// weight byte once and the activations once per BN weight rows (wg_body's
// 64-row weight tiles re-read x once per 64). grid (N / BN, S): block
// (b, z) takes weight rows [b BN, (b + 1) BN) over the z-th of S equal K
// ranges; with S > 1 the splits meet as fp8_gemm_skinny's do (float32
// partials, the tile's last block sums them in split order: the same bits
// whichever finishes last, no second launch).
//
// A stage is WS_KA atoms of 128 bytes of K of each staged row: the 64
// activation rows, then the BN weight rows, in wg_body's 128-byte-swizzle
// K-major layout (row r at r * 128 of a 1024-aligned atom, 16-byte chunk c
// at c ^ (r % 8)), copied by cp.async by all 128 threads (chunk tid % 8 of
// rows tid / 8 + 16 i). ST stages (as many as WS_SMEM holds, 16 at most),
// ST - 1 - IF ahead of the one multiplied (IF: WsShape's wgmma groups left
// running, WS_INFLIGHT or WS_INFLIGHT_NARROW). The first stages' weights are
// asked before griddepcontrol.wait (no kernel of a step writes
// weights; opts bits 0-3, at most ST - 1); activation rows M..63 are
// zeroed once and never copied. opts bit 4: a staggered K walk (below).
// Accumulators: thread (warp w, lane l) holds activation rows 16 w + l / 4
// (+8) and weight rows 8 j + 2 (l % 4) (+1) in d[4 j .. 4 j + 3].
// K ES % (128 S) == 0 (each split whole 128-byte atoms), N % BN == 0.
// part: S N 64 floats; done: N / BN counters, zero between launches.
// ---------------------------------------------------------------------------
#ifndef WS_KA
// 128-byte K atoms a stage: 2 since v0.68 (H200, FP8 decode base 32 / 64
// rows 3.74 / 4.36 -> 3.67 / 4.30 ms, four rank-32 adapters 4.12 / 4.95 ->
// 4.08 / 4.87): half the stages' barriers and waits for the same bytes;
// the widths whose two-atom stages leave fewer than 3 (n224, n256) keep
// one (WsShape's ka). -DWS_KA=1 for the A/B.
#define WS_KA 2
#endif
#ifndef WS_INFLIGHT
// wgmma groups left running while the next stage starts (0-2). 1 since
// v0.63 (H200, FP8 decode base 32 / 64 rows 3.83 / 4.45 -> 3.70 / 4.34 ms;
// steps with adapters, whose products beside the LoRA stream are not
// fp8_ws's, unchanged): the narrow blocks' stages are latency chains
// (v0.55), and one group in flight lets the next stage's copies start
// before the last stage's MMAs end. -DWS_INFLIGHT=0 for the A/B.
#define WS_INFLIGHT 1
#endif
#ifndef WS_INFLIGHT_NARROW
// the same for the narrow widths (BN <= 64: o, q/k/v, down), whose 12-16
// KB stages are the shortest chains (PERFORMANCE v0.63 section 2: 0.4-0.6
// of their bytes at 64 rows); -DWS_INFLIGHT_NARROW=2 for the A/B
#define WS_INFLIGHT_NARROW WS_INFLIGHT
#endif
#ifndef WS_SMEM
// a block's stage buffers at most (one block an SM); less (e.g.
// -DWS_SMEM=100000) leaves an SM room for a LoRA kernel's block beside
// one of these (runtime/gpu's wsSmem reads it; widths with fewer than 3
// stages are not loaded)
#define WS_SMEM (200 * 1024)
#endif
#ifndef WSH_SMEM
// the half-row blocks' (ws_body's HALF: gemm_wsh_n*, fp8_wsh_n*) stage
// buffers at most: the whole of an SM's shared memory but their static
// arrays, so that n224's 44 KB stages are five, as its 36 KB ones are
// under WS_SMEM (runtime/gpu's wshSmem reads it)
#define WSH_SMEM (226 * 1024)
#endif
#ifndef WS_KA_BF16
// gemm_ws's (bf16 operands, ES 2: an atom holds 64 values of K, half of
// FP8's 128) atoms a stage: WS_KA unless set, for the A/B of bf16 stages
// as long in K as FP8's (-DWS_KA_BF16=4; runtime/gpu's wsKABF16 reads it)
#define WS_KA_BF16 WS_KA
#endif
#ifndef WS16_KA
// the 16-row blocks' (ws_body's TR 16: fp8_ws16_n*) 128-byte K atoms a
// stage, halved while fewer than 3 stages would fit (runtime/gpu's
// ws16KAFor must agree): their atoms stage 16 activation rows, not 64,
// so a stage of 4 atoms costs what WS_KA 2's does at TR 64 (the narrow
// products' stages are latency chains: PERFORMANCE v0.68)
#define WS16_KA 4
#endif
// KA: WS_KA (ES 2: WS_KA_BF16; TR 16: WS16_KA) atoms a stage, halved while
// fewer than 3 stages would fit (runtime/gpu's wsKAFor must agree).
// TR 16 (ws_body's products of 1-16 rows, fp8_ws16_n*): 16 activation
// rows staged in each atom, before the weight rows. The wgmma's A is still
// 64 rows read from the atom's start: rows 16-63 are whatever bytes follow
// (the weight rows, past the atom for BN 32: PAD bytes keep the last read
// inside the buffer), multiplied into accumulator rows 16-63, which no
// store reads (ws_store: rows below M <= 16 only, warp 0's).
template <int BN, int ES = 1, bool HALF = false, int TR_ = 64> struct WsShape {
    static constexpr int TR = TR_;                // activation rows staged (the wgmma's M is 64 whatever TR)
    static constexpr int WR = HALF ? BN / 2 : BN; // weight rows a stage
    static constexpr int AB = (TR + WR) * WG_RB;  // an atom: 128 bytes of each staged row (a multiple of 1024)
    static constexpr int PAD = TR + WR < 64 ? (64 - TR - WR) * WG_RB : 0; // bytes the last atom's A reads past it
    static constexpr int SMEM = HALF ? WSH_SMEM : WS_SMEM;
    __host__ __device__ static constexpr int fit(int ka) { return (SMEM - 1024 - PAD) / (ka * AB); }
    __host__ __device__ static constexpr int ka(int k) { return k > 1 && fit(k) < 3 ? ka(k / 2) : k; }
    static constexpr int KA = HALF ? 2 : ka(TR == 16 ? WS16_KA : ES == 2 ? WS_KA_BF16 : WS_KA);
    static constexpr int SB = KA * AB;            // a stage
    static constexpr int ST = fit(KA) < 16 ? fit(KA) : 16;
    static constexpr int IF = BN <= 64 ? WS_INFLIGHT_NARROW : WS_INFLIGHT; // wgmma groups left running (ws_body)
    static_assert(BN % 16 == 0 && ST >= 2, "ws_body: weight rows a multiple of 16, 2 stages at least (runtime/gpu loads 3 or more)");
    static_assert(TR == 64 || TR == 16 && ES == 1, "ws_body: 64 activation rows, or 16 for FP8 products");
};

// ws_koff: the stage of its nst a block of ws_body starts its
// K walk at (wrapping around). opts bit 4: each block at its own stage, so
// that the blocks reading the same activation lines at one time are few,
// not the whole grid (the sum's order is the block's); else the first.
__device__ __forceinline__ int ws_koff(int opts, int nst) {
    return (opts & 16) ? (int)((long long)blockIdx.x * nst / gridDim.x) : 0;
}

// ws_put: the accumulators v of a ws block (ws_body's layout: rows 16
// warp + lane / 4 (+8) below M, weight rows n0 + 8 j + 2 (lane % 4) (+1))
// scaled by xs[m] ws[n - n0] where set, rounded and stored into out's rows
// of N values.
template <int BN>
__device__ __forceinline__ void ws_put(const float* v, bf16* __restrict__ out, const float* xs, const float* ws, int M, int N, int n0, int m0, int tig) {
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int m = m0 + 8 * h;
        if (m >= M) continue;
        const float a = xs ? xs[m] : 1.f;
#pragma unroll
        for (int j = 0; j < BN / 8; j++) {
            const int n = 8 * j + 2 * tig;
            const float s0 = ws ? a * ws[n] : a, s1 = ws ? a * ws[n + 1] : a;
            *reinterpret_cast<__nv_bfloat162*>(out + (long long)m * N + n0 + n) =
                __floats2bfloat162_rn(v[4 * j + 2 * h] * s0, v[4 * j + 2 * h + 1] * s1);
        }
    }
}

// ws_silu_pair: silu(g) * u for a SILU block's thread's two columns 8 j +
// 2 tig (+1) of row half h: gate's accumulators j and up's j + BN / 16,
// each scaled as ws_put scales (SCALED, FP8 operands: a the row's scale,
// ws the block's weight rows' scales, gate's then up's; bf16: none) and
// rounded to bf16 as ws_put stores it, then silu(g) * u computed and
// rounded as silu_mul8 does from the stored values.
template <int BN, bool SCALED>
__device__ __forceinline__ __nv_bfloat162 ws_silu_pair(const float* v, int j, int h, int tig, float a, const float* ws) {
    const int n = 8 * j + 2 * tig, ju = j + BN / 16;
    const float g0 = SCALED ? a * ws[n] : 1.f, g1 = SCALED ? a * ws[n + 1] : 1.f;
    const float u0 = SCALED ? a * ws[BN / 2 + n] : 1.f, u1 = SCALED ? a * ws[BN / 2 + n + 1] : 1.f;
    const float2 g = __bfloat1622float2(__floats2bfloat162_rn(v[4 * j + 2 * h] * g0, v[4 * j + 2 * h + 1] * g1));
    const float2 u = __bfloat1622float2(__floats2bfloat162_rn(v[4 * ju + 2 * h] * u0, v[4 * ju + 2 * h + 1] * u1));
    return __floats2bfloat162_rn(g.x / (1.f + expf(-g.x)) * u.x, g.y / (1.f + expf(-g.y)) * u.y);
}

// ws_put_silu: ws_put for ws_body's SILU blocks (bf16, one split): weight
// rows n < BN / 2 are gate's columns gn0 + n and rows BN / 2 + n up's same
// columns; silu(g) * u (ws_silu_pair) into out's rows of I values. The
// same bits as gemm_ws then silu_mul where both walk K from its start
// (opts bit 4 off); with the stagger a gate or up column's stages start
// where its fused block's do, not where gemm_ws's block's do, so its
// float32 sum (not the rounding points) may differ in the last bits.
template <int BN>
__device__ __forceinline__ void ws_put_silu(const float* v, bf16* __restrict__ out, int M, int I, int gn0, int m0, int tig) {
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int m = m0 + 8 * h;
        if (m >= M) continue;
#pragma unroll
        for (int j = 0; j < BN / 16; j++)
            *reinterpret_cast<__nv_bfloat162*>(out + (long long)m * I + gn0 + 8 * j + 2 * tig) = ws_silu_pair<BN, false>(v, j, h, tig, 1.f, nullptr);
    }
}

// grid_meet: a grid-wide barrier on the counter *arrive (zero before the
// launch): every thread's writes so far are visible at the device to every
// block after it. Safe only where every block of the grid is resident at
// once (ws_body's SILU and NORM ends: a one-wave plan, one block an SM, and
// the kernel after it launches only once every block has reached
// griddepcontrol.launch_dependents in pdl_entry). Bounded: blocks that are
// not all resident (a plan of more blocks than SMs, SMs another kernel
// holds) end the kernel with an error after ~5 s instead of hanging the
// card. wait false: the block only arrives (its writes published) and
// goes on without waiting for the others (it reads nothing they wrote).
// Every thread of the block calls it.
#define GRID_MEET_NS 5000000000ull // 5 s by the global timer
__device__ __forceinline__ void grid_meet(unsigned* arrive, bool wait = true) {
    const unsigned n = gridDim.x * gridDim.y * gridDim.z;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        atomicAdd(arrive, 1u);
        if (wait) {
            const unsigned long long t0 = globaltimer_ns();
            while (ld_acquire_u32(arrive) < n) {
                __nanosleep(64);
                if (globaltimer_ns() - t0 > GRID_MEET_NS) __trap(); // a plan whose blocks are not all resident: fail, do not hang
            }
        }
        __threadfence();
    }
    __syncthreads();
}

// grid_leave: after grid_meet(arrive), once every thread of the block has
// read what the barrier guarded: the last block out zeroes the nw words
// from w, arrive and the leave counter after it (arrive + 1) for the next
// launch. Every thread of the block calls it.
__device__ __forceinline__ void grid_leave(unsigned* w, int nw, unsigned* arrive) {
    unsigned* leave = arrive + 1;
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        if (atomicAdd(leave, 1u) == gridDim.x * gridDim.y * gridDim.z - 1) {
            for (int i = 0; i < nw; i++) w[i] = 0;
            *arrive = 0, *leave = 0;
        }
    }
}

// WsSiluQ: where ws_body's FP8 SILU blocks (fp8_ws_silu_n*) put the
// quantized rows: q [M][I] e4m3 bytes and qscale [M] (silu_mul's), and
// sync: 64 row maxima (float bits) then two counters, zero between
// launches (the last block leaves them so).
struct WsSiluQ {
    unsigned char* q;
    float* qscale;
    unsigned* sync;
};

// ws_put_silu_q: ws_put_silu for FP8 operands (ws_silu_pair with the
// scales xs[m] and ws, up's at ws[BN / 2 + n]), which also
// quantizes each row as silu_mul does into Q: the row's max |v| over every
// block (atomicMax on the bits of a non-negative float; +Inf for a
// non-finite value) met at a grid-wide barrier (grid_meet: every block
// resident at once), then each block converts its own values with the
// row's scale. Every thread of the block calls it.
template <int BN>
__device__ __forceinline__ void ws_put_silu_q(float* v, bf16* __restrict__ out, const float* xs, const float* ws, int M, int I, int gn0,
                                              int m0, int tig, const WsSiluQ& Q) {
    float mx[2] = {0.f, 0.f};
    int bad[2] = {0, 0};
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int m = m0 + 8 * h;
        if (m >= M) continue;
        const float a = xs[m];
#pragma unroll
        for (int j = 0; j < BN / 16; j++) {
            const __nv_bfloat162 r = ws_silu_pair<BN, true>(v, j, h, tig, a, ws);
            *reinterpret_cast<__nv_bfloat162*>(out + (long long)m * I + gn0 + 8 * j + 2 * tig) = r;
            amax1(r.x, mx[h], bad[h]);
            amax1(r.y, mx[h], bad[h]);
            const float2 f = __bfloat1622float2(r);
            v[4 * j + 2 * h] = f.x, v[4 * j + 2 * h + 1] = f.y; // the stored values, kept for the quantization
        }
    }
#pragma unroll
    for (int h = 0; h < 2; h++) { // the row's lanes (tig) meet; each warp holds its own rows
#pragma unroll
        for (int o = 1; o < 4; o <<= 1) {
            mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], o));
            bad[h] |= __shfl_xor_sync(0xffffffffu, bad[h], o);
        }
        if (tig == 0 && m0 + 8 * h < M) atomicMax(Q.sync + m0 + 8 * h, bad[h] ? 0x7f800000u : __float_as_uint(mx[h]));
    }
    grid_meet(Q.sync + 64); // each thread's maxima, at the device
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int m = m0 + 8 * h;
        if (m >= M) continue;
        const float amax = __uint_as_float(__ldcg(Q.sync + m));
        float sc;
        const float inv = e4m3_scale(amax, amax == __int_as_float(0x7f800000), &sc);
        if (blockIdx.x == 0 && tig == 0) Q.qscale[m] = sc;
#pragma unroll
        for (int j = 0; j < BN / 16; j++) {
            const int n = 8 * j + 2 * tig;
            *reinterpret_cast<unsigned short*>(Q.q + (long long)m * I + gn0 + n) =
                __nv_cvt_float2_to_fp8x2(make_float2(v[4 * j + 2 * h] * inv, v[4 * j + 2 * h + 1] * inv), __NV_SATFINITE, __NV_E4M3);
        }
    }
    grid_leave(Q.sync, 64, Q.sync + 64); // every thread has read the maxima
}

// ws_store: the end of ws_body for the accumulators d of
// block (blockIdx.x, split z): rows m = 16 warp + g (+8) below M, weight
// rows n0 + 8 j + 2 tig (+1), scaled (xs[m] ws[n - n0] where set: ws_body
// passes copies in shared memory, read before any store; from global
// memory each store waited for its own scale loads, ~56 dependent round
// trips a thread at BN 224, measured on an H200 as ~9 us of FP8 gate/up's
// 43 at 64 rows, PERFORMANCE v0.57), rounded and
// stored with one split; with gridDim.y splits, float32 partials
// [tile][split][64][BN] and the tile's last block (done's counter; last:
// a __shared__ int) sums them in split order, its own read back too (the
// same bits whichever block is last), stores, and leaves the counter at
// zero. Every thread of the block calls it (its barriers are the block's).
template <int BN>
__device__ __forceinline__ void ws_store(float* d, bf16* __restrict__ out, float* __restrict__ part, int* __restrict__ done,
                                         const float* xs, const float* ws, int M, int N, int n0, int z, int* last) {
    constexpr int TR = 64;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, tig = lane & 3, S = gridDim.y;
    const int m0 = 16 * warp + g;
    auto put = [&](const float* v) { ws_put<BN>(v, out, xs, ws, M, N, n0, m0, tig); };
    if (S == 1) {
        put(d);
        return;
    }
    float* tp = part + (long long)blockIdx.x * S * TR * BN;
    auto at = [&](int s, int h, int j) { return tp + ((long long)s * TR + m0 + 8 * h) * BN + 8 * j + 2 * tig; };
#pragma unroll
    for (int h = 0; h < 2; h++)
        if (m0 + 8 * h < M)
#pragma unroll
            for (int j = 0; j < BN / 8; j++) *reinterpret_cast<float2*>(at(z, h, j)) = make_float2(d[4 * j + 2 * h], d[4 * j + 2 * h + 1]);
    __syncthreads();
    if (tid == 0) {
        __threadfence(); // the block's partials before its count (cumulative, after the barrier)
        *last = atomicAdd(done + blockIdx.x, 1) == S - 1;
        if (*last) __threadfence();
    }
    __syncthreads();
    if (!*last) return;
#pragma unroll
    for (int i = 0; i < BN / 2; i++) d[i] = 0.f;
    for (int s = 0; s < S; s++) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            if (m0 + 8 * h >= M) continue;
#pragma unroll
            for (int j = 0; j < BN / 8; j++) {
                const float2 p = __ldcg(reinterpret_cast<const float2*>(at(s, h, j)));
                d[4 * j + 2 * h] += p.x, d[4 * j + 2 * h + 1] += p.y;
            }
        }
    }
    put(d);
    if (tid == 0) done[blockIdx.x] = 0; // ready for the next launch
}

// WsNorm: what ws_body's NORM blocks (gemm_ws_norm_n*, fp8_ws_norm_n*)
// do once the product's rows (the delta) are stored: add_rmsnorm's work,
// x += delta and, where out is set, out = rmsnorm(x) * w (eps; H the
// width, the product's N), with q set also out's rows quantized into q and
// qscale as add_rmsnorm's FP8 path does; sync: two counters, zero between
// launches (the last block leaves them so).
struct WsNorm {
    bf16* x;
    bf16* out;
    const bf16* w;
    float eps;
    unsigned char* q;
    float* qscale;
    unsigned* sync;
};

// add_words: the sum of two words of 8 bf16 values, each rounded to bf16
// (add_word's without a LoRA update).
__device__ __forceinline__ uint4 add_words(uint4 a, uint4 b) {
    float v[8], d[8];
    unpack8(a, v);
    unpack8(b, d);
#pragma unroll
    for (int i = 0; i < 8; i++) v[i] += d[i];
    return pack8(v);
}

// ws_add_norm: the NORM blocks' end, with the product's rows delta [M][H]
// stored by this block: the grid meets (grid_meet: every block's rows
// stored), then block b (of G, x fastest) takes rows b, b + G, ... and does
// add_rmsnorm's work on each with the same bits: its 128 threads stand for
// add_rmsnorm's 256 (thread t for t and t + 128, whose 16-byte words t +
// 256 i are this thread's even and odd words t + 128 j), each sum of
// squares added in add_rmsnorm's order and the two met as its block_sum
// meets its eight warps. The norm's weight and the block's first row of x
// (no other block writes them) are read before the barrier, so that only
// delta's words are read after it. A block with no rows (G > M) arrives
// and ends without waiting, so that its SM takes the next kernel's block
// while the others finish. H % 8 == 0 and H <= 2048 ADD_RC (runtime/gpu
// checks). Every thread of the block calls it.
__device__ __forceinline__ void ws_add_norm(const bf16* delta, int M, int H, const WsNorm& P) {
    constexpr int NW = 2 * ADD_RC;
    __shared__ float sh[33];
    const int G = gridDim.x * gridDim.y, b0 = blockIdx.y * gridDim.x + blockIdx.x;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, n8 = H >> 3;
    const uint4* w8 = reinterpret_cast<const uint4*>(P.w);
    uint4 wk[NW], xk[NW], dk[NW];
    auto load_x = [&](int r) {
        const uint4* x8 = reinterpret_cast<const uint4*>(P.x + (long long)r * H);
#pragma unroll
        for (int j = 0; j < NW; j++)
            if (tid + 128 * j < n8) xk[j] = x8[tid + 128 * j];
    };
    if (P.out)
#pragma unroll
        for (int j = 0; j < NW; j++)
            if (tid + 128 * j < n8) wk[j] = __ldg(w8 + tid + 128 * j);
    if (b0 < M) load_x(b0);
    grid_meet(P.sync, b0 < M);
    for (int r = b0; r < M; r += G) {
        if (r != b0) load_x(r);
        const uint4* d8 = reinterpret_cast<const uint4*>(delta + (long long)r * H);
#pragma unroll
        for (int j = 0; j < NW; j++)
            if (tid + 128 * j < n8) dk[j] = __ldcg(d8 + tid + 128 * j);
        uint4* x8 = reinterpret_cast<uint4*>(P.x + (long long)r * H);
        float sa = 0.f, sb = 0.f; // the sums of squares of add_rmsnorm's threads t and t + 128
#pragma unroll
        for (int j = 0; j < NW; j++) {
            const int c = tid + 128 * j;
            if (c < n8) {
                xk[j] = add_words(xk[j], dk[j]);
                x8[c] = xk[j];
                if (j & 1)
                    sb += sumsq8(xk[j]);
                else
                    sa += sumsq8(xk[j]);
            }
        }
        if (!P.out) continue;
        // block_sum over add_rmsnorm's eight warps: ours (0-3) and the ones
        // our second sums stand for (4-7)
        sa = warp_sum(sa), sb = warp_sum(sb);
        if (lane == 0) sh[warp] = sa, sh[warp + 4] = sb;
        __syncthreads();
        if (warp == 0) {
            float s = lane < 8 ? sh[lane] : 0.f;
            s = warp_sum(s);
            if (lane == 0) sh[32] = s;
        }
        __syncthreads();
        const float ss = sh[32];
        __syncthreads();
        const float inv = 1.f / sqrtf(ss / (float)H + P.eps);
        uint4* o8 = reinterpret_cast<uint4*>(P.out + (long long)r * H);
        float m = 0.f;
        int bad = 0;
#pragma unroll
        for (int j = 0; j < NW; j++) {
            const int c = tid + 128 * j;
            if (c < n8) xk[j] = norm_word(o8, c, xk[j], wk[j], inv, P.q != nullptr, m, bad);
        }
        if (P.q) quant_words_e4m3<NW>(xk, n8, P.q + (long long)r * H, P.qscale + r, m, bad, sh);
    }
    grid_leave(nullptr, 0, P.sync);
}

// ws_copy: one stage's cp.async chunks of a thread (ws_body's copies): for
// each of KA atoms, the 16 bytes at column (ks KA + a) 128 of C rows (r0 =
// tid / 8 + 16 i, KB bytes apart) from src (the thread's chunk of the
// block's row 0) into the stage at b (AB bytes an atom; b the thread's
// swizzled place), zero-filled for an atom at or past lim bytes; GUARD:
// only rows below M (the activations).
template <int KA, int AB, int C, bool GUARD>
__device__ __forceinline__ void ws_copy(unsigned b, const unsigned char* src, int KB, int ks, int lim, int r0, int M) {
    constexpr int RSTEP = 128 / (WG_RB / 16);
#pragma unroll
    for (int a = 0; a < KA; a++) {
        const int col = (ks * KA + a) * WG_RB;
        const bool ok = col < lim;
#pragma unroll
        for (int i = 0; i < C; i++)
            if (!GUARD || r0 + i * RSTEP < M) cp_async16(b + a * AB + i * RSTEP * WG_RB, src + (long long)i * RSTEP * KB + (ok ? col : 0), ok ? 16 : 0);
    }
}

// ws_copy_halves: ws_copy's weight copies (no guard) for a block whose
// first C / 2 row groups come from lo and the rest from hi (ws_body's
// SILU: gate rows, then the same rows of up), each the thread's chunk of
// that half's row 0.
template <int KA, int AB, int C>
__device__ __forceinline__ void ws_copy_halves(unsigned b, const unsigned char* lo, const unsigned char* hi, int KB, int ks, int lim) {
    constexpr int RSTEP = 128 / (WG_RB / 16);
    static_assert(C % 2 == 0, "ws_copy_halves: an even number of row groups");
#pragma unroll
    for (int a = 0; a < KA; a++) {
        const int col = (ks * KA + a) * WG_RB;
        const bool ok = col < lim;
#pragma unroll
        for (int i = 0; i < C; i++) {
            const unsigned char* src = i < C / 2 ? lo + (long long)i * RSTEP * KB : hi + (long long)(i - C / 2) * RSTEP * KB;
            cp_async16(b + a * AB + i * RSTEP * WG_RB, src + (ok ? col : 0), ok ? 16 : 0);
        }
    }
}

// ws_zero_rows: activation rows M..TR-1 of each of ST stages of KA atoms
// (SB bytes a stage, AB an atom) from base: zero (ws_body's copies
// skip them); the block's first 128 threads.
template <int ST, int KA, int SB, int AB, int TR>
__device__ __forceinline__ void ws_zero_rows(unsigned base, int M) {
    constexpr int CH = WG_RB / 16;
    if (M >= TR) return;
    for (int i = threadIdx.x; i < ST * KA * (TR - M) * CH; i += 128) {
        const int ch = i % CH, rest = i / CH, r = M + rest % (TR - M), sa = rest / (TR - M);
        const unsigned a = base + (sa / KA) * SB + (sa % KA) * AB + r * WG_RB + ch * 16;
        asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(a), "r"(0) : "memory");
    }
}

// ws_fill: after griddepcontrol.wait, the activation rows' scales (ES 1;
// seen after the K loop's first barrier) and the first AHEAD stages'
// copies, one cp.async group a stage (the ne early weight stages, asked
// before the wait, join the first).
template <int ES, int AHEAD, int TR, class CW, class CX>
__device__ __forceinline__ void ws_fill(float* xsc, const float* __restrict__ sx, int M, int ne, CW copy_w, CX copy_x) {
    if (ES == 1)
        for (int i = threadIdx.x; i < TR; i += 128) xsc[i] = i < M ? sx[i] : 0.f;
#pragma unroll 1
    for (int j = 0; j < AHEAD; j++) {
        if (j >= ne) copy_w(j);
        copy_x(j);
        cp_async_commit();
    }
}

// ws_mma: one stage's wgmma group into d: KA atoms (AB bytes apart) at
// b, each the TR activation rows then the BN weight rows.
template <int ES, int BN, int KA, int AB, int TR = 64>
__device__ __forceinline__ void ws_mma(float* d, unsigned b) {
    wg_pin<BN / 2>(d);
    wg_fence();
#pragma unroll
    for (int a = 0; a < KA; a++)
#pragma unroll
        for (int q = 0; q < WG_RB / 32; q++)
            wg_mma_n<ES, BN>(d, wg_desc(b + a * AB + 32 * q), wg_desc(b + a * AB + TR * WG_RB + 32 * q));
    wg_commit();
}

// ws_stage: one K stage of ws_body's pipeline on the
// accumulators d: wait for this thread's copies of the stage at smem (its
// AHEAD - 1 successors may still fly) and make them visible to wgmma (and
// the zeroed rows, the first time), the block's barrier (everyone's; and
// every warp's group IF + 1 stages back is done, so issue may overwrite
// its stage), issue() (the copies of the stage AHEAD on) committed as one
// group, then the stage's wgmma group, IF groups left in flight. H 0 or 1
// (ws_body's HALF blocks): the stage holds half H of the block's BN weight
// rows, whose wgmma group of N BN / 2 goes into that half of the
// accumulators (d + H BN / 4: the registers BN's layout gives those rows);
// the whole of d is pinned after the wait either way (in HALF the other
// half's group may be the one left in flight).
template <int ES, int BN, int KA, int AB, int AHEAD, int IF, int H = -1, int TR = 64, class Issue>
__device__ __forceinline__ void ws_stage(float* d, int j, unsigned base, unsigned sb, int st, Issue issue) {
    cp_async_wait<AHEAD - 1>();
    fence_proxy_async();
    __syncthreads();
    issue();
    cp_async_commit();
    if constexpr (H < 0)
        ws_mma<ES, BN, KA, AB, TR>(d, base + (j % st) * sb);
    else
        ws_mma<ES, BN / 2, KA, AB, TR>(d + H * (BN / 4), base + (j % st) * sb);
    wg_wait<IF>();
    wg_pin<BN / 2>(d);
}

// ws_body's HALF blocks (gemm_wsh_n*, fp8_wsh_n*; BN 224 and 256, whose
// one-atom stages read 128 bytes of each weight row a stage): a stage is
// two atoms (256 bytes of K) of half the block's weight rows beside the 64
// activation rows', the halves alternating stage by stage (K pair p of
// half h at stage 2 p + h, the stagger moving whole pairs), each into its
// half of the accumulators (ws_stage's H). Each row's DRAM reads are
// twice as long for the same stage bytes, the activations read twice (L2);
// the products, split and end are BN's.
//
// qx and sx are declared __restrict__ (the default kernels' code), but the
// FP8 SILU and NORM ends (SQ.q / qscale, NP.q / qscale) write that same
// scratch through other pointers. That holds only because every read of
// qx and sx is a cp.async or comes before the grid's barrier and its
// fences; a plain read of either after a barrier could compile to a
// non-coherent load and see stale data.
template <int ES, int BN, bool SILU = false, bool NORM = false, bool HALF = false, int TR_ = 64>
__device__ __forceinline__ void ws_body(bf16* __restrict__ out, float* __restrict__ part, int* __restrict__ done,
                                        const unsigned char* __restrict__ qx, const float* __restrict__ sx,
                                        const unsigned char* __restrict__ qw, const float* __restrict__ sw, int M,
                                        int N, int K, int opts, WsSiluQ SQ = {}, WsNorm NP = {}) {
    using W = WsShape<BN, ES, HALF, TR_>;
    constexpr int TR = W::TR, AB = W::AB, SB = W::SB, ST = W::ST, KA = W::KA, IF = W::IF, AHEAD = ST - 1 - IF;
    static_assert(IF >= 0 && IF <= 2, "ws_body: WS_INFLIGHT, WS_INFLIGHT_NARROW 0-2");
    static_assert(AHEAD >= 1, "ws_body: fewer than 2 + WS_INFLIGHT stages fit");
    static_assert(!SILU || BN % 32 == 0, "ws_body: SILU on whole 16-row groups a half");
    static_assert(!NORM || !SILU, "ws_body: NORM is a plain product's end");
    static_assert(!HALF || (!NORM && BN % 32 == 0 && W::KA == 2), "ws_body: HALF takes plain and SILU products of whole 16-row halves");
    static_assert(TR == 64 || !SILU && !NORM, "ws_body: TR 16 takes plain products");
    constexpr int CH = WG_RB / 16;                 // 16-byte chunks a staged row
    constexpr int RSTEP = 128 / CH;                // rows between a thread's copies
    constexpr int CX = TR / RSTEP, CW = W::WR / RSTEP; // a thread's activation and weight rows an atom
    extern __shared__ __align__(16) unsigned char wsm[];
    __shared__ int last;
    __shared__ float wsc[BN], xsc[TR]; // the block's weight rows' and the activation rows' scales (ES 1)
    const int tid = threadIdx.x;
    const int KB = K * ES, S = gridDim.y, z = blockIdx.y, n0 = blockIdx.x * BN;
    const int kb0 = z * (KB / S), nks = (KB / S + KA * WG_RB - 1) / (KA * WG_RB); // this split's K stages (HALF: pairs)
    const int nst = HALF ? 2 * nks : nks, koff = HALF ? 2 * ws_koff(opts, nks) : ws_koff(opts, nks);
    const unsigned base = ((unsigned)__cvta_generic_to_shared(wsm) + 1023u) & ~1023u;
    const int c = tid % CH, r0 = tid / CH;
    const unsigned dst0 = r0 * WG_RB + ((c ^ (r0 & 7)) << 4);
    // SILU: the block's BN / 2 gate rows gn0.. and the same rows of up (N / 2 on)
    const int gn0 = SILU ? blockIdx.x * (BN / 2) : n0;
    const unsigned char* wsrc = qw + (long long)(gn0 + r0) * KB + kb0 + 16 * c;
    // the second half's rows: SILU up's, HALF the block's second BN / 2
    const unsigned char* whi = SILU ? wsrc + (long long)(N / 2) * KB : HALF ? wsrc + (long long)(BN / 2) * KB : nullptr;
    const unsigned char* xsrc = qx + (long long)r0 * KB + kb0 + 16 * c;
    auto kst = [&](int j) { const int k = j + koff; return k < nst ? k : k - nst; }; // the K stage local stage j holds (HALF: k = 2 pair + half)
    // the stage j copies: weights, activations (rows below M), each atom's
    // chunks past this split's K zero-filled
    auto copy_w = [&](int j) {
        if constexpr (HALF) {
            if (j < nst) {
                const int k = kst(j);
                ws_copy<KA, AB, CW, false>(base + (j % ST) * SB + dst0 + TR * WG_RB, (k & 1) ? whi : wsrc, KB, k >> 1, KB / S, r0, M);
            }
        } else if constexpr (SILU) {
            if (j < nst) ws_copy_halves<KA, AB, CW>(base + (j % ST) * SB + dst0 + TR * WG_RB, wsrc, whi, KB, kst(j), KB / S);
        } else {
            if (j < nst) ws_copy<KA, AB, CW, false>(base + (j % ST) * SB + dst0 + TR * WG_RB, wsrc, KB, kst(j), KB / S, r0, M);
        }
    };
    auto copy_x = [&](int j) {
        if (j < nst) ws_copy<KA, AB, CX, true>(base + (j % ST) * SB + dst0, xsrc, KB, HALF ? kst(j) >> 1 : kst(j), KB / S, r0, M);
    };
    ws_zero_rows<ST, KA, SB, AB, TR>(base, M); // activation rows M..TR-1 of every stage: zero, once (the copies skip them)
    const int early = opts & 15, ne = early < AHEAD ? early : AHEAD;
    for (int j = 0; j < ne; j++) copy_w(j);
    if (ES == 1)
        for (int i = tid; i < BN; i += 128) // weights' scales: no kernel of a step writes them (SILU: gate's rows, then up's)
            wsc[i] = sw[SILU ? (i < BN / 2 ? gn0 + i : N / 2 + gn0 + i - BN / 2) : n0 + i];
    pdl_entry();
    ws_fill<ES, AHEAD, TR>(xsc, sx, M, ne, copy_w, copy_x);
    float d[BN / 2];
#pragma unroll
    for (int i = 0; i < BN / 2; i++) d[i] = 0.f;
    if constexpr (HALF) {
        // stage j even: the first half's pair, j + 1 the second's (nst and
        // koff are even)
#pragma unroll 1
        for (int j = 0; j < nst; j += 2) {
            ws_stage<ES, BN, KA, AB, AHEAD, IF, 0, TR>(d, j, base, SB, ST, [&] {
                copy_w(j + AHEAD);
                copy_x(j + AHEAD);
            });
            ws_stage<ES, BN, KA, AB, AHEAD, IF, 1, TR>(d, j + 1, base, SB, ST, [&] {
                copy_w(j + 1 + AHEAD);
                copy_x(j + 1 + AHEAD);
            });
        }
    } else {
#pragma unroll 1
        for (int j = 0; j < nst; j++)
            ws_stage<ES, BN, KA, AB, AHEAD, IF, -1, TR>(d, j, base, SB, ST, [&] {
                copy_w(j + AHEAD);
                copy_x(j + AHEAD);
            });
    }
    wg_wait<0>();
    wg_pin<BN / 2>(d);
    cp_async_wait<0>();
    if constexpr (SILU) {
        if (S != 1) __trap(); // runtime/gpu launches SILU with one split (wsProduct.siluFits)
        if constexpr (ES == 1)
            ws_put_silu_q<BN>(d, out, xsc, wsc, M, N / 2, gn0, 16 * (tid >> 5) + ((tid & 31) >> 2), tid & 3, SQ);
        else
            ws_put_silu<BN>(d, out, M, N / 2, gn0, 16 * (tid >> 5) + ((tid & 31) >> 2), tid & 3);
        return;
    }
    ws_store<BN>(d, out, part, done, ES == 1 ? xsc : nullptr, ES == 1 ? wsc : nullptr, M, N, n0, z, &last); // ES 1 has scales, ES 2 none (a constant: the reads stay shared-memory loads)
    if constexpr (NORM) {
        // every block's rows of out stored (with splits, by each tile's
        // last block: ws_add_norm's barrier), then add_rmsnorm's work on
        // them; the activations and their scales (FP8: the scratch NP.q
        // rewrites) were all read before
        ws_add_norm(out, M, N, NP);
    }
}

// WS_WIDTHS(prefix, body, ES, ARGS, PASS, THREADS):
// prefix_n{32,48,64,96,128,224,256} on body (ws_body), one block of
// THREADS an SM (128: one warpgroup). ARGS and PASS are a module's macros,
// named here (a macro passing them on would expand them into too many
// arguments).
#define WS_WIDTHS(prefix, body, ES, ARGS, PASS, THREADS)                                                           \
    extern "C" __global__ void __launch_bounds__(THREADS, 1) prefix##_n32(ARGS) { body<ES, 32>(PASS); }   \
    extern "C" __global__ void __launch_bounds__(THREADS, 1) prefix##_n48(ARGS) { body<ES, 48>(PASS); }   \
    extern "C" __global__ void __launch_bounds__(THREADS, 1) prefix##_n64(ARGS) { body<ES, 64>(PASS); }   \
    extern "C" __global__ void __launch_bounds__(THREADS, 1) prefix##_n96(ARGS) { body<ES, 96>(PASS); }   \
    extern "C" __global__ void __launch_bounds__(THREADS, 1) prefix##_n128(ARGS) { body<ES, 128>(PASS); } \
    extern "C" __global__ void __launch_bounds__(THREADS, 1) prefix##_n224(ARGS) { body<ES, 224>(PASS); } \
    extern "C" __global__ void __launch_bounds__(THREADS, 1) prefix##_n256(ARGS) { body<ES, 256>(PASS); }

// WS_FUSED_KERNELS(prefix, ES, ARGS, PASS, SARGS, SPASS, NARGS, NPASS):
// a module's fused and half-row ws kernels beside WS_WIDTHS's (runtime/gpu
// loadWS finds them by these names; they are off by default until
// measured: PERFORMANCE v0.71-v0.72):
// - prefix_silu_n{224,256} (SARGS, SPASS): the gate/up product (N = 2 I
//   rows: gate's I, then up's) and silu_mul of its halves in one launch,
//   out [M, I] = silu(x . gate^T) * (x . up^T) rounded where the two
//   kernels round (ws_body's SILU: a block streams BN / 2 rows of gate and
//   the same rows of up, its end pairs them; FP8 also quantizes the rows,
//   a grid-wide barrier meeting their maxima); one split only
//   (kernelForce.wsSiLU);
// - prefix##h_n{224,256}, prefix##h_silu_n{224,256}: the same widths with
//   half-row stages (ws_body's HALF: two 128-byte atoms of half the
//   block's weight rows a stage, the halves alternating; gate's rows, then
//   up's, for SILU), each weight row read 256 bytes at a time
//   (kernelForce.wsHalf);
// - prefix_norm_n{32,64} (NARGS, NPASS): the o or down product (N = H)
//   and add_rmsnorm of its rows in one launch (ws_body's NORM: the rows
//   stored as prefix_n* stores them, a grid-wide barrier, then each block
//   add_rmsnorm's work on its share of the rows with its bits; FP8 also
//   quantizes them) (kernelForce.wsNorm).
#define WS_FUSED_KERNELS(prefix, ES, ARGS, PASS, SARGS, SPASS, NARGS, NPASS)                                                       \
    extern "C" __global__ void __launch_bounds__(128, 1) prefix##_silu_n224(SARGS) { ws_body<ES, 224, true>(SPASS); }             \
    extern "C" __global__ void __launch_bounds__(128, 1) prefix##_silu_n256(SARGS) { ws_body<ES, 256, true>(SPASS); }             \
    extern "C" __global__ void __launch_bounds__(128, 1) prefix##h_n224(ARGS) { ws_body<ES, 224, false, false, true>(PASS); }     \
    extern "C" __global__ void __launch_bounds__(128, 1) prefix##h_n256(ARGS) { ws_body<ES, 256, false, false, true>(PASS); }     \
    extern "C" __global__ void __launch_bounds__(128, 1) prefix##h_silu_n224(SARGS) { ws_body<ES, 224, true, false, true>(SPASS); } \
    extern "C" __global__ void __launch_bounds__(128, 1) prefix##h_silu_n256(SARGS) { ws_body<ES, 256, true, false, true>(SPASS); } \
    extern "C" __global__ void __launch_bounds__(128, 1) prefix##_norm_n32(NARGS) { ws_body<ES, 32, false, true>(NPASS); }        \
    extern "C" __global__ void __launch_bounds__(128, 1) prefix##_norm_n64(NARGS) { ws_body<ES, 64, false, true>(NPASS); }

// WG_KERNELS(prefix, ES, ARGS, PASS): a module's three wgmma kernels,
// prefix_n{32,64,128} (one warpgroup a block; the two-warpgroup
// prefix2_n* builds, which only benchmarks launched, left the module in
// v0.81), with the module's argument list and its pass to wg_body.
#define WG_KERNELS(prefix, ES, ARGS, PASS)                                                                 \
    extern "C" __global__ void __launch_bounds__(32 * SK_WARPS) prefix##_n32(ARGS) { wg_body<ES, 4>(PASS); } \
    extern "C" __global__ void __launch_bounds__(32 * SK_WARPS) prefix##_n64(ARGS) { wg_body<ES, 8>(PASS); } \
    extern "C" __global__ void __launch_bounds__(32 * SK_WARPS) prefix##_n128(ARGS) { wg_body<ES, 16>(PASS); }

#endif // PEFTD_WG || PEFTD_WS

