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

// mma.sync m16n8k32 e4m3 -> f32: c += a * b (sm_89 and later).
__device__ __forceinline__ void mma_e4m3(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 890
    __trap(); // no FP8 tensor cores before sm_89 (the Go side never launches it there)
#else
    asm("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

// sk_slot (stream_rows_body): the shared address of 16-byte chunk c of row
// r of a tile at t with rows of rb bytes (chunks XOR-swizzled by the row in
// groups of 8, so the 8 rows an ldmatrix reads fall in 8 different bank
// groups)
__device__ __forceinline__ unsigned sk_slot(unsigned t, int rb, int r, int c) { return t + r * rb + ((c ^ (r & 7)) << 4); }

// stream_rows_body: the product of a decode step's few rows (M <= 16) with
// a weight, out[m, n] = sum_k x[m, k] w[n, k] (F8: e4m3 values, the sum
// times sx[m] sw[n]; else bf16), bf16 out, float32 accumulate; x, w and
// out whole rows (ld K, K, N), 16-byte aligned, K a multiple of the tile.
// Such a product is the weights' bytes: the kernel streams them once, in a
// grid of one wave (N / BN blocks of STREAM_THREADS), without a split-K
// reduce launch. Block b takes weight rows [b BN, (b + 1) BN) and all of K
// in tiles of RB bytes of each row (contiguous), copied with x's M rows
// into ST shared stages by cp.async, ST - 1 tiles ahead of the one
// multiplied (MMAs with both operands by ldmatrix from rows whose chunks
// sk_slot swizzles; an e4m3 fragment is a bf16 fragment's bytes, so the
// addressing is one for both). Two layouts of the 4 warps:
//   - WK: warp w multiplies a quarter of each tile's columns for all BN
//     outputs, and the warps' sums meet in shared memory at the end
//     (narrow blocks: many bytes of each row a tile);
//   - else (bf16 only): warp w owns outputs [BN/4 w, BN/4 (w + 1)).
// opts bit 0: the first ST - 1 weight tiles are requested before
// griddepcontrol.wait (no kernel of a step writes weights), so their DRAM
// latency runs under the kernel before. runtime/gpu/stream_rows.go sizes
// the launches (StreamShape's stages); TestStreamRowsEmulated checks this
// index arithmetic on the CPU.
#define STREAM_THREADS 128

template <int BN, int RB, bool WK> struct StreamShape {
    static constexpr int CH = RB / 16;                   // 16-byte chunks of a tile row
    static constexpr int NT = WK ? BN / 8 : BN / 32;     // n8 tiles a warp multiplies
    static constexpr int STEPS = WK ? CH / 8 : CH / 2;   // a warp's 32-byte k steps a tile
    static constexpr int STAGE_B = (BN + 16) * RB;       // the weight tile, then x's 16 rows
    static constexpr int ST = (190 * 1024) / STAGE_B < 8 ? (190 * 1024) / STAGE_B : 8;
    static_assert(ST >= 3, "stream_rows: too few stages");
    static_assert(!WK || CH % 8 == 0, "stream_rows: a warp's quarter of a tile row is whole k steps");
    static_assert(!WK || 4 * 16 * BN * 4 <= ST * STAGE_B, "stream_rows: the warps' sums do not fit the stages");
    static_assert(WK || BN % 32 == 0, "stream_rows: the warps' outputs are whole n8 tiles");
};

// StreamElem<F8>::T: the value type of stream_rows_body's operands.
template <bool F8> struct StreamElem { typedef bf16 T; };
template <> struct StreamElem<true> { typedef unsigned char T; };

template <int BN, int RB, bool WK, bool F8>
__device__ __forceinline__ void stream_rows_body(bf16* __restrict__ out, const typename StreamElem<F8>::T* __restrict__ x,
                                                 const float* __restrict__ sx, const typename StreamElem<F8>::T* __restrict__ w,
                                                 const float* __restrict__ sw, int M, int N, int K, int opts) {
    static_assert(WK || !F8, "stream_rows: e4m3 weights take the WK layout");
    typedef StreamShape<BN, RB, WK> S;
    typedef typename StreamElem<F8>::T E;
    constexpr int TV = RB / sizeof(E), CV = 16 / sizeof(E); // values of a tile row, of a chunk
    extern __shared__ __align__(128) unsigned char stream_sm[];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int n0 = blockIdx.x * BN, nk = K / TV;
    const unsigned sb = (unsigned)__cvta_generic_to_shared(stream_sm);
    auto issue_w = [&](int t) { // weight tile t into stage t % ST
        if (t < nk) {
            const unsigned d = sb + (t % S::ST) * S::STAGE_B;
            const E* src = w + (i64)n0 * K + (i64)t * TV;
#pragma unroll
            for (int i = 0; i < BN * S::CH / STREAM_THREADS; i++) {
                const int idx = tid + i * STREAM_THREADS, r = idx / S::CH, c = idx % S::CH;
                cp_async16(sk_slot(d, RB, r, c), src + (i64)r * K + c * CV, 16);
            }
        }
    };
    auto issue_x = [&](int t) { // x's M rows of tile t (rows past M are never stored: their outputs are dropped)
        if (t < nk) {
            const unsigned d = sb + (t % S::ST) * S::STAGE_B + BN * RB;
            const E* src = x + (i64)t * TV;
            for (int idx = tid; idx < M * S::CH; idx += STREAM_THREADS) {
                const int r = idx / S::CH, c = idx % S::CH;
                cp_async16(sk_slot(d, RB, r, c), src + (i64)r * K + c * CV, 16);
            }
        }
    };
    const bool early = opts & 1;
    if (early)
        for (int t = 0; t < S::ST - 1; t++) issue_w(t);
    pdl_entry();
    for (int t = 0; t < S::ST - 1; t++) {
        if (!early) issue_w(t);
        issue_x(t);
        cp_async_commit(); // one group per tile (the early weight tiles join the first)
    }
    float acc[S::NT][4];
#pragma unroll
    for (int j = 0; j < S::NT; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
    // this warp's first chunk of a tile row and its first output row (n8 tile)
    const int kc0 = WK ? warp * (S::CH / 4) : 0, r0 = WK ? 0 : warp * 8 * S::NT;
    for (int t = 0; t < nk; t++) {
        cp_async_wait<S::ST - 2>();
        __syncthreads(); // tile t has landed for every thread; every warp is done with the stage the next issue overwrites
        issue_w(t + S::ST - 1);
        issue_x(t + S::ST - 1);
        cp_async_commit();
        const unsigned wb = sb + (t % S::ST) * S::STAGE_B, xb = wb + BN * RB;
#pragma unroll
        for (int kk = 0; kk < S::STEPS; kk++) {
            const int kc = kc0 + 2 * kk; // the k step's first chunk (k16 bf16, k32 e4m3: 32 bytes)
            unsigned a[4];
            ldsm4(sk_slot(xb, RB, lane & 15, kc + (lane >> 4)), a);
#pragma unroll
            for (int j = 0; j < S::NT; j += 2) {
                // lanes 0-15: n tile j, chunks kc and kc + 1 (b0, b1);
                // lanes 16-31: n tile j + 1 (the same tile again past NT)
                const int jj = j + 1 < S::NT ? j + (lane >> 4) : j;
                unsigned b[4];
                ldsm4(sk_slot(wb, RB, r0 + jj * 8 + (lane & 7), kc + ((lane >> 3) & 1)), b);
                if (F8) {
                    mma_e4m3(acc[j], a[0], a[1], a[2], a[3], b[0], b[1]);
                    if (j + 1 < S::NT) mma_e4m3(acc[j + 1], a[0], a[1], a[2], a[3], b[2], b[3]);
                } else {
                    mma16816(acc[j], a[0], a[1], a[2], a[3], b[0], b[1]);
                    if (j + 1 < S::NT) mma16816(acc[j + 1], a[0], a[1], a[2], a[3], b[2], b[3]);
                }
            }
        }
    }
    cp_async_wait<0>();
    const int g = lane >> 2, c2 = 2 * (lane & 3);
    if (!WK) {
#pragma unroll
        for (int j = 0; j < S::NT; j++) {
            const int n = n0 + r0 + j * 8 + c2;
            if (g < M) *reinterpret_cast<__nv_bfloat162*>(out + (i64)g * N + n) = __floats2bfloat162_rn(acc[j][0], acc[j][1]);
            if (g + 8 < M) *reinterpret_cast<__nv_bfloat162*>(out + (i64)(g + 8) * N + n) = __floats2bfloat162_rn(acc[j][2], acc[j][3]);
        }
        return;
    }
    // the warps' sums [warp][16][BN] meet in shared memory, added in warp order
    float* red = reinterpret_cast<float*>(stream_sm);
    __syncthreads(); // every warp is done with the stages
#pragma unroll
    for (int j = 0; j < S::NT; j++) {
        const int n = j * 8 + c2;
        *reinterpret_cast<float2*>(red + (warp * 16 + g) * BN + n) = make_float2(acc[j][0], acc[j][1]);
        *reinterpret_cast<float2*>(red + (warp * 16 + g + 8) * BN + n) = make_float2(acc[j][2], acc[j][3]);
    }
    __syncthreads();
    for (int p = tid; p < M * BN / 2; p += STREAM_THREADS) {
        const int m = 2 * p / BN, n = 2 * p - m * BN;
        float2 s = make_float2(0.f, 0.f);
#pragma unroll
        for (int q = 0; q < 4; q++) {
            const float2 v = *reinterpret_cast<const float2*>(red + (q * 16 + m) * BN + n);
            s.x += v.x, s.y += v.y;
        }
        if (F8) {
            const float a = sx[m];
            s.x = s.x * a * sw[n0 + n], s.y = s.y * a * sw[n0 + n + 1];
        }
        *reinterpret_cast<__nv_bfloat162*>(out + (i64)m * N + n0 + n) = __floats2bfloat162_rn(s.x, s.y);
    }
}

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

// quant_row_e4m3 quantizes the bf16 row out (n values, 16-byte words when
// vec) to e4m3 with one scale, for the FP8 projections (fp8.cu's
// quant_rows_e4m3, and the kernels that quantize the row they have just
// written: add_rmsnorm, silu_mul): scale = amax / 448 (1 for a zero row, NaN for a row
// holding Inf or NaN, whose values become zeros), q = e4m3_satfinite(v /
// scale; 448 / amax clamped to FLT_MAX). m and bad are this thread's max |v| and non-finite flag over the
// values it wrote; every thread of the block calls it.
__device__ void quant_row_e4m3(const bf16* out, unsigned char* q, float* qscale, int n, bool vec, float m, int bad, float* sh) {
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
    if (vec) {
        const uint4* o8 = reinterpret_cast<const uint4*>(out);
        for (int c = threadIdx.x; c < n / 8; c += blockDim.x) {
            const uint4 u = o8[c];
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
            *reinterpret_cast<uint2*>(q + 8 * c) = o;
        }
    } else {
        for (int i = threadIdx.x; i < n; i += blockDim.x) q[i] = __nv_cvt_float_to_fp8(__bfloat162float(out[i]) * inv, __NV_SATFINITE, __NV_E4M3);
    }
}
