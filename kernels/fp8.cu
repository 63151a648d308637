// FP8 (e4m3) quantization kernels for peftd's FP8 weight path (runtime/gpu
// fp8.go). Weights are quantized once at upload with one float32 scale per
// output row; activations per token (row) before each FP8 GEMM. The GEMM
// itself is cuBLASLt's (outer-vector scales on both operands, bf16 out),
// except for steps of up to 16 rows (fp8_gemv, below).
// Compiled at run time by NVRTC (kernels.Load) like llama.cu.
#include <cuda_bf16.h>
#include <cuda_fp8.h>

typedef __nv_bfloat16 bf16;
typedef long long i64;

// pdl_entry: with Programmatic Dependent Launch (runtime/cuda
// Stream.SetProgrammaticLaunch) a kernel's blocks may start while the kernel
// before it on the stream still runs. Every kernel calls this first: it
// waits for that kernel to finish and its writes to be visible (so nothing
// is read early, nor overwritten while the other kernel still reads it),
// then lets the next kernel's blocks be scheduled as this one's finish. A
// no-op for a normal launch, and before sm_90.
__device__ __forceinline__ void pdl_entry() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

#define E4M3_MAX 448.0f

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// block_max: max over the block (blockDim.x a multiple of 32); sh holds 33 floats.
__device__ float block_max(float v, float* sh) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    if (lane == 0) sh[w] = v;
    __syncthreads();
    if (w == 0) {
        float x = lane < nw ? sh[lane] : 0.f;
        x = warp_max(x);
        if (lane == 0) sh[32] = x;
    }
    __syncthreads();
    float r = sh[32];
    __syncthreads();
    return r;
}

// quant_rows_e4m3: for each row r (grid.x = rows, block a multiple of 32):
//   amax = max |x[r, :cols]|, scale[r] = amax / 448,
//   q[r, k] = e4m3_satfinite(x[r, k] * (448 / amax))   (round to nearest even)
// so x ~= q * scale. x rows are ldx elements apart, q rows cols bytes apart.
// A zero row gets scale 1 and zeros; a row holding Inf or NaN gets scale NaN
// (and zeros), so the NaN reaches the GEMM's output instead of vanishing.
// 16-byte loads and 8-byte stores when cols, ldx and the pointers allow.
extern "C" __global__ void quant_rows_e4m3(unsigned char* __restrict__ q, float* __restrict__ scale,
                                           const bf16* __restrict__ x, int cols, i64 ldx) {
    pdl_entry();
    __shared__ float sh[33];
    const i64 r = blockIdx.x;
    const bf16* xr = x + r * ldx;
    unsigned char* qr = q + r * (i64)cols;
    const bool vec = (cols & 7) == 0 && (ldx & 7) == 0 && (((unsigned long long)x) & 15) == 0 && (((unsigned long long)q) & 7) == 0;
    float m = 0.f;
    int bad = 0;
    if (vec) {
        for (int i = threadIdx.x * 8; i < cols; i += blockDim.x * 8) {
            uint4 u = *(const uint4*)(xr + i);
            const __nv_bfloat162* h = (const __nv_bfloat162*)&u;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                float2 f = __bfloat1622float2(h[j]);
                float a = fabsf(f.x), b = fabsf(f.y);
                bad |= !(a <= 3.4e38f) | !(b <= 3.4e38f);
                m = fmaxf(m, fmaxf(a, b));
            }
        }
    } else {
        for (int i = threadIdx.x; i < cols; i += blockDim.x) {
            float a = fabsf(__bfloat162float(xr[i]));
            bad |= !(a <= 3.4e38f);
            m = fmaxf(m, a);
        }
    }
    bad = __syncthreads_or(bad);
    m = block_max(m, sh);
    float s, inv;
    if (bad) {
        s = __int_as_float(0x7fc00000);
        inv = 0.f;
    } else if (m == 0.f) {
        s = 1.f;
        inv = 0.f;
    } else {
        s = m / E4M3_MAX;
        inv = E4M3_MAX / m;
    }
    if (threadIdx.x == 0) scale[r] = s;
    if (vec) {
        for (int i = threadIdx.x * 8; i < cols; i += blockDim.x * 8) {
            uint4 u = *(const uint4*)(xr + i);
            const __nv_bfloat162* h = (const __nv_bfloat162*)&u;
            uint2 o;
            unsigned short* os = (unsigned short*)&o;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                float2 f = __bfloat1622float2(h[j]);
                f.x *= inv;
                f.y *= inv;
                os[j] = __nv_cvt_float2_to_fp8x2(f, __NV_SATFINITE, __NV_E4M3);
            }
            *(uint2*)(qr + i) = o;
        }
    } else {
        for (int i = threadIdx.x; i < cols; i += blockDim.x) {
            qr[i] = __nv_cvt_float_to_fp8(__bfloat162float(xr[i]) * inv, __NV_SATFINITE, __NV_E4M3);
        }
    }
}

// fp8_gemv_n{8,16}: the FP8 product for a few rows (M <= 8 or 16):
//   out[m, n] = bf16(sx[m] * sw[n] * sum_k qx[m, k] * qw[n, k])
// for e4m3 activations qx [M, K] and weights qw [N, K] with float32 scales
// per row (what cuBLASLt's outer-vector product computes, summed in another
// order). On the tensor cores with the operands swapped: 16 weight rows are
// the M of an m16n8k32 MMA and the activation rows its N, so a step of one
// row reads the weights once at full width instead of padding M to a tile.
// grid N/16, block of up to GV_MAX_WARPS warps splitting K in 64-byte spans; K % 64 ==
// 0, N % 16 == 0, 16-byte aligned rows. Each lane loads 16 contiguous bytes
// of its weight rows g and g + 8 and of its activation row g per span and
// feeds them to two MMAs: the k order inside a span is permuted the same way
// for both operands (it depends only on the lane's column group), so the
// sum is the same. The warps' partial sums meet in shared memory.
#define GV_MAX_WARPS 16
#define GV_PREFETCH 4096 // bytes of each weight row asked of L2 before pdl_entry (at most 64 KB a block)

// prefetch_l2: bring the 128-byte line holding p into L2 (no register, no wait).
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p)); }

// ld_stream16: 16 bytes read once (weights): not kept in L1.
__device__ __forceinline__ uint4 ld_stream16(const unsigned char* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

__device__ __forceinline__ void mma_e4m3(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 890
    __trap(); // no FP8 tensor cores before sm_89 (the Go side never launches it there)
#else
    asm("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

template <int NT>
__device__ __forceinline__ void fp8_gemv_body(bf16* __restrict__ out, const unsigned char* __restrict__ qx,
                                              const float* __restrict__ sx, const unsigned char* __restrict__ qw,
                                              const float* __restrict__ sw, int M, int N, int K) {
    __shared__ float red[GV_MAX_WARPS][NT][4][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tig = lane & 3, nw = blockDim.x >> 5;
    const int n0 = blockIdx.x * 16;
    // The weights never change during a step: before waiting for the kernel
    // before (which writes the activations), ask L2 for the first
    // GV_PREFETCH bytes of each of the block's 16 rows, so that with
    // Programmatic Dependent Launch the fetch overlaps that kernel's tail.
    {
        const int lines = min(K, GV_PREFETCH) / 128; // 128-byte lines per row (K % 64 == 0: a last half line is left out)
        for (int i = threadIdx.x; i < 16 * lines; i += blockDim.x) {
            const int r = i / lines, l = i - r * lines;
            prefetch_l2(qw + (i64)(n0 + r) * K + l * 128);
        }
    }
    pdl_entry();
    const unsigned char* wa = qw + (i64)(n0 + g) * K + 16 * tig;
    const unsigned char* wb = wa + 8 * (i64)K;
    const unsigned char* xr[NT];
    bool xv[NT];
#pragma unroll
    for (int t = 0; t < NT; t++) {
        const int m = g + 8 * t;
        xv[t] = m < M;
        xr[t] = qx + (i64)(xv[t] ? m : 0) * K + 16 * tig;
    }
    float c[NT][4];
#pragma unroll
    for (int t = 0; t < NT; t++) c[t][0] = c[t][1] = c[t][2] = c[t][3] = 0.f;
    const int spans = K / 64;
    // U spans per warp in flight: every load of a batch is issued before
    // its MMAs (clamped addresses, no branch between them), so a warp keeps
    // U KB of weights in flight, not one span's 1 KB: small grids (o, down:
    // 256 blocks, a third of a wave) are otherwise latency-bound. Two
    // activation tiles take half as many (registers).
    constexpr int U = NT == 1 ? 4 : 2;
    for (int s0 = warp; s0 < spans; s0 += nw * U) {
        uint4 A[U], B[U], X[U][NT];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const i64 k = (i64)min(s0 + u * nw, spans - 1) * 64;
            A[u] = ld_stream16(wa + k);
            B[u] = ld_stream16(wb + k);
#pragma unroll
            for (int t = 0; t < NT; t++) X[u][t] = __ldg(reinterpret_cast<const uint4*>(xr[t] + k));
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            if (s0 + u * nw >= spans) break; // warp-uniform
#pragma unroll
            for (int t = 0; t < NT; t++) {
                const uint4 x = xv[t] ? X[u][t] : make_uint4(0u, 0u, 0u, 0u);
                mma_e4m3(c[t], A[u].x, B[u].x, A[u].y, B[u].y, x.x, x.y);
                mma_e4m3(c[t], A[u].z, B[u].z, A[u].w, B[u].w, x.z, x.w);
            }
        }
    }
#pragma unroll
    for (int t = 0; t < NT; t++)
#pragma unroll
        for (int e = 0; e < 4; e++) red[warp][t][e][lane] = c[t][e];
    __syncthreads();
    if (warp != 0) return;
#pragma unroll
    for (int t = 0; t < NT; t++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            float v = 0.f;
#pragma unroll
            for (int w = 0; w < nw; w++) v += red[w][t][e][lane];
            // c[e]: row n0 + g (+8 for e >= 2), column m = 8t + 2tig + (e & 1)
            const int m = 8 * t + 2 * tig + (e & 1), n = n0 + g + (e >= 2 ? 8 : 0);
            if (m < M) out[(i64)m * N + n] = __float2bfloat16_rn(v * sx[m] * sw[n]);
        }
    }
}

#define FP8_GEMV_ARGS                                                                                        \
    bf16 *out, const unsigned char *qx, const float *sx, const unsigned char *qw, const float *sw, int M, int N, \
        int K
extern "C" __global__ void __launch_bounds__(32 * GV_MAX_WARPS) fp8_gemv_n8(FP8_GEMV_ARGS) { fp8_gemv_body<1>(out, qx, sx, qw, sw, M, N, K); }
extern "C" __global__ void __launch_bounds__(32 * GV_MAX_WARPS) fp8_gemv_n16(FP8_GEMV_ARGS) { fp8_gemv_body<2>(out, qx, sx, qw, sw, M, N, K); }
