// FP8 (e4m3) quantization kernels for peftd's FP8 weight path (runtime/gpu
// fp8.go). Weights are quantized once at upload with one float32 scale per
// output row; activations per token (row) before each FP8 GEMM. The GEMM
// itself is cuBLASLt's (outer-vector scales on both operands, bf16 out),
// except for steps of up to 16 rows (fp8_gemv, below) and of 17-64 rows
// (fp8_gemm_skinny), and the sum of a K-split cuBLASLt product
// (fp8_splitk_reduce, at the end).
// Compiled at run time by NVRTC (kernels.Load) like llama.cu.
#include "common.cuh"

// quant_rows_e4m3: for each row r (grid.x = rows, block a multiple of 32):
//   amax = max |x[r, :cols]|, scale[r] = amax / 448,
//   q[r, k] = e4m3_satfinite(x[r, k] * (448 / amax))   (round to nearest even)
// so x ~= q * scale. x rows are ldx elements apart, q rows cols bytes apart.
// A zero row gets scale 1 and zeros; a row holding Inf or NaN gets scale NaN
// (and zeros), so the NaN reaches the GEMM's output instead of vanishing.
// 16-byte loads and 8-byte stores when cols, ldx and the pointers allow.
#define QR_RC 4 // 16-byte words of a row each thread keeps in registers (rows of up to 32 * blockDim values)
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
    if (vec && cols <= 8 * QR_RC * (int)blockDim.x) {
        // the row stays in registers: every load in flight at once, and no
        // read back for the quantization
        const int n8 = cols >> 3;
        uint4 w[QR_RC];
#pragma unroll
        for (int j = 0; j < QR_RC; j++) {
            const int c = threadIdx.x + j * blockDim.x;
            if (c < n8) w[j] = reinterpret_cast<const uint4*>(xr)[c];
        }
#pragma unroll
        for (int j = 0; j < QR_RC; j++)
            if (threadIdx.x + j * blockDim.x < n8) amax8(w[j], m, bad);
        quant_words_e4m3<QR_RC>(w, n8, qr, scale + r, m, bad, sh);
        return;
    }
    if (vec) {
        for (int i = threadIdx.x * 8; i < cols; i += blockDim.x * 8) amax8(*(const uint4*)(xr + i), m, bad);
    } else {
        for (int i = threadIdx.x; i < cols; i += blockDim.x) {
            float a = fabsf(__bfloat162float(xr[i]));
            bad |= !(a <= 3.4e38f);
            m = fmaxf(m, a);
        }
    }
    quant_row_e4m3(xr, qr, scale + r, cols, vec, m, bad, sh);
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

// ld_stream16: 16 bytes read once (weights): not kept in L1.
__device__ __forceinline__ uint4 ld_stream16(const unsigned char* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

template <int NT>
__device__ __forceinline__ void fp8_gemv_body(bf16* __restrict__ out, const unsigned char* __restrict__ qx,
                                              const float* __restrict__ sx, const unsigned char* __restrict__ qw,
                                              const float* __restrict__ sw, int M, int N, int K) {
    __shared__ float red[GV_MAX_WARPS][NT][4][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tig = lane & 3, nw = blockDim.x >> 5;
    const int n0 = blockIdx.x * 16;
    // No L2 prefetch of the weights before pdl_entry: v0.16 measured one
    // (4 KB of each row) 1.5-10 us slower per product at batch 1 (gate_up
    // 36.8 -> 46.7 us: at K = 4096 it asked for every row twice).
    const unsigned char* wa = qw + (i64)(n0 + g) * K + 16 * tig;
    const unsigned char* wb = wa + 8 * (i64)K;
    const int spans = K / 64;
    // U spans per warp in flight: every load of a batch is issued before
    // its MMAs (clamped addresses, no branch between them), so a warp keeps
    // U KB of weights in flight, not one span's 1 KB: small grids (o, down:
    // 256 blocks, a third of a wave) are otherwise latency-bound. Two
    // activation tiles take half as many (registers).
    constexpr int U = NT == 1 ? 4 : 2;
    pdl_entry();
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
#if FP8_WIDE
            const unsigned a0[4] = {A[u].x, B[u].x, A[u].y, B[u].y}, a1[4] = {A[u].z, B[u].z, A[u].w, B[u].w};
            unsigned w0[8], w1[8];
            widen_e4m3<4>(a0, w0);
            widen_e4m3<4>(a1, w1);
#endif
#pragma unroll
            for (int t = 0; t < NT; t++) {
                const uint4 x = xv[t] ? X[u][t] : make_uint4(0u, 0u, 0u, 0u);
#if FP8_WIDE
                const unsigned xs[4] = {x.x, x.y, x.z, x.w};
                unsigned v[8];
                widen_e4m3<4>(xs, v);
                mma_e4m3w(c[t], w0, v);
                mma_e4m3w(c[t], w1, v + 4);
#else
                mma_e4m3(c[t], A[u].x, B[u].x, A[u].y, B[u].y, x.x, x.y);
                mma_e4m3(c[t], A[u].z, B[u].z, A[u].w, B[u].w, x.z, x.w);
#endif
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

// fp8_gemm_skinny_n{32,64,128}: the same product for 17-128 rows (M <= 32,
// 64 or 128), where cuBLASLt's one FP8 algorithm reads the weights at
// 0.3-0.5 of the bandwidth (n128 is taken only where a benchmark showed it
// faster: see skinnyAutoRows in runtime/gpu). Operands swapped as in fp8_gemv (weight rows are the MMA's M,
// activation rows its N, the same k permutation inside each 64-byte span),
// but a block of SK_WARPS warps takes SK_ROWS weight rows (16 per warp) over
// one K range and stages both operands in shared memory with cp.async,
// SK_STAGES stages of SK_U spans: each weight byte is read from memory once,
// each activation span once per block (not once per warp), and every warp
// reads the activation tile its MMAs share from shared memory.
// grid (N / SK_ROWS, S): the S blocks of a weight tile split K; with S > 1
// they write float32 partials to part ([N/SK_ROWS][S][SK_ROWS][8*NT]) and
// the last to finish (a counter in done, left at zero again) sums them in
// split order and writes the tile: no second launch, and the same result
// however the blocks are scheduled. Dynamic shared memory
// SK_STAGES * (SK_ROWS + 8*NT) * SK_LD bytes. N % 64 == 0, K % 64 == 0.
#define SK_WARPS 4
#define SK_ROWS 64
#define SK_U 2
#define SK_STAGES 4
#define SK_LD (SK_U * 64 + 64) // bytes per staged row: 16-byte reads of 8 lanes hit 32 different banks

__device__ __forceinline__ uint4 sk_lds(unsigned a) {
    uint4 v;
    asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(a));
    return v;
}

// skinny_store: the end fp8_gemm_skinny and fp8_wg share. acc[4t + e]
// holds weight row n0 + 16*warp + g (+8 for e >= 2) times activation row
// 8t + 2tig + (e & 1) (n0 = blockIdx.x * SK_ROWS; g, tig: lane / 4, lane %
// 4). One block a tile (gridDim.y == 1): scaled, rounded and stored.
// Otherwise the block's partials go to part and the last block of the
// tile to finish (done's counter; last: a __shared__ int) sums the
// gridDim.y partials in split order and stores them, then leaves the
// counter at zero for the next launch.
template <int NT>
__device__ __forceinline__ void skinny_store(const float* acc, bf16* __restrict__ out, float* __restrict__ part,
                                             int* __restrict__ done, const float* __restrict__ sx,
                                             const float* __restrict__ sw, int M, int N, int* last) {
    constexpr int TR = 8 * NT;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, tig = lane & 3;
    const int n0 = blockIdx.x * SK_ROWS, S = gridDim.y, sp = blockIdx.y;
    if (S == 1) {
#pragma unroll
        for (int t = 0; t < NT; t++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int m = 8 * t + 2 * tig + (e & 1), n = n0 + 16 * warp + g + (e >= 2 ? 8 : 0);
                if (m < M) out[(i64)m * N + n] = __float2bfloat16_rn(acc[4 * t + e] * sx[m] * sw[n]);
            }
        return;
    }
    float* tile = part + (i64)blockIdx.x * S * SK_ROWS * TR;
    float* mine = tile + (i64)sp * SK_ROWS * TR;
#pragma unroll
    for (int t = 0; t < NT; t++)
#pragma unroll
        for (int e = 0; e < 4; e++) mine[(16 * warp + g + (e >= 2 ? 8 : 0)) * TR + 8 * t + 2 * tig + (e & 1)] = acc[4 * t + e];
    __threadfence();
    __syncthreads();
    if (tid == 0) *last = atomicAdd(done + blockIdx.x, 1) == S - 1;
    __syncthreads();
    if (!*last) return;
    __threadfence();
    for (int i = tid; i < SK_ROWS * TR; i += SK_WARPS * 32) {
        const int r = i / TR, m = i - r * TR;
        if (m >= M) continue;
        float v = 0.f;
        for (int s = 0; s < S; s++) v += __ldcg(tile + (i64)s * SK_ROWS * TR + i);
        out[(i64)m * N + n0 + r] = __float2bfloat16_rn(v * sx[m] * sw[n0 + r]);
    }
    if (tid == 0) done[blockIdx.x] = 0; // ready for the next launch
}

template <int NT>
__device__ __forceinline__ void fp8_skinny_body(bf16* __restrict__ out, float* __restrict__ part, int* __restrict__ done,
                                                const unsigned char* __restrict__ qx, const float* __restrict__ sx,
                                                const unsigned char* __restrict__ qw, const float* __restrict__ sw, int M,
                                                int N, int K) {
    constexpr int TR = 8 * NT;            // activation rows staged (zeros past M)
    constexpr int WB = SK_ROWS * SK_LD;   // weight bytes of a stage
    constexpr int SB = WB + TR * SK_LD;   // bytes of a stage
    constexpr int CH = SK_U * 4;          // 16-byte chunks per staged row
    extern __shared__ __align__(16) unsigned char skm[];
    __shared__ int last;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, tig = lane & 3;
    const int n0 = blockIdx.x * SK_ROWS, S = gridDim.y, sp = blockIdx.y;
    const int spans = K / 64, per = (spans + S - 1) / S;
    const int s0 = min(spans, sp * per), s1 = min(spans, s0 + per);
    const int nst = (s1 - s0 + SK_U - 1) / SK_U; // stages of this block (0 for an empty split)
    const unsigned base = (unsigned)__cvta_generic_to_shared(skm);

    // copy(j, lo, hi): staged rows [lo, hi) (weights 0..SK_ROWS-1, then the
    // activation rows) of stage j (spans s0 + j*SK_U on) into buffer j %
    // SK_STAGES; spans past s1 and activation rows past M are zero-filled
    // (they add 0)
    auto copy = [&](int j, int lo, int hi) {
        if (j >= nst) return;
        const unsigned b = base + (j % SK_STAGES) * SB;
        const int sa = s0 + j * SK_U;
        for (int i = lo * CH + tid; i < hi * CH; i += SK_WARPS * 32) {
            const int r = i / CH, c = i - r * CH, s = sa + c / 4;
            const bool w = r < SK_ROWS;
            const int xr = r - SK_ROWS;
            const bool ok = s < s1 && (w || xr < M);
            const unsigned char* src = w ? qw + (i64)(n0 + r) * K : qx + (i64)(ok ? xr : 0) * K;
            cp_async16(b + r * SK_LD + c * 16, src + (i64)(ok ? s : s0) * 64 + (c & 3) * 16, ok ? 16 : 0);
        }
    };

    float c[NT][4];
#pragma unroll
    for (int t = 0; t < NT; t++) c[t][0] = c[t][1] = c[t][2] = c[t][3] = 0.f;
    // The weights never change during a step: their first stages are
    // copied before waiting for the kernel before (which writes the
    // activations), so with Programmatic Dependent Launch the fetch
    // overlaps its tail. They join the first commit group (a wait for stage
    // 0 waits for them all: they were issued first).
#pragma unroll
    for (int j = 0; j < SK_STAGES - 1; j++) copy(j, 0, SK_ROWS);
    pdl_entry();
#pragma unroll
    for (int j = 0; j < SK_STAGES - 1; j++) {
        copy(j, SK_ROWS, SK_ROWS + TR);
        cp_async_commit(); // empty past the end: the group count stays uniform
    }
    const unsigned wrow = (warp * 16 + g) * SK_LD + tig * 16;
    for (int j = 0; j < nst; j++) {
        cp_async_wait<SK_STAGES - 2>(); // this thread's copies of stage j have landed
        __syncthreads();          // everyone's have; and everyone is done with stage j - 1's buffer
        copy(j + SK_STAGES - 1, 0, SK_ROWS + TR);
        cp_async_commit();
        const unsigned b = base + (j % SK_STAGES) * SB;
#pragma unroll
        for (int u = 0; u < SK_U; u++) {
            const uint4 A = sk_lds(b + wrow + u * 64), B = sk_lds(b + wrow + 8 * SK_LD + u * 64);
#if FP8_WIDE
            const unsigned a0[4] = {A.x, B.x, A.y, B.y}, a1[4] = {A.z, B.z, A.w, B.w};
            unsigned w0[8], w1[8];
            widen_e4m3<4>(a0, w0);
            widen_e4m3<4>(a1, w1);
#endif
#pragma unroll
            for (int t = 0; t < NT; t++) {
                const uint4 X = sk_lds(b + WB + (8 * t + g) * SK_LD + tig * 16 + u * 64);
#if FP8_WIDE
                const unsigned xs[4] = {X.x, X.y, X.z, X.w};
                unsigned v[8];
                widen_e4m3<4>(xs, v);
                mma_e4m3w(c[t], w0, v);
                mma_e4m3w(c[t], w1, v + 4);
#else
                mma_e4m3(c[t], A.x, B.x, A.y, B.y, X.x, X.y);
                mma_e4m3(c[t], A.z, B.z, A.w, B.w, X.z, X.w);
#endif
            }
        }
    }
    cp_async_wait<0>();
    skinny_store<NT>(&c[0][0], out, part, done, sx, sw, M, N, &last);
}

#define FP8_SKINNY_ARGS                                                                                        \
    bf16 *out, float *part, int *done, const unsigned char *qx, const float *sx, const unsigned char *qw,    \
        const float *sw, int M, int N, int K
#define FP8_SKINNY_PASS out, part, done, qx, sx, qw, sw, M, N, K
extern "C" __global__ void __launch_bounds__(32 * SK_WARPS) fp8_gemm_skinny_n32(FP8_SKINNY_ARGS) { fp8_skinny_body<4>(FP8_SKINNY_PASS); }
extern "C" __global__ void __launch_bounds__(32 * SK_WARPS) fp8_gemm_skinny_n64(FP8_SKINNY_ARGS) { fp8_skinny_body<8>(FP8_SKINNY_PASS); }
extern "C" __global__ void __launch_bounds__(32 * SK_WARPS) fp8_gemm_skinny_n128(FP8_SKINNY_ARGS) { fp8_skinny_body<16>(FP8_SKINNY_PASS); }

// ---------------------------------------------------------------------------
// fp8_wg_n{32,64,128}: fp8_gemm_skinny's product (same arguments, grid,
// split-K and partials) on Hopper's warpgroup MMAs (wgmma, sm_90a), the
// FP8 tensor-core path that `mma.sync` lacks there (FP8_WIDE above): one
// warpgroup (4 warps) a block, each K step of 32 bytes one
// wgmma.m64nNk32.e4m3 with the block's 64 weight rows as A (M) and the
// 8*NT staged activation rows as B (N), both read from shared memory by
// descriptor; f32 accumulators in registers. No unpacking, no f16 MMAs.
// Stages hold 128 bytes of K a row (two 64-byte spans) in the K-major
// 128-byte-swizzle layout wgmma reads: row r at r * 128 from a
// 1024-aligned stage, its 16-byte chunk c at chunk c ^ (r % 8); a
// descriptor names a 32-byte K slice by its start (stage + 32 ks) and
// 8-row groups 1024 bytes apart. cp.async writes the chunks (generic
// proxy): each thread fences them to the async proxy
// (fence.proxy.async) before the barrier that precedes the wgmma.
// Each stage's wgmma group is waited for before the next barrier, so
// the copies issued after it never overwrite a stage being read.
// Accumulators: thread (warp w, lane l) holds weight rows 16w + l/4 (+8)
// and activation rows 8t + 2(l%4) (+1) in d[4t..4t+3]: mma.sync's m16n8
// layout per warp, fp8_gemm_skinny's c[t][e], so the epilogue is its.
// Dynamic shared memory: WG_STAGES * (64 + 8*NT) * 128 + 1024 bytes (the
// base is rounded up to 1024). An experiment, compiled only with
// PEFTD_FP8_WG (PEFTD_KERNEL_DEFINES) until it has run on a GPU: the Go
// side uses it where the module has it and fp8State.wgOn asks
// (TestFP8Wgmma, TestDecodeBench's +wg rows).
// ---------------------------------------------------------------------------
#ifdef PEFTD_FP8_WG
#define WG_STAGES 4
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
__device__ __forceinline__ void wg_commit_wait() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#endif
}
// fence_proxy_async: this thread's generic-proxy writes to shared memory
// (cp.async's included) are ordered before later async-proxy reads (wgmma).
__device__ __forceinline__ void fence_proxy_async() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
// wg_pin: the accumulators are read only after the wait (the compiler
// must not move their reads above it).
template <int N> __device__ __forceinline__ void wg_pin(float* d) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+f"(d[i])::"memory");
}

__device__ __forceinline__ void wg_mma_n32(float* d, unsigned long long a, unsigned long long b) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k32.f32.e4m3.e4m3 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, %16, %17, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
        : "l"(a), "l"(b), "r"(1));
#else
    __trap();
#endif
}
__device__ __forceinline__ void wg_mma_n64(float* d, unsigned long long a, unsigned long long b) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(a), "l"(b), "r"(1));
#else
    __trap();
#endif
}
__device__ __forceinline__ void wg_mma_n128(float* d, unsigned long long a, unsigned long long b) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(a), "l"(b), "r"(1));
#else
    __trap();
#endif
}

template <int NT> __device__ __forceinline__ void wg_mma(float* d, unsigned long long a, unsigned long long b) {
    if constexpr (NT == 4) wg_mma_n32(d, a, b);
    else if constexpr (NT == 8) wg_mma_n64(d, a, b);
    else wg_mma_n128(d, a, b);
}

template <int NT>
__device__ __forceinline__ void fp8_wg_body(bf16* __restrict__ out, float* __restrict__ part, int* __restrict__ done,
                                            const unsigned char* __restrict__ qx, const float* __restrict__ sx,
                                            const unsigned char* __restrict__ qw, const float* __restrict__ sw, int M,
                                            int N, int K) {
    static_assert(NT == 4 || NT == 8 || NT == 16, "fp8_wg: 32, 64 or 128 activation rows");
    constexpr int TR = 8 * NT;              // activation rows staged (zeros past M)
    constexpr int WB = SK_ROWS * WG_RB;     // weight bytes of a stage (8 KB)
    constexpr int SB = WB + TR * WG_RB;     // bytes of a stage (a multiple of 1024)
    constexpr int CH = WG_RB / 16;          // 16-byte chunks a staged row
    extern __shared__ __align__(16) unsigned char wgm[];
    __shared__ int last;
    const int tid = threadIdx.x;
    const int n0 = blockIdx.x * SK_ROWS, S = gridDim.y, sp = blockIdx.y;
    const int spans = K / 64, per = (spans + S - 1) / S;
    const int s0 = min(spans, sp * per), s1 = min(spans, s0 + per);
    const int nst = (s1 - s0 + 1) / 2; // stages of this block: two 64-byte spans each (0 for an empty split)
    const unsigned base = ((unsigned)__cvta_generic_to_shared(wgm) + 1023u) & ~1023u;

    // The copies. Thread tid copies the same chunks of every stage: 16-byte
    // chunk c = tid % 8 of staged rows r0 + 16k (r0 = tid / 8, k < CPT;
    // the first WK are weight rows, then activation rows). (r0 + 16k) % 8 ==
    // r0 % 8, so the swizzled chunk is the same in every row; the rows'
    // sources are worked out once, and a stage adds only its span (spans s0
    // + 2j, s0 + 2j + 1 for stage j; chunk c reads span c / 4 of the two).
    // Spans past s1 and activation rows past M are zero-filled (they add 0).
    constexpr int RSTEP = SK_WARPS * 32 / CH;                 // 16 rows between a thread's chunks
    constexpr int CPT = (SK_ROWS + TR) / RSTEP, WK = SK_ROWS / RSTEP; // chunks a stage, weight chunks first
    static_assert(RSTEP % 8 == 0 && SK_ROWS % RSTEP == 0 && TR % RSTEP == 0, "fp8_wg: rows of a thread share their swizzle");
    const int c = tid % CH, r0 = tid / CH;
    const unsigned dst0 = r0 * WG_RB + ((c ^ (r0 & 7)) << 4);
    const unsigned char* src[CPT];
    bool live[CPT];
#pragma unroll
    for (int k = 0; k < CPT; k++) {
        const int xr = r0 + RSTEP * k - SK_ROWS;
        live[k] = k < WK || xr < M;
        src[k] = (k < WK ? qw + (i64)(n0 + r0 + RSTEP * k) * K : qx + (i64)(live[k] ? xr : 0) * K) + (c & 3) * 16;
    }
    // copy(j, k0, k1): this thread's chunks [k0, k1) of stage j into buffer j % WG_STAGES
    auto copy = [&](int j, int k0, int k1) {
        if (j >= nst) return;
        const unsigned b = base + (j % WG_STAGES) * SB + dst0;
        const int s = s0 + 2 * j + c / 4;
        const bool in = s < s1;
#pragma unroll
        for (int k = k0; k < k1; k++) {
            const bool ok = in && live[k];
            cp_async16(b + k * RSTEP * WG_RB, src[k] + (i64)(ok ? s : s0) * 64, ok ? 16 : 0);
        }
    };

    float d[4 * NT];
#pragma unroll
    for (int i = 0; i < 4 * NT; i++) d[i] = 0.f;
    // the weights' first stages before the wait, as fp8_gemm_skinny
#pragma unroll
    for (int j = 0; j < WG_STAGES - 1; j++) copy(j, 0, WK);
    pdl_entry();
#pragma unroll
    for (int j = 0; j < WG_STAGES - 1; j++) {
        copy(j, WK, CPT);
        cp_async_commit();
    }
    for (int j = 0; j < nst; j++) {
        cp_async_wait<WG_STAGES - 2>(); // this thread's copies of stage j have landed
        fence_proxy_async();            // ... and are visible to wgmma
        __syncthreads();                // everyone's; and stage j - 1's wgmma group is done in every warp
        copy(j + WG_STAGES - 1, 0, CPT);
        cp_async_commit();
        const unsigned b = base + (j % WG_STAGES) * SB;
        wg_fence();
#pragma unroll
        for (int ks = 0; ks < WG_RB / 32; ks++) wg_mma<NT>(d, wg_desc(b + 32 * ks), wg_desc(b + WB + 32 * ks));
        wg_commit_wait();
        wg_pin<4 * NT>(d);
    }
    cp_async_wait<0>();
    skinny_store<NT>(d, out, part, done, sx, sw, M, N, &last);
}

extern "C" __global__ void __launch_bounds__(32 * SK_WARPS) fp8_wg_n32(FP8_SKINNY_ARGS) { fp8_wg_body<4>(FP8_SKINNY_PASS); }
extern "C" __global__ void __launch_bounds__(32 * SK_WARPS) fp8_wg_n64(FP8_SKINNY_ARGS) { fp8_wg_body<8>(FP8_SKINNY_PASS); }
extern "C" __global__ void __launch_bounds__(32 * SK_WARPS) fp8_wg_n128(FP8_SKINNY_ARGS) { fp8_wg_body<16>(FP8_SKINNY_PASS); }
#endif // PEFTD_FP8_WG

// fp8_splitk_reduce: the sum of a K-split product's float32 partials
// (cuBLASLt's strided batch, runtime/cuda GemmTNSplitK), scaled and rounded
// as the whole product would be:
//   out[m, n] = bf16(sx[m] * sw[n] * sum_{s < S} part[s, m, n])
// summed in split order (deterministic), with sx [M] and sw [N] the
// activation and weight row scales. N % 4 == 0; four columns per thread,
// a grid-stride loop.
extern "C" __global__ void fp8_splitk_reduce(bf16* __restrict__ out, const float* __restrict__ part,
                                             const float* __restrict__ sx, const float* __restrict__ sw, int M, int N,
                                             int S) {
    pdl_entry();
    const i64 n4 = (i64)M * N / 4;
    const float4* p = (const float4*)part;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n4; i += (i64)gridDim.x * blockDim.x) {
        float4 v = __ldcg(p + i);
        for (int s = 1; s < S; s++) {
            const float4 u = __ldcg(p + (i64)s * n4 + i);
            v.x += u.x;
            v.y += u.y;
            v.z += u.z;
            v.w += u.w;
        }
        const i64 e = 4 * i;
        const int m = (int)(e / N), n = (int)(e - (i64)m * N);
        const float a = sx[m];
        const float4 b = *(const float4*)(sw + n);
        __nv_bfloat162 lo = __floats2bfloat162_rn(v.x * a * b.x, v.y * a * b.y);
        __nv_bfloat162 hi = __floats2bfloat162_rn(v.z * a * b.z, v.w * a * b.w);
        uint2 o;
        o.x = *(unsigned*)&lo;
        o.y = *(unsigned*)&hi;
        *(uint2*)(out + e) = o;
    }
}

// fp8_stream_n{32,48,224}: the FP8 product for a few rows (M <= 16) the
// way gemm_skinny (llama.cu) streams bf16 weights:
//   out[m, n] = bf16(sx[m] * sw[n] * sum_k qx[m, k] * qw[n, k])
// grid N / BN blocks (one wave; runtime/gpu/fp8_stream.go picks BN), block
// FS_THREADS (4 warps). Block b streams weight rows [b BN, (b + 1) BN) over
// all of K in tiles of RB bytes of each row (512 for n32 and n48, 128 for
// n224), with the M activation rows, through ST shared stages by cp.async,
// ST - 1 tiles ahead of the one multiplied. Each warp multiplies a quarter
// of each tile's columns for all BN outputs with m16n8k32 e4m3 MMAs (the
// activation rows as A, the weight rows as B; an e4m3 fragment is a bf16
// fragment's bytes, so ldmatrix reads both from rows whose 16-byte chunks
// are XOR-swizzled in groups of 8); the warps' sums meet in shared memory
// and are scaled as they are written. K % RB == 0, N % BN == 0, 16-byte
// aligned rows. opts bit 0: the first ST - 1 weight tiles are requested
// before griddepcontrol.wait (no kernel of a step writes weights).
#define FS_THREADS 128

template <int BN, int RB> struct FsShape {
    static constexpr int NT = BN / 8;                  // n8 tiles (every warp multiplies all of them)
    // WIDE: operands widened once for f16 MMAs (mma_e4m3w) rather than e4m3
    // MMAs; not for n224, whose 112 accumulators then spill (v0.27 SASS:
    // 52 LDL, 27 STL; FP8 decode at 16 rows 3.56 -> 3.51 ms, but 4.27 ->
    // 4.51 with four adapters: docs/TRIED.md)
    static constexpr bool WIDE = FP8_WIDE && NT <= 8;
    static constexpr int STAGE_B = (BN + 16) * RB;     // the weight tile, then 16 activation rows
    static constexpr int ST = (190 * 1024) / STAGE_B < 8 ? (190 * 1024) / STAGE_B : 8;
    static_assert(ST >= 3, "fp8_stream: too few stages");
    static_assert(RB % 128 == 0, "fp8_stream: a warp's quarter of a tile row is whole k32 steps");
    static_assert(4 * 16 * BN * 4 <= ST * STAGE_B, "fp8_stream: the warps' sums do not fit the stages");
};

template <int BN, int RB>
__device__ __forceinline__ void fp8_stream_body(bf16* __restrict__ out, const unsigned char* __restrict__ qx,
                                                const float* __restrict__ sx, const unsigned char* __restrict__ qw,
                                                const float* __restrict__ sw, int M, int N, int K, int opts) {
    typedef FsShape<BN, RB> S;
    constexpr int CH = RB / 16; // 16-byte chunks a tile row
    extern __shared__ __align__(128) unsigned char fsm[];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int n0 = blockIdx.x * BN, nk = K / RB;
    const unsigned sb = (unsigned)__cvta_generic_to_shared(fsm);
    auto issue_w = [&](int t) { // weight tile t into stage t % ST
        if (t < nk) {
            const unsigned d = sb + (t % S::ST) * S::STAGE_B;
            const unsigned char* src = qw + (i64)n0 * K + (i64)t * RB;
#pragma unroll
            for (int i = 0; i < BN * CH / FS_THREADS; i++) {
                const int idx = tid + i * FS_THREADS, r = idx / CH, c = idx % CH;
                cp_async16(sk_slot(d, RB, r, c), src + (i64)r * K + c * 16, 16);
            }
        }
    };
    auto issue_x = [&](int t) { // the M activation rows of tile t (rows past M: outputs dropped)
        if (t < nk) {
            const unsigned d = sb + (t % S::ST) * S::STAGE_B + BN * RB;
            const unsigned char* src = qx + (i64)t * RB;
            for (int idx = tid; idx < M * CH; idx += FS_THREADS) {
                const int r = idx / CH, c = idx % CH;
                cp_async16(sk_slot(d, RB, r, c), src + (i64)r * K + c * 16, 16);
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
    const int kc0 = warp * (CH / 4); // this warp's first chunk of a tile row
    for (int t = 0; t < nk; t++) {
        cp_async_wait<S::ST - 2>();
        __syncthreads(); // tile t has landed for every thread; every warp is done with the stage the next issue overwrites
        issue_w(t + S::ST - 1);
        issue_x(t + S::ST - 1);
        cp_async_commit();
        const unsigned wb = sb + (t % S::ST) * S::STAGE_B, xb = wb + BN * RB;
#pragma unroll
        for (int kk = 0; kk < CH / 8; kk++) { // k32 steps: two chunks each
            const int kc = kc0 + 2 * kk;
            unsigned a[4];
            ldsm4(sk_slot(xb, RB, lane & 15, kc + (lane >> 4)), a);
            unsigned aw[8];
            if constexpr (S::WIDE) widen_e4m3<4>(a, aw);
#pragma unroll
            for (int j = 0; j < S::NT; j += 2) {
                const int jj = j + 1 < S::NT ? j + (lane >> 4) : j;
                unsigned b[4];
                ldsm4(sk_slot(wb, RB, jj * 8 + (lane & 7), kc + ((lane >> 3) & 1)), b);
                if constexpr (S::WIDE) {
                    unsigned bw[8];
                    widen_e4m3<4>(b, bw);
                    mma_e4m3w(acc[j], aw, bw);
                    if (j + 1 < S::NT) mma_e4m3w(acc[j + 1], aw, bw + 4);
                } else {
                    mma_e4m3(acc[j], a[0], a[1], a[2], a[3], b[0], b[1]);
                    if (j + 1 < S::NT) mma_e4m3(acc[j + 1], a[0], a[1], a[2], a[3], b[2], b[3]);
                }
            }
        }
    }
    cp_async_wait<0>();
    // the warps' sums [warp][16][BN] meet in shared memory, added in warp order
    float* red = reinterpret_cast<float*>(fsm);
    const int g = lane >> 2, c2 = 2 * (lane & 3);
    __syncthreads(); // every warp is done with the stages
#pragma unroll
    for (int j = 0; j < S::NT; j++) {
        const int n = j * 8 + c2;
        *reinterpret_cast<float2*>(red + (warp * 16 + g) * BN + n) = make_float2(acc[j][0], acc[j][1]);
        *reinterpret_cast<float2*>(red + (warp * 16 + g + 8) * BN + n) = make_float2(acc[j][2], acc[j][3]);
    }
    __syncthreads();
    for (int p = tid; p < M * BN / 2; p += FS_THREADS) {
        const int m = 2 * p / BN, n = 2 * p - m * BN;
        float2 s = make_float2(0.f, 0.f);
#pragma unroll
        for (int q = 0; q < 4; q++) {
            const float2 v = *reinterpret_cast<const float2*>(red + (q * 16 + m) * BN + n);
            s.x += v.x, s.y += v.y;
        }
        const float a = sx[m];
        *reinterpret_cast<__nv_bfloat162*>(out + (i64)m * N + n0 + n) =
            __floats2bfloat162_rn(s.x * a * sw[n0 + n], s.y * a * sw[n0 + n + 1]);
    }
}

#define FP8_STREAM_ARGS                                                                                      \
    bf16 *out, const unsigned char *qx, const float *sx, const unsigned char *qw, const float *sw, int M, int N, \
        int K, int opts
extern "C" __global__ void __launch_bounds__(FS_THREADS) fp8_stream_n32(FP8_STREAM_ARGS) { fp8_stream_body<32, 512>(out, qx, sx, qw, sw, M, N, K, opts); }
extern "C" __global__ void __launch_bounds__(FS_THREADS) fp8_stream_n48(FP8_STREAM_ARGS) { fp8_stream_body<48, 512>(out, qx, sx, qw, sw, M, N, K, opts); }
extern "C" __global__ void __launch_bounds__(FS_THREADS) fp8_stream_n224(FP8_STREAM_ARGS) { fp8_stream_body<224, 128>(out, qx, sx, qw, sw, M, N, K, opts); }
