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
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
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

__device__ __forceinline__ uint4 ldg16(const bf16* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

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

// e4m3_inv: the row's scale from the block's max |v| (m, per thread) and
// non-finite flag (bad), as quant_row_e4m3 says, stored into *qscale by
// thread 0; returns the factor the values are multiplied by (0 for a zero
// or non-finite row). Every thread of the block calls it.
__device__ float e4m3_inv(float m, int bad, float* qscale, float* sh) {
    bad = __syncthreads_or(bad);
    const float amax = block_max(m, sh);
    float s, inv;
    if (bad) {
        s = __int_as_float(0x7fc00000);
        inv = 0.f;
    } else if (amax == 0.f) {
        s = 1.f;
        inv = 0.f;
    } else {
        s = amax / 448.f;
        inv = fminf(448.f / amax, 3.402823466e38f); // a subnormal amax: no Inf (0 * Inf is NaN)
    }
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
