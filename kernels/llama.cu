// Llama forward-pass kernels for peftd's GPU backend (runtime/gpu).
// Activations and weights are bf16, arithmetic is float32. Compiled at run
// time by NVRTC (kernels.Load) for the device's architecture.
#include <cuda_bf16.h>

typedef __nv_bfloat16 bf16;
typedef long long i64;

#define NEG_INF (__int_as_float(0xff800000))

__device__ __forceinline__ float ld(const bf16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ bf16 tobf(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// block_sum: sum over the block (blockDim.x a multiple of 32); sh holds 33 floats.
__device__ float block_sum(float v, float* sh) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    if (lane == 0) sh[w] = v;
    __syncthreads();
    if (w == 0) {
        float x = lane < nw ? sh[lane] : 0.f;
        x = warp_sum(x);
        if (lane == 0) sh[32] = x;
    }
    __syncthreads();
    float r = sh[32];
    __syncthreads();
    return r;
}

// embed: out[r] = table[tokens[r]]; grid (T), any block.
extern "C" __global__ void embed(bf16* out, const bf16* table, const int* tokens, int H) {
    const int r = blockIdx.x;
    const bf16* src = table + (i64)tokens[r] * H;
    bf16* dst = out + (i64)r * H;
    for (int i = threadIdx.x; i < H; i += blockDim.x) dst[i] = src[i];
}

// add_rmsnorm: if delta: x += delta (rounded to bf16 in x); if out: out = rmsnorm(x) * w.
// grid (T), block multiple of 32.
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

extern "C" __global__ void add_rmsnorm(bf16* x, const bf16* delta, bf16* out, const bf16* w, float eps, int H) {
    __shared__ float sh[33];
    const int r = blockIdx.x;
    bf16* xr = x + (i64)r * H;
    float ss = 0.f;
    if ((H & 7) == 0) { // 16-byte words: every load of a row in flight at once
        uint4* x8 = reinterpret_cast<uint4*>(xr);
        const uint4* d8 = delta ? reinterpret_cast<const uint4*>(delta + (i64)r * H) : nullptr;
        for (int c = threadIdx.x; c < H / 8; c += blockDim.x) {
            float v[8];
            unpack8(x8[c], v);
            if (d8) {
                float d[8];
                unpack8(d8[c], d);
#pragma unroll
                for (int i = 0; i < 8; i++) v[i] += d[i];
                const uint4 b = pack8(v);
                x8[c] = b;
                unpack8(b, v); // the rounded sum, as stored
            }
#pragma unroll
            for (int i = 0; i < 8; i++) ss += v[i] * v[i];
        }
        if (!out) return;
        ss = block_sum(ss, sh);
        const float inv = 1.f / sqrtf(ss / (float)H + eps);
        uint4* o8 = reinterpret_cast<uint4*>(out + (i64)r * H);
        const uint4* w8 = reinterpret_cast<const uint4*>(w);
        for (int c = threadIdx.x; c < H / 8; c += blockDim.x) {
            float v[8], g[8];
            unpack8(x8[c], v);
            unpack8(w8[c], g);
#pragma unroll
            for (int i = 0; i < 8; i++) v[i] = g[i] * (v[i] * inv);
            o8[c] = pack8(v);
        }
        return;
    }
    for (int i = threadIdx.x; i < H; i += blockDim.x) {
        float v = ld(xr + i);
        if (delta) {
            bf16 b = tobf(v + ld(delta + (i64)r * H + i));
            xr[i] = b;
            v = __bfloat162float(b);
        }
        ss += v * v;
    }
    if (!out) return;
    ss = block_sum(ss, sh);
    const float inv = 1.f / sqrtf(ss / (float)H + eps);
    bf16* o = out + (i64)r * H;
    for (int i = threadIdx.x; i < H; i += blockDim.x) o[i] = tobf(ld(w + i) * (ld(xr + i) * inv));
}

// add_bias: x[r] += b (rounded to bf16 in x); grid (T), any block (Qwen2's q/k/v biases).
extern "C" __global__ void add_bias(bf16* x, const bf16* b, int H) {
    bf16* xr = x + (i64)blockIdx.x * H;
    for (int i = threadIdx.x; i < H; i += blockDim.x) xr[i] = tobf(ld(xr + i) + ld(b + i));
}

// head_rmsnorm: each head (hd values) of row r of x, in place: rmsnorm(head) * w.
// Rows are ldx values apart. grid (T, heads), block 32 (Qwen3's q_norm and k_norm).
extern "C" __global__ void head_rmsnorm(bf16* x, const bf16* w, float eps, int heads, int hd, int ldx) {
    bf16* p = x + (i64)blockIdx.x * ldx + (i64)blockIdx.y * hd;
    float ss = 0.f;
    for (int i = threadIdx.x; i < hd; i += 32) {
        const float v = ld(p + i);
        ss += v * v;
    }
    ss = warp_sum(ss);
    const float inv = 1.f / sqrtf(ss / (float)hd + eps);
    for (int i = threadIdx.x; i < hd; i += 32) p[i] = tobf(ld(w + i) * (ld(p + i) * inv));
}

// rmsnorm_rows: out[i] = rmsnorm(x[rows[i]]) * w; grid (n), block multiple of 32.
extern "C" __global__ void rmsnorm_rows(bf16* out, const bf16* x, const int* rows, const bf16* w, float eps, int H) {
    __shared__ float sh[33];
    const bf16* xr = x + (i64)rows[blockIdx.x] * H;
    float ss = 0.f;
    for (int i = threadIdx.x; i < H; i += blockDim.x) {
        float v = ld(xr + i);
        ss += v * v;
    }
    ss = block_sum(ss, sh);
    const float inv = 1.f / sqrtf(ss / (float)H + eps);
    bf16* o = out + (i64)blockIdx.x * H;
    for (int i = threadIdx.x; i < H; i += blockDim.x) o[i] = tobf(ld(w + i) * (ld(xr + i) * inv));
}

// rope_store: rotate-half RoPE of q [T, heads*hd] and k [T, kvh*hd] in
// place (rows ldq and ldk values apart), and, when kc is not null, k (as
// rotated) and v (rows ldv apart) stored at the row's KV slot of one
// layer's cache [slots, kvh*hd]; a row with a negative slot (padding of a
// recorded step) stores nothing. grid (T, heads + 2*kvh): block y < heads
// takes query head y, then the key heads, then the value heads (a copy).
// block: any multiple of 32; each thread takes frequencies i (one sincosf
// each). inv_freq null: no rotation (k stored as it is).
extern "C" __global__ void rope_store(bf16* q, bf16* k, const bf16* v, bf16* kc, bf16* vc, const float* inv_freq, const int* pos,
                                      const int* slots, int heads, int kvh, int hd, int ldq, int ldk, int ldv) {
    const int r = blockIdx.x, h = blockIdx.y, half = hd / 2, width = kvh * hd;
    const int slot = kc ? slots[r] : -1;
    if (h >= heads + kvh) { // a value head: copy it to the cache
        if (slot < 0) return;
        const int vh = h - heads - kvh;
        const bf16* src = v + (i64)r * ldv + (i64)vh * hd;
        bf16* dst = vc + (i64)slot * width + (i64)vh * hd;
        for (int i = threadIdx.x; i < hd; i += blockDim.x) dst[i] = src[i];
        return;
    }
    const float p = (float)pos[r];
    const bool isk = h >= heads;
    bf16* x = isk ? k + (i64)r * ldk + (i64)(h - heads) * hd : q + (i64)r * ldq + (i64)h * hd;
    bf16* dst = isk && slot >= 0 ? kc + (i64)slot * width + (i64)(h - heads) * hd : nullptr;
    if (!inv_freq) { // no rotation: store k as it is
        if (dst)
            for (int i = threadIdx.x; i < hd; i += blockDim.x) dst[i] = x[i];
        return;
    }
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float s, c;
        sincosf(p * inv_freq[i], &s, &c);
        const float x1 = ld(x + i), x2 = ld(x + i + half);
        const bf16 y1 = tobf(x1 * c - x2 * s), y2 = tobf(x2 * c + x1 * s);
        x[i] = y1;
        x[i + half] = y2;
        if (dst) {
            dst[i] = y1;
            dst[i + half] = y2;
        }
    }
}

#define ATT_WARPS 4
#define ATT_MAXJ 8 // head_dim <= 256

// attention: causal attention of query row r, head h over its sequence's
// paged cache. grid (T, heads), block 32*ATT_WARPS. Each warp takes every
// ATT_WARPS-th position with an online softmax; the warps merge at the end.
// seq_info: per sequence {start, len, context, page_offset}; pages: the page tables.
// row_list: if not null, block x takes row row_list[x] (the prefill rows when
// decode rows go to attn_decode), else row x. q's rows are ldq values apart.
extern "C" __global__ void __launch_bounds__(32 * ATT_WARPS) attention(
    bf16* out, const bf16* q, const bf16* kc, const bf16* vc, const int* row_seq, const int* seq_info,
    const int* pages, int heads, int kvh, int hd, int bs, float scale, const int* row_list, int ldq) {
    __shared__ float sm[ATT_WARPS], sl[ATT_WARPS];
    __shared__ float sacc[ATT_WARPS][32 * ATT_MAXJ];
    const int r = row_list ? row_list[blockIdx.x] : blockIdx.x, h = blockIdx.y;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int s = row_seq[r];
    const int start = seq_info[4 * s], len = seq_info[4 * s + 1], total = seq_info[4 * s + 2], poff = seq_info[4 * s + 3];
    const int ctx = total - len + (r - start) + 1;
    const int width = kvh * hd, kvoff = (h / (heads / kvh)) * hd;
    const bf16* qr = q + (i64)r * ldq + (i64)h * hd;
    float qv[ATT_MAXJ], acc[ATT_MAXJ];
#pragma unroll
    for (int j = 0; j < ATT_MAXJ; j++) {
        const int d = lane + 32 * j;
        qv[j] = d < hd ? ld(qr + d) : 0.f;
        acc[j] = 0.f;
    }
    float m = NEG_INF, l = 0.f;
    for (int p = w; p < ctx; p += ATT_WARPS) {
        const i64 slot = (i64)pages[poff + p / bs] * bs + p % bs;
        const bf16* kr = kc + slot * width + kvoff;
        float dot = 0.f;
#pragma unroll
        for (int j = 0; j < ATT_MAXJ; j++) {
            const int d = lane + 32 * j;
            if (d < hd) dot += qv[j] * ld(kr + d);
        }
        dot = warp_sum(dot) * scale;
        const float mn = fmaxf(m, dot);
        const float corr = expf(m - mn), pe = expf(dot - mn);
        l = l * corr + pe;
        const bf16* vr = vc + slot * width + kvoff;
#pragma unroll
        for (int j = 0; j < ATT_MAXJ; j++) {
            const int d = lane + 32 * j;
            if (d < hd) acc[j] = acc[j] * corr + pe * ld(vr + d);
        }
        m = mn;
    }
    if (lane == 0) {
        sm[w] = m;
        sl[w] = l;
    }
#pragma unroll
    for (int j = 0; j < ATT_MAXJ; j++) {
        const int d = lane + 32 * j;
        if (d < hd) sacc[w][d] = acc[j];
    }
    __syncthreads();
    if (w == 0) {
        float M = NEG_INF;
        for (int i = 0; i < ATT_WARPS; i++) M = fmaxf(M, sm[i]);
        float f[ATT_WARPS], L = 0.f;
        for (int i = 0; i < ATT_WARPS; i++) {
            f[i] = sl[i] > 0.f ? expf(sm[i] - M) : 0.f;
            L += sl[i] * f[i];
        }
        bf16* o = out + (i64)r * heads * hd + (i64)h * hd;
#pragma unroll
        for (int j = 0; j < ATT_MAXJ; j++) {
            const int d = lane + 32 * j;
            if (d < hd) {
                float x = 0.f;
                for (int i = 0; i < ATT_WARPS; i++) x += sacc[i][d] * f[i];
                o[d] = tobf(x / L);
            }
        }
    }
}

#define DEC_THREADS 128
#define DEC_MAXG 8
#define DEC_P 2 // positions per position group in flight at once

// attn_decode_g{1,2,4,8}: split-KV (flash-decoding) attention for decode
// sequences (one new row each, already stored in the cache). grid (nDec,
// kvh, nsplit), block DEC_THREADS; dynamic shared (DEC_THREADS / (hd/8)) *
// G * (hd + 2) floats. A block takes positions [split*chunk, split*chunk +
// chunk) of one sequence's cache for one KV head and all G = heads/kvh
// query heads that share it, so each K/V row is read once. hd/8 threads
// share one position (16-byte loads), DEC_P positions per iteration with
// all their loads issued before any arithmetic; the block's position groups
// run an online softmax each, then merge through shared memory. nsplit ==
// 1: the block writes the output row; else it writes (acc[hd], max, sum)
// per (sequence, head, split) to part for attn_reduce. chunk <= 0: each
// sequence's chunk is its context split nsplit ways (at least 32 positions,
// a multiple of 8; splits past the context are empty), so one recorded
// launch fits every step. A sequence with no context (padding) gets zeros.
// q's rows are ldq values apart.
// GM (the kernel's name) bounds G: the host picks the smallest of 1, 2, 4, 8
// that holds it, so the registers are sized for the model. Requires hd a
// power of two in [8, 256].
template <int GM>
__device__ __forceinline__ void attn_decode_body(
    bf16* __restrict__ out, float* __restrict__ part, const bf16* __restrict__ q, const bf16* __restrict__ kc,
    const bf16* __restrict__ vc, const int* __restrict__ dec_seq, const int* __restrict__ seq_info,
    const int* __restrict__ pages, int heads, int kvh, int hd, int bs, float scale, int chunk, int nsplit, int ldq) {
    extern __shared__ float dsh[];
    const int di = blockIdx.x, kh = blockIdx.y, sp = blockIdx.z;
    const int s = dec_seq[di];
    const int row = seq_info[4 * s], ctx = seq_info[4 * s + 2], poff = seq_info[4 * s + 3];
    const int G = heads / kvh;
    const int tpr = hd >> 3, ngr = DEC_THREADS / tpr;
    const int grp = threadIdx.x / tpr, t = threadIdx.x - grp * tpr;
    const int width = kvh * hd, d0 = t * 8;
    float qv[GM][8], acc[GM][8], m[GM], l[GM];
#pragma unroll
    for (int g = 0; g < GM; g++) {
        m[g] = NEG_INF;
        l[g] = 0.f;
#pragma unroll
        for (int i = 0; i < 8; i++) acc[g][i] = 0.f;
        if (g < G) {
            unpack8(*reinterpret_cast<const uint4*>(q + (i64)row * ldq + (i64)(kh * G + g) * hd + d0), qv[g]);
#pragma unroll
            for (int i = 0; i < 8; i++) qv[g][i] *= scale;
        } else {
#pragma unroll
            for (int i = 0; i < 8; i++) qv[g][i] = 0.f;
        }
    }
    if (chunk <= 0) chunk = max(32, (((ctx + nsplit - 1) / nsplit) + 7) & ~7);
    const int p0 = sp * chunk, p1 = min(ctx, p0 + chunk);
    const uint4 z4 = make_uint4(0, 0, 0, 0);
    // every thread runs the same number of iterations (the shuffles need the whole warp)
    for (int base = p0; base < p1; base += ngr * DEC_P) {
        uint4 ku[DEC_P], vu[DEC_P];
        bool valid[DEC_P];
#pragma unroll
        for (int j = 0; j < DEC_P; j++) {
            const int p = base + j * ngr + grp;
            valid[j] = p < p1;
            ku[j] = vu[j] = z4;
            if (valid[j]) {
                const i64 off = ((i64)pages[poff + p / bs] * bs + p % bs) * width + (i64)kh * hd + d0;
                ku[j] = __ldg(reinterpret_cast<const uint4*>(kc + off));
                vu[j] = __ldg(reinterpret_cast<const uint4*>(vc + off));
            }
        }
#pragma unroll
        for (int j = 0; j < DEC_P; j++) {
            float kf[8], vf[8];
            unpack8(ku[j], kf);
            unpack8(vu[j], vf);
#pragma unroll
            for (int g = 0; g < GM; g++) {
                float dot = 0.f;
#pragma unroll
                for (int i = 0; i < 8; i++) dot += qv[g][i] * kf[i];
                for (int o = tpr >> 1; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
                if (valid[j] && g < G) {
                    const float mn = fmaxf(m[g], dot);
                    const float corr = expf(m[g] - mn), pe = expf(dot - mn);
                    l[g] = l[g] * corr + pe;
#pragma unroll
                    for (int i = 0; i < 8; i++) acc[g][i] = acc[g][i] * corr + pe * vf[i];
                    m[g] = mn;
                }
            }
        }
    }
    // merge the position groups: sacc[(grp*G + g)*hd + d], sm/sl[grp*G + g]
    float* sacc = dsh;
    float* smx = dsh + ngr * G * hd;
    float* sl = smx + ngr * G;
#pragma unroll
    for (int g = 0; g < GM; g++) {
        if (g < G) {
#pragma unroll
            for (int i = 0; i < 8; i++) sacc[(grp * G + g) * hd + d0 + i] = acc[g][i];
            if (t == 0) {
                smx[grp * G + g] = m[g];
                sl[grp * G + g] = l[g];
            }
        }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < G * hd; idx += DEC_THREADS) {
        const int g = idx / hd, d = idx - g * hd;
        float M = NEG_INF;
        for (int i = 0; i < ngr; i++)
            if (sl[i * G + g] > 0.f) M = fmaxf(M, smx[i * G + g]);
        float L = 0.f, A = 0.f;
        for (int i = 0; i < ngr; i++) {
            const float li = sl[i * G + g];
            if (li > 0.f) {
                const float f = expf(smx[i * G + g] - M);
                L += li * f;
                A += sacc[(i * G + g) * hd + d] * f;
            }
        }
        const int h = kh * G + g;
        if (nsplit == 1) {
            out[(i64)row * heads * hd + (i64)h * hd + d] = tobf(L > 0.f ? A / L : 0.f);
        } else {
            float* pp = part + ((i64)(di * heads + h) * nsplit + sp) * (hd + 2);
            pp[d] = A;
            if (d == 0) {
                pp[hd] = M;
                pp[hd + 1] = L;
            }
        }
    }
}

#define ATTN_DECODE_ARGS                                                                                              \
    bf16 *out, float *part, const bf16 *q, const bf16 *kc, const bf16 *vc, const int *dec_seq, const int *seq_info, \
        const int *pages, int heads, int kvh, int hd, int bs, float scale, int chunk, int nsplit, int ldq
#define ATTN_DECODE_PASS out, part, q, kc, vc, dec_seq, seq_info, pages, heads, kvh, hd, bs, scale, chunk, nsplit, ldq
extern "C" __global__ void __launch_bounds__(DEC_THREADS) attn_decode_g1(ATTN_DECODE_ARGS) { attn_decode_body<1>(ATTN_DECODE_PASS); }
extern "C" __global__ void __launch_bounds__(DEC_THREADS) attn_decode_g2(ATTN_DECODE_ARGS) { attn_decode_body<2>(ATTN_DECODE_PASS); }
extern "C" __global__ void __launch_bounds__(DEC_THREADS) attn_decode_g4(ATTN_DECODE_ARGS) { attn_decode_body<4>(ATTN_DECODE_PASS); }
extern "C" __global__ void __launch_bounds__(DEC_THREADS) attn_decode_g8(ATTN_DECODE_ARGS) { attn_decode_body<8>(ATTN_DECODE_PASS); }

// attn_reduce: merges attn_decode's nsplit (<= 64) partials of each (decode
// sequence, head) into the output row. grid (nDec, heads), block 128: the
// split weights exp(max_i - max) are computed once, in parallel, then each
// thread sums its output columns over the splits with independent loads.
extern "C" __global__ void __launch_bounds__(128) attn_reduce(bf16* out, const float* __restrict__ part, const int* dec_seq,
                                                              const int* seq_info, int heads, int hd, int nsplit) {
    __shared__ float wsp[64], red[4];
    __shared__ float sM, sL;
    const int di = blockIdx.x, h = blockIdx.y, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int row = seq_info[4 * dec_seq[di]];
    const float* pp = part + (i64)(di * heads + h) * nsplit * (hd + 2);
    float mi = NEG_INF, li = 0.f;
    if (tid < nsplit) {
        li = pp[tid * (hd + 2) + hd + 1];
        if (li > 0.f) mi = pp[tid * (hd + 2) + hd];
    }
    float M = mi;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
    if (lane == 0) red[warp] = M;
    __syncthreads();
    if (tid == 0) sM = fmaxf(fmaxf(red[0], red[1]), fmaxf(red[2], red[3]));
    __syncthreads();
    M = sM;
    const float wi = li > 0.f ? expf(mi - M) : 0.f;
    if (tid < 64) wsp[tid] = wi;
    float L = warp_sum(li * wi);
    __syncthreads();
    if (lane == 0) red[warp] = L;
    __syncthreads();
    if (tid == 0) sL = red[0] + red[1] + red[2] + red[3];
    __syncthreads();
    L = sL;
    for (int d = tid; d < hd; d += blockDim.x) {
        float A = 0.f;
        for (int i = 0; i < nsplit; i++)
            if (wsp[i] != 0.f) A += pp[i * (hd + 2) + d] * wsp[i];
        out[(i64)row * heads * hd + (i64)h * hd + d] = tobf(L > 0.f ? A / L : 0.f);
    }
}

// silu_mul: out[r, c] = silu(g[r, c]) * u[r, c] for rows x cols values;
// out's rows are cols apart, g's and u's ldg (views of one gate_up row).
// Grid-stride over 8-value words when cols and ldg are multiples of 8.
extern "C" __global__ void silu_mul(bf16* out, const bf16* g, const bf16* u, int rows, int cols, int ldg) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    if ((cols & 7) == 0 && (ldg & 7) == 0) {
        const int w = cols / 8;
        for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (i64)rows * w; i += stride) {
            const i64 r = i / w, c = (i - r * w) * 8;
            float a[8], b[8];
            unpack8(*reinterpret_cast<const uint4*>(g + r * ldg + c), a);
            unpack8(*reinterpret_cast<const uint4*>(u + r * ldg + c), b);
#pragma unroll
            for (int j = 0; j < 8; j++) a[j] = a[j] / (1.f + expf(-a[j])) * b[j];
            *reinterpret_cast<uint4*>(out + r * cols + c) = pack8(a);
        }
        return;
    }
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (i64)rows * cols; i += stride) {
        const i64 r = i / cols, c = i - r * cols;
        const float x = ld(g + r * ldg + c);
        out[i] = tobf(x / (1.f + expf(-x)) * ld(u + r * ldg + c));
    }
}

// LoRA table entry, one per (slot, layer, module): A [rank, in], B [out, rank].
struct LoraEntry {
    const bf16* a;
    const bf16* b;
    int rank;
    float scale;
    int pad[2];
};

// lora_shrink: tmp[i, k] = scale * x[rows[i]] . A[k] for each LoRA row i
// (rows[i] its activation row, slots[i] its adapter slot) and k < that
// adapter's rank. grid (n, ceil(max_rank/8)), block 256: one warp per k.
extern "C" __global__ void lora_shrink(float* tmp, const bf16* x, const LoraEntry* table, const int* rows, const int* slots,
                                       int entry_base, int entry_stride, int in_f, int x_stride, int t_stride) {
    const int i = blockIdx.x, lane = threadIdx.x & 31;
    const int k = blockIdx.y * 8 + (threadIdx.x >> 5);
    if (slots[i] < 0) return; // a row without an adapter (recorded steps)
    const LoraEntry e = table[entry_base + slots[i] * entry_stride];
    if (k >= e.rank) return;
    const bf16* xr = x + (i64)rows[i] * x_stride;
    const bf16* ar = e.a + (i64)k * in_f;
    float dot = 0.f;
    for (int c = lane; c < in_f; c += 32) dot += ld(xr + c) * ld(ar + c);
    dot = warp_sum(dot);
    if (lane == 0) tmp[(i64)i * t_stride + k] = dot * e.scale;
}

// lora_expand: out[rows[i], j] += tmp[i, :rank] . B[j]; grid (n, ceil(out_f/256)), block 256.
extern "C" __global__ void lora_expand(bf16* out, const float* tmp, const LoraEntry* table, const int* rows, const int* slots,
                                       int entry_base, int entry_stride, int out_f, int o_stride, int t_stride) {
    const int i = blockIdx.x;
    const int j = blockIdx.y * blockDim.x + threadIdx.x;
    if (slots[i] < 0) return;
    const LoraEntry e = table[entry_base + slots[i] * entry_stride];
    if (e.rank == 0 || j >= out_f) return;
    const float* t = tmp + (i64)i * t_stride;
    const bf16* br = e.b + (i64)j * e.rank;
    float acc = 0.f;
    for (int k = 0; k < e.rank; k++) acc += t[k] * ld(br + k);
    bf16* o = out + (i64)rows[i] * o_stride + j;
    *o = tobf(ld(o) + acc);
}

// ---------------------------------------------------------------------------
// SGMV v1: segment-tiled LoRA shrink (tensor cores) and expand (bf16x8 loads).
//
// Rows that share an adapter form tiles of up to 16 consecutive rows
// (int4 {row0, nrows, slot, 0}, built on the host from the step's segments).
// One launch may cover up to three projections that read the same input
// ("slices": fused q/k/v or gate/up): slice s uses table entry m_s and writes
// output columns [off_s, off_s + out_s) of a fused output row.
//
// tmp layout: [ksplit][T][t_stride] float32, slice s at columns
// [s*max_rank, s*max_rank + rank_s); the shrink writes one partial sum per K
// split, the expand adds them up. Requirements (else the backend uses the
// v0 kernels): in_f % 8 == 0, every slice width even, 16-byte aligned rows.
// ---------------------------------------------------------------------------

#define SG_TR 16     // rows per tile (the MMA's M)
#define SG_WARPS 8   // shrink: warps per block, splitting K

__device__ __forceinline__ int sg_mod(int s, int m0, int m1, int m2) { return s == 0 ? m0 : (s == 1 ? m1 : m2); }

// mma.sync m16n8k16 bf16 -> f32: c += a * b.
__device__ __forceinline__ void mma16816(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint4 ldg16(const bf16* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

// sgmv_shrink (8 rank rows per block) / sgmv_shrink4 (32): tmp[z][row][s*max_rank + k]
// = scale * sum over this block's K range of x[row] . A_s[k].
// grid (tiles, slices*rank_tiles, ksplit), block 256. Each block takes one
// tile of 16 rows and 8*NB rank rows of one slice; its 8 warps split the K
// range, each warp running m16n8k16 MMAs on 32 columns at a time. The K order
// inside a 32-column chunk is permuted the same way for x and A (each lane
// loads 8 contiguous values of both), so every load is 16 bytes. NB=4 reads
// each x tile once per 32 rank rows instead of 8 (prefill); NB=1 gives more
// blocks when there are few rows (decode).
template <int NB>
__device__ __forceinline__ void shrink_body(
    float* __restrict__ tmp, const bf16* __restrict__ x, const LoraEntry* __restrict__ table, const int4* __restrict__ tiles,
    int entry_base, int entry_stride, int m0, int m1, int m2, int rank_tiles, int max_rank,
    int in_f, int x_stride, int t_stride, int rows_total, int kchunk, float* red) {
    const int4 tile = tiles[blockIdx.x];
    if (tile.y == 0) return; // no rows (a recorded step's spare tile)
    const int s = blockIdx.y / rank_tiles, k0 = (blockIdx.y % rank_tiles) * 8 * NB;
    const LoraEntry e = table[entry_base + tile.z * entry_stride + sg_mod(s, m0, m1, m2)];
    if (k0 >= e.rank) return; // uniform over the block
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    const int kbeg = blockIdx.z * kchunk, kend = min(in_f, kbeg + kchunk);
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
    // c0,c1: row g, rank cols 2q,2q+1; c2,c3: row g+8. red: [warp][row][8*NB]
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
            tmp[((i64)blockIdx.z * rows_total + tile.x + r) * t_stride + s * max_rank + k0 + kk] = sum * e.scale;
        }
    }
}

#define SHRINK_ARGS                                                                                                      \
    float *__restrict__ tmp, const bf16 *__restrict__ x, const LoraEntry *__restrict__ table, const int4 *__restrict__ tiles, \
        int entry_base, int entry_stride, int m0, int m1, int m2, int rank_tiles, int max_rank, int in_f, int x_stride,    \
        int t_stride, int rows_total, int kchunk
#define SHRINK_PASS tmp, x, table, tiles, entry_base, entry_stride, m0, m1, m2, rank_tiles, max_rank, in_f, x_stride, t_stride, rows_total, kchunk

extern "C" __global__ void __launch_bounds__(32 * SG_WARPS) sgmv_shrink(SHRINK_ARGS) {
    __shared__ float red[SG_WARPS * SG_TR * 8];
    shrink_body<1>(SHRINK_PASS, red);
}

extern "C" __global__ void __launch_bounds__(32 * SG_WARPS) sgmv_shrink4(SHRINK_ARGS) {
    __shared__ float red[SG_WARPS * SG_TR * 32];
    shrink_body<4>(SHRINK_PASS, red);
}

// sgmv_expand: out[row][off_s + j] += sum_k tmp[row][s*max_rank + k] * B_s[j][k]
// (tmp summed over the ksplit partials). grid (tiles, ceil(out_total/256)),
// block 128: each thread owns two adjacent output columns. Its B rows (the
// first 64 ranks, 16 bytes a load) and the tile's output values are loaded
// before the tile's tmp rows are staged in shared memory, so the three
// streams are in flight together; then every row of the tile is updated.
#define SG_EX_THREADS 128
#define SG_EX_CHUNKS 8 // B loads kept in registers: ranks up to 64

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
extern "C" __global__ void __launch_bounds__(SG_EX_THREADS) sgmv_expand(
    bf16* __restrict__ out, const float* __restrict__ tmp, const LoraEntry* __restrict__ table, const int4* __restrict__ tiles,
    int entry_base, int entry_stride, int m0, int m1, int m2, int nslices, int off1, int off2, int out_total,
    int max_rank, int o_stride, int t_stride, int rows_total, int ksplit) {
    extern __shared__ float sm[]; // [SG_TR][nslices * mr8]
    const int4 tile = tiles[blockIdx.x];
    if (tile.y == 0) return; // no rows (a recorded step's spare tile)
    const int mr8 = (max_rank + 7) & ~7, w = nslices * mr8, n = tile.y;
    const int j = (blockIdx.y * SG_EX_THREADS + threadIdx.x) * 2;
    const bool active = j < out_total;
    const int s = j >= off2 ? 2 : (j >= off1 ? 1 : 0);
    const int off = s == 0 ? 0 : (s == 1 ? off1 : off2);
    LoraEntry e = {};
    if (active) e = table[entry_base + tile.z * entry_stride + sg_mod(s, m0, m1, m2)];
    const int rank = e.rank;
    const bf16* b0 = e.b + (i64)(j - off) * rank;
    const bf16* b1 = b0 + rank;
    const bool vec = (rank & 7) == 0;
    uint4 u0[SG_EX_CHUNKS], u1[SG_EX_CHUNKS];
#pragma unroll
    for (int c = 0; c < SG_EX_CHUNKS; c++) {
        const bool ok = vec && c * 8 < rank;
        u0[c] = ok ? ldg16(b0 + c * 8) : make_uint4(0, 0, 0, 0);
        u1[c] = ok ? ldg16(b1 + c * 8) : make_uint4(0, 0, 0, 0);
    }
    __nv_bfloat162 ov[SG_TR];
#pragma unroll
    for (int r = 0; r < SG_TR; r++)
        if (r < n && rank > 0) ov[r] = *reinterpret_cast<const __nv_bfloat162*>(out + (i64)(tile.x + r) * o_stride + j);
    for (int i = threadIdx.x; i < SG_TR * w; i += blockDim.x) {
        const int r = i / w, col = i - r * w, s2 = col / mr8, k = col - s2 * mr8;
        float v = 0.f;
        if (r < n && k < max_rank) {
            const int rk = table[entry_base + tile.z * entry_stride + sg_mod(s2, m0, m1, m2)].rank;
            if (k < rk)
                for (int z = 0; z < ksplit; z++) v += tmp[((i64)z * rows_total + tile.x + r) * t_stride + s2 * max_rank + k];
        }
        sm[i] = v;
    }
    __syncthreads();
    if (rank == 0) return;
    const float* t = sm + s * mr8;
    float acc0[SG_TR], acc1[SG_TR];
#pragma unroll
    for (int r = 0; r < SG_TR; r++) acc0[r] = acc1[r] = 0.f;
    if (vec) {
#pragma unroll
        for (int c = 0; c < SG_EX_CHUNKS; c++) {
            if (c * 8 >= rank) break;
            expand_chunk(acc0, acc1, t + c * 8, w, n, u0[c], u1[c]);
        }
        for (int k = 8 * SG_EX_CHUNKS; k < rank; k += 8) expand_chunk(acc0, acc1, t + k, w, n, ldg16(b0 + k), ldg16(b1 + k));
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
            *reinterpret_cast<__nv_bfloat162*>(out + (i64)(tile.x + r) * o_stride + j) = __floats2bfloat162_rn(v.x + acc0[r], v.y + acc1[r]);
        }
    }
}

// l2_flush: reads n 16-byte words (a buffer larger than L2) and writes nothing
// unless the impossible happens, so the cache ends up full of clean lines.
// Benchmarks run it between timed replays (a memset would leave dirty lines
// whose write-back lands in the next timed region).
extern "C" __global__ void l2_flush(const uint4* __restrict__ p, i64 n, unsigned* sink) {
    unsigned acc = 0;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const uint4 v = p[i];
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0x9e3779b9u && n < 0) *sink = acc;
}

// ---------------------------------------------------------------------------
// Sampling on the device (runtime/gpu SampleRows). One block of SM_THREADS per
// sampled row; the logits are float32 rows of width V. Semantics follow
// runtime/sample: log-softmax of the raw logits; greedy is the first argmax;
// otherwise temperature, then top-k, then top-p over the tokens ordered by
// (logit desc, id asc), then one draw from the kept set. The draw uses
// Philox4x32-10 keyed by the row's seed at the row's counter (the token's
// index in its sequence), so a seeded request is reproducible whatever else
// is in the batch. Thresholds are found by bisection over the ordered bits of
// the logits (32 counting passes) and, on ties at the threshold, over ids.

#define SM_THREADS 1024
#define SP_WORDS 12 // per row: temp, top_p, top_k, n_top, seed lo/hi, ctr lo/hi, row, 3 pad
#define SO_MAXTOP 20
#define SO_WORDS (2 + 2 * SO_MAXTOP) // id, logprob, top ids, top logprobs

__device__ __forceinline__ unsigned fkey(float x) {
    const unsigned u = __float_as_uint(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ unsigned long long combo(unsigned key, int i) {
    return ((unsigned long long)key << 32) | (unsigned)(0xffffffffu - (unsigned)i);
}

// block_max64: max over the block; sh holds 33 u64.
__device__ unsigned long long block_max64(unsigned long long v, unsigned long long* sh) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const unsigned long long x = __shfl_xor_sync(0xffffffffu, v, o);
        v = x > v ? x : v;
    }
    if (lane == 0) sh[w] = v;
    __syncthreads();
    if (w == 0) {
        unsigned long long x = lane < nw ? sh[lane] : 0ull;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const unsigned long long y = __shfl_xor_sync(0xffffffffu, x, o);
            x = y > x ? y : x;
        }
        if (lane == 0) sh[32] = x;
    }
    __syncthreads();
    const unsigned long long r = sh[32];
    __syncthreads();
    return r;
}

__device__ __forceinline__ uint4 philox4x32(uint4 c, uint2 k) {
#pragma unroll
    for (int r = 0; r < 10; r++) {
        const unsigned lo0 = 0xD2511F53u * c.x, hi0 = __umulhi(0xD2511F53u, c.x);
        const unsigned lo1 = 0xCD9E8D57u * c.z, hi1 = __umulhi(0xCD9E8D57u, c.z);
        c = make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
        k.x += 0x9E3779B9u;
        k.y += 0xBB67AE85u;
    }
    return c;
}

// kept: inside the cut (K, I) of the order (key desc, id asc).
__device__ __forceinline__ bool in_cut(unsigned key, int i, unsigned K, int I) { return key > K || (key == K && i <= I); }

extern "C" __global__ void __launch_bounds__(SM_THREADS) sample_rows(int* out, const float* logits, const int* params, int V) {
    __shared__ float shf[33];
    __shared__ unsigned long long shu[33];
    __shared__ float scan[SM_THREADS / 32];
    __shared__ int pick;
    const int* P = params + blockIdx.x * SP_WORDS;
    const float temp = __int_as_float(P[0]), top_p = __int_as_float(P[1]);
    const int top_k = P[2], n_top = min(min(P[3], SO_MAXTOP), V);
    const uint2 seed = make_uint2((unsigned)P[4], (unsigned)P[5]);
    const uint4 ctr = make_uint4((unsigned)P[6], (unsigned)P[7], 0x5eedu, 0u);
    const float* x = logits + (i64)P[8] * V;
    int* o = out + blockIdx.x * SO_WORDS;
    const int tid = threadIdx.x, nt = blockDim.x;

    // max (first index on ties) and log-sum-exp of the raw logits
    unsigned long long best = 0;
    for (int i = tid; i < V; i += nt) {
        const unsigned long long c = combo(fkey(x[i]), i);
        best = c > best ? c : best;
    }
    best = block_max64(best, shu);
    const int amax = (int)(0xffffffffu - (unsigned)(best & 0xffffffffu));
    const float xmax = x[amax];
    float s = 0.f;
    for (int i = tid; i < V; i += nt) s += expf(x[i] - xmax);
    const float lse = xmax + logf(block_sum(s, shf));

    // the n_top most likely tokens, largest first (ties: lower id first)
    unsigned long long prev = best;
    for (int j = 0; j < n_top; j++) {
        unsigned long long b = 0;
        if (j == 0) {
            b = best;
        } else {
            for (int i = tid; i < V; i += nt) {
                const unsigned long long c = combo(fkey(x[i]), i);
                if (c < prev && c > b) b = c;
            }
            b = block_max64(b, shu);
        }
        prev = b;
        const int id = (int)(0xffffffffu - (unsigned)(b & 0xffffffffu));
        if (tid == 0) {
            o[2 + j] = id;
            o[2 + SO_MAXTOP + j] = __float_as_int(x[id] - lse);
        }
    }

    int chosen = amax;
    if (temp > 0.f) {
        const float inv_t = 1.f / temp;
        unsigned K = 0u; // cut: everything
        int I = V - 1;
        if (top_k > 0 && top_k < V) {
            unsigned t = 0u;
            for (int bit = 31; bit >= 0; bit--) {
                const unsigned cand = t | (1u << bit);
                float c = 0.f;
                for (int i = tid; i < V; i += nt) c += fkey(x[i]) >= cand ? 1.f : 0.f;
                if (block_sum(c, shf) >= (float)top_k) t = cand;
            }
            float cgt = 0.f, ceq = 0.f;
            for (int i = tid; i < V; i += nt) {
                const unsigned k = fkey(x[i]);
                cgt += k > t ? 1.f : 0.f;
                ceq += k == t ? 1.f : 0.f;
            }
            cgt = block_sum(cgt, shf);
            ceq = block_sum(ceq, shf);
            const float need = (float)top_k - cgt;
            K = t;
            if (need < ceq) { // ties at the threshold: keep the lowest ids
                int lo = 0, hi = V - 1;
                while (lo < hi) {
                    const int mid = (lo + hi) >> 1;
                    float c = 0.f;
                    for (int i = tid; i <= mid; i += nt) c += fkey(x[i]) == t ? 1.f : 0.f;
                    if (block_sum(c, shf) >= need) hi = mid; else lo = mid + 1;
                }
                I = lo;
            }
        }
        if (top_p > 0.f && top_p < 1.f) {
            float z = 0.f;
            for (int i = tid; i < V; i += nt) {
                const unsigned k = fkey(x[i]);
                if (in_cut(k, i, K, I)) z += expf((x[i] - xmax) * inv_t);
            }
            const float target = top_p * block_sum(z, shf);
            unsigned t = 0u;
            for (int bit = 31; bit >= 0; bit--) {
                const unsigned cand = t | (1u << bit);
                float m = 0.f;
                for (int i = tid; i < V; i += nt) {
                    const unsigned k = fkey(x[i]);
                    if (k >= cand && in_cut(k, i, K, I)) m += expf((x[i] - xmax) * inv_t);
                }
                if (block_sum(m, shf) >= target) t = cand;
            }
            float mgt = 0.f, ceq = 0.f;
            for (int i = tid; i < V; i += nt) {
                const unsigned k = fkey(x[i]);
                if (!in_cut(k, i, K, I)) continue;
                if (k > t) mgt += expf((x[i] - xmax) * inv_t);
                if (k == t) ceq += 1.f;
            }
            mgt = block_sum(mgt, shf);
            ceq = block_sum(ceq, shf);
            int I2 = (t == K) ? I : V - 1;
            if (ceq > 1.f) {
                int lo = 0, hi = I2;
                while (lo < hi) {
                    const int mid = (lo + hi) >> 1;
                    float m = 0.f;
                    for (int i = tid; i <= mid; i += nt)
                        if (fkey(x[i]) == t) m += expf((x[i] - xmax) * inv_t);
                    if (mgt + block_sum(m, shf) >= target) hi = mid; else lo = mid + 1;
                }
                I2 = lo;
            }
            if (t > K) I = I2; else I = min(I, I2); // the top-p prefix lies inside the top-k one
            K = t > K ? t : K;
        }
        // draw: prefix sums of the kept weights in id order, one chunk per thread
        const int chunk = (V + nt - 1) / nt;
        const int b0 = min(V, tid * chunk), b1 = min(V, b0 + chunk);
        float m = 0.f;
        for (int i = b0; i < b1; i++) {
            const unsigned k = fkey(x[i]);
            if (in_cut(k, i, K, I)) m += expf((x[i] - xmax) * inv_t);
        }
        // inclusive scan over the block: warps, then warp totals
        const int lane = tid & 31, w = tid >> 5;
        float inc = m;
#pragma unroll
        for (int d = 1; d < 32; d <<= 1) {
            const float y = __shfl_up_sync(0xffffffffu, inc, d);
            if (lane >= d) inc += y;
        }
        if (lane == 31) scan[w] = inc;
        if (tid == 0) pick = -1;
        __syncthreads();
        if (w == 0) {
            float v = lane < nt / 32 ? scan[lane] : 0.f;
#pragma unroll
            for (int d = 1; d < 32; d <<= 1) {
                const float y = __shfl_up_sync(0xffffffffu, v, d);
                if (lane >= d) v += y;
            }
            if (lane < nt / 32) scan[lane] = v;
        }
        __syncthreads();
        const float excl = inc - m + (w > 0 ? scan[w - 1] : 0.f);
        const float total = scan[nt / 32 - 1];
        const uint4 r = philox4x32(ctr, seed);
        const double u = ((double)(r.x >> 5) * 67108864.0 + (double)(r.y >> 6)) * (1.0 / 9007199254740992.0);
        const float target = (float)(u * (double)total);
        // the last thread holding any mass takes a target rounded up to the total
        unsigned long long lastc = m > 0.f ? (unsigned long long)tid : 0ull;
        const int last = (int)block_max64(lastc, shu);
        if (m > 0.f && excl <= target && (target < excl + m || tid == last)) {
            float acc = excl;
            int sel = -1;
            for (int i = b0; i < b1; i++) {
                const unsigned k = fkey(x[i]);
                if (!in_cut(k, i, K, I)) continue;
                sel = i;
                acc += expf((x[i] - xmax) * inv_t);
                if (acc > target) break;
            }
            atomicMax(&pick, sel);
        }
        __syncthreads();
        chosen = pick >= 0 ? pick : amax;
    }
    if (tid == 0) {
        o[0] = chosen;
        o[1] = __float_as_int(x[chosen] - lse);
    }
}
