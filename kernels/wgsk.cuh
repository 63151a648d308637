// wgsk.cuh: wgsk_body, the FP8 product of 65-256 activation rows on
// Hopper's warpgroup MMAs, stream-K over any number of SMs, its stages
// copied by the tensor memory accelerator (TMA) and consumed by two
// warpgroups while a third asks for the next ones (warp specialization).
// Included by fp8.cu in its wgmma build only (PEFTD_WG, sm_90a).
//
// Why: at 65-256 rows cuBLASLt's FP8 product runs one block per 128 x 128
// output tile, so o and down at 8B shapes (N = 4,096: 64 tiles at 129-256
// rows) leave SMs idle when the LoRA stream holds some (84-100 SMs left,
// 64 busy; PERFORMANCE v0.85 and v0.95), and split K only by powers of
// two within one wave. A stream-K grid covers whatever SMs it is given.
//
// Work: the weight rows in tiles of WK_BM = 128 (64 per consumer
// warpgroup), each tile's K in 128-byte stages (SPT a tile, the last one
// zero-filled past K by the TMA), U = tiles * SPT stage units; block b of
// G takes units [b U / G, (b + 1) U / G) (wg_first), so every block
// streams the same bytes through one ring, across its tiles' boundaries.
// A tile the block holds whole is scaled, rounded and stored from
// registers; one it shares goes through float32 partials (two slots a
// block) and a per-tile counter, and the sum is spread (wk_sum): every
// block whose last tile it is waits for all of the tile's partials to be
// counted in, then sums its share of the tile's activation rows, each
// value in block order, and stores it; the last to count a second time
// leaves the counter at zero. A slot is fragment-major (wk_store_part):
// each warp's stores and loads of it are 512 contiguous bytes.
//
// Waiting is safe: a block waits only at its end, for blocks that started
// (every block has triggered the next kernel's launch, pdl_entry, before
// the next kernel's blocks can take an SM) or that take an SM as blocks
// of other streams' kernels end; the grid is at most the SMs (one block an
// SM) and each block holds at least one stage unit (wgskProduct.grid).
//
// A stage: WK_BM weight rows, then TR = 8 NT activation rows (zeros past
// M: the activation map has M rows), 128 bytes of K each, in the 128-byte
// swizzle wgmma reads (the TMA writes it so: boxes of 128 bytes x rows).
// Warpgroup 0 is the producer: its thread 0 waits for a stage's slot to
// be free (empty, 256 consumer arrivals), counts the stage's bytes in
// (full) and asks for its two boxes; its other threads leave. Warpgroups 1
// and 2 wait for full, each multiplies its 64 weight rows by the TR
// activation rows (four m64nTRk32 wgmmas), waits for them and arrives on
// empty (with WK_INFLIGHT 1 it waits for the stage before's, and frees
// that one, but at a tile's end). The weights' first ST boxes are asked for before
// griddepcontrol.wait (no kernel writes weights). Accumulators as
// wg_body's per warpgroup: thread (warp w, lane l) of consumer c holds
// weight rows 64c + 16w + l/4 (+8) and activation rows 8t + 2(l%4) (+1)
// in d[4t..4t+3]. The producer gives its registers to the consumers
// (setmaxnreg): 128 accumulators a thread at TR = 256.
// ---------------------------------------------------------------------------
#pragma once
#include "common.cuh"

#define WK_BM 128      // weight rows a tile (two consumer warpgroups of 64)
#define WK_THREADS 384 // producer warpgroup, then two consumer warpgroups
#define WK_CONSUMERS 256
#ifndef WK_SMEM
#define WK_SMEM (200 * 1024) // the stages' shared memory at most, with 1 KB to align it
#endif
#ifndef WK_INFLIGHT
#define WK_INFLIGHT 0 // a consumer's wgmma groups left running while it waits for the next stage (0 or 1)
#endif

// WkShape: the ring of the variant with TR staged activation rows. WB, XB:
// a stage's weight and activation bytes; ST: stages (3 to 8). runtime/gpu's
// wgskStages must agree.
template <int TR> struct WkShape {
    static constexpr int WB = WK_BM * WG_RB, XB = TR * WG_RB, SB = WB + XB;
    static constexpr int FIT = (WK_SMEM - 1024) / SB;
    static constexpr int ST = FIT > 8 ? 8 : FIT;
    static_assert(ST >= 3, "wgsk_body: fewer than 3 stages fit");
    static_assert(TR / 8 * WK_CONSUMERS * 16 <= ST * SB, "wgsk_body: a tile's own share (wk_keep) exceeds the ring");
};

// TmaDesc: a CUtensorMap as a kernel parameter (const __grid_constant__,
// 128 bytes, 64-aligned; runtime/cuda TensorMap).
struct __align__(64) TmaDesc {
    unsigned long long v[16];
};

__device__ __forceinline__ void mbar_init(unsigned bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// mbar_expect_tx: one arrival that also expects bytes to be counted in.
__device__ __forceinline__ void mbar_expect_tx(unsigned bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(unsigned bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// mbar_wait: until the barrier's phase of this parity has completed.
__device__ __forceinline__ void mbar_wait(unsigned bar, unsigned parity) {
    asm volatile("{\n.reg .pred P1;\nWK_WAIT:\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
                 "@P1 bra WK_DONE;\nbra WK_WAIT;\nWK_DONE:\n}\n" ::"r"(bar),
                 "r"(parity)
                 : "memory");
}
// tma_load2d: the box at (c0, c1) (inner element, row) of map into shared
// memory at dst, its bytes counted in at bar.
__device__ __forceinline__ void tma_load2d(unsigned dst, const TmaDesc* map, int c0, int c1, unsigned bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
                 "l"(reinterpret_cast<unsigned long long>(map)), "r"(c0), "r"(c1), "r"(bar)
                 : "memory");
#endif
}
// wk_sync: the consumers' barrier (named barrier 1, their 256 threads; the
// producer warpgroup has left).
__device__ __forceinline__ void wk_sync() { asm volatile("bar.sync 1, %0;\n" ::"n"(WK_CONSUMERS) : "memory"); }

template <int N> __device__ __forceinline__ void wk_setmaxnreg_dec() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}
template <int N> __device__ __forceinline__ void wk_setmaxnreg_inc() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}

// A partial slot holds each consumer thread's 4 NT accumulators
// fragment-major: float4 i (accumulators 4i..4i+3) of consumer thread ct
// at float4 i WK_CONSUMERS + ct, so a warp's 16-byte pieces are 512
// contiguous bytes (full lines). PERFORMANCE v0.97: in wg_body's layout
// ([weight row][activation row], a warp's float2 pieces over 8 rows) the
// last block of a tile read its ~5 partials at ~12 bytes a cycle, 35 µs
// of a 72 µs product (down, 240 rows). runtime/gpu's wgskPartAt (the
// emulation) must agree.
// Only the NV = ceil(M / 8) float4s holding activation rows below M are
// stored (and summed: wk_sum), and of those not [o0, o1): a block that
// sums that share of the tile keeps its own values of it in shared memory
// instead (wk_keep).
template <int NT> __device__ __forceinline__ void wk_store_part(float* __restrict__ slot, const float* d, int ct, int NV, int o0, int o1) {
    float4* p = reinterpret_cast<float4*>(slot) + ct;
#pragma unroll
    for (int i = 0; i < NT; i++)
        if (i < NV && (i < o0 || i >= o1)) p[i * WK_CONSUMERS] = make_float4(d[4 * i], d[4 * i + 1], d[4 * i + 2], d[4 * i + 3]);
}
// wk_keep puts float4s [o0, o1) of consumer thread ct in own (float4 i -
// o0 of the share WK_CONSUMERS apart): the ring's shared memory, free once
// both consumer warpgroups are past their last stage.
template <int NT> __device__ __forceinline__ void wk_keep(float4* own, const float* d, int ct, int o0, int o1) {
#pragma unroll
    for (int i = 0; i < NT; i++)
        if (i >= o0 && i < o1) own[(i - o0) * WK_CONSUMERS + ct] = make_float4(d[4 * i], d[4 * i + 1], d[4 * i + 2], d[4 * i + 3]);
}
// wk_put scales, rounds and stores a thread's four values of fragment t
// (activation rows 8t + 2 tig (+1), weight rows n and n + 8) as frag_out
// does, with the scales at hand: the activation rows' in shared memory
// (sxs), the thread's two weight rows' read once (sw0 for weight row n,
// sw1 for n + 8); the same products in the same order.
__device__ __forceinline__ void wk_put(bf16* __restrict__ out, const float* v, int t, int M, int N, int n, int tig, const float* sxs,
                                       float sw0, float sw1) {
#pragma unroll
    for (int e = 0; e < 4; e++) {
        const int m = 8 * t + 2 * tig + (e & 1);
        if (m < M) out[(i64)m * N + n + (e >= 2 ? 8 : 0)] = __float2bfloat16_rn(v[e] * sxs[m] * (e >= 2 ? sw1 : sw0));
    }
}
// wk_out is frag_out for a whole tile: wk_put of every fragment.
template <int NT>
__device__ __forceinline__ void wk_out(bf16* __restrict__ out, const float* v, int M, int N, int n, int tig, const float* sxs, float sw0,
                                       float sw1) {
#pragma unroll
    for (int t = 0; t < NT; t++) wk_put(out, v + 4 * t, t, M, N, n, tig, sxs, sw0, sw1);
}

// wk_sum sums float4s [i0, i1) of consumer thread ct's values in the slots
// of blocks b0..b1, in block order from zero (through L2: other blocks
// wrote them), and stores them (wk_put). Block b0's slot is s0;
// each block after it starts inside the tile, so its slot is its first,
// at part + 2 b WK_BM TR floats; block me's values are own (shared
// memory, wk_keep's). A round has WS_F float4s of WS_C slots' loads
// in flight.
#define WS_F 8
#define WS_C 4
template <int TR>
__device__ __forceinline__ void wk_sum(bf16* __restrict__ out, const float* s0, const float* part, const float4* own, int me, int b0, int b1,
                                       int i0, int i1, int ct, int M, int N, int n, int tig, const float* sxs, float sw0, float sw1) {
    const float4* p0 = reinterpret_cast<const float4*>(s0) + ct;
    const float4* pb = reinterpret_cast<const float4*>(part) + ct;
    constexpr long long SS = 2LL * WK_BM * TR / 4; // float4s from one block's first slot to the next's
#pragma unroll 1
    for (int i = i0; i < i1; i += WS_F) {
        float4 a[WS_F];
#pragma unroll
        for (int f = 0; f < WS_F; f++) a[f] = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 1
        for (int b = b0; b <= b1; b += WS_C) {
            float4 q[WS_C][WS_F];
#pragma unroll
            for (int k = 0; k < WS_C; k++) {
                const float4* p = b + k == b0 ? p0 : pb + (b + k) * SS;
#pragma unroll
                for (int f = 0; f < WS_F; f++)
                    q[k][f] = b + k > b1 || i + f >= i1 ? make_float4(0.f, 0.f, 0.f, 0.f)
                              : b + k == me         ? own[(i + f - i0) * WK_CONSUMERS + ct]
                                                    : __ldcg(p + (i + f) * WK_CONSUMERS);
            }
#pragma unroll
            for (int k = 0; k < WS_C; k++)
                if (b + k <= b1)
#pragma unroll
                    for (int f = 0; f < WS_F; f++) a[f].x += q[k][f].x, a[f].y += q[k][f].y, a[f].z += q[k][f].z, a[f].w += q[k][f].w;
        }
#pragma unroll
        for (int f = 0; f < WS_F; f++) {
            const int t = i + f;
            if (t >= i1) break;
            const float v[4] = {a[f].x, a[f].y, a[f].z, a[f].w};
            wk_put(out, v, t, M, N, n, tig, sxs, sw0, sw1);
        }
    }
}

// The phases of a block (runtime/gpu's wgskPhases reads them), globaltimer
// nanoseconds stamped by its first consumer thread: the scales in, the
// first stage landed, its last stage's products done, its last tile's
// partials all counted in (wk_sum's wait over; the same stamp where the
// last tile is whole), the end; then flags (1: the last tile shared, 2:
// this block summed its share; every such block does), the
// nanoseconds of the flushes before the last, and its stages.
#define WK_TIMES 8

// wgsk_body: out [M, N] = x [M, K] . w [N, K]^T times sx[m] sw[n], e4m3
// operands (K bytes a row, K % 16 == 0), N % WK_BM == 0, M <= TR.
// wmap: w in boxes of 128 bytes x WK_BM rows; xmap: x (M rows) in boxes of
// 128 bytes x TR rows, both with the 128-byte swizzle; part: 2 G WK_BM TR
// floats; done: N / WK_BM counters, zero. times (null: none) takes each
// block's phases, WK_TIMES values a block (above).
template <int NT>
__device__ __forceinline__ void wgsk_body(const TmaDesc* wmap, const TmaDesc* xmap, bf16* __restrict__ out,
                                          float* __restrict__ part, int* __restrict__ done,
                                          unsigned long long* __restrict__ times, const float* __restrict__ sx,
                                          const float* __restrict__ sw, int M, int N, int K) {
    constexpr int TR = 8 * NT;
    using S = WkShape<TR>;
    constexpr int WB = S::WB, SB = S::SB, ST = S::ST;
    extern __shared__ __align__(16) unsigned char wkm[];
    __shared__ __align__(8) unsigned long long full[ST], empty[ST];
    __shared__ float sxs[TR]; // the activation rows' scales
    const int tid = threadIdx.x;
    const int SPT = (K + WG_RB - 1) / WG_RB; // stages a tile
    const int U = N / WK_BM * SPT, G = gridDim.x, bid = blockIdx.x;
    const int u0 = wg_first(bid, U, G), n = wg_first(bid + 1, U, G) - u0;
    const unsigned base = ((unsigned)__cvta_generic_to_shared(wkm) + 1023u) & ~1023u;
    const unsigned fb = (unsigned)__cvta_generic_to_shared(full), eb = (unsigned)__cvta_generic_to_shared(empty);
    if (tid == 0) {
        for (int i = 0; i < ST; i++) {
            mbar_init(fb + 8 * i, 1);
            mbar_init(eb + 8 * i, WK_CONSUMERS);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
        fence_proxy_async();
    }
    __syncthreads();

    if (tid < 128) { // the producer
        wk_setmaxnreg_dec<40>();
        if (tid == 0) {
            auto ask_w = [&](int j) { // stage j's weight box, with the stage's whole count
                const int u = u0 + j, tile = u / SPT;
                mbar_expect_tx(fb + 8 * (j % ST), SB);
                tma_load2d(base + (j % ST) * SB, wmap, (u - tile * SPT) * WG_RB, tile * WK_BM, fb + 8 * (j % ST));
            };
            auto ask_x = [&](int j) {
                const int u = u0 + j, tile = u / SPT;
                tma_load2d(base + (j % ST) * SB + WB, xmap, (u - tile * SPT) * WG_RB, 0, fb + 8 * (j % ST));
            };
            const int first = n < ST ? n : ST;
            for (int j = 0; j < first; j++) ask_w(j); // weights: no kernel writes them
            pdl_entry();
            for (int j = 0; j < first; j++) ask_x(j);
            for (int j = ST; j < n; j++) {
                mbar_wait(eb + 8 * (j % ST), ((j / ST) & 1) ^ 1); // the consumers are done with use j - ST
                ask_w(j);
                ask_x(j);
            }
        } else {
            pdl_entry();
        }
        return;
    }

    wk_setmaxnreg_inc<232>();
    pdl_entry();
    const int ct = tid - 128, c = ct >> 7; // consumer thread, warpgroup
    for (int i = ct; i < TR; i += WK_CONSUMERS) sxs[i] = i < M ? sx[i] : 0.f;
    wk_sync(); // the scales are in for every consumer
    const bool stamp = times != nullptr && ct == 0;
    unsigned long long ph[WK_TIMES] = {}; // this block's phases (stamp)
    if (stamp) ph[0] = globaltimer_ns();
    const int lane = ct & 31, warp = (ct >> 5) & 3, g = lane >> 2, tig = lane & 3;
    const int row = 64 * c + 16 * warp + g; // this thread's first weight row in a tile
    auto slot = [&](int b, int tile) { return part + ((long long)b * 2 + (wg_first(b, U, G) / SPT == tile ? 0 : 1)) * WK_BM * TR; };
    float d[4 * NT];
    // flush: the accumulators of tile `tile`, which this block holds from
    // its stage k0 to k1 (inclusive)
    auto flush = [&](int tile, int k0, int k1, bool final) {
        const int n = tile * WK_BM + row;
        if (stamp && final) ph[2] = ph[3] = globaltimer_ns();
        if (k0 == 0 && k1 == SPT - 1) {
            wk_out<NT>(out, d, M, N, n, tig, sxs, sw[n], sw[n + 8]);
            return;
        }
        const int NV = (M + 7) >> 3; // float4s of activation rows below M
        // C blocks hold the tile; the P whose last tile it is (all but b1
        // when b1 goes on to the next tile) sum it, block b0 + p the
        // float4s [p NV / P, (p + 1) NV / P), its own values of them kept
        // in shared memory (wk_keep), not stored
        const int b0 = wg_block(tile * SPT, U, G), b1 = wg_block((tile + 1) * SPT - 1, U, G);
        const int C = b1 - b0 + 1, P = b1 - b0 + (wg_first(b1 + 1, U, G) == (tile + 1) * SPT ? 1 : 0);
        const int p = bid - b0, i0 = final ? p * NV / P : 0, i1 = final ? (p + 1) * NV / P : 0;
        wk_store_part<NT>(slot(bid, tile), d, ct, NV, i0, i1);
        // the block's partials, ordered before its count by one thread's
        // fence after the barrier, and the others' before this block's
        // reads by its acquire and fence after the wait (wg_body's)
        wk_sync();
        if (ct == 0) {
            __threadfence();
            atomicAdd(done + tile, 1);
        }
        if (!final) return; // b1, on to its next tile: the others sum this one
        // past the barrier both warpgroups are done with every stage
        float4* own = reinterpret_cast<float4*>(wkm + (base - (unsigned)__cvta_generic_to_shared(wkm)));
        wk_keep<NT>(own, d, ct, i0, i1);
        if (ct == 0) {
            while ((int)ld_acquire_u32(reinterpret_cast<const unsigned*>(done + tile)) < C) {
            }
            __threadfence();
            // a second count: the last leaves the counter at zero for the
            // next launch (every block has passed the wait by then)
            if (atomicAdd(done + tile, 1) == C + P - 1) done[tile] = 0;
        }
        wk_sync();
        if (stamp) ph[3] = globaltimer_ns(), ph[5] = 3;
        wk_sum<TR>(out, slot(b0, tile), part, own, bid, b0, b1, i0, i1, ct, M, N, n, tig, sxs, sw[n], sw[n + 8]);
    };

    static_assert(WK_INFLIGHT == 0 || WK_INFLIGHT == 1, "wgsk_body: WK_INFLIGHT");
#pragma unroll
    for (int i = 0; i < 4 * NT; i++) d[i] = 0.f;
    int tile = u0 / SPT, ks = u0 - tile * SPT, k0 = ks;
    int pend = -1; // a stage this thread is done with but has not freed (WK_INFLIGHT 1)
#pragma unroll 1
    for (int j = 0; j < n; j++) {
        const int s = j % ST;
        mbar_wait(fb + 8 * s, (j / ST) & 1); // stage j's boxes have landed
        if (stamp && j == 0) ph[1] = globaltimer_ns();
        const unsigned wb = base + s * SB + 64 * c * WG_RB, xb = base + s * SB + WB;
        wg_pin<4 * NT>(d);
        wg_fence();
#pragma unroll
        for (int q = 0; q < WG_RB / 32; q++) wg_mma_n<1, TR>(d, wg_desc(wb + 32 * q), wg_desc(xb + 32 * q));
        wg_commit();
        const bool end = ks == SPT - 1 || j == n - 1; // this block's last stage of the tile
        if (WK_INFLIGHT == 0 || end) {
            wg_wait<0>();
            wg_pin<4 * NT>(d);
            if (pend >= 0) mbar_arrive(eb + 8 * pend);
            mbar_arrive(eb + 8 * s); // this thread is done with the stage
            pend = -1;
        } else {
            wg_wait<1>(); // the stage before's group is done
            wg_pin<4 * NT>(d);
            if (pend >= 0) mbar_arrive(eb + 8 * pend);
            pend = s;
        }
        if (end) {
            const unsigned long long f0 = stamp && j < n - 1 ? globaltimer_ns() : 0;
            flush(tile, k0, ks, j == n - 1);
            if (f0) ph[6] += globaltimer_ns() - f0;
#pragma unroll
            for (int i = 0; i < 4 * NT; i++) d[i] = 0.f;
            tile++, ks = 0, k0 = 0;
        } else {
            ks++;
        }
    }
    if (stamp) {
        ph[4] = globaltimer_ns(), ph[7] = n;
#pragma unroll
        for (int i = 0; i < WK_TIMES; i++) times[bid * WK_TIMES + i] = ph[i];
    }
}

// fp8_wgsk_n{128,256}: wgsk_body for 65-128 and 129-256 rows (runtime/gpu
// wgsk.go), one block of WK_THREADS an SM.
#define FP8_WGSK_ARGS                                                                                             \
    const __grid_constant__ TmaDesc wmap, const __grid_constant__ TmaDesc xmap, bf16 *out, float *part, int *done, \
        unsigned long long *times, const float *sx, const float *sw, int M, int N, int K
#define FP8_WGSK_PASS &wmap, &xmap, out, part, done, times, sx, sw, M, N, K
extern "C" __global__ void __launch_bounds__(WK_THREADS, 1) fp8_wgsk_n128(FP8_WGSK_ARGS) { wgsk_body<16>(FP8_WGSK_PASS); }
extern "C" __global__ void __launch_bounds__(WK_THREADS, 1) fp8_wgsk_n256(FP8_WGSK_ARGS) { wgsk_body<32>(FP8_WGSK_PASS); }
