// SGMV v2 (LoRA shrink + expand fused into one launch per op) for peftd's GPU
// backend (runtime/gpu loraSlices). A separate module from llama.cu: if it
// fails to build or load, the backend keeps the v1 kernels of llama.cu.
// LoraEntry (common.cuh) must match entryWords in runtime/gpu/backend.go.
#include "common.cuh"

// ---------------------------------------------------------------------------
// SGMV v2: shrink and expand of one LoRA op in a single launch
// (sgmv_fused1: 8 rank rows per shrink item, sgmv_fused4: 32).
//
// Each block takes a ticket (atomicAdd on ctr[0]) and with it a role: tickets
// [0, n_shrink) are shrink items (tile x slice x rank tile x K split, the v1
// shrink grid flattened), the rest expand items (tile x 512 output columns).
// Tickets are handed out in the order blocks start, so a block waiting on the
// shrink items only ever waits on blocks that are already running: no
// deadlock whatever the grid size. A shrink item writes its partial sums to
// tmp (same layout as v1) and then counts itself in ctr[1]; an expand item
// first issues its B rows and output values (the bulk of the op's bytes), then
// waits until ctr[1] == n_shrink, sums the K-split partials in a fixed order
// (deterministic) and updates its rows. The last block to leave (ctr[2])
// resets the counters for the next launch. While the ticket is in flight the
// block copies the step's tiles and this op's table entries for every slot
// into shared memory, so the first dependent global load is the data itself.
// Versus v1: one launch and one launch gap per op instead of two, the
// tile -> table -> data load chain cut from three round trips to two, and the
// expand's B stream overlapped with the shrink instead of after it.
// ---------------------------------------------------------------------------
#define SG_FU_THREADS 256
#define SG_FU_COLS (2 * SG_FU_THREADS) // output columns per expand item
#define SG_FU_MAXTILES 128
#define SG_FU_MAXENT 192 // slots * slices
#define SG_FU_CHUNKS 4   // expand: B loads issued before the wait (ranks up to 32; 2 blocks/SM fit)

#define SG_FU_WAIT_NS 1000000000ull // 1 s

template <int NB>
__device__ __forceinline__ void fu_shrink(
    float* __restrict__ tmp, const bf16* __restrict__ x, const LoraEntry& e, const int4 tile, int s, int k0, int z,
    int max_rank, int in_f, int x_stride, int t_stride, int rows_total, int kchunk, float* red) {
    if (k0 >= e.rank) return; // uniform over the block
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    const int kbeg = z * kchunk, kend = min(in_f, kbeg + kchunk);
    const bool v0 = g < tile.y, v1 = g + 8 < tile.y;
    const bf16* x0 = x + (i64)(tile.x + (v0 ? g : 0)) * x_stride;
    const bf16* x1 = x + (i64)(tile.x + (v1 ? g + 8 : 0)) * x_stride;
    bool va[NB];
    const bf16* ar[NB];
#pragma unroll
    for (int nb = 0; nb < NB; nb++) {
        va[nb] = k0 + nb * 8 + g < e.rank;
        ar[nb] = e.a + (i64)(va[nb] ? k0 + nb * 8 + g : 0) * in_f;
    }
    float c[NB][4];
#pragma unroll
    for (int nb = 0; nb < NB; nb++) c[nb][0] = c[nb][1] = c[nb][2] = c[nb][3] = 0.f;
    const uint4 z4 = make_uint4(0, 0, 0, 0);
#pragma unroll 4
    for (int cb = kbeg + warp * 32; cb < kend; cb += 32 * SG_WARPS) {
        const int col = cb + q * 8;
        const bool in = col < kend;
        const uint4 xa = (in && v0) ? ldg16(x0 + col) : z4;
        const uint4 xb = (in && v1) ? ldg16(x1 + col) : z4;
#pragma unroll
        for (int nb = 0; nb < NB; nb++) {
            const uint4 aa = (in && va[nb]) ? ldg16(ar[nb] + col) : z4;
            mma16816(c[nb], xa.x, xb.x, xa.y, xb.y, aa.x, aa.y);
            mma16816(c[nb], xa.z, xb.z, xa.w, xb.w, aa.z, aa.w);
        }
    }
    const int W = 8 * NB;
#pragma unroll
    for (int nb = 0; nb < NB; nb++) {
        float* rw = red + warp * SG_TR * W + nb * 8 + 2 * q;
        rw[g * W] = c[nb][0];
        rw[g * W + 1] = c[nb][1];
        rw[(g + 8) * W] = c[nb][2];
        rw[(g + 8) * W + 1] = c[nb][3];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < SG_TR * W; i += blockDim.x) {
        const int r = i / W, kk = i - r * W;
        if (r < tile.y && k0 + kk < e.rank) {
            float sum = 0.f;
#pragma unroll
            for (int w = 0; w < SG_WARPS; w++) sum += red[w * SG_TR * W + i];
            tmp[((i64)z * rows_total + tile.x + r) * t_stride + s * max_rank + k0 + kk] = sum * e.scale;
        }
    }
}

// fu_expand: as sgmv_expand, 512 columns per block, table entries from ent.
__device__ __forceinline__ void fu_expand(
    bf16* __restrict__ out, const float* __restrict__ tmp, const LoraEntry* ent, const int4 tile, int cb, const unsigned* done,
    unsigned n_shrink, int nslices, int off1, int off2, int out_total, int max_rank, int o_stride, int t_stride,
    int rows_total, int ksplit, int accum, float* sm) {
    const int mr8 = (max_rank + 7) & ~7, w = nslices * mr8, n = tile.y;
    const int j = (cb * SG_FU_THREADS + threadIdx.x) * 2;
    const bool active = j < out_total;
    const int s = j >= off2 ? 2 : (j >= off1 ? 1 : 0);
    const int off = s == 0 ? 0 : (s == 1 ? off1 : off2);
    const LoraEntry* ep = ent + tile.z * nslices + s;
    const int rank = active ? ep->rank : 0;
    const bf16* b0 = active ? ep->b + (i64)(j - off) * rank : nullptr;
    const bf16* b1 = b0 + rank;
    const bool vec = (rank & 7) == 0;
    uint4 u0[SG_FU_CHUNKS], u1[SG_FU_CHUNKS];
#pragma unroll
    for (int c = 0; c < SG_FU_CHUNKS; c++) {
        const bool ok = vec && c * 8 < rank;
        u0[c] = ok ? ldg16(b0 + c * 8) : make_uint4(0, 0, 0, 0);
        u1[c] = ok ? ldg16(b1 + c * 8) : make_uint4(0, 0, 0, 0);
    }
    __nv_bfloat162 ov[SG_TR];
#pragma unroll
    for (int r = 0; r < SG_TR; r++) {
        ov[r] = __floats2bfloat162_rn(0.f, 0.f);
        if (accum && r < n && rank > 0) ov[r] = *reinterpret_cast<const __nv_bfloat162*>(out + (i64)(tile.x + r) * o_stride + j);
    }
    // wait for every shrink item of this launch
    if (threadIdx.x == 0) {
        const unsigned long long t0 = globaltimer_ns();
        while (ld_acquire_u32(done) < n_shrink) {
            __nanosleep(32);
            if (globaltimer_ns() - t0 > SG_FU_WAIT_NS) __trap(); // a bug, not a state to wait out: fail the launch
        }
        __threadfence();
    }
    __syncthreads();
    for (int i = threadIdx.x; i < SG_TR * w; i += blockDim.x) {
        const int r = i / w, col = i - r * w, s2 = col / mr8, k = col - s2 * mr8;
        float v = 0.f;
        if (r < n && k < max_rank && k < ent[tile.z * nslices + s2].rank)
            for (int z = 0; z < ksplit; z++) v += __ldcg(tmp + ((i64)z * rows_total + tile.x + r) * t_stride + s2 * max_rank + k);
        sm[i] = v;
    }
    __syncthreads();
    if (rank == 0) {
        if (!accum && active)
            for (int r = 0; r < n; r++) *reinterpret_cast<float2*>(reinterpret_cast<float*>(out) + (i64)(tile.x + r) * o_stride + j) = make_float2(0.f, 0.f);
        return;
    }
    const float* t = sm + s * mr8;
    float acc0[SG_TR], acc1[SG_TR];
#pragma unroll
    for (int r = 0; r < SG_TR; r++) acc0[r] = acc1[r] = 0.f;
    if (vec) {
#pragma unroll
        for (int c = 0; c < SG_FU_CHUNKS; c++) {
            if (c * 8 >= rank) break;
            expand_chunk(acc0, acc1, t + c * 8, w, n, u0[c], u1[c]);
        }
        for (int k = 8 * SG_FU_CHUNKS; k < rank; k += 8) expand_chunk(acc0, acc1, t + k, w, n, ldg16(b0 + k), ldg16(b1 + k));
    } else {
        for (int k = 0; k < rank; k += 8) {
            unsigned short h0[8], h1[8];
#pragma unroll
            for (int i = 0; i < 8; i++) {
                h0[i] = k + i < rank ? __bfloat16_as_ushort(b0[k + i]) : 0;
                h1[i] = k + i < rank ? __bfloat16_as_ushort(b1[k + i]) : 0;
            }
            uint4 a, b;
            a.x = h0[0] | (unsigned)h0[1] << 16, a.y = h0[2] | (unsigned)h0[3] << 16, a.z = h0[4] | (unsigned)h0[5] << 16, a.w = h0[6] | (unsigned)h0[7] << 16;
            b.x = h1[0] | (unsigned)h1[1] << 16, b.y = h1[2] | (unsigned)h1[3] << 16, b.z = h1[4] | (unsigned)h1[5] << 16, b.w = h1[6] | (unsigned)h1[7] << 16;
            expand_chunk(acc0, acc1, t + k, w, n, a, b);
        }
    }
#pragma unroll
    for (int r = 0; r < SG_TR; r++) {
        if (r < n) {
            const float2 v = __bfloat1622float2(ov[r]);
            if (accum)
                *reinterpret_cast<__nv_bfloat162*>(out + (i64)(tile.x + r) * o_stride + j) = __floats2bfloat162_rn(v.x + acc0[r], v.y + acc1[r]);
            else
                *reinterpret_cast<float2*>(reinterpret_cast<float*>(out) + (i64)(tile.x + r) * o_stride + j) = make_float2(acc0[r], acc1[r]);
        }
    }
}

// grid (n_shrink + ntiles * ceil(out_total / 512)), block 256, dynamic shared
// memory max(8 warps * 16 rows * 8*NB, 16 rows * nslices * round8(max_rank))
// floats. ctr: 3 zeroed words (ticket, shrink items done, blocks done).
template <int NB>
__device__ __forceinline__ void fused_body(
    bf16* __restrict__ out, float* __restrict__ tmp, const bf16* __restrict__ x, const LoraEntry* __restrict__ table,
    const int4* __restrict__ tiles, unsigned* ctr, int ntiles, int nslots, int entry_base, int entry_stride,
    int m0, int m1, int m2, int nslices, int rank_tiles, int ksplit, int kchunk, int n_shrink,
    int off1, int off2, int out_total, int max_rank, int in_f, int x_stride, int o_stride, int t_stride, int rows_total, int accum) {
    extern __shared__ __align__(16) float fsm[]; // float4 reads in the expand
    __shared__ int4 tl[SG_FU_MAXTILES];
    __shared__ LoraEntry ent[SG_FU_MAXENT];
    __shared__ unsigned ticket;
    if (threadIdx.x == 0) ticket = atomicAdd(ctr, 1u);
    for (int i = threadIdx.x; i < ntiles; i += blockDim.x) tl[i] = tiles[i];
    for (int i = threadIdx.x; i < nslots * nslices; i += blockDim.x) {
        const int sl = i / nslices, s = i - sl * nslices;
        ent[i] = table[entry_base + sl * entry_stride + sg_mod(s, m0, m1, m2)];
    }
    __syncthreads();
    const int t = (int)ticket;
    if (t < n_shrink) {
        const int ti = t % ntiles, rest = t / ntiles, ys = nslices * rank_tiles;
        const int y = rest % ys, z = rest / ys;
        const int s = y / rank_tiles, k0 = (y % rank_tiles) * 8 * NB;
        const int4 tile = tl[ti];
        fu_shrink<NB>(tmp, x, ent[tile.z * nslices + s], tile, s, k0, z, max_rank, in_f, x_stride, t_stride, rows_total, kchunk, fsm);
        __threadfence(); // this thread's partial sums, before the count below
        __syncthreads();
        if (threadIdx.x == 0) atomicAdd(ctr + 1, 1u);
    } else {
        const int u = t - n_shrink;
        fu_expand(out, tmp, ent, tl[u % ntiles], u / ntiles, ctr + 1, (unsigned)n_shrink, nslices, off1, off2, out_total,
                  max_rank, o_stride, t_stride, rows_total, ksplit, accum, fsm);
    }
    if (threadIdx.x == 0 && atomicAdd(ctr + 2, 1u) == gridDim.x - 1) { // last block out: reset for the next launch
        atomicExch(ctr, 0u);
        atomicExch(ctr + 1, 0u);
        atomicExch(ctr + 2, 0u);
    }
}

#define FUSED_ARGS                                                                                                       \
    bf16 *__restrict__ out, float *__restrict__ tmp, const bf16 *__restrict__ x, const LoraEntry *__restrict__ table,     \
        const int4 *__restrict__ tiles, unsigned *ctr, int ntiles, int nslots, int entry_base, int entry_stride, int m0,  \
        int m1, int m2, int nslices, int rank_tiles, int ksplit, int kchunk, int n_shrink, int off1, int off2,           \
        int out_total, int max_rank, int in_f, int x_stride, int o_stride, int t_stride, int rows_total, int accum
#define FUSED_PASS                                                                                                       \
    out, tmp, x, table, tiles, ctr, ntiles, nslots, entry_base, entry_stride, m0, m1, m2, nslices, rank_tiles, ksplit,   \
        kchunk, n_shrink, off1, off2, out_total, max_rank, in_f, x_stride, o_stride, t_stride, rows_total, accum

extern "C" __global__ void __launch_bounds__(SG_FU_THREADS, 2) sgmv_fused1(FUSED_ARGS) { pdl_entry(); fused_body<1>(FUSED_PASS); }
extern "C" __global__ void __launch_bounds__(SG_FU_THREADS, 2) sgmv_fused4(FUSED_ARGS) { pdl_entry(); fused_body<4>(FUSED_PASS); }

