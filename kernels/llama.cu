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
extern "C" __global__ void add_rmsnorm(bf16* x, const bf16* delta, bf16* out, const bf16* w, float eps, int H) {
    __shared__ float sh[33];
    const int r = blockIdx.x;
    bf16* xr = x + (i64)r * H;
    float ss = 0.f;
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

// rope: rotate-half RoPE of q [T, heads*hd] and k [T, kvh*hd] in place; grid (T).
extern "C" __global__ void rope(bf16* q, bf16* k, const float* inv_freq, const int* pos, int heads, int kvh, int hd) {
    const int r = blockIdx.x, half = hd / 2;
    const float p = (float)pos[r];
    const int total = (heads + kvh) * half;
    for (int idx = threadIdx.x; idx < total; idx += blockDim.x) {
        const int h = idx / half, i = idx - h * half;
        bf16* v = h < heads ? q + (i64)r * heads * hd + h * hd : k + (i64)r * kvh * hd + (h - heads) * hd;
        const float ang = p * inv_freq[i];
        float s, c;
        sincosf(ang, &s, &c);
        const float x1 = ld(v + i), x2 = ld(v + i + half);
        v[i] = tobf(x1 * c - x2 * s);
        v[i + half] = tobf(x2 * c + x1 * s);
    }
}

// kv_store: kc/vc[slots[r]] = k/v[r] for one layer's cache [slots, width]; grid (T).
extern "C" __global__ void kv_store(bf16* kc, bf16* vc, const bf16* k, const bf16* v, const int* slots, int width) {
    const int r = blockIdx.x;
    const i64 dst = (i64)slots[r] * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        kc[dst + i] = k[(i64)r * width + i];
        vc[dst + i] = v[(i64)r * width + i];
    }
}

#define ATT_WARPS 4
#define ATT_MAXJ 8 // head_dim <= 256

// attention: causal attention of query row r, head h over its sequence's
// paged cache. grid (T, heads), block 32*ATT_WARPS. Each warp takes every
// ATT_WARPS-th position with an online softmax; the warps merge at the end.
// seq_info: per sequence {start, len, context, page_offset}; pages: the page tables.
extern "C" __global__ void __launch_bounds__(32 * ATT_WARPS) attention(
    bf16* out, const bf16* q, const bf16* kc, const bf16* vc, const int* row_seq, const int* seq_info,
    const int* pages, int heads, int kvh, int hd, int bs, float scale) {
    __shared__ float sm[ATT_WARPS], sl[ATT_WARPS];
    __shared__ float sacc[ATT_WARPS][32 * ATT_MAXJ];
    const int r = blockIdx.x, h = blockIdx.y;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int s = row_seq[r];
    const int start = seq_info[4 * s], len = seq_info[4 * s + 1], total = seq_info[4 * s + 2], poff = seq_info[4 * s + 3];
    const int ctx = total - len + (r - start) + 1;
    const int width = kvh * hd, kvoff = (h / (heads / kvh)) * hd;
    const bf16* qr = q + (i64)r * heads * hd + (i64)h * hd;
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

// silu_mul: out = silu(g) * u over n elements (out may alias g or u).
extern "C" __global__ void silu_mul(bf16* out, const bf16* g, const bf16* u, i64 n) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const float x = ld(g + i);
        out[i] = tobf(x / (1.f + expf(-x)) * ld(u + i));
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
    const LoraEntry e = table[entry_base + slots[i] * entry_stride];
    if (e.rank == 0 || j >= out_f) return;
    const float* t = tmp + (i64)i * t_stride;
    const bf16* br = e.b + (i64)j * e.rank;
    float acc = 0.f;
    for (int k = 0; k < e.rank; k++) acc += t[k] * ld(br + k);
    bf16* o = out + (i64)rows[i] * o_stride + j;
    *o = tobf(ld(o) + acc);
}
