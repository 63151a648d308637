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
        for (int i = threadIdx.x; i < cols; i += blockDim.x) amax1(xr[i], m, bad);
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

// ld_stream16_early, ld_f32_early: weights (and their scales) read before
// griddepcontrol.wait: coherent loads in volatile asm with a memory
// clobber, which ptxas keeps before the wait (it sinks .nc loads past it:
// v0.61's SASS scan). fp8_gemv_seg_e_* use them.
__device__ __forceinline__ uint4 ld_stream16_early(const unsigned char* p) {
    uint4 v;
    asm volatile("ld.global.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p)
                 : "memory");
    return v;
}
__device__ __forceinline__ float ld_f32_early(const float* p) {
    float v;
    asm volatile("ld.global.f32 %0, [%1];\n" : "=f"(v) : "l"(p) : "memory");
    return v;
}

// SpanW, span_w, span_mma: the two k32 MMAs of one 64-byte span that
// fp8_gemv and fp8_gemm_skinny make, with weight rows g (a) and g + 8 (b)
// as A (this lane's 16 bytes of each) and an activation row's 16 bytes (x)
// as B: the k order inside the span is the lane's, the same for both
// operands. Under FP8_WIDE the weights are widened once (span_w) for all
// the activation tiles that share them.
struct SpanW {
#if FP8_WIDE
    unsigned w0[8], w1[8];
#else
    uint4 a, b;
#endif
};
__device__ __forceinline__ SpanW span_w(uint4 a, uint4 b) {
    SpanW s;
#if FP8_WIDE
    const unsigned a0[4] = {a.x, b.x, a.y, b.y}, a1[4] = {a.z, b.z, a.w, b.w};
    widen_e4m3<4>(a0, s.w0);
    widen_e4m3<4>(a1, s.w1);
#else
    s.a = a, s.b = b;
#endif
    return s;
}
__device__ __forceinline__ void span_mma(float* c, const SpanW& s, uint4 x) {
#if FP8_WIDE
    const unsigned xs[4] = {x.x, x.y, x.z, x.w};
    unsigned v[8];
    widen_e4m3<4>(xs, v);
    mma_e4m3w(c, s.w0, v);
    mma_e4m3w(c, s.w1, v + 4);
#else
    mma_e4m3(c, s.a.x, s.b.x, s.a.y, s.b.y, x.x, x.y);
    mma_e4m3(c, s.a.z, s.b.z, s.a.w, s.b.w, x.z, x.w);
#endif
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
    // The weight scales of the rows lane writes (if warp 0; below), asked
    // for here, not one pair before each store at the end. (Written before
    // pdl_entry, but ptxas moves this .nc load past the wait: v0.61.)
    const float osw[2] = {sw[n0 + g], sw[n0 + g + 8]};
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
            const SpanW ws = span_w(A[u], B[u]);
#pragma unroll
            for (int t = 0; t < NT; t++) span_mma(c[t], ws, xv[t] ? X[u][t] : make_uint4(0u, 0u, 0u, 0u));
        }
    }
#pragma unroll
    for (int t = 0; t < NT; t++)
#pragma unroll
        for (int e = 0; e < 4; e++) red[warp][t][e][lane] = c[t][e];
    __syncthreads();
    if (warp != 0) return;
    float osx[2 * NT]; // the activation scales, all requested before the first sum
#pragma unroll
    for (int i = 0; i < 2 * NT; i++) osx[i] = sx[min(8 * (i >> 1) + 2 * tig + (i & 1), M - 1)];
#pragma unroll
    for (int t = 0; t < NT; t++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            float v = 0.f;
#pragma unroll
            for (int w = 0; w < nw; w++) v += red[w][t][e][lane];
            // c[e]: row n0 + g (+8 for e >= 2), column m = 8t + 2tig + (e & 1)
            const int m = 8 * t + 2 * tig + (e & 1), n = n0 + g + (e >= 2 ? 8 : 0);
            if (m < M) out[(i64)m * N + n] = __float2bfloat16_rn(v * osx[2 * t + (e & 1)] * osw[e >> 1]);
        }
    }
}

#define FP8_GEMV_ARGS                                                                                        \
    bf16 *out, const unsigned char *qx, const float *sx, const unsigned char *qw, const float *sw, int M, int N, \
        int K
extern "C" __global__ void __launch_bounds__(32 * GV_MAX_WARPS) fp8_gemv_n8(FP8_GEMV_ARGS) { fp8_gemv_body<1>(out, qx, sx, qw, sw, M, N, K); }
extern "C" __global__ void __launch_bounds__(32 * GV_MAX_WARPS) fp8_gemv_n16(FP8_GEMV_ARGS) { fp8_gemv_body<2>(out, qx, sx, qw, sw, M, N, K); }

// fp8_gemv_seg_s{S}_c{CH}: the FP8 product for M <= 8 / S rows (S = 8, 4,
// 2: steps of 1, 2 and 3-4 rows), the product fp8_gemv computes, with each
// warp load 8 / S runs of S * 64 contiguous bytes of a weight row instead
// of fp8_gemv's 64-byte pieces of 8 rows: 0.86-1.03 of a plain read's
// bandwidth at one row on the 8B shapes where fp8_gemv reaches 0.75-0.84
// (H200, v0.39 gemvlab).
// The m16n8k32 MMA's 16 rows are S contiguous 64-byte segments of 16 / S
// weight rows (A row a: weight row a / S, plus 8 / S for rows 8-15, segment
// a % S); its 8 columns are the same S segments of the 8 / S activation
// rows (column n: activation row n / S, segment n % S). C[a][n] with
// a % S == n % S is one segment's dot product; the S segments of a
// (weight row, activation row) pair are summed by shuffles, and the KS
// warps splitting K by shared memory. Each lane loads 16 bytes at
// segment * 64 + 16 * tig of its two weight rows and its activation row (the
// k order inside a segment is the lane's, the same for both operands).
// A block: KS * G warps (blockDim.x / 32), G groups of 16 / S weight rows,
// each group's K split over KS warps of CH chunks of S * 64 bytes
// (K = KS * CH * S * 64); grid N / (G * 16 / S). Runtime/gpu fp8_seg.go
// plans it. Activation rows M..8/S-1 read as zeros and are not written.
#define SEG_MAX_WARPS 16
template <int S, int CH, bool EARLY>
__device__ __forceinline__ void fp8_gemv_seg_body(bf16* __restrict__ out, const unsigned char* __restrict__ qx,
                                                  const float* __restrict__ sx, const unsigned char* __restrict__ qw,
                                                  const float* __restrict__ sw, int M, int N, int K, int KS) {
    constexpr int RW = 16 / S, MX = 8 / S, CB = S * 64;
    __shared__ float red[SEG_MAX_WARPS * 128 / (S * S)]; // [KS][MX][RB]: KS * G warps of RW rows, MX activation rows
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tig = lane & 3;
    const int G = (blockDim.x >> 5) / KS, RB = G * RW;
    const int grp = warp / KS, ks = warp % KS, seg = g % S, xm = g / S;
    const int rb0 = blockIdx.x * RB;
    const i64 koff = (i64)ks * CH * CB + seg * 64 + 16 * tig;
    const unsigned char* w0 = qw + (i64)(rb0 + grp * RW + g / S) * K + koff;
    const unsigned char* w1 = w0 + (i64)MX * K;
    const bool xv = xm < M;
    const unsigned char* xp = qx + (i64)(xv ? xm : 0) * K + koff;
    // Thread i < RB M writes output (i / RB, rb0 + i % RB): RB M = G (16 /
    // S) M <= 128 G / S^2 <= 32 KS G threads for S >= 2 (M <= 8 / S), so
    // every output has a thread and none has two. Its scales are loaded
    // here, not after the reduction: there they were a global round trip
    // before the store, at the end of every launch. (The weight row's is
    // written before pdl_entry, but ptxas moves this .nc load past the
    // wait: v0.61; d84c1d4 measured early weights, PERFORMANCE v0.61.)
    // EARLY (fp8_gemv_seg_e_*, steps with no LoRA update: runtime/gpu
    // fp8State.plain): the block's whole share of the weights and its
    // scale are asked for before the wait by coherent loads, so their
    // bytes stream while the kernel before ends (v0.63: FP8 base 1 / 2
    // rows 2.68 / 2.88 -> 2.61 / 2.73 ms, 4 rows the same). A kernel of its
    // own, not a flag of this one: v0.62's flag changed the late path's
    // speed too, and early weights beside a LoRA update slow the step.
    const int oi = threadIdx.x, om = oi / RB, orr = oi % RB, on = rb0 + orr;
    const bool ov = om < M;
    uint4 A[CH], B[CH], X[CH];
    float osw;
    if constexpr (EARLY) {
        osw = ld_f32_early(sw + on);
#pragma unroll
        for (int c = 0; c < CH; c++) {
            A[c] = ld_stream16_early(w0 + c * CB);
            B[c] = ld_stream16_early(w1 + c * CB);
        }
        pdl_entry();
    } else {
        osw = sw[on];
        pdl_entry();
    }
    const float osx = sx[ov ? om : 0];
    if constexpr (!EARLY) {
#pragma unroll
        for (int c = 0; c < CH; c++) {
            A[c] = ld_stream16(w0 + c * CB);
            B[c] = ld_stream16(w1 + c * CB);
        }
    }
#pragma unroll
    for (int c = 0; c < CH; c++) X[c] = xv ? __ldg(reinterpret_cast<const uint4*>(xp + c * CB)) : make_uint4(0u, 0u, 0u, 0u);
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int c = 0; c < CH; c++) {
        mma_e4m3(acc, A[c].x, B[c].x, A[c].y, B[c].y, X[c].x, X[c].y);
        mma_e4m3(acc, A[c].z, B[c].z, A[c].w, B[c].w, X[c].z, X[c].w);
    }
    // lane (g, tig) holds C[g][2 tig + j] (acc[j]) and C[g + 8][2 tig + j]
    // (acc[2 + j]); its segment pairs with column m * S + seg
#pragma unroll
    for (int m = 0; m < MX; m++) {
        if (m >= M) break; // warp-uniform
        const int n = m * S + seg;
        float t = 0.f, b = 0.f;
        if (n == 2 * tig) t = acc[0], b = acc[2];
        if (n == 2 * tig + 1) t = acc[1], b = acc[3];
        // a weight row's S segments: lanes 4 S r .. 4 S r + 4 S - 1
#pragma unroll
        for (int o = 1; o < 4 * S; o <<= 1) {
            t += __shfl_xor_sync(0xffffffffu, t, o);
            b += __shfl_xor_sync(0xffffffffu, b, o);
        }
        if ((lane & (4 * S - 1)) == 0) {
            float* rr = red + (ks * MX + m) * RB + grp * RW + g / S;
            rr[0] = t;
            rr[8 / S] = b; // the bottom half: weight row + 8 / S
        }
    }
    __syncthreads();
    if (ov) {
        float v = 0.f;
        for (int j = 0; j < KS; j++) v += red[(j * MX + om) * RB + orr]; // in k order: the same sum whatever the warps' timing
        out[(i64)om * N + on] = __float2bfloat16_rn(v * osx * osw);
    }
}
#define FP8_SEG_ARGS                                                                                         \
    bf16 *out, const unsigned char *qx, const float *sx, const unsigned char *qw, const float *sw, int M, int N, \
        int K, int KS
#define FP8_SEG(S, CH)                                                                                             \
    extern "C" __global__ void __launch_bounds__(32 * SEG_MAX_WARPS) fp8_gemv_seg_s##S##_c##CH(FP8_SEG_ARGS) { \
        fp8_gemv_seg_body<S, CH, false>(out, qx, sx, qw, sw, M, N, K, KS);                                        \
    }
#define FP8_SEG_E(S, CH)                                                                                             \
    extern "C" __global__ void __launch_bounds__(32 * SEG_MAX_WARPS) fp8_gemv_seg_e_s##S##_c##CH(FP8_SEG_ARGS) { \
        fp8_gemv_seg_body<S, CH, true>(out, qx, sx, qw, sw, M, N, K, KS);                                           \
    }
#define FP8_SEGS(S, CH) FP8_SEG(S, CH) FP8_SEG_E(S, CH)
FP8_SEGS(8, 7)
FP8_SEGS(8, 4)
FP8_SEGS(8, 2)
FP8_SEGS(4, 7)
FP8_SEGS(4, 4)
FP8_SEGS(4, 2)
FP8_SEGS(2, 7)
FP8_SEGS(2, 4)
FP8_SEGS(2, 2)

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
#define SK_U 2
#define SK_STAGES 4
#define SK_LD (SK_U * 64 + 64) // bytes per staged row: 16-byte reads of 8 lanes hit 32 different banks

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
            const uint4 A = lds16(b + wrow + u * 64), B = lds16(b + wrow + 8 * SK_LD + u * 64);
            const SpanW ws = span_w(A, B);
#pragma unroll
            for (int t = 0; t < NT; t++) span_mma(c[t], ws, lds16(b + WB + (8 * t + g) * SK_LD + tig * 16 + u * 64));
        }
    }
    cp_async_wait<0>();
    skinny_store<NT>(&c[0][0], out, part, done, sx, sw, M, N, &last, blockIdx.x, threadIdx.x);
}

#define FP8_SKINNY_ARGS                                                                                        \
    bf16 *out, float *part, int *done, const unsigned char *qx, const float *sx, const unsigned char *qw,    \
        const float *sw, int M, int N, int K
#define FP8_SKINNY_PASS out, part, done, qx, sx, qw, sw, M, N, K
extern "C" __global__ void __launch_bounds__(32 * SK_WARPS) fp8_gemm_skinny_n32(FP8_SKINNY_ARGS) { fp8_skinny_body<4>(FP8_SKINNY_PASS); }
extern "C" __global__ void __launch_bounds__(32 * SK_WARPS) fp8_gemm_skinny_n64(FP8_SKINNY_ARGS) { fp8_skinny_body<8>(FP8_SKINNY_PASS); }
extern "C" __global__ void __launch_bounds__(32 * SK_WARPS) fp8_gemm_skinny_n128(FP8_SKINNY_ARGS) { fp8_skinny_body<16>(FP8_SKINNY_PASS); }

// fp8_wg_n{32,64,128}: fp8_gemm_skinny's product on wgmma
// (wg_body in common.cuh; only with PEFTD_WG).
#ifdef PEFTD_WG
WG_KERNELS(fp8_wg, 1, FP8_SKINNY_ARGS, FP8_SKINNY_PASS)
// fp8_ws_n{32,48,64,96,128,224,256}: up to 64 rows streamed through wgmma
// (ws_body in common.cuh), one wave of BN-row weight blocks, K split
// gridDim.y ways (runtime/gpu ws.go).
#define FP8_WS_ARGS                                                                                                   \
    bf16 *out, float *part, int *done, const unsigned char *qx, const float *sx, const unsigned char *qw, const float *sw, \
        int M, int N, int K, int opts
#define FP8_WS_PASS out, part, done, qx, sx, qw, sw, M, N, K, opts
WS_WIDTHS(fp8_ws, ws_body, 1, FP8_WS_ARGS, FP8_WS_PASS, 128)
// fp8_ws_silu_n*, fp8_wsh_n*, fp8_wsh_silu_n*, fp8_ws_norm_n*: the fused
// and half-row kernels (WS_FUSED_KERNELS, common.cuh) on e4m3 operands:
// the SILU end also quantizes its rows into q and qscale as silu_mul
// does (ws_put_silu_q: the rows' maxima met at a grid-wide barrier on
// sync), the NORM end the normalized rows as add_rmsnorm does, into the
// scratch the product read its activations from (written after the
// barrier).
#define FP8_WS_SILU_ARGS FP8_WS_ARGS, unsigned char *q, float *qscale, unsigned *sync
#define FP8_WS_SILU_PASS FP8_WS_PASS, WsSiluQ{q, qscale, sync}
#define FP8_WS_NORM_ARGS FP8_WS_ARGS, bf16 *xr, bf16 *nout, const bf16 *nw, float eps, unsigned char *q, float *qscale, unsigned *sync
#define FP8_WS_NORM_PASS FP8_WS_PASS, WsSiluQ{}, WsNorm{xr, nout, nw, eps, q, qscale, sync}
WS_FUSED_KERNELS(fp8_ws, 1, FP8_WS_ARGS, FP8_WS_PASS, FP8_WS_SILU_ARGS, FP8_WS_SILU_PASS, FP8_WS_NORM_ARGS, FP8_WS_NORM_PASS)
// fp8_ws16_n{32,48,64,96,128}: fp8_ws_n* for products of 1-16 rows (ws_body's
// TR 16: 16 activation rows staged an atom, not 64, so a stage holds
// WS16_KA atoms of K for the shared memory of WS_KA's; runtime/gpu ws.go
// takes them where wsProduct.on16 says so)
#define WS16_KERNEL(bn) \
    extern "C" __global__ void __launch_bounds__(128, 1) fp8_ws16_n##bn(FP8_WS_ARGS) { ws_body<1, bn, false, false, false, 16>(FP8_WS_PASS); }
WS16_KERNEL(32)
WS16_KERNEL(48)
WS16_KERNEL(64)
WS16_KERNEL(96)
WS16_KERNEL(128)
// fp8_wsh16_n{224,256}: the half-row kernels (fp8_wsh_n*) with TR 16: a
// stage two atoms of 16 activation rows and half the block's weight rows
// (7 stages at n224 in WSH_SMEM, not 5; kernelForce.wsHalf16, off)
#define WSH16_KERNEL(bn) \
    extern "C" __global__ void __launch_bounds__(128, 1) fp8_wsh16_n##bn(FP8_WS_ARGS) { ws_body<1, bn, false, false, true, 16>(FP8_WS_PASS); }
WSH16_KERNEL(224)
WSH16_KERNEL(256)
// fp8_wgsk_n{128,256}: 65-256 rows, stream-K over any SMs, TMA stages and
// warp-specialized warpgroups (wgsk.cuh; runtime/gpu wgsk.go)
#include "wgsk.cuh"
#endif

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

// fp8_stream_n{32,48,224}_e1: the FP8 product for a few rows (M <= 16) the
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
// aligned rows. opts bit 0: the first weight tile is requested before
// griddepcontrol.wait (no kernel of a step writes weights): one tile, the
// _e1 of the names (v0.45; v0.44's ST - 1 tiles, whose kernels left the
// module in v0.81, queued the small kernel before each product behind ~18
// MB of early tiles; a count in opts instead slowed the kernel beside the
// LoRA stream).
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
    static_assert((4 * 16 * BN + BN + 16) * 4 <= ST * STAGE_B, "fp8_stream: the warps' sums and the scales do not fit the stages");
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
    // opts bit 0: NE weight tiles before griddepcontrol.wait (header comment)
    constexpr int NE = 1;
    const bool early = opts & 1;
    if (early)
        for (int t = 0; t < NE; t++) issue_w(t);
    pdl_entry();
    for (int t = 0; t < S::ST - 1; t++) {
        if (!early || t >= NE) issue_w(t);
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
    // the warps' sums [warp][16][BN] meet in shared memory, added in warp
    // order; after them the block's BN weight scales, then the M activation
    // scales, all requested at once here (read from global memory one pair
    // before each store, they were up to 14 round trips in a row at the end
    // of every n224 launch; static shared memory for them slowed the kernel
    // beside the LoRA kernels: v0.57)
    float* red = reinterpret_cast<float*>(fsm);
    float* scl = red + 4 * 16 * BN;
    const int g = lane >> 2, c2 = 2 * (lane & 3);
    constexpr int NS = (BN + 16 + FS_THREADS - 1) / FS_THREADS;
    float sv[NS];
#pragma unroll
    for (int j = 0; j < NS; j++) {
        const int i = tid + j * FS_THREADS;
        sv[j] = i < BN ? sw[n0 + i] : sx[min(i - BN, M - 1)];
    }
    __syncthreads(); // every warp is done with the stages
#pragma unroll
    for (int j = 0; j < NS; j++)
        if (tid + j * FS_THREADS < BN + M) scl[tid + j * FS_THREADS] = sv[j];
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
        const float a = scl[BN + m];
        *reinterpret_cast<__nv_bfloat162*>(out + (i64)m * N + n0 + n) =
            __floats2bfloat162_rn(s.x * a * scl[n], s.y * a * scl[n + 1]);
    }
}

#define FP8_STREAM_ARGS                                                                                      \
    bf16 *out, const unsigned char *qx, const float *sx, const unsigned char *qw, const float *sw, int M, int N, \
        int K, int opts
extern "C" __global__ void __launch_bounds__(FS_THREADS) fp8_stream_n32_e1(FP8_STREAM_ARGS) { fp8_stream_body<32, 512>(out, qx, sx, qw, sw, M, N, K, opts); }
extern "C" __global__ void __launch_bounds__(FS_THREADS) fp8_stream_n48_e1(FP8_STREAM_ARGS) { fp8_stream_body<48, 512>(out, qx, sx, qw, sw, M, N, K, opts); }
extern "C" __global__ void __launch_bounds__(FS_THREADS) fp8_stream_n224_e1(FP8_STREAM_ARGS) { fp8_stream_body<224, 128>(out, qx, sx, qw, sw, M, N, K, opts); }
