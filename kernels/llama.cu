// Llama forward-pass kernels for peftd's GPU backend (runtime/gpu).
// Activations and weights are bf16, arithmetic is float32. Compiled at run
// time by NVRTC (kernels.Load) for the device's architecture.
#include "common.cuh"

#define NEG_INF (__int_as_float(0xff800000))

__device__ __forceinline__ float ld(const bf16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ bf16 tobf(float x) { return __float2bfloat16_rn(x); }

// embed: out[r] = table[tokens[r]]; grid (T), any block. With tok_from (a
// step chained behind the one before it), a row whose tok_from[r] is k >= 0
// takes ring[k] instead: the token that step's sample_rows drew for its
// sample row k, still on the device.
extern "C" __global__ void embed(bf16* out, const bf16* table, const int* tokens, const int* tok_from, const int* ring, int H) {
    pdl_entry();
    const int r = blockIdx.x;
    int t = tokens[r];
    if (tok_from && tok_from[r] >= 0) t = ring[tok_from[r]];
    const bf16* src = table + (i64)t * H;
    bf16* dst = out + (i64)r * H;
    for (int i = threadIdx.x; i < H; i += blockDim.x) dst[i] = src[i];
}

// widen8_e4m3: 8 e4m3 values (8 bytes, the first lowest) as 8 bf16 in a
// 16-byte word, exactly (bf16 holds every e4m3 value).
__device__ __forceinline__ uint4 widen8_e4m3(uint2 w) {
    float f[8];
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const float2 v = e4m3x2_float2((unsigned short)((j < 2 ? w.x : w.y) >> (16 * (j & 1))));
        f[2 * j] = v.x;
        f[2 * j + 1] = v.y;
    }
    return pack8(f);
}

// ldf: a LoRA update's value as float (float32 or bf16 updates); upd_row:
// an update row as add_word reads it (float32 in float4 words).
__device__ __forceinline__ float ldf(const float* p) { return *p; }
__device__ __forceinline__ float ldf(const bf16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ const float4* upd_row(const float* p) { return reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ const bf16* upd_row(const bf16* p) { return p; }

// add_rmsnorm: x[r] += delta[r] (and the LoRA update d2 of the rows whose
// rl is >= 0, rows H apart; delta + d2 is rounded to bf16 first, as the
// projection's output updated in place would have been), rounded to bf16;
// then, when out is set, out[r] = rmsnorm(x[r]) * w; and when q is set
// too, out[r] quantized per row to e4m3 into q[r] (H bytes) and qscale[r]
// for the FP8 projections that read it (no quant_rows_e4m3 launch).
// grid (T), block a multiple of 32. add_rmsnorm_h: the same with a bf16
// update (outHalf: o's and down's updates written as bf16, each value
// rounded to bf16 before the sum, as PEFT's bf16 lora_B output is).
template <class D>
__device__ __forceinline__ void add_rmsnorm_body(bf16* x, const bf16* delta, const D* d2, const int* rl, bf16* out, const bf16* w, float eps,
                                                 int H, unsigned char* q, float* qscale) {
    const int r = blockIdx.x, tid = threadIdx.x, bd = blockDim.x, n8 = H >> 3;
    const bool vec = (H & 7) == 0;       // 16-byte words: every load of a row in flight at once
    const bool regs = vec && n8 <= ADD_RC * bd; // the row stays in registers between the two passes
    const uint4* w8 = reinterpret_cast<const uint4*>(w);
    uint4 wk[ADD_RC];
    if (regs && out) {
        // the norm weight is written by no kernel: its loads go out before
        // griddepcontrol.wait, under the kernel before
#pragma unroll
        for (int j = 0; j < ADD_RC; j++) {
            const int c = tid + j * bd;
            wk[j] = c < n8 ? __ldg(w8 + c) : make_uint4(0u, 0u, 0u, 0u);
        }
    }
    pdl_entry();
    __shared__ float sh[33];
    bf16* xr = x + (i64)r * H;
    if (d2 && rl[r] < 0) d2 = nullptr; // a row without an adapter
    float ss = 0.f;
    if (vec) {
        uint4* x8 = reinterpret_cast<uint4*>(xr);
        const uint4* d8 = delta ? reinterpret_cast<const uint4*>(delta + (i64)r * H) : nullptr;
        const auto e8 = d2 ? upd_row(d2 + (i64)r * H) : nullptr;
        uint4* o8 = reinterpret_cast<uint4*>(out + (i64)r * H);
        float m = 0.f;
        int bad = 0;
        if (regs) {
            uint4 xk[ADD_RC];
#pragma unroll
            for (int j = 0; j < ADD_RC; j++) {
                const int c = tid + j * bd;
                if (c < n8) {
                    xk[j] = add_word(x8, d8, e8, c);
                    ss += sumsq8(xk[j]);
                }
            }
            if (!out) return;
            ss = block_sum(ss, sh);
            const float inv = 1.f / sqrtf(ss / (float)H + eps);
#pragma unroll
            for (int j = 0; j < ADD_RC; j++) {
                const int c = tid + j * bd;
                if (c < n8) xk[j] = norm_word(o8, c, xk[j], wk[j], inv, q != nullptr, m, bad);
            }
            // quantized from registers: the row is not read back
            if (q) quant_words_e4m3<ADD_RC>(xk, n8, q + (i64)r * H, qscale + r, m, bad, sh);
            return;
        } else {
            for (int c = tid; c < n8; c += bd) ss += sumsq8(add_word(x8, d8, e8, c));
            if (!out) return;
            ss = block_sum(ss, sh);
            const float inv = 1.f / sqrtf(ss / (float)H + eps);
            for (int c = tid; c < n8; c += bd) norm_word(o8, c, x8[c], w8[c], inv, q != nullptr, m, bad);
        }
        if (q) quant_row_e4m3(out + (i64)r * H, q + (i64)r * H, qscale + r, H, true, m, bad, sh);
        return;
    }
    for (int i = threadIdx.x; i < H; i += blockDim.x) {
        float v = ld(xr + i);
        if (delta) {
            float d = ld(delta + (i64)r * H + i);
            if (d2) d = __bfloat162float(tobf(d + ldf(d2 + (i64)r * H + i)));
            bf16 b = tobf(v + d);
            xr[i] = b;
            v = __bfloat162float(b);
        }
        ss += v * v;
    }
    if (!out) return;
    ss = block_sum(ss, sh);
    const float inv = 1.f / sqrtf(ss / (float)H + eps);
    bf16* o = out + (i64)r * H;
    float m = 0.f;
    int bad = 0;
    for (int i = threadIdx.x; i < H; i += blockDim.x) {
        const bf16 b = tobf(ld(w + i) * (ld(xr + i) * inv));
        o[i] = b;
        amax1(b, m, bad);
    }
    if (q) quant_row_e4m3(o, q + (i64)r * H, qscale + r, H, false, m, bad, sh);
}
#define ADD_RMSNORM_ARGS_D(D) \
    bf16 *x, const bf16 *delta, const D *d2, const int *rl, bf16 *out, const bf16 *w, float eps, int H, unsigned char *q, float *qscale
#define ADD_RMSNORM_PASS x, delta, d2, rl, out, w, eps, H, q, qscale
extern "C" __global__ void add_rmsnorm(ADD_RMSNORM_ARGS_D(float)) { add_rmsnorm_body(ADD_RMSNORM_PASS); }
extern "C" __global__ void add_rmsnorm_h(ADD_RMSNORM_ARGS_D(bf16)) { add_rmsnorm_body(ADD_RMSNORM_PASS); }

// fill_rows: what a memset node does (cuda.MemsetParams): height rows of
// width elements of esize bytes (1, 2 or 4) set to value, rows pitch bytes
// apart. Recordings run it in place of cuBLASLt's workspace memsets
// (runtime/gpu/memsethoist.go): a kernel after a kernel launches sooner
// than a kernel after a memset node. grid-stride over the elements.
extern "C" __global__ void fill_rows(unsigned char* dst, unsigned value, int esize, i64 width, i64 height, i64 pitch) {
    const i64 n = width * height, stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const i64 r = i / width, c = i - r * width;
        unsigned char* p = dst + r * pitch + c * esize;
        if (esize == 4)
            *reinterpret_cast<unsigned*>(p) = value;
        else if (esize == 2)
            *reinterpret_cast<unsigned short*>(p) = (unsigned short)value;
        else
            *p = (unsigned char)value;
    }
}

// add_delta: x[r][c] += d[r][c] (rounded to bf16 in x) for c < cols and
// the rows whose rl (row adapter slot) is >= 0, x rows ldx values apart, d
// (float32; add_delta_h: bf16) rows cols apart: a LoRA update computed on
// the LoRA stream, added where no op folds it in. grid-stride over
// rows*cols.
template <class D>
__device__ __forceinline__ void add_delta_body(bf16* x, const D* d, const int* rl, int rows, int cols, int ldx) {
    pdl_entry();
    const i64 n = (i64)rows * cols, stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const i64 r = i / cols, c = i - r * cols;
        if (rl[r] < 0) continue;
        bf16* p = x + r * ldx + c;
        *p = tobf(ld(p) + ldf(d + i));
    }
}
extern "C" __global__ void add_delta(bf16* x, const float* d, const int* rl, int rows, int cols, int ldx) { add_delta_body(x, d, rl, rows, cols, ldx); }
extern "C" __global__ void add_delta_h(bf16* x, const bf16* d, const int* rl, int rows, int cols, int ldx) { add_delta_body(x, d, rl, rows, cols, ldx); }

// add_bias: x[r] += b (rounded to bf16 in x); grid (T), any block (Qwen2's q/k/v biases).
extern "C" __global__ void add_bias(bf16* x, const bf16* b, int H) {
    pdl_entry();
    bf16* xr = x + (i64)blockIdx.x * H;
    for (int i = threadIdx.x; i < H; i += blockDim.x) xr[i] = tobf(ld(xr + i) + ld(b + i));
}

// head_rmsnorm: each head (hd values) of row r of x, in place: rmsnorm(head) * w.
// Rows are ldx values apart. grid (T, heads), block 32 (Qwen3's q_norm and k_norm).
extern "C" __global__ void head_rmsnorm(bf16* x, const bf16* w, float eps, int heads, int hd, int ldx) {
    pdl_entry();
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
    pdl_entry();
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

// key_scale_e4m3: an FP8 key head's scale from its max |value|, amax / 448
// (1 for a zero head), and in inv the factor that quantizes it (448 /
// amax clamped to FLT_MAX: a subnormal amax gives no Inf; 0 for a zero head).
__device__ __forceinline__ float key_scale_e4m3(float amax, float& inv) {
    inv = amax > 0.f ? fminf(448.f / amax, 3.402823466e38f) : 0.f;
    return amax > 0.f ? amax / 448.f : 1.f;
}

// kscale_at: where the float32 scale of the FP8 key at cache slot slot,
// KV head kh sits in a layer's key scales, laid out [page][kvh][bs] (page
// = slot / bs): the bs positions of one page and head are contiguous, so
// attn_decode8's 16 scales a tile are one 64-byte read, not 16 sectors
// 4 * kvh bytes apart (each 32-byte sector for 4 bytes). bsh: log2(bs)
// when bs is a power of two, else -1.
__device__ __forceinline__ i64 kscale_at(int slot, int kvh, int kh, int bs, int bsh) {
    const int page = bsh >= 0 ? slot >> bsh : slot / bs;
    return ((i64)page * kvh + kh) * bs + (slot - page * bs);
}
// log2_or: log2(bs) for a power of two, else -1 (kscale_at's bsh).
__device__ __forceinline__ int log2_or(int bs) { return (bs & (bs - 1)) == 0 ? __ffs(bs) - 1 : -1; }

// rope_store: rotate-half RoPE of q [T, heads*hd] and k [T, kvh*hd] in
// place (rows ldq and ldk values apart), and, when kc is not null, k (as
// rotated) and v (rows ldv apart) stored at the row's KV slot of one
// layer's cache [slots, kvh*hd]; a row with a negative slot (padding of a
// recorded step) stores nothing. dq, dk, dv (null, or all set): float32
// LoRA updates of q, k, v computed beside the qkv projection, rows ldd
// apart, added first in the rows whose rl (row adapter slot) is >= 0
// (rounded to bf16, as an update in place would have left them; q and k
// keep the sum). grid (T, heads + 2*kvh): block y < heads takes query
// head y, then the key heads, then the value heads (a copy). block: any
// multiple of 32; each thread takes frequencies i (one sincosf each).
// inv_freq null: no rotation (k stored as it is). rope_store_h and
// rope_store_rows_h: the same with bf16 updates (qkvHalf).
template <class D> __device__ __forceinline__ float plus(const bf16* x, const D* d, int i) {
    return d ? __bfloat162float(tobf(ld(x + i) + ldf(d + i))) : ld(x + i);
}
#define ROPE_ARGS_D(D)                                                                                                          \
    bf16 *q, bf16 *k, const bf16 *v, bf16 *kc, bf16 *vc, const float *inv_freq, const int *pos, const int *slots, const D *dq, \
        const D *dk, const D *dv, const int *rl, int heads, int kvh, int hd, int ldq, int ldk, int ldv, int ldd, unsigned char *kc8, float *ks, int bs
#define ROPE_PASS q, k, v, kc, vc, inv_freq, pos, slots, dq, dk, dv, rl, heads, kvh, hd, ldq, ldk, ldv, ldd, kc8, ks, bs

template <class D> __device__ __forceinline__ void rope_store_body(ROPE_ARGS_D(D)) {
    pdl_entry();
    __shared__ float ysh[256]; // an FP8 key head's values (hd <= 256)
    __shared__ float red[33];
    const int r = blockIdx.x, h = blockIdx.y, half = hd / 2, width = kvh * hd;
    const int slot = kc || ks ? slots[r] : -1;
    if (dq && rl[r] < 0) dq = dk = dv = nullptr; // a row without an adapter
    if (h >= heads + kvh) { // a value head: copy it to the cache
        if (slot < 0) return;
        const int vh = h - heads - kvh;
        const bf16* src = v + (i64)r * ldv + (i64)vh * hd;
        const D* d = dv ? dv + (i64)r * ldd + (i64)vh * hd : nullptr;
        bf16* dst = vc + (i64)slot * width + (i64)vh * hd;
        for (int i = threadIdx.x; i < hd; i += blockDim.x) dst[i] = d ? tobf(plus(src, d, i)) : src[i];
        return;
    }
    const float p = (float)pos[r];
    const bool isk = h >= heads;
    const bool k8 = isk && ks && slot >= 0; // block-uniform: the key head goes to the FP8 cache
    bf16* x = isk ? k + (i64)r * ldk + (i64)(h - heads) * hd : q + (i64)r * ldq + (i64)h * hd;
    const D* d = isk ? (dk ? dk + (i64)r * ldd + (i64)(h - heads) * hd : nullptr) : (dq ? dq + (i64)r * ldd + (i64)h * hd : nullptr);
    bf16* dst = isk && slot >= 0 && kc ? kc + (i64)slot * width + (i64)(h - heads) * hd : nullptr;
    float amax = 0.f;
    if (!inv_freq) { // no rotation: add the update, store k as it is
        for (int i = threadIdx.x; i < hd; i += blockDim.x) {
            const bf16 y = d ? tobf(plus(x, d, i)) : x[i];
            if (d) x[i] = y;
            if (dst) dst[i] = y;
            if (k8) {
                ysh[i] = __bfloat162float(y);
                amax = fmaxf(amax, fabsf(ysh[i]));
            }
        }
    } else {
        for (int i = threadIdx.x; i < half; i += blockDim.x) {
            float s, c;
            sincosf(p * inv_freq[i], &s, &c);
            const float x1 = plus(x, d, i), x2 = plus(x, d, i + half);
            const bf16 y1 = tobf(x1 * c - x2 * s), y2 = tobf(x2 * c + x1 * s);
            x[i] = y1;
            x[i + half] = y2;
            if (dst) {
                dst[i] = y1;
                dst[i + half] = y2;
            }
            if (k8) {
                ysh[i] = __bfloat162float(y1);
                ysh[i + half] = __bfloat162float(y2);
                amax = fmaxf(amax, fmaxf(fabsf(ysh[i]), fabsf(ysh[i + half])));
            }
        }
    }
    if (!k8) return;
    // the FP8 key cache: the head's rotated values (as the bf16 cache would
    // hold them) in e4m3 with one scale, amax / 448 (1 for a zero head)
    amax = block_max(amax, red); // also makes every thread's ysh visible
    float inv;
    const float sc = key_scale_e4m3(amax, inv);
    const int kh = h - heads;
    unsigned char* q8 = kc8 + (i64)slot * width + (i64)kh * hd;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) q8[i] = __nv_cvt_float_to_fp8(ysh[i] * inv, __NV_SATFINITE, __NV_E4M3);
    if (threadIdx.x == 0) ks[kscale_at(slot, kvh, kh, bs, log2_or(bs))] = sc;
}
extern "C" __global__ void rope_store(ROPE_ARGS_D(float)) { rope_store_body(ROPE_PASS); }
extern "C" __global__ void rope_store_h(ROPE_ARGS_D(bf16)) { rope_store_body(ROPE_PASS); }

// rope_store_rows: rope_store for head_dim 64, 128 or 256 with 16-byte
// aligned rows (ldq, ldk, ldv, ldd multiples of 8): one block per row, each
// thread taking 8 rotation pairs (16 bytes of each half of a head) or 16
// bytes of a value head, so a row's loads are all in flight at once and the
// row's cos/sin are computed once (in shared memory) for all its heads, not
// once per head. The row's position, slot and cos/sin come from the step
// metadata and inv_freq, which no kernel writes: they are read before
// griddepcontrol.wait, under the projection before. Same arguments and
// results as rope_store; grid (T), block a multiple of 32.
template <class D> __device__ __forceinline__ void rope_store_rows_body(ROPE_ARGS_D(D)) {
    __shared__ float cs[128], sn[128]; // cos and sin of frequency i at the row's position (hd <= 256)
    const int r = blockIdx.x, tid = threadIdx.x, bd = blockDim.x, half = hd / 2, per = half / 8;
    const bool rot = inv_freq != nullptr;
    const int slot = kc || ks || vc ? slots[r] : -1;
    if (rot) {
        const float p = (float)pos[r];
        for (int i = tid; i < half; i += bd) sincosf(p * inv_freq[i], &sn[i], &cs[i]);
    }
    pdl_entry();
    __syncthreads();
    if (dq && rl[r] < 0) dq = dk = dv = nullptr; // a row without an adapter
    const int width = kvh * hd, nrot = (heads + kvh) * per;
    // rotation units: unit u is pairs [8j, 8j + 8) of head u / per (query
    // heads, then key heads); a head's per units sit in per consecutive
    // lanes (per divides 32), so its FP8 scale is a reduction among them
    for (int u0 = 0; u0 < nrot; u0 += bd) {
        const int u = u0 + tid, h = u / per, j = u - h * per;
        const bool act = u < nrot, isk = act && h >= heads;
        const bool k8 = isk && ks && slot >= 0;
        float y[16];
        if (act) {
            bf16* x = isk ? k + (i64)r * ldk + (i64)(h - heads) * hd : q + (i64)r * ldq + (i64)h * hd;
            const D* d = isk ? (dk ? dk + (i64)r * ldd + (i64)(h - heads) * hd : nullptr) : (dq ? dq + (i64)r * ldd + (i64)h * hd : nullptr);
            float x1[8], x2[8];
            unpack8(*reinterpret_cast<const uint4*>(x + 8 * j), x1);
            unpack8(*reinterpret_cast<const uint4*>(x + half + 8 * j), x2);
            if (d) {
                add8(x1, d + 8 * j);
                add8(x2, d + half + 8 * j);
            }
#pragma unroll
            for (int e = 0; e < 8; e++) {
                if (rot) {
                    const float c = cs[8 * j + e], sv = sn[8 * j + e];
                    y[e] = __bfloat162float(tobf(x1[e] * c - x2[e] * sv));
                    y[8 + e] = __bfloat162float(tobf(x2[e] * c + x1[e] * sv));
                } else {
                    y[e] = x1[e];
                    y[8 + e] = x2[e];
                }
            }
            const uint4 w1 = pack8(y), w2 = pack8(y + 8);
            if (rot || d) {
                *reinterpret_cast<uint4*>(x + 8 * j) = w1;
                *reinterpret_cast<uint4*>(x + half + 8 * j) = w2;
            }
            if (isk && kc && slot >= 0) {
                bf16* dst = kc + (i64)slot * width + (i64)(h - heads) * hd;
                *reinterpret_cast<uint4*>(dst + 8 * j) = w1;
                *reinterpret_cast<uint4*>(dst + half + 8 * j) = w2;
            }
        }
        if (!ks || slot < 0) continue; // block-uniform: no FP8 key cache for this row
        // the FP8 key cache: the head's rotated values (as the bf16 cache
        // would hold them) in e4m3 with one scale, amax / 448 (1 for a zero head)
        float amax = 0.f;
        if (k8)
#pragma unroll
            for (int e = 0; e < 16; e++) amax = fmaxf(amax, fabsf(y[e]));
        for (int o = 1; o < per; o <<= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
        if (!k8) continue;
        float inv;
        const float sc = key_scale_e4m3(amax, inv);
        const int kh = h - heads;
        unsigned char* q8 = kc8 + (i64)slot * width + (i64)kh * hd;
        unsigned char b[16];
#pragma unroll
        for (int e = 0; e < 16; e++) b[e] = __nv_cvt_float_to_fp8(y[e] * inv, __NV_SATFINITE, __NV_E4M3);
        *reinterpret_cast<uint2*>(q8 + 8 * j) = *reinterpret_cast<const uint2*>(b);
        *reinterpret_cast<uint2*>(q8 + half + 8 * j) = *reinterpret_cast<const uint2*>(b + 8);
        if (j == 0) ks[kscale_at(slot, kvh, kh, bs, log2_or(bs))] = sc;
    }
    if (!vc || slot < 0) return;
    // value heads: 16-byte words copied to the cache (plus the update)
    const int nv8 = width / 8;
    for (int u = tid; u < nv8; u += bd) {
        const bf16* src = v + (i64)r * ldv + 8 * u;
        uint4 w = *reinterpret_cast<const uint4*>(src);
        if (dv) {
            float a[8];
            unpack8(w, a);
            add8(a, dv + (i64)r * ldd + 8 * u);
            w = pack8(a);
        }
        *reinterpret_cast<uint4*>(vc + (i64)slot * width + 8 * u) = w;
    }
}
extern "C" __global__ void rope_store_rows(ROPE_ARGS_D(float)) { rope_store_rows_body(ROPE_PASS); }
extern "C" __global__ void rope_store_rows_h(ROPE_ARGS_D(bf16)) { rope_store_rows_body(ROPE_PASS); }

// rope_store_lora: rope_store_rows' results for a step whose q/k/v LoRA
// update has not been expanded: each row's update of a head is computed
// here, from the shrink's output tmp (ksplit K parts, [ksplit][rows]
// [t_stride] floats, scale applied; slice s's ranks at s * max_rank) and
// the row's adapter's B (the table entry of the slice's module: entry_base
// + slot * entry_stride + m{s}), and added to the projection's output
// (rounded to bf16, as rope_store_rows' add8 does) before the rotation;
// rows whose rl is < 0 get none. No expand launch and no float32 update in
// memory (runtime/gpu/lora_rope.go). grid (heads + 2 * kvh, rows): query
// heads, key heads, value heads, each row; block hd / 2 threads: thread j
// takes rotation pair j (columns j and j + hd / 2). Before
// griddepcontrol.wait (no kernel of the step writes them) each thread
// loads its two columns' first 32 ranks of B and computes its cos/sin;
// tmp, q, k and v are read after it. hd 32, 64, 128 or 256; ranks
// multiples of 8, at most 128.
// EX_ZU: the loads of the shrink's tmp that rope_store_lora and
// sgmv_expand_tc issue before they add any (8: rope_store_lora's K parts
// of a decode step's q/k/v shrink in one round trip to L2; sgmv_expand_tc
// sums PER = 2 * KC values a thread, so EX_ZU / PER parts of each).
#ifndef EX_ZU
#define EX_ZU 8
#endif

// sum_kparts: v[u] (u < PER) = the sum over the shrink's K parts z <
// ksplit of tp[u * us + z * zs], 0 where ok[u] is false. ZU parts of every
// value are loaded before the first add (a rolled loop waits for each load
// at its add: one round trip to L2 a part, or per four parts where the
// compiler unrolls it), then added in part order (the serial sum's bits).
template <int ZU, int PER>
__device__ __forceinline__ void sum_kparts(float (&v)[PER], const float* tp, i64 us, i64 zs, int ksplit, const bool (&ok)[PER]) {
#pragma unroll
    for (int u = 0; u < PER; u++) v[u] = 0.f;
    for (int z0 = 0; z0 < ksplit; z0 += ZU) {
        float p[ZU][PER];
#pragma unroll
        for (int zu = 0; zu < ZU; zu++)
#pragma unroll
            for (int u = 0; u < PER; u++) p[zu][u] = ok[u] && z0 + zu < ksplit ? __ldcg(tp + u * us + (z0 + zu) * zs) : 0.f;
#pragma unroll
        for (int zu = 0; zu < ZU; zu++)
#pragma unroll
            for (int u = 0; u < PER; u++)
                if (z0 + zu < ksplit) v[u] += p[zu][u];
    }
}
#define ROPE_LORA_PRE 4 // 8-rank chunks of B kept in registers from before the wait
extern "C" __global__ void rope_store_lora(bf16* q, bf16* k, const bf16* v, bf16* kc, bf16* vc, const float* inv_freq, const int* pos,
                                           const int* slots, const int* rl, int heads, int kvh, int hd, int ldq, int ldk, int ldv,
                                           unsigned char* kc8, float* ks, const float* tmp, const LoraEntry* table, int entry_base,
                                           int entry_stride, int m0, int m1, int m2, int max_rank, int t_stride, int rows, int ksplit, int bs) {
    __shared__ float ts[128]; // this row's s for this slice
    __shared__ float red[4];  // FP8 keys: the warps' amax (hd / 2 <= 128 threads)
    const int h = blockIdx.x, r = blockIdx.y, half = hd / 2, j = threadIdx.x;
    const int sl = h < heads ? 0 : (h < heads + kvh ? 1 : 2);
    const int hh = sl == 0 ? h : (sl == 1 ? h - heads : h - heads - kvh);
    const int col = hh * hd, width = kvh * hd;
    const int slot = kc || ks || vc ? slots[r] : -1;
    const int a = rl[r];
    const LoraEntry e = a >= 0 ? table[entry_base + a * entry_stride + sg_mod(sl, m0, m1, m2)] : LoraEntry{nullptr, nullptr, 0, 0.f, {0, 0}};
    const bf16* b1 = e.b + (i64)(col + j) * e.rank;
    const bf16* b2 = e.b + (i64)(col + j + half) * e.rank;
    uint4 w1[ROPE_LORA_PRE], w2[ROPE_LORA_PRE];
#pragma unroll
    for (int c = 0; c < ROPE_LORA_PRE; c++) {
        const bool in = 8 * c < e.rank;
        w1[c] = in ? ldg16(b1 + 8 * c) : make_uint4(0u, 0u, 0u, 0u);
        w2[c] = in ? ldg16(b2 + 8 * c) : make_uint4(0u, 0u, 0u, 0u);
    }
    float sn = 0.f, cs = 1.f;
    if (inv_freq && sl < 2) sincosf((float)pos[r] * inv_freq[j], &sn, &cs);
    pdl_entry();
    // the projection's outputs first, then tmp's K parts (sum_kparts)
    const bf16* x = sl == 0 ? q + (i64)r * ldq + col : (sl == 1 ? k + (i64)r * ldk + col : v + (i64)r * ldv + col);
    float x1 = ld(x + j), x2 = ld(x + j + half);
    if (e.rank > 0) {
        const bool all[1] = {true};
        for (int i = j; i < e.rank; i += half) {
            float t[1];
            sum_kparts<EX_ZU>(t, tmp + (i64)r * t_stride + sl * max_rank + i, 0, (i64)rows * t_stride, ksplit, all);
            ts[i] = t[0];
        }
    }
    __syncthreads();
    if (e.rank > 0) {
        float d1 = 0.f, d2 = 0.f;
        auto chunk = [&](int kk, uint4 u1, uint4 u2) { // ranks kk..kk+7
            float f1[8], f2[8];
            unpack8(u1, f1);
            unpack8(u2, f2);
#pragma unroll
            for (int u = 0; u < 8; u++) {
                d1 = fmaf(ts[kk + u], f1[u], d1);
                d2 = fmaf(ts[kk + u], f2[u], d2);
            }
        };
#pragma unroll
        for (int c = 0; c < ROPE_LORA_PRE; c++)
            if (8 * c < e.rank) chunk(8 * c, w1[c], w2[c]);
        for (int kk = 8 * ROPE_LORA_PRE; kk < e.rank; kk += 8) chunk(kk, ldg16(b1 + kk), ldg16(b2 + kk));
        x1 = __bfloat162float(tobf(x1 + d1));
        x2 = __bfloat162float(tobf(x2 + d2));
    }
    if (sl == 2) { // a value head: to the cache
        if (vc && slot >= 0) {
            bf16* dst = vc + (i64)slot * width + col;
            dst[j] = tobf(x1);
            dst[j + half] = tobf(x2);
        }
        return;
    }
    float y1 = x1, y2 = x2;
    if (inv_freq) {
        y1 = __bfloat162float(tobf(x1 * cs - x2 * sn));
        y2 = __bfloat162float(tobf(x2 * cs + x1 * sn));
    }
    bf16* xw = const_cast<bf16*>(x);
    xw[j] = tobf(y1);
    xw[j + half] = tobf(y2);
    if (sl == 0 || slot < 0) return; // block-uniform
    if (kc) {
        bf16* dst = kc + (i64)slot * width + col;
        dst[j] = tobf(y1);
        dst[j + half] = tobf(y2);
    }
    if (!ks) return;
    // the FP8 key cache: the head's rotated values in e4m3 with one scale,
    // amax / 448 (1 for a zero head), as rope_store_rows stores them
    float amax = fmaxf(fabsf(y1), fabsf(y2));
    for (int o = 1; o < min(half, 32); o <<= 1) amax = fmaxf(amax, __shfl_xor_sync(half >= 32 ? 0xffffffffu : (1u << half) - 1u, amax, o));
    if (half > 32) {
        if ((j & 31) == 0) red[j >> 5] = amax;
        __syncthreads();
        amax = 0.f;
        for (int w = 0; w < half / 32; w++) amax = fmaxf(amax, red[w]);
    }
    float inv;
    const float sc = key_scale_e4m3(amax, inv);
    unsigned char* q8 = kc8 + (i64)slot * width + col;
    q8[j] = __nv_cvt_float_to_fp8(y1 * inv, __NV_SATFINITE, __NV_E4M3);
    q8[j + half] = __nv_cvt_float_to_fp8(y2 * inv, __NV_SATFINITE, __NV_E4M3);
    if (j == 0) ks[kscale_at(slot, kvh, hh, bs, log2_or(bs))] = sc;
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
    const int* pages, int heads, int kvh, int hd, int bs, float scale, const int* row_list, int ldq, const float* ks) {
    pdl_entry();
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
        float dot = 0.f;
        if (ks) { // FP8 keys: e4m3 values, one scale per (slot, KV head)
            const unsigned char* kr = reinterpret_cast<const unsigned char*>(kc) + slot * width + kvoff;
#pragma unroll
            for (int j = 0; j < ATT_MAXJ; j++) {
                const int d = lane + 32 * j;
                if (d < hd) dot += qv[j] * e4m3x2_float2(kr[d]).x;
            }
            dot = warp_sum(dot) * ks[kscale_at((int)slot, kvh, kvoff / hd, bs, log2_or(bs))] * scale;
        } else {
            const bf16* kr = kc + slot * width + kvoff;
#pragma unroll
            for (int j = 0; j < ATT_MAXJ; j++) {
                const int d = lane + 32 * j;
                if (d < hd) dot += qv[j] * ld(kr + d);
            }
            dot = warp_sum(dot) * scale;
        }
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

#define DEC_WARPS 4
#define DEC_THREADS (DEC_WARPS * 32)
#define DEC_MAXG 8
#define DEC_TILE 16 // positions per warp tile
#define LOG2E 1.4426950408889634f

// mma8: d += a * b on the tensor cores (m16n8k16, bf16 in, f32 out) for
// rows 0-7 of A only: rows 8-15 are zero and their outputs dropped. a0/a2
// hold A[lane/4][2*(lane%4) + {0,1}] and the same 8 columns on; b0/b1
// B[2*(lane%4) + {0,1}][lane/4] and 8 rows on; d[0..1] is
// D[lane/4][2*(lane%4) + {0,1}].
__device__ __forceinline__ void mma8(float* d, unsigned a0, unsigned a2, unsigned b0, unsigned b1) {
    float x2, x3;
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%10,%10};\n"
        : "+f"(d[0]), "+f"(d[1]), "=f"(x2), "=f"(x3)
        : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1), "f"(0.f));
}

// mma8_e4m3: d += a * b as mma8 does, on the FP8 tensor cores (m16n8k32,
// e4m3 in, f32 out) for rows 0-7 of A: a0/a2 hold A[lane/4][4*(lane%4) ..
// +3] and the same 4 columns 16 on; b0/b1 B[4*(lane%4) .. +3][lane/4] and 16
// rows on. Rows 8-15 are zero and their outputs go to scratch registers, so
// two calls on different d are independent (mma_e4m3's c[2..3] would chain
// them).
__device__ __forceinline__ void mma8_e4m3(float* d, unsigned a0, unsigned a2, unsigned b0, unsigned b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 890
    __trap(); // no FP8 tensor cores before sm_89 (DEC_QK8 keeps them out)
#else
    float x2, x3;
    asm("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%10,%10};\n"
        : "+f"(d[0]), "+f"(d[1]), "=f"(x2), "=f"(x3)
        : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1), "f"(0.f));
#endif
}

// QK8 (sm_89 and later, FP8 keys, head_dim >= 64): attn_decode8 computes
// Q K^T on the FP8 tensor cores (m16n8k32 e4m3) from the cached e4m3 keys
// as they are, with Q quantized per head (amax / 448, as the keys are per
// token) once per block: issue 14's "QK^T in FP8, PV in BF16". S is scaled
// by both scales; P V stays bf16. The raw key rows are XOR-swizzled so that
// ldmatrix reads them without bank conflicts. Before sm_89 (and at smaller
// head dims) each K tile is widened to bf16 in shared memory for bf16 MMAs.
// PEFTD_ATTN_NO_QK8 (PEFTD_KERNEL_DEFINES) widens them on every card: the
// A/B of QK8's quality and speed against the widened keys on one model.
// PEFTD_ATTN_DIAG_NOSCALE, a diagnostic for timing only (its results are
// wrong): QK8 neither copies nor applies the keys' per-token scales (4
// bytes a row at a 4 * kvh-byte stride), to see what those reads cost.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890 && !defined(PEFTD_ATTN_NO_QK8)
#define DEC_QK8 1
#else
#define DEC_QK8 0
#endif

// xor_slot: the 16-byte slot of chunk c of row r in a tile whose rows are
// C chunks: XOR-swizzled so that the 8 rows an ldmatrix reads (one chunk
// each) fall in 8 different bank groups.
template <int C> __device__ __forceinline__ int xor_slot(int r, int c) {
    return C >= 8 ? (c ^ (r & 7)) : (c ^ ((r >> 1) & (C - 1)));
}

// DecShape: attn_decode_d{HD}'s shared memory, per warp: ST cp.async
// stages of a DEC_TILE-position tile (bf16, 4 warps: 4 * ST * 64 * HD
// bytes, 96 KB at HD 128, 128 KB at 256).
template <int HD, bool K8 = false> struct DecShape {
    static constexpr bool QK8 = DEC_QK8 && K8 && HD >= 64; // e4m3 Q K^T on the raw key rows
    static constexpr int C = HD / 8;                       // 16-byte chunks per K or V row
    static constexpr int ST = HD >= 256 ? 2 : 3;           // stages per warp
    static constexpr int TILE_B = DEC_TILE * HD * 2;       // bytes of bf16 K (or V) per tile
    // FP8 keys: a stage holds the tile's V rows, its e4m3 K rows as read
    // (RAW_B) and their scales (SC_B). Without QK8 the warp widens the K
    // rows of the tile it computes into its one bf16 K tile, after the
    // stages (written and read within one iteration, so one suffices: 89.5
    // KB a block of 4 warps at HD 128). QK8 reads the e4m3 rows as they are
    // and leaves that tile's room empty: two blocks an SM, as in bf16. At
    // three (73 KB) the split plan takes 3 splits at batch 64 with
    // 4,096-token contexts: 12.29 ms a step against 11.44 at two; 4 stages
    // in that room (99 KB) ran as fast as 3 (v0.25). bf16: a stage holds
    // the K and V tiles. The tile's 16 scales (64 bytes) take 128, so that
    // every stage and every warp's buffers start on a 128-byte line: at
    // 64 bytes off, half the stages' copies and reads took an extra
    // shared-memory wavefront (v0.53: 4,096-token contexts at 64 rows,
    // 11.06 -> 10.98 ms a step).
    static constexpr int RAW_B = K8 ? DEC_TILE * HD : 0;
    static constexpr int SC_B = K8 ? 128 : 0;
    static constexpr int STAGE_B = (K8 ? 1 : 2) * TILE_B + RAW_B + SC_B;
    static constexpr int WARP_B = ST * STAGE_B + (K8 ? TILE_B : 0);
    static_assert(STAGE_B % 128 == 0 && WARP_B % 128 == 0, "stages on 128-byte lines");
    // the K tile and the V tile of tile k in the warp's buffers at wb (the
    // e4m3 rows follow the V tile, their scales the rows)
    static __device__ __forceinline__ unsigned kt(unsigned wb, int k) { return K8 ? wb + ST * STAGE_B : wb + (k % ST) * STAGE_B; }
    static __device__ __forceinline__ unsigned vt(unsigned wb, int k) { return wb + (k % ST) * STAGE_B + (K8 ? 0 : TILE_B); }
    // swz: the 16-byte slot of chunk c of row r within its row, XOR-swizzled
    // so that the 8 rows an ldmatrix reads fall in 8 different bank groups
    static __device__ __forceinline__ int swz(int r, int c) { return xor_slot<C>(r, c); }
    // at: the shared-memory address of chunk c of row r of a tile at base
    static __device__ __forceinline__ unsigned at(unsigned base, int r, int c) { return base + r * HD * 2 + swz(r, c) * 16; }
    // rsw: the 16-byte slot of chunk c of e4m3 key row r (HD bytes, HD / 16
    // chunks) in the raw tile: as stored unless QK8 reads the rows by
    // ldmatrix, then XOR-swizzled as swz does for bf16 rows
    static __device__ __forceinline__ int rsw(int r, int c) {
        if constexpr (!QK8) return c;
        return xor_slot<HD / 16>(r, c);
    }
};

// Thread-block clusters (sm_90): this block's rank in its cluster, a barrier
// over the cluster's threads (its writes to shared memory visible to the
// other blocks after it), and a float read from shared memory of the
// cluster's block rank (the address p has in every block of the cluster).
__device__ __forceinline__ unsigned cluster_rank() {
    unsigned r = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
#endif
    return r;
}
__device__ __forceinline__ void cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#else
    __trap(); // no clusters before sm_90 (the Go side never asks for them there)
#endif
}
__device__ __forceinline__ float ld_cluster(const float* p, unsigned rank) {
    float v = 0.f;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    unsigned r;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(r) : "r"(a), "r"(rank));
    asm volatile("ld.shared::cluster.f32 %0, [%1];\n" : "=f"(v) : "r"(r) : "memory");
#endif
    return v;
}

// cluster_amax: the max |v| of a row spread over a cluster of NCL blocks,
// from each thread's m and non-finite flag bad (amax8 / amax1): the block's
// max (or +Inf when any value is not finite) goes to cm, this block's
// shared float, and every block reads the NCL blocks' values through
// distributed shared memory. +Inf back means a non-finite value: e4m3_scale
// takes `amax == +Inf` as its flag. A max does not depend on the order, so
// every block gets the bits one block over the whole row would.
template <int NCL>
__device__ __forceinline__ float cluster_amax(float m, int bad, float* sh, float* cm) {
    bad = __syncthreads_or(bad);
    const float bm = block_max(m, sh);
    if (threadIdx.x == 0) *cm = bad ? __int_as_float(0x7f800000) : bm;
    cluster_sync();
    float amax = 0.f;
#pragma unroll
    for (unsigned k = 0; k < NCL; k++) amax = fmaxf(amax, ld_cluster(cm, k));
    cluster_sync(); // no block leaves while another still reads its shared memory
    return amax;
}

// DEC_CLUSTER: the most splits attn_decode merges through a cluster's shared
// memory (opts bit 2; 8: the portable cluster size).
#define DEC_CLUSTER 8

// dec_cluster_merge: the splits of a (sequence, KV head) as one cluster
// (opts bit 2): each block has left its partial (cA [G][HD], cM, cL [G]:
// the sum, max and denominator over its positions; cL 0 for none) in its
// shared memory; block r of the S writes outputs [r * per, (r + 1) * per)
// of the G * HD, reading every block's partial straight from its shared
// memory (no partials through L2, no counter). Sums in split order.
template <int HD, int NT>
__device__ __forceinline__ void dec_cluster_merge(bf16* __restrict__ out, const float* cA, const float* cM, const float* cL,
                                                  int G, int S, int heads, int kh, int row, int tid) {
    cluster_sync(); // every block's partial is in its shared memory
    const int n = G * HD, per = (n + S - 1) / S, r = (int)cluster_rank();
    for (int idx = r * per + tid; idx < min(n, (r + 1) * per); idx += NT) {
        const int hg = idx / HD, d = idx - hg * HD;
        float Ms[DEC_CLUSTER], Ls[DEC_CLUSTER], As[DEC_CLUSTER];
#pragma unroll
        for (int s = 0; s < DEC_CLUSTER; s++) {
            Ms[s] = NEG_INF, Ls[s] = 0.f, As[s] = 0.f;
            if (s < S) {
                Ms[s] = ld_cluster(cM + hg, s);
                Ls[s] = ld_cluster(cL + hg, s);
                As[s] = ld_cluster(cA + idx, s);
            }
        }
        float M = NEG_INF;
#pragma unroll
        for (int s = 0; s < DEC_CLUSTER; s++)
            if (Ls[s] > 0.f) M = fmaxf(M, Ms[s]);
        float L = 0.f, A = 0.f;
#pragma unroll
        for (int s = 0; s < DEC_CLUSTER; s++)
            if (Ls[s] > 0.f) {
                const float w = exp2f(Ms[s] - M);
                L += Ls[s] * w;
                A += As[s] * w;
            }
        out[(i64)row * heads * HD + (i64)(kh * G + hg) * HD + d] = tobf(L > 0.f ? A / L : 0.f);
    }
    cluster_sync(); // no block leaves while another still reads its shared memory
}

// dec_merge: attn_decode's last block of a (sequence, KV head) writes the
// output rows of its G query heads from the nv splits' partials (part) and
// their merge weights (ws: [g][64], the 1/L folded in): two outputs per
// thread (float2: a partial row is HD + 2 floats, so even d is 8-byte
// aligned), W splits' loads in flight at once (summed in split order
// whatever W is).
template <int HD, int W, int NT>
__device__ __forceinline__ void dec_merge(bf16* __restrict__ out, const float* __restrict__ part, const float* ws, int di,
                                          int heads, int kh, int G, int nsplit, int nv, int row, int tid) {
    for (int idx = 2 * tid; idx < G * HD; idx += 2 * NT) {
        const int hg = idx / HD, d = idx - hg * HD, h = kh * G + hg;
        const float* pp = part + (i64)(di * heads + h) * nsplit * (HD + 2) + d;
        const float* w = ws + hg * 64;
        float2 A = make_float2(0.f, 0.f);
        for (int i0 = 0; i0 < nv; i0 += W) {
            float2 v[W];
#pragma unroll
            for (int j = 0; j < W; j++)
                v[j] = i0 + j < nv ? __ldcg(reinterpret_cast<const float2*>(pp + (i0 + j) * (HD + 2))) : make_float2(0.f, 0.f);
#pragma unroll
            for (int j = 0; j < W; j++) {
                const float wi = i0 + j < nv ? w[i0 + j] : 0.f;
                A.x += v[j].x * wi;
                A.y += v[j].y * wi;
            }
        }
        *reinterpret_cast<__nv_bfloat162*>(out + (i64)row * heads * HD + (i64)h * HD + d) = __floats2bfloat162_rn(A.x, A.y);
    }
}

#ifdef PEFTD_ATTN_TS
// PEFTD_ATTN_TS (a diagnostic build for TestDecodeBench's PEFTD_ATTN_TS=1):
// attn_decode records %globaltimer at its phases into part (which the
// Backend passes with one split too under kernelForce.attnTS, and which
// holds nothing when the splits merge as a cluster or there is one split):
// per block, ATS_W words a warp (entry, after griddepcontrol.wait, its
// first tile landed, its last tile done) and ATS_B for the block.
#define ATS_W 4
#define ATS_B 8 // the block's words: warps merged, end, warp 0's tiles, warp 0 at griddepcontrol.wait (its metadata read, its early tiles issued), after the merge's first barrier, after its second, warp 0's metadata chain done (its pages loaded), the SM it ran on (%smid)
#endif
// DEC_MERGE4 (default 1): attn_decode merges its warps four outputs a
// thread after one thread a head works out the warp weights; 0: one output a
// thread, each working out its head's weights (v0.46's loop, for A/Bs).
// Both give the same bits.
#ifndef DEC_MERGE4
#define DEC_MERGE4 1
#endif

// dec_load_q: a decode row's Q for query heads kh * G .. + G - 1 as MMA A
// fragments (rows: the G heads, lane group g; rows past G zero): bf16 pairs
// in qa, or with QK8 e4m3 values in qa8 (A[g][32s + 16h + 4tig ..+3] in
// qa8[s][h]) and this lane's head's scale in qsc (amax / 448).
// l2: the bf16 values are read from L2 (ld.global.cg), not through L1
// (attn_decode after attn_prefill, opts bit 5: it reads q without a
// griddepcontrol.wait of its own).
template <int HD, bool K8>
__device__ __forceinline__ void dec_load_q(const bf16* __restrict__ q, int row, int ldq, int kh, int G, int g, int tig,
                                           unsigned (&qa)[HD / 16][2], unsigned (&qa8)[DecShape<HD, K8>::QK8 ? HD / 32 : 1][2],
                                           float& qsc, bool l2) {
    typedef DecShape<HD, K8> D;
    qsc = 1.f;
    if constexpr (D::QK8) {
        // the head's HD values: 8 per k32 step of each of its 4 lanes
        float v[HD / 32][8], am = 0.f;
        const bf16* qh = q + (i64)row * ldq + (i64)(kh * G + min(g, G - 1)) * HD;
#pragma unroll
        for (int s2 = 0; s2 < HD / 32; s2++)
#pragma unroll
            for (int h = 0; h < 4; h++) { // two bf16 at a time
                const int d = 32 * s2 + 16 * (h >> 1) + 4 * tig + 2 * (h & 1);
                const unsigned* up = reinterpret_cast<const unsigned*>(qh + d);
                const unsigned u = g < G ? (l2 ? __ldcg(up) : *up) : 0u;
                const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u));
                v[s2][2 * h] = f.x, v[s2][2 * h + 1] = f.y;
                am = fmaxf(am, fmaxf(fabsf(f.x), fabsf(f.y)));
            }
        am = fmaxf(am, __shfl_xor_sync(0xffffffffu, am, 1));
        am = fmaxf(am, __shfl_xor_sync(0xffffffffu, am, 2));
        const float inv = am > 0.f ? fminf(448.f / am, 3.402823466e38f) : 0.f;
        qsc = am > 0.f ? am / 448.f : 1.f;
#pragma unroll
        for (int s2 = 0; s2 < HD / 32; s2++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const unsigned short lo = __nv_cvt_float2_to_fp8x2(make_float2(v[s2][4 * h] * inv, v[s2][4 * h + 1] * inv), __NV_SATFINITE, __NV_E4M3);
                const unsigned short hi = __nv_cvt_float2_to_fp8x2(make_float2(v[s2][4 * h + 2] * inv, v[s2][4 * h + 3] * inv), __NV_SATFINITE, __NV_E4M3);
                qa8[s2][h] = (unsigned)lo | ((unsigned)hi << 16);
            }
    } else {
#pragma unroll
        for (int ks = 0; ks < HD / 16; ks++) {
            qa[ks][0] = qa[ks][1] = 0u;
            if (g < G) {
                const bf16* qh = q + (i64)row * ldq + (i64)(kh * G + g) * HD;
                const int d = ks * 16 + tig * 2;
                const unsigned* u = reinterpret_cast<const unsigned*>(qh + d);
                qa[ks][0] = l2 ? __ldcg(u) : u[0];
                qa[ks][1] = l2 ? __ldcg(u + 4) : u[4];
            }
        }
    }
}

// dec_tile: one warp's 16-position tile whose K (or e4m3 K rows and their
// scales) and V rows have landed in shared memory at kb / vb: S = Q K^T,
// the online softmax (positions from pb, this lane's first S column, at or
// past p1 masked) and O += P V into o, m and l.
template <int HD, bool K8>
__device__ __forceinline__ void dec_tile(unsigned kb, unsigned vb, int lane, int tig,
                                         const unsigned (&qa)[HD / 16][2], const unsigned (&qa8)[DecShape<HD, K8>::QK8 ? HD / 32 : 1][2],
                                         float qs, int pb, int p1, float (&o)[HD / 8][2], float& m, float& l) {
    typedef DecShape<HD, K8> D;
    extern __shared__ __align__(128) unsigned char dsm[]; // the kernel's dynamic shared memory
    float ksc[2][2] = {{1.f, 1.f}, {1.f, 1.f}}; // the scales of this lane's S columns
    if constexpr (D::QK8) { // the keys' scales multiply S below; the e4m3 rows are read as they are
#ifndef PEFTD_ATTN_DIAG_NOSCALE
        const float* sc8 = reinterpret_cast<const float*>(dsm + (vb - (unsigned)__cvta_generic_to_shared(dsm)) + D::TILE_B + D::RAW_B);
#pragma unroll
        for (int nt = 0; nt < 2; nt++) { // a column pair's two scales: one 8-byte load
            const float2 p = *reinterpret_cast<const float2*>(sc8 + nt * 8 + tig * 2);
            ksc[nt][0] = p.x, ksc[nt][1] = p.y;
        }
#endif
    } else if (K8) {
        // widen the e4m3 rows into the bf16 K tile (exact: bf16 holds
        // every e4m3 value); the scales multiply S below
        const unsigned sm0 = (unsigned)__cvta_generic_to_shared(dsm);
        unsigned char* st = dsm + (kb - sm0);
        const unsigned char* raw = dsm + (vb - sm0) + D::TILE_B;
        const float* sc8 = reinterpret_cast<const float*>(raw + D::RAW_B);
#pragma unroll
        for (int i = 0; i < D::C / 2; i++) {
            const int idx = lane + 32 * i, r = idx / D::C, c = idx % D::C;
            const uint2 w = *reinterpret_cast<const uint2*>(raw + r * HD + c * 8);
            *reinterpret_cast<uint4*>(st + r * HD * 2 + D::swz(r, c) * 16) = widen8_e4m3(w);
        }
#pragma unroll
        for (int nt = 0; nt < 2; nt++)
#pragma unroll
            for (int e = 0; e < 2; e++) ksc[nt][e] = sc8[nt * 8 + tig * 2 + e];
        __syncwarp(); // the whole bf16 tile is written
    }
    // S[g][pos]: positions 0-7 in s[0], 8-15 in s[1]
    float sc[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
    if constexpr (D::QK8) {
        // one ldmatrix.x4 of the raw rows: chunks 4kk..4kk+3 (64 key
        // dims) of positions nt*8..+7, the B fragments of two k32 steps
        const unsigned rb = vb + D::TILE_B;
#pragma unroll
        for (int kk = 0; kk < HD / 64; kk++) {
#pragma unroll
            for (int nt = 0; nt < 2; nt++) {
                unsigned b[4];
                const int r = nt * 8 + (lane & 7), c = 4 * kk + (lane >> 3);
                ldsm4(rb + r * HD + D::rsw(r, c) * 16, b);
                mma8_e4m3(sc[nt], qa8[2 * kk][0], qa8[2 * kk][1], b[0], b[1]);
                mma8_e4m3(sc[nt], qa8[2 * kk + 1][0], qa8[2 * kk + 1][1], b[2], b[3]);
            }
        }
    } else {
#pragma unroll
        for (int kk = 0; kk < D::C / 4; kk++) {
#pragma unroll
            for (int nt = 0; nt < 2; nt++) {
                unsigned b[4];
                const int r = nt * 8 + (lane & 7), c = 4 * kk + (lane >> 3);
                ldsm4(D::at(kb, r, c), b);
                mma8(sc[nt], qa[2 * kk][0], qa[2 * kk][1], b[0], b[1]);
                mma8(sc[nt], qa[2 * kk + 1][0], qa[2 * kk + 1][1], b[2], b[3]);
            }
        }
    }
    float mx = NEG_INF;
#pragma unroll
    for (int nt = 0; nt < 2; nt++)
#pragma unroll
        for (int e = 0; e < 2; e++) {
            sc[nt][e] = pb + nt * 8 + e < p1 ? sc[nt][e] * ksc[nt][e] * qs : NEG_INF;
            mx = fmaxf(mx, sc[nt][e]);
        }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float mn = fmaxf(m, mx);
    const float corr = mn == NEG_INF ? 1.f : exp2f(m - mn);
    float sum = 0.f;
#pragma unroll
    for (int nt = 0; nt < 2; nt++)
#pragma unroll
        for (int e = 0; e < 2; e++) {
            sc[nt][e] = sc[nt][e] == NEG_INF ? 0.f : exp2f(sc[nt][e] - mn);
            sum += sc[nt][e];
        }
    l = l * corr + sum;
    m = mn;
    // P = hi + lo, both bf16: two MMAs keep P's float32 precision
    unsigned ph[2], pl[2];
#pragma unroll
    for (int nt = 0; nt < 2; nt++) {
        const bf16 h0 = tobf(sc[nt][0]), h1 = tobf(sc[nt][1]);
        ph[nt] = pack_bf2(__bfloat162float(h0), __bfloat162float(h1));
        pl[nt] = pack_bf2(sc[nt][0] - __bfloat162float(h0), sc[nt][1] - __bfloat162float(h1));
    }
#pragma unroll
    for (int j = 0; j < D::C; j += 2) {
        unsigned b[4];
        const int r = ((lane >> 3) & 1) * 8 + (lane & 7), c = j + (lane >> 4);
        ldsm4t(D::at(vb, r, c), b);
        o[j][0] *= corr, o[j][1] *= corr, o[j + 1][0] *= corr, o[j + 1][1] *= corr;
        mma8(o[j], ph[0], ph[1], b[0], b[1]);
        mma8(o[j], pl[0], pl[1], b[0], b[1]);
        mma8(o[j + 1], ph[0], ph[1], b[2], b[3]);
        mma8(o[j + 1], pl[0], pl[1], b[2], b[3]);
    }
    __syncwarp(); // done reading the buffer the next issue overwrites
}

// attn_decode_d{32,64,128,256}: split-KV (flash-decoding) attention for
// decode sequences (one new row each, already stored in the cache), on the
// tensor cores. grid (nDec, kvh, nsplit), block DEC_THREADS, dynamic shared
// DEC_WARPS * DecShape<HD>::WARP_B bytes. A block takes positions
// [split*chunk, split*chunk + chunk) of one sequence's cache for one KV head
// and the G = heads/kvh <= 8 query heads that share it, so each K/V row is
// read once.
//
// Each warp takes 16-position tiles (the block's warps interleave) and runs
// its own pipeline: cp.async copies a tile's K and V rows (zero-filled past
// the chunk) into the warp's shared buffers DecShape::ST - 1 tiles ahead of
// the one it computes; each lane loads the page slot of one row of the tile
// after that one tile earlier, so no dependent load stalls the loop. Per
// tile: S = Q K^T as m16n8k16 MMAs with the G query heads as the rows of A
// (the other rows zero) and K read by ldmatrix; an online softmax over the
// tile in the log2 domain (scale*log2(e) folded in, exp2f; a row's max over
// 4 lanes by 2 shuffles); O += P V with P straight from S's accumulators as
// the A fragment, split into two bf16 parts (hi + lo: P keeps its float32
// precision, so the result does not depend on where tiles and splits
// begin), and V read by ldmatrix.trans. The warps
// merge through shared memory at the end.
//
// nsplit == 1: the block writes the output row. Else it writes (acc[hd],
// max, sum) per (sequence, head, split) to part, and the last block of the
// (sequence, KV head) to finish (a counter in done, left at zero again)
// merges the splits that hold positions into the output row: no second
// launch. Each sequence's chunk is its context split nsplit ways (at least
// 32 positions, a multiple of 8; splits past the context are empty), so one
// recorded launch fits every step. A sequence with no context
// (padding) gets zeros; a dec entry whose sequence is -1 none (its blocks
// exit). dec[4 * di] = {its row, its context, the offset of its page ids in
// pages, its sequence}: one load before the page ids, not two (v0.48). q's
// rows are ldq values apart. Requires nsplit <= 64.
//
// opts (the Backend's attnOpts; bits 0-2 by default on sm_90): bit 0 issues
// a warp's first tiles before griddepcontrol.wait when they do not hold
// the newest position; bit 1 merges the splits with 16 loads in flight,
// not 8 (dec_merge). Neither changes a result bit. Bit 2: the nsplit <=
// DEC_CLUSTER splits of a (sequence, KV head) are one thread-block cluster
// (launched with clusters of 1 x 1 x nsplit) and merge through each other's
// shared memory (dec_cluster_merge). Bit 4: the blocks head-major (the
// KV head fastest in launch order; the same result bits).
// dec_entry: the dec entry (sequence) of this attn_decode block: blockIdx.x,
// or with opts bit 4 (head-major) the launch order's sequence.
__device__ __forceinline__ int dec_entry(int opts) {
    return (opts & 16) ? (blockIdx.y * gridDim.x + blockIdx.x) / gridDim.y : blockIdx.x;
}
// dec_late: opts bit 5 where it applies (bf16 keys): no wait before the
// tiles, a wait at the end (attn_decode_late).
template <bool K8>
__device__ __forceinline__ bool dec_late(int opts) { return !K8 && (opts & 32); }

template <int HD, bool K8, int W>
__device__ __forceinline__ void attn_decode_body(
    bf16* __restrict__ out, float* __restrict__ part, int* __restrict__ done, const bf16* __restrict__ q,
    const bf16* __restrict__ kc, const bf16* __restrict__ vc, const int* __restrict__ dec,
    const int* __restrict__ pages, int heads, int kvh, int bs, float scale, int nsplit,
    int ldq, const float* __restrict__ ks, int opts) {
    typedef DecShape<HD, K8> D;
    extern __shared__ __align__(128) unsigned char dsm[];
    // opts bit 4: the blocks in launch order take a sequence's KV heads one
    // after another (head-major), not one KV head's sequences, so resident
    // blocks read whole cache rows (FP8 keys, v0.53)
    // (di is dec_entry's index written out with kh's: through the helper
    // NVRTC 12.4 compiles every attn_decode differently, session 87's sass-diff)
    const int lin = blockIdx.y * gridDim.x + blockIdx.x;
    const int di = (opts & 16) ? lin / gridDim.y : blockIdx.x, kh = (opts & 16) ? lin % gridDim.y : blockIdx.y;
    const int sp = blockIdx.z, tid = threadIdx.x;
    const int lane = tid & 31, warp = tid >> 5, g = lane >> 2, tig = lane & 3;
    // The step's metadata (dec, pages) is copied in before
    // the step's first kernel and written by none, so it is read before
    // griddepcontrol.wait: with PDL the chain of loads up to the first
    // tile's cache rows runs under the kernel before (rope_store, which
    // writes q and the newest K/V row: nothing of them is read before it).
#ifdef PEFTD_ATTN_TS
    unsigned long long ts_entry = globaltimer_ns(), ts_wait = 0, ts_first = 0;
    unsigned long long* ats = reinterpret_cast<unsigned long long*>(part) +
                              ((i64)(blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x) * (ATS_W * W + ATS_B);
#endif
    // opts bit 5 (late; bf16 keys): the kernel before is attn_prefill,
    // whose blocks all passed their griddepcontrol.wait (rope_store done,
    // its writes in L2) before this kernel's blocks were scheduled. So this
    // one reads q and the cache at once (q from L2: dec_load_q's l2, the
    // rows by cp.async.cg) and runs beside attn_prefill; its blocks wait for
    // attn_prefill only at their end (attn_decode_late), so the kernel after
    // this one still finds both kernels' rows written.
    const bool late = dec_late<K8>(opts);
    const int4 e = __ldg(reinterpret_cast<const int4*>(dec) + di);
    if (e.w < 0) { // no sequence (a recording's spare entry)
        if (late)
            pdl_trigger();
        else
            pdl_entry();
        return;
    }
    const int row = e.x, ctx = e.y, poff = e.z;
    const int G = heads / kvh, width = kvh * HD;
    const int chunk = max(32, (((ctx + nsplit - 1) / nsplit) + 7) & ~7);
    const int p0 = sp * chunk, p1 = min(ctx, p0 + chunk);
    const int ntiles = p0 < p1 ? (p1 - p0 + DEC_TILE - 1) / DEC_TILE : 0;
    const int nk = ntiles > warp ? (ntiles - warp + W - 1) / W : 0; // this warp's tiles
    float o[D::C][2], m = NEG_INF, l = 0.f; // O[g][8j + 2*tig + {0,1}], the row's max and this lane's part of its sum
#pragma unroll
    for (int j = 0; j < D::C; j++) o[j][0] = o[j][1] = 0.f;
    const bool pow2 = (bs & (bs - 1)) == 0;
    const int bsh = __ffs(bs) - 1;
    // slot, next: the cache rows of row (lane % 16) of the next tile to
    // issue and of the one after it (-1: past the chunk). A page id is
    // loaded two tiles before its copies are issued, so its latency hides
    // behind two tiles' arithmetic, not one.
    int slot = -1, next = -1;
    auto rows = [&](int k) {
        const int p = p0 + (warp + k * W) * DEC_TILE + (lane & 15);
        int r = -1;
        if (p < p1) {
            const int pi = pow2 ? p >> bsh : p / bs;
            r = __ldg(pages + poff + pi) * bs + (p - pi * bs);
        }
        return r;
    };
    auto advance = [&](int k) { // slot <- next <- tile k's rows
        slot = next;
        next = rows(k);
    };
    if (nk > 0) {
        slot = rows(0);
        next = rows(1);
    }
#ifdef PEFTD_ATTN_TS
    asm volatile("" ::"r"(slot), "r"(next)); // the chain's last loads (the pages) have landed
    const unsigned long long ts_meta = globaltimer_ns();
#endif
    const unsigned wbase = (unsigned)__cvta_generic_to_shared(dsm) + warp * D::WARP_B;
    auto issue = [&](int k) {
        if (k < nk) {
            const unsigned kb = D::kt(wbase, k), vb = D::vt(wbase, k);
#pragma unroll
            for (int i = 0; i < D::C / 2; i++) {
                const int idx = lane + 32 * i, r = idx / D::C, c = idx % D::C;
                const int sl = __shfl_sync(0xffffffffu, slot, r);
                const i64 off = (i64)max(sl, 0) * width + (i64)kh * HD + c * 8;
                const unsigned so = r * HD * 2 + D::swz(r, c) * 16;
                if (!K8) cp_async16(kb + so, kc + off, sl >= 0 ? 16 : 0);
                cp_async16(vb + so, vc + off, sl >= 0 ? 16 : 0);
            }
            if (K8) {
                // the e4m3 rows (HD bytes each, HD / 16 chunks) and their scales
                const unsigned rb = vb + D::TILE_B, sb = rb + D::RAW_B;
                const unsigned char* k8 = reinterpret_cast<const unsigned char*>(kc);
#pragma unroll
                for (int i = 0; i < HD / 32; i++) {
                    const int idx = lane + 32 * i, r = idx / (HD / 16), c = idx % (HD / 16);
                    const int sl = __shfl_sync(0xffffffffu, slot, r);
                    cp_async16(rb + r * HD + D::rsw(r, c) * 16, k8 + (i64)max(sl, 0) * width + (i64)kh * HD + c * 16, sl >= 0 ? 16 : 0);
                }
#ifndef PEFTD_ATTN_DIAG_NOSCALE
                if (lane < DEC_TILE) cp_async4(sb + 4 * lane, ks + kscale_at(max(slot, 0), kvh, kh, bs, pow2 ? bsh : -1), slot >= 0 ? 4 : 0);
#endif
            }
        }
        cp_async_commit(); // empty past the end: the group count stays uniform
    };
    // With early (opts bit 0), the first tiles that do not hold the newest
    // position (ctx - 1, whose K/V row rope_store writes) are issued before
    // griddepcontrol.wait: older cache rows are written by no kernel of the
    // step, so their DRAM latency runs under the kernel before.
    int pre = 0;
    if ((opts & 1) && nk > 0) {
        auto safe = [&](int k) { return late || k >= nk || min(p1, p0 + (warp + k * W) * DEC_TILE + DEC_TILE) <= ctx - 1; };
        for (; pre < D::ST - 1 && safe(pre); pre++) {
            issue(pre);
            advance(pre + 2);
        }
    }
#ifdef PEFTD_ATTN_TS
    const unsigned long long ts_pre = globaltimer_ns();
#endif
    if (late)
        pdl_trigger();
    else
        pdl_entry();
#ifdef PEFTD_ATTN_TS
    ts_wait = globaltimer_ns();
#endif
    if (nk > 0) {
        unsigned qa[HD / 16][2];                // A fragments of Q (rows: the query heads)
        unsigned qa8[D::QK8 ? HD / 32 : 1][2]; // QK8: e4m3 Q (dec_load_q)
        float qsc;                             // QK8: this lane's head's Q scale
        dec_load_q<HD, K8>(q, row, ldq, kh, G, g, tig, qa, qa8, qsc, late);
        const float qs = scale * LOG2E * qsc;
        for (int k = pre; k < D::ST - 1; k++) {
            issue(k);
            advance(k + 2);
        }
        for (int k = 0; k < nk; k++) {
            issue(k + D::ST - 1);   // slot holds its rows
            advance(k + D::ST + 1); // used two iterations on: its latency hides behind two tiles
            cp_async_wait<D::ST - 1>();
            __syncwarp(); // every lane's copies of tile k have landed
#ifdef PEFTD_ATTN_TS
            if (k == 0) ts_first = globaltimer_ns();
#endif
            const unsigned kb = D::kt(wbase, k), vb = D::vt(wbase, k);
            dec_tile<HD, K8>(kb, vb, lane, tig, qa, qa8, qs, p0 + (warp + k * W) * DEC_TILE + tig * 2, p1, o, m, l);
        }
        cp_async_wait<0>();
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
    }
#ifdef PEFTD_ATTN_TS
    const bool ats_on = ((opts & 4) || nsplit == 1) && part != nullptr; // part: kernelForce.attnTS
    if (ats_on && lane == 0) {
        ats[ATS_W * warp] = ts_entry;
        ats[ATS_W * warp + 1] = ts_wait;
        ats[ATS_W * warp + 2] = ts_first;
        ats[ATS_W * warp + 3] = globaltimer_ns();
    }
#endif
    // merge the warps: wo[(warp*G + g)*HD + d], wm/wl[warp*G + g]
    float* wo = reinterpret_cast<float*>(dsm);
    float* wm = wo + W * G * HD;
    float* wl = wm + W * G;
    const bool clu = (opts & 4) && nsplit > 1; // the splits are a cluster (dec_cluster_merge)
    float* cA = wl + W * G + 8;         // this block's partial, for the cluster (16-byte aligned: W * G is even)
    float* cM = cA + G * HD;
    float* cL = cM + G;
    float* hw = cL + 8;                 // DEC_MERGE4: [W][8] warp i's weight for head g (0: no positions)
    float* hM = hw + 8 * W;             // [8] head g's max over the warps, hL [8] its denominator
    float* hL = hM + 8;                 // (runtime/gpu decMergeFloats: the whole area)
    __syncthreads(); // the stage buffers become the merge area
#ifdef PEFTD_ATTN_TS
    if (ats_on && tid == 0) ats[ATS_W * W + 4] = globaltimer_ns();
#endif
    if (g < G) {
#pragma unroll
        for (int j = 0; j < D::C; j++) {
            wo[(warp * G + g) * HD + 8 * j + tig * 2] = o[j][0];
            wo[(warp * G + g) * HD + 8 * j + tig * 2 + 1] = o[j][1];
        }
        if (tig == 0) {
            wm[warp * G + g] = m;
            wl[warp * G + g] = l;
        }
    }
    __syncthreads();
#ifdef PEFTD_ATTN_TS
    if (ats_on && tid == 0) ats[ATS_W * W + 5] = globaltimer_ns();
#endif
#if DEC_MERGE4
    // each head's max, warp weights and denominator once (G threads), then
    // four outputs a thread: the same sums in warp order as the loop below,
    // with the weights' chain (loads, exp2f) off the outputs' loop
    if (tid < G) {
        const int hg = tid;
        float M = NEG_INF;
        for (int i = 0; i < W; i++)
            if (wl[i * G + hg] > 0.f) M = fmaxf(M, wm[i * G + hg]);
        float L = 0.f;
        for (int i = 0; i < W; i++) {
            const float li = wl[i * G + hg];
            float f = 0.f;
            if (li > 0.f) {
                f = exp2f(wm[i * G + hg] - M);
                L += li * f;
            }
            hw[i * 8 + hg] = f;
        }
        hM[hg] = M;
        hL[hg] = L;
    }
    __syncthreads();
    for (int idx = 4 * tid; idx < G * HD; idx += 4 * (32 * W)) {
        const int hg = idx / HD, d = idx - hg * HD; // HD % 4 == 0: the four share a head
        float4 A = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
        for (int i = 0; i < W; i++) {
            if (wl[i * G + hg] > 0.f) {
                const float f = hw[i * 8 + hg];
                const float4 v = *reinterpret_cast<const float4*>(wo + (i * G + hg) * HD + d);
                A.x += v.x * f;
                A.y += v.y * f;
                A.z += v.z * f;
                A.w += v.w * f;
            }
        }
        const float M = hM[hg], L = hL[hg];
        const int h = kh * G + hg;
        if (nsplit == 1) {
            const __nv_bfloat162 lo = L > 0.f ? __floats2bfloat162_rn(A.x / L, A.y / L) : __floats2bfloat162_rn(0.f, 0.f);
            const __nv_bfloat162 hi = L > 0.f ? __floats2bfloat162_rn(A.z / L, A.w / L) : __floats2bfloat162_rn(0.f, 0.f);
            uint2 w2;
            w2.x = *reinterpret_cast<const unsigned*>(&lo);
            w2.y = *reinterpret_cast<const unsigned*>(&hi);
            *reinterpret_cast<uint2*>(out + (i64)row * heads * HD + (i64)h * HD + d) = w2;
        } else if (clu) { // every block, empty ones too (L 0)
            *reinterpret_cast<float4*>(cA + idx) = A;
            if (d == 0) {
                cM[hg] = M;
                cL[hg] = L;
            }
        } else if (ntiles > 0) {
            float* pp = part + ((i64)(di * heads + h) * nsplit + sp) * (HD + 2);
            pp[d] = A.x;
            pp[d + 1] = A.y;
            pp[d + 2] = A.z;
            pp[d + 3] = A.w;
            if (d == 0) {
                pp[HD] = M;
                pp[HD + 1] = L;
            }
        }
    }
#else
    for (int idx = tid; idx < G * HD; idx += (32 * W)) {
        const int hg = idx / HD, d = idx - hg * HD;
        float M = NEG_INF;
        for (int i = 0; i < W; i++)
            if (wl[i * G + hg] > 0.f) M = fmaxf(M, wm[i * G + hg]);
        float L = 0.f, A = 0.f;
        for (int i = 0; i < W; i++) {
            const float li = wl[i * G + hg];
            if (li > 0.f) {
                const float f = exp2f(wm[i * G + hg] - M);
                L += li * f;
                A += wo[(i * G + hg) * HD + d] * f;
            }
        }
        const int h = kh * G + hg;
        if (nsplit == 1) {
            out[(i64)row * heads * HD + (i64)h * HD + d] = tobf(L > 0.f ? A / L : 0.f);
        } else if (clu) { // every block, empty ones too (L 0)
            cA[idx] = A;
            if (d == 0) {
                cM[hg] = M;
                cL[hg] = L;
            }
        } else if (ntiles > 0) {
            float* pp = part + ((i64)(di * heads + h) * nsplit + sp) * (HD + 2);
            pp[d] = A;
            if (d == 0) {
                pp[HD] = M;
                pp[HD + 1] = L;
            }
        }
    }
#endif
#ifdef PEFTD_ATTN_TS
    if (ats_on && tid == 0) {
        ats[ATS_W * W] = globaltimer_ns();
        ats[ATS_W * W + 2] = nk;
        ats[ATS_W * W + 3] = ts_pre;
        ats[ATS_W * W + 6] = ts_meta;
        unsigned smid;
        asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
        ats[ATS_W * W + 7] = smid;
    }
#endif
    if (nsplit == 1) {
#ifdef PEFTD_ATTN_TS
        if (ats_on && tid == 0) ats[ATS_W * W + 1] = globaltimer_ns();
#endif
        return;
    }
    if (clu) {
        dec_cluster_merge<HD, 32 * W>(out, cA, cM, cL, G, nsplit, heads, kh, row, tid);
#ifdef PEFTD_ATTN_TS
        if (ats_on && tid == 0) ats[ATS_W * W + 1] = globaltimer_ns();
#endif
        return;
    }
    // The last split block of this (sequence, KV head) merges the partials.
    int* last = reinterpret_cast<int*>(wl + W * G);
    float* ws = reinterpret_cast<float*>(last + 4); // [g][64] merge weights
    __threadfence();
    __syncthreads();
    if (tid == 0) *last = atomicAdd(done + di * kvh + kh, 1) == nsplit - 1;
    __syncthreads();
    if (!*last) return;
    __threadfence();
    // Every split below nv wrote its partial (it holds positions), so the
    // loads below need no branch on its sum: they are issued together, a few
    // round trips to L2 for the whole merge instead of one per split and
    // output (the merge is the tail of a one-sequence step's attention).
    const int nv = ctx > 0 ? min(nsplit, (ctx + chunk - 1) / chunk) : 0; // splits that hold positions
    for (int hg = warp; hg < G; hg += W) {
        const float* pp = part + (i64)(di * heads + kh * G + hg) * nsplit * (HD + 2);
        float M0 = NEG_INF, M1 = NEG_INF, L0 = 0.f, L1 = 0.f;
        if (lane < nv) {
            const float2 ml = __ldcg(reinterpret_cast<const float2*>(pp + lane * (HD + 2) + HD));
            L0 = ml.y;
            M0 = L0 > 0.f ? ml.x : NEG_INF;
        }
        if (lane + 32 < nv) {
            const float2 ml = __ldcg(reinterpret_cast<const float2*>(pp + (lane + 32) * (HD + 2) + HD));
            L1 = ml.y;
            M1 = L1 > 0.f ? ml.x : NEG_INF;
        }
        float M = fmaxf(M0, M1);
#pragma unroll
        for (int x = 16; x > 0; x >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, x));
        const float w0 = L0 > 0.f ? exp2f(M0 - M) : 0.f, w1 = L1 > 0.f ? exp2f(M1 - M) : 0.f;
        const float L = warp_sum(L0 * w0 + L1 * w1);
        const float inv = L > 0.f ? 1.f / L : 0.f;
        ws[hg * 64 + lane] = w0 * inv;
        ws[hg * 64 + lane + 32] = w1 * inv;
    }
    __syncthreads();
    if (opts & 2)
        dec_merge<HD, 16, 32 * W>(out, part, ws, di, heads, kh, G, nsplit, nv, row, tid);
    else
        dec_merge<HD, 8, 32 * W>(out, part, ws, di, heads, kh, G, nsplit, nv, row, tid);
    if (tid == 0) done[di * kvh + kh] = 0; // ready for the next launch
}

#define ATTN_DECODE_ARGS                                                                                           \
    bf16 *out, float *part, int *done, const bf16 *q, const bf16 *kc, const bf16 *vc, const int *dec,            \
        const int *pages, int heads, int kvh, int bs, float scale, int nsplit, int ldq, const float *ks, \
        int opts
#define ATTN_DECODE_PASS \
    out, part, done, q, kc, vc, dec, pages, heads, kvh, bs, scale, nsplit, ldq, ks, opts

// attn_decode_late: with opts bit 5 (bf16 keys) a block that attended a
// sequence, and block 0 whatever it did, waits for attn_prefill (the kernel
// before) as it ends: the kernel completes after attn_prefill has, with no
// spare entry's block holding its SM until then.
template <bool K8>
__device__ __forceinline__ void attn_decode_late(const int* __restrict__ dec, int opts) {
    if (!dec_late<K8>(opts)) return;
    if (__ldg(reinterpret_cast<const int4*>(dec) + dec_entry(opts)).w >= 0 || (blockIdx.x | blockIdx.y | blockIdx.z) == 0) pdl_wait();
}
extern "C" __global__ void __launch_bounds__(DEC_THREADS) attn_decode_d32(ATTN_DECODE_ARGS) { attn_decode_body<32, false, DEC_WARPS>(ATTN_DECODE_PASS); attn_decode_late<false>(dec, opts); }
extern "C" __global__ void __launch_bounds__(DEC_THREADS) attn_decode_d64(ATTN_DECODE_ARGS) { attn_decode_body<64, false, DEC_WARPS>(ATTN_DECODE_PASS); attn_decode_late<false>(dec, opts); }
extern "C" __global__ void __launch_bounds__(DEC_THREADS) attn_decode_d128(ATTN_DECODE_ARGS) { attn_decode_body<128, false, DEC_WARPS>(ATTN_DECODE_PASS); attn_decode_late<false>(dec, opts); }
extern "C" __global__ void __launch_bounds__(DEC_THREADS) attn_decode_d256(ATTN_DECODE_ARGS) { attn_decode_body<256, false, DEC_WARPS>(ATTN_DECODE_PASS); attn_decode_late<false>(dec, opts); }
// attn_decode2_d*: the same with 2 warps a block (DEC_WARPS2; bf16 keys): a
// third of the shared memory, so twice the blocks an SM (decode steps of
// 64 rows and more: runtime/gpu decVariantFor).
#define DEC_WARPS2 2
extern "C" __global__ void __launch_bounds__(32 * DEC_WARPS2) attn_decode2_d32(ATTN_DECODE_ARGS) { attn_decode_body<32, false, DEC_WARPS2>(ATTN_DECODE_PASS); attn_decode_late<false>(dec, opts); }
extern "C" __global__ void __launch_bounds__(32 * DEC_WARPS2) attn_decode2_d64(ATTN_DECODE_ARGS) { attn_decode_body<64, false, DEC_WARPS2>(ATTN_DECODE_PASS); attn_decode_late<false>(dec, opts); }
extern "C" __global__ void __launch_bounds__(32 * DEC_WARPS2) attn_decode2_d128(ATTN_DECODE_ARGS) { attn_decode_body<128, false, DEC_WARPS2>(ATTN_DECODE_PASS); attn_decode_late<false>(dec, opts); }
extern "C" __global__ void __launch_bounds__(32 * DEC_WARPS2) attn_decode2_d256(ATTN_DECODE_ARGS) { attn_decode_body<256, false, DEC_WARPS2>(ATTN_DECODE_PASS); attn_decode_late<false>(dec, opts); }
// attn_decode_w8_d*: the same with 8 warps a block (DEC_WARPS8; bf16 keys,
// head_dim up to 128: 192 KB there, one block an SM). Steps whose (sequence,
// KV head) pairs fit one wave of them run unsplit: no cluster merge, and as
// many tiles in flight as 4-warp blocks split two ways (runtime/gpu
// decVariantFor).
#define DEC_WARPS8 8
extern "C" __global__ void __launch_bounds__(32 * DEC_WARPS8) attn_decode_w8_d32(ATTN_DECODE_ARGS) { attn_decode_body<32, false, DEC_WARPS8>(ATTN_DECODE_PASS); attn_decode_late<false>(dec, opts); }
extern "C" __global__ void __launch_bounds__(32 * DEC_WARPS8) attn_decode_w8_d64(ATTN_DECODE_ARGS) { attn_decode_body<64, false, DEC_WARPS8>(ATTN_DECODE_PASS); attn_decode_late<false>(dec, opts); }
extern "C" __global__ void __launch_bounds__(32 * DEC_WARPS8) attn_decode_w8_d128(ATTN_DECODE_ARGS) { attn_decode_body<128, false, DEC_WARPS8>(ATTN_DECODE_PASS); attn_decode_late<false>(dec, opts); }
// attn_decode8_d*: the same over an FP8 key cache (kc: e4m3 values; ks: one
// float32 scale per cache slot and KV head, at kscale_at).
extern "C" __global__ void __launch_bounds__(DEC_THREADS) attn_decode8_d32(ATTN_DECODE_ARGS) { attn_decode_body<32, true, DEC_WARPS>(ATTN_DECODE_PASS); attn_decode_late<true>(dec, opts); }
extern "C" __global__ void __launch_bounds__(DEC_THREADS) attn_decode8_d64(ATTN_DECODE_ARGS) { attn_decode_body<64, true, DEC_WARPS>(ATTN_DECODE_PASS); attn_decode_late<true>(dec, opts); }
extern "C" __global__ void __launch_bounds__(DEC_THREADS) attn_decode8_d128(ATTN_DECODE_ARGS) { attn_decode_body<128, true, DEC_WARPS>(ATTN_DECODE_PASS); attn_decode_late<true>(dec, opts); }
extern "C" __global__ void __launch_bounds__(DEC_THREADS) attn_decode8_d256(ATTN_DECODE_ARGS) { attn_decode_body<256, true, DEC_WARPS>(ATTN_DECODE_PASS); attn_decode_late<true>(dec, opts); }
// attn_decode8_w2_d*, attn_decode8_w8_d*: FP8 keys with 2 and 8 warps a
// block (the bf16 keys' attn_decode2 and attn_decode_w8 shapes; head_dim
// up to 128 for 8 warps: 179 KB there).
extern "C" __global__ void __launch_bounds__(32 * DEC_WARPS2) attn_decode8_w2_d32(ATTN_DECODE_ARGS) { attn_decode_body<32, true, DEC_WARPS2>(ATTN_DECODE_PASS); attn_decode_late<true>(dec, opts); }
extern "C" __global__ void __launch_bounds__(32 * DEC_WARPS2) attn_decode8_w2_d64(ATTN_DECODE_ARGS) { attn_decode_body<64, true, DEC_WARPS2>(ATTN_DECODE_PASS); attn_decode_late<true>(dec, opts); }
extern "C" __global__ void __launch_bounds__(32 * DEC_WARPS2) attn_decode8_w2_d128(ATTN_DECODE_ARGS) { attn_decode_body<128, true, DEC_WARPS2>(ATTN_DECODE_PASS); attn_decode_late<true>(dec, opts); }
extern "C" __global__ void __launch_bounds__(32 * DEC_WARPS2) attn_decode8_w2_d256(ATTN_DECODE_ARGS) { attn_decode_body<256, true, DEC_WARPS2>(ATTN_DECODE_PASS); attn_decode_late<true>(dec, opts); }
extern "C" __global__ void __launch_bounds__(32 * DEC_WARPS8) attn_decode8_w8_d32(ATTN_DECODE_ARGS) { attn_decode_body<32, true, DEC_WARPS8>(ATTN_DECODE_PASS); attn_decode_late<true>(dec, opts); }
extern "C" __global__ void __launch_bounds__(32 * DEC_WARPS8) attn_decode8_w8_d64(ATTN_DECODE_ARGS) { attn_decode_body<64, true, DEC_WARPS8>(ATTN_DECODE_PASS); attn_decode_late<true>(dec, opts); }
extern "C" __global__ void __launch_bounds__(32 * DEC_WARPS8) attn_decode8_w8_d128(ATTN_DECODE_ARGS) { attn_decode_body<128, true, DEC_WARPS8>(ATTN_DECODE_PASS); attn_decode_late<true>(dec, opts); }

// attn_prefill_d{32,64,128}: causal attention of prefill rows on the tensor
// cores (flash-attention style). grid (tiles, heads), block PRE_THREADS,
// dynamic shared PreShape<HD>::SMEM bytes. tiles[4 * x] = {first row, rows
// (<= PRE_ROWS; 0: the block exits), sequence, 0}: consecutive rows of one
// sequence, whose K and V are already in the cache (rope_store). Warp w takes
// rows 16w..16w+15 of the tile as the M of m16n8k16 MMAs for query head
// blockIdx.y; the block streams the sequence's K and V through shared memory
// in PRE_KT-position stages (cp.async, PreShape::ST - 1 stages ahead, rows
// XOR-swizzled for conflict-free ldmatrix; each thread looks its rows' page
// slots up one stage before it copies them), up to the tile's last row's
// position. Per stage: S = Q K^T, the causal mask (row r attends positions
// <= its own), an online softmax in the log2 domain, O += P V with P split
// into two bf16 parts (hi + lo) so P keeps its float32 precision, as in
// attn_decode. A warp skips the stages past its last row's position. q's
// rows are ldq values apart; out's heads*HD.
#define PRE_WARPS 4
#define PRE_THREADS (32 * PRE_WARPS)
#define PRE_ROWS (16 * PRE_WARPS) // query rows per tile
#define PRE_KT 64                 // positions per K/V stage

template <int HD, bool K8 = false> struct PreShape {
    static constexpr int C = HD / 8;                     // 16-byte chunks per K or V row
    static constexpr int ST = 2;                         // stages
    static constexpr int TILE_B = PRE_KT * HD * 2;       // bytes of K (or V) per stage
    // FP8 keys: a stage holds the V rows, the e4m3 K rows as read and their
    // scales; the block widens the K rows of the stage it computes into its
    // one bf16 K tile after the stages (64.5 KB at HD 128: three blocks fit
    // an SM, as in bf16). bf16: a stage holds the K and V tiles.
    static constexpr int RAW_B = K8 ? PRE_KT * HD : 0;
    static constexpr int SC_B = K8 ? PRE_KT * 4 : 0;
    static constexpr int STAGE_B = (K8 ? 1 : 2) * TILE_B + RAW_B + SC_B;
    static constexpr int SMEM = ST * STAGE_B + (K8 ? TILE_B : 0); // dynamic shared memory
    static __device__ __forceinline__ unsigned kt(unsigned b, int k) { return K8 ? b + ST * STAGE_B : b + (k % ST) * STAGE_B; }
    static __device__ __forceinline__ unsigned vt(unsigned b, int k) { return b + (k % ST) * STAGE_B + (K8 ? 0 : TILE_B); }
    static constexpr int NR = PRE_KT * C / PRE_THREADS;  // chunks (and rows) per thread per stage
    static constexpr int RSTEP = PRE_THREADS / C;        // rows between a thread's chunks
    static __device__ __forceinline__ int swz(int r, int c) {
        return xor_slot<C>(r, c);
    }
};

template <int HD, bool K8>
__device__ __forceinline__ void attn_prefill_body(bf16* __restrict__ out, const bf16* __restrict__ q,
                                                  const bf16* __restrict__ kc, const bf16* __restrict__ vc,
                                                  const int* __restrict__ tiles, const int* __restrict__ seq_info,
                                                  const int* __restrict__ pages, int heads, int kvh, int bs, float scale,
                                                  int ldq, const float* __restrict__ ks) {
    typedef PreShape<HD, K8> P;
    extern __shared__ __align__(128) unsigned char psm[];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, tig = lane & 3;
    const int r0 = tiles[4 * blockIdx.x], nr = tiles[4 * blockIdx.x + 1], s = tiles[4 * blockIdx.x + 2];
    if (nr <= 0) return;
    const int h = blockIdx.y, kh = h / (heads / kvh), width = kvh * HD;
    const int start = seq_info[4 * s], len = seq_info[4 * s + 1], ctx = seq_info[4 * s + 2], poff = seq_info[4 * s + 3];
    const int pos0 = ctx - len + (r0 - start); // the tile's first row's position
    const int plast = pos0 + nr - 1;           // the tile attends positions [0, plast]
    const int nst = plast / PRE_KT + 1;        // stages
    const int wr = 16 * warp;                  // this warp's first row in the tile
    const int pa = wr + g < nr ? pos0 + wr + g : -1, pb = wr + g + 8 < nr ? pos0 + wr + g + 8 : -1;
    const int wlast = wr < nr ? pos0 + min(nr - 1, wr + 15) : -1; // the warp's last position

    unsigned qa[HD / 16][4]; // A fragments of Q: rows g, g + 8 of the warp's 16
#pragma unroll
    for (int ks = 0; ks < HD / 16; ks++) {
        qa[ks][0] = qa[ks][1] = qa[ks][2] = qa[ks][3] = 0u;
        const bf16* qr = q + (i64)(r0 + wr + g) * ldq + (i64)h * HD + ks * 16 + tig * 2;
        if (pa >= 0) {
            qa[ks][0] = *reinterpret_cast<const unsigned*>(qr);
            qa[ks][2] = *reinterpret_cast<const unsigned*>(qr + 8);
        }
        if (pb >= 0) {
            qa[ks][1] = *reinterpret_cast<const unsigned*>(qr + 8 * (i64)ldq);
            qa[ks][3] = *reinterpret_cast<const unsigned*>(qr + 8 * (i64)ldq + 8);
        }
    }
    float o[P::C][4]; // O[g][8j + 2tig + {0,1}] in [0..1], row g + 8 in [2..3]
#pragma unroll
    for (int j = 0; j < P::C; j++) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};
    const float qs = scale * LOG2E;
    const bool pow2 = (bs & (bs - 1)) == 0;
    const int bsh = __ffs(bs) - 1;
    const unsigned base = (unsigned)__cvta_generic_to_shared(psm);
    int slot[P::NR]; // cache rows of this thread's chunks of the next stage to issue (-1: past the tile)
    auto rows = [&](int k) {
#pragma unroll
        for (int i = 0; i < P::NR; i++) {
            const int p = k * PRE_KT + tid / P::C + i * P::RSTEP;
            slot[i] = -1;
            if (k < nst && p <= plast) {
                const int pi = pow2 ? p >> bsh : p / bs;
                slot[i] = __ldg(pages + poff + pi) * bs + (p - pi * bs);
            }
        }
    };
    auto issue = [&](int k) {
        if (k < nst) {
            const unsigned kb = P::kt(base, k), vb = P::vt(base, k);
#pragma unroll
            for (int i = 0; i < P::NR; i++) {
                const int r = tid / P::C + i * P::RSTEP, c = tid % P::C;
                const i64 off = (i64)max(slot[i], 0) * width + (i64)kh * HD + c * 8;
                const unsigned so = r * HD * 2 + P::swz(r, c) * 16;
                if (K8) {
                    // the chunk's 8 e4m3 keys (row r, the same values), and
                    // the row's scale from the thread that takes its chunk 0
                    const unsigned rb = vb + P::TILE_B;
                    cp_async8(rb + r * HD + c * 8, reinterpret_cast<const unsigned char*>(kc) + off, slot[i] >= 0 ? 8 : 0);
                    if (c == 0) cp_async4(rb + P::RAW_B + 4 * r, ks + kscale_at(max(slot[i], 0), kvh, kh, bs, log2_or(bs)), slot[i] >= 0 ? 4 : 0);
                } else {
                    cp_async16(kb + so, kc + off, slot[i] >= 0 ? 16 : 0);
                }
                cp_async16(vb + so, vc + off, slot[i] >= 0 ? 16 : 0);
            }
        }
        cp_async_commit();
    };
    rows(0);
#pragma unroll
    for (int k = 0; k < P::ST - 1; k++) {
        issue(k);
        rows(k + 1);
    }
    for (int k = 0; k < nst; k++) {
        issue(k + P::ST - 1);
        rows(k + P::ST);
        cp_async_wait<P::ST - 1>();
        __syncthreads(); // every thread's copies of stage k have landed
        const int kbase = k * PRE_KT;
        const float* sc8 = nullptr; // FP8 keys: the stage's scales
        if (K8) {
            // widen the stage's e4m3 keys into its bf16 K tile (each thread
            // the chunks it copied)
            unsigned char* st = psm + (P::kt(base, k) - base);
            const unsigned char* raw = psm + (P::vt(base, k) - base) + P::TILE_B;
#pragma unroll
            for (int i = 0; i < P::NR; i++) {
                const int r = tid / P::C + i * P::RSTEP, c = tid % P::C;
                *reinterpret_cast<uint4*>(st + r * HD * 2 + P::swz(r, c) * 16) = widen8_e4m3(*reinterpret_cast<const uint2*>(raw + r * HD + c * 8));
            }
            sc8 = reinterpret_cast<const float*>(raw + P::RAW_B);
            __syncthreads(); // the whole bf16 tile is written
        }
        if (kbase <= wlast) {
            const unsigned kb = P::kt(base, k), vb = P::vt(base, k);
            float sc[PRE_KT / 8][4];
#pragma unroll
            for (int nt = 0; nt < PRE_KT / 8; nt++) sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < P::C / 4; kk++) {
#pragma unroll
                for (int nt = 0; nt < PRE_KT / 8; nt++) {
                    unsigned b[4];
                    const int r = nt * 8 + (lane & 7), c = 4 * kk + (lane >> 3);
                    ldsm4(kb + r * HD * 2 + P::swz(r, c) * 16, b);
                    mma16816(sc[nt], qa[2 * kk][0], qa[2 * kk][1], qa[2 * kk][2], qa[2 * kk][3], b[0], b[1]);
                    mma16816(sc[nt], qa[2 * kk + 1][0], qa[2 * kk + 1][1], qa[2 * kk + 1][2], qa[2 * kk + 1][3], b[2], b[3]);
                }
            }
            float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
            for (int nt = 0; nt < PRE_KT / 8; nt++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const int p = kbase + nt * 8 + tig * 2 + e;
                    const float kq = K8 ? sc8[nt * 8 + tig * 2 + e] * qs : qs; // the key's scale
                    sc[nt][e] = p <= pa ? sc[nt][e] * kq : NEG_INF;
                    sc[nt][2 + e] = p <= pb ? sc[nt][2 + e] * kq : NEG_INF;
                    mx[0] = fmaxf(mx[0], sc[nt][e]);
                    mx[1] = fmaxf(mx[1], sc[nt][2 + e]);
                }
            float corr[2];
#pragma unroll
            for (int i = 0; i < 2; i++) {
                mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
                mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
                const float mn = fmaxf(m[i], mx[i]);
                corr[i] = mn == NEG_INF ? 1.f : exp2f(m[i] - mn);
                m[i] = mn;
            }
            float sum[2] = {0.f, 0.f};
#pragma unroll
            for (int nt = 0; nt < PRE_KT / 8; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    sc[nt][e] = sc[nt][e] == NEG_INF ? 0.f : exp2f(sc[nt][e] - m[e >> 1]);
                    sum[e >> 1] += sc[nt][e];
                }
            l[0] = l[0] * corr[0] + sum[0];
            l[1] = l[1] * corr[1] + sum[1];
#pragma unroll
            for (int j = 0; j < P::C; j++) {
                o[j][0] *= corr[0], o[j][1] *= corr[0];
                o[j][2] *= corr[1], o[j][3] *= corr[1];
            }
#pragma unroll
            for (int kk = 0; kk < PRE_KT / 16; kk++) {
                // P's A fragment for positions 16kk..16kk+15, hi + lo
                unsigned ph[4], pl[4];
#pragma unroll
                for (int x = 0; x < 4; x++) {
                    const float* v = &sc[2 * kk + (x >> 1)][(x & 1) * 2];
                    const bf16 h0 = tobf(v[0]), h1 = tobf(v[1]);
                    ph[x] = pack_bf2(__bfloat162float(h0), __bfloat162float(h1));
                    pl[x] = pack_bf2(v[0] - __bfloat162float(h0), v[1] - __bfloat162float(h1));
                }
#pragma unroll
                for (int j = 0; j < P::C; j += 2) {
                    unsigned b[4];
                    const int r = 16 * kk + ((lane >> 3) & 1) * 8 + (lane & 7), c = j + (lane >> 4);
                    ldsm4t(vb + r * HD * 2 + P::swz(r, c) * 16, b);
                    mma16816(o[j], ph[0], ph[1], ph[2], ph[3], b[0], b[1]);
                    mma16816(o[j], pl[0], pl[1], pl[2], pl[3], b[0], b[1]);
                    mma16816(o[j + 1], ph[0], ph[1], ph[2], ph[3], b[2], b[3]);
                    mma16816(o[j + 1], pl[0], pl[1], pl[2], pl[3], b[2], b[3]);
                }
            }
        }
        __syncthreads(); // done reading the stage the next issue overwrites
    }
    cp_async_wait<0>();
#pragma unroll
    for (int i = 0; i < 2; i++) {
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
    }
    const float ia = l[0] > 0.f ? 1.f / l[0] : 0.f, ib = l[1] > 0.f ? 1.f / l[1] : 0.f;
    bf16* oa = out + (i64)(r0 + wr + g) * heads * HD + (i64)h * HD + tig * 2;
    bf16* ob = oa + 8 * (i64)heads * HD;
#pragma unroll
    for (int j = 0; j < P::C; j++) {
        if (pa >= 0) *reinterpret_cast<unsigned*>(oa + 8 * j) = pack_bf2(o[j][0] * ia, o[j][1] * ia);
        if (pb >= 0) *reinterpret_cast<unsigned*>(ob + 8 * j) = pack_bf2(o[j][2] * ib, o[j][3] * ib);
    }
}

#define ATTN_PREFILL_ARGS                                                                                        \
    bf16 *out, const bf16 *q, const bf16 *kc, const bf16 *vc, const int *tiles, const int *seq_info, const int *pages, \
        int heads, int kvh, int bs, float scale, int ldq, const float *ks
#define ATTN_PREFILL_PASS out, q, kc, vc, tiles, seq_info, pages, heads, kvh, bs, scale, ldq, ks
extern "C" __global__ void __launch_bounds__(PRE_THREADS) attn_prefill_d32(ATTN_PREFILL_ARGS) { pdl_entry(); attn_prefill_body<32, false>(ATTN_PREFILL_PASS); }
extern "C" __global__ void __launch_bounds__(PRE_THREADS) attn_prefill_d64(ATTN_PREFILL_ARGS) { pdl_entry(); attn_prefill_body<64, false>(ATTN_PREFILL_PASS); }
extern "C" __global__ void __launch_bounds__(PRE_THREADS) attn_prefill_d128(ATTN_PREFILL_ARGS) { pdl_entry(); attn_prefill_body<128, false>(ATTN_PREFILL_PASS); }
// attn_prefill8_d*: the same over an FP8 key cache (as attn_decode8).
extern "C" __global__ void __launch_bounds__(PRE_THREADS) attn_prefill8_d32(ATTN_PREFILL_ARGS) { pdl_entry(); attn_prefill_body<32, true>(ATTN_PREFILL_PASS); }
extern "C" __global__ void __launch_bounds__(PRE_THREADS) attn_prefill8_d64(ATTN_PREFILL_ARGS) { pdl_entry(); attn_prefill_body<64, true>(ATTN_PREFILL_PASS); }
extern "C" __global__ void __launch_bounds__(PRE_THREADS) attn_prefill8_d128(ATTN_PREFILL_ARGS) { pdl_entry(); attn_prefill_body<128, true>(ATTN_PREFILL_PASS); }

// silu_mul8: silu(g) * u for 8 values (16-byte words gw, uw), after adding
// the LoRA updates dg and du (when dg is set; float32 or bf16: D) as
// silu_mul says.
template <typename D>
__device__ __forceinline__ uint4 silu_mul8(uint4 gw, uint4 uw, const D* dg, const D* du) {
    float a[8], b[8];
    unpack8(gw, a);
    unpack8(uw, b);
    if (dg) {
        add8(a, dg);
        add8(b, du);
    }
#pragma unroll
    for (int j = 0; j < 8; j++) a[j] = a[j] / (1.f + expf(-a[j])) * b[j];
    return pack8(a);
}

// silu_mul: out[r, c] = silu(g[r, c]) * u[r, c] for rows x cols values;
// out's rows are cols apart, g's and u's ldg (views of one gate_up row).
// dg, du (null, or both set): float32 LoRA updates of g and u computed
// beside the gate_up projection, rows ldd apart, added first (rounded to
// bf16, as an update in place would have left g and u) in the rows whose
// rl (row adapter slot) is >= 0; bf16 updates where D is bf16
// (silu_mul_h / _o2h / _clh: half the update's bytes, each update rounded to bf16
// before the add, as PEFT's bf16 lora_B output is). Grid-stride over 8-value words when cols,
// ldg and ldd are multiples of 8. q, qscale (null, or both set; then cols,
// ldg and ldd must be multiples of 8 and the grid is one block per row): each
// out row is also quantized to e4m3 into q (cols bytes per row) and its scale
// into qscale, as quant_rows_e4m3 would from the stored values, for the FP8
// down projection (no quantization launch).
#define SILU_RC 4 // 16-byte words of a row each thread keeps in registers when quantizing (rows of up to 32 * blockDim values)
__device__ __forceinline__ uint4 ld16(const bf16* p) { return *reinterpret_cast<const uint4*>(p); }
__device__ __forceinline__ float dval(float v) { return v; }
__device__ __forceinline__ float dval(bf16 v) { return __bfloat162float(v); }
template <typename D>
__device__ __forceinline__ void silu_mul_body(bf16* out, const bf16* g, const bf16* u, const D* dg, const D* du, const int* rl,
                                              int rows, int cols, int ldg, int ldd, unsigned char* q, float* qscale) {
    pdl_entry();
    if (q) { // one block per row, quantized as it is stored
        __shared__ float sh[33];
        const i64 r = blockIdx.x;
        const bool lo = dg && rl[r] >= 0;
        float m = 0.f;
        int bad = 0;
        const int n8 = cols >> 3, tid = threadIdx.x, bd = blockDim.x;
        if (n8 <= SILU_RC * bd) {
            // the row stays in registers: every load of it (and of its
            // LoRA updates) in flight at once, no store between them, and
            // no read back for the scale
            uint4 w[SILU_RC];
#pragma unroll
            for (int j = 0; j < SILU_RC; j++) {
                const int c = 8 * (tid + j * bd);
                if (c < cols) {
                    w[j] = silu_mul8(ld16(g + r * ldg + c), ld16(u + r * ldg + c), lo ? dg + r * ldd + c : nullptr, lo ? du + r * ldd + c : nullptr);
                    amax8(w[j], m, bad);
                }
            }
#pragma unroll
            for (int j = 0; j < SILU_RC; j++) {
                const int c = 8 * (tid + j * bd);
                if (c < cols) *reinterpret_cast<uint4*>(out + r * cols + c) = w[j];
            }
            quant_words_e4m3<SILU_RC>(w, n8, q + r * cols, qscale + r, m, bad, sh);
            return;
        }
        for (int c = 8 * tid; c < cols; c += 8 * bd) {
            const uint4 w = silu_mul8(ld16(g + r * ldg + c), ld16(u + r * ldg + c), lo ? dg + r * ldd + c : nullptr, lo ? du + r * ldd + c : nullptr);
            *reinterpret_cast<uint4*>(out + r * cols + c) = w;
            amax8(w, m, bad);
        }
        quant_row_e4m3(out + r * cols, q + r * cols, qscale + r, cols, true, m, bad, sh);
        return;
    }
    const i64 stride = (i64)gridDim.x * blockDim.x;
    if ((cols & 7) == 0 && (ldg & 7) == 0 && (ldd & 7) == 0) {
        const int w = cols / 8;
        for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (i64)rows * w; i += stride) {
            const i64 r = i / w, c = (i - r * w) * 8;
            const bool lo = dg && rl[r] >= 0;
            *reinterpret_cast<uint4*>(out + r * cols + c) =
                silu_mul8(ld16(g + r * ldg + c), ld16(u + r * ldg + c), lo ? dg + r * ldd + c : nullptr, lo ? du + r * ldd + c : nullptr);
        }
        return;
    }
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (i64)rows * cols; i += stride) {
        const i64 r = i / cols, c = i - r * cols;
        float x = ld(g + r * ldg + c), y = ld(u + r * ldg + c);
        if (dg && rl[r] >= 0) {
            x = __bfloat162float(tobf(x + dval(dg[r * ldd + c])));
            y = __bfloat162float(tobf(y + dval(du[r * ldd + c])));
        }
        out[i] = tobf(x / (1.f + expf(-x)) * y);
    }
}
#define SILU_MUL_ARGS_D(D)                                                                                           \
    bf16 *out, const bf16 *g, const bf16 *u, const D *dg, const D *du, const int *rl, int rows, int cols, int ldg, \
        int ldd, unsigned char *q, float *qscale
#define SILU_MUL_ARGS SILU_MUL_ARGS_D(float)
#define SILU_MUL_PASS out, g, u, dg, du, rl, rows, cols, ldg, ldd, q, qscale
extern "C" __global__ void silu_mul(SILU_MUL_ARGS) { silu_mul_body(SILU_MUL_PASS); }
// silu_mul_h, silu_mul_o2h, silu_mul_clh: silu_mul, silu_mul_o2 and
// silu_mul_cl reading bf16 LoRA updates of g and u (the gate/up expand's
// accHalf, sgmv_expand_tch*: kernelForce.guHalf): 2 + 2 + 2 + 2 bytes a value read instead of
// 2 + 2 + 4 + 4.
extern "C" __global__ void silu_mul_h(SILU_MUL_ARGS_D(bf16)) { silu_mul_body(SILU_MUL_PASS); }
// silu_mul_o2: silu_mul with at most 64 registers a thread, so two of the
// quantizing path's 512-thread blocks fit an SM (silu_mul's 80 registers
// fit one: ncu, H100, 256 rows of 14,336 columns, 1.94 waves, 17.2 µs at
// 26% of DRAM; PERFORMANCE v0.79). Chosen by kernelForce.siluO2.
extern "C" __global__ void __launch_bounds__(512, 2) silu_mul_o2(SILU_MUL_ARGS) { silu_mul_body(SILU_MUL_PASS); }
extern "C" __global__ void __launch_bounds__(512, 2) silu_mul_o2h(SILU_MUL_ARGS_D(bf16)) { silu_mul_body(SILU_MUL_PASS); }

// silu_mul_cl: silu_mul's quantizing path for steps of a few rows with each
// row over a cluster of SILU_CL blocks (sm_90; grid rows x SILU_CL, blocks
// of 256): each block takes a contiguous slice of the row's 16-byte words
// (at most SILU_CL_RC a thread), the blocks' max |v| and non-finite flags
// meet through distributed shared memory, and each block quantizes its
// slice with the row's scale: the bytes and scale silu_mul's one block a
// row writes (a max does not depend on the order), with the row's loads
// spread over SILU_CL SMs.
#define SILU_CL 8
#define SILU_CL_RC 2
template <typename D>
__device__ __forceinline__ void silu_mul_cl_body(bf16* out, const bf16* g, const bf16* u, const D* dg, const D* du, const int* rl, int cols, int ldg,
                                                 int ldd, unsigned char* q, float* qscale) {
    pdl_entry();
    __shared__ float sh[33];
    __shared__ float cm; // this block's max |v| (+Inf: a non-finite value), read by the cluster
    const unsigned rank = cluster_rank();
    const i64 r = blockIdx.x / SILU_CL;
    const bool lo = dg && rl[r] >= 0;
    const int n8 = cols >> 3, per = (n8 + SILU_CL - 1) / SILU_CL, w0 = rank * per, w1 = min(n8, w0 + per);
    float m = 0.f;
    int bad = 0;
    uint4 w[SILU_CL_RC];
#pragma unroll
    for (int j = 0; j < SILU_CL_RC; j++) {
        const int c = w0 + threadIdx.x + j * blockDim.x;
        if (c < w1) {
            const int col = 8 * c;
            w[j] = silu_mul8(ld16(g + r * ldg + col), ld16(u + r * ldg + col), lo ? dg + r * ldd + col : nullptr, lo ? du + r * ldd + col : nullptr);
            amax8(w[j], m, bad);
            *reinterpret_cast<uint4*>(out + r * cols + col) = w[j];
        }
    }
    const float amax = cluster_amax<SILU_CL>(m, bad, sh, &cm);
    float s;
    const float inv = e4m3_scale(amax, amax == __int_as_float(0x7f800000), &s);
    if (rank == 0 && threadIdx.x == 0) qscale[r] = s;
#pragma unroll
    for (int j = 0; j < SILU_CL_RC; j++) {
        const int c = w0 + threadIdx.x + j * blockDim.x;
        if (c < w1) *reinterpret_cast<uint2*>(q + r * cols + 8 * c) = e4m3_word(w[j], inv);
    }
}
#define SILU_CL_ARGS_D(D) \
    bf16 *out, const bf16 *g, const bf16 *u, const D *dg, const D *du, const int *rl, int cols, int ldg, int ldd, unsigned char *q, float *qscale
#define SILU_CL_PASS out, g, u, dg, du, rl, cols, ldg, ldd, q, qscale
extern "C" __global__ void __launch_bounds__(256) silu_mul_cl(SILU_CL_ARGS_D(float)) { silu_mul_cl_body(SILU_CL_PASS); }
extern "C" __global__ void __launch_bounds__(256) silu_mul_clh(SILU_CL_ARGS_D(bf16)) { silu_mul_cl_body(SILU_CL_PASS); }

// add_rmsnorm_cl: add_rmsnorm (delta set, out set) for steps of a few rows
// with each row over a cluster of ADD_CL blocks (sm_90; grid rows * ADD_CL,
// blocks of ADD_CL_THREADS): block `rank` takes columns [rank * per,
// (rank + 1) * per), per = H / ADD_CL, a pair of columns a thread (at most
// ADD_CL_PR pairs), so a row's x, delta and float32 LoRA update d2 (rows
// whose rl is >= 0; delta + d2 rounded to bf16 first, as add_rmsnorm adds
// them) are read by ADD_CL SMs. The row's sum of squares meets through
// distributed shared memory (the blocks' sums added in rank order), then
// with q its max |out| and non-finite flag: out quantized with the row's
// scale, as add_rmsnorm does (the same bytes for the same out). The norm
// weights are loaded before griddepcontrol.wait (no kernel writes them).
#define ADD_CL 8
#define ADD_CL_THREADS 256
#define ADD_CL_PR 2
extern "C" __global__ void __launch_bounds__(ADD_CL_THREADS) add_rmsnorm_cl(bf16* x, const bf16* delta, const float* d2, const int* rl,
                                                                         bf16* out, const bf16* w, float eps, int H, unsigned char* q,
                                                                         float* qscale) {
    __shared__ float sh[33];
    __shared__ float cs[2]; // this block's sum of squares, then its max |out| (non-finite: Inf), read by the cluster
    const unsigned rank = cluster_rank();
    const i64 r = blockIdx.x / ADD_CL;
    const int per = H / ADD_CL, c0 = rank * per, np = per / 2, tid = threadIdx.x;
    __nv_bfloat162 wv[ADD_CL_PR];
#pragma unroll
    for (int i = 0; i < ADD_CL_PR; i++) {
        const int p = tid + i * ADD_CL_THREADS;
        wv[i] = p < np ? *reinterpret_cast<const __nv_bfloat162*>(w + c0 + 2 * p) : __floats2bfloat162_rn(0.f, 0.f);
    }
    pdl_entry();
    const bool lo = d2 && rl[r] >= 0;
    bf16* xr = x + r * H + c0;
    float2 v[ADD_CL_PR];
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < ADD_CL_PR; i++) {
        const int p = tid + i * ADD_CL_THREADS;
        v[i] = make_float2(0.f, 0.f);
        if (p >= np) continue;
        const float2 xv = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(xr + 2 * p));
        float2 dv = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(delta + r * H + c0 + 2 * p));
        if (lo) {
            const float2 e2 = *reinterpret_cast<const float2*>(d2 + r * H + c0 + 2 * p);
            dv = __bfloat1622float2(__floats2bfloat162_rn(dv.x + e2.x, dv.y + e2.y));
        }
        const __nv_bfloat162 nb = __floats2bfloat162_rn(xv.x + dv.x, xv.y + dv.y);
        *reinterpret_cast<__nv_bfloat162*>(xr + 2 * p) = nb;
        v[i] = __bfloat1622float2(nb);
        ss += v[i].x * v[i].x + v[i].y * v[i].y;
    }
    ss = block_sum(ss, sh);
    if (tid == 0) cs[0] = ss;
    cluster_sync();
    float tot = 0.f;
#pragma unroll
    for (unsigned k = 0; k < ADD_CL; k++) tot += ld_cluster(cs, k);
    const float inv = 1.f / sqrtf(tot / (float)H + eps);
    float m = 0.f;
    int bad = 0;
#pragma unroll
    for (int i = 0; i < ADD_CL_PR; i++) {
        const int p = tid + i * ADD_CL_THREADS;
        if (p >= np) continue;
        const float2 g = __bfloat1622float2(wv[i]);
        const __nv_bfloat162 o = __floats2bfloat162_rn(g.x * (v[i].x * inv), g.y * (v[i].y * inv));
        *reinterpret_cast<__nv_bfloat162*>(out + r * H + c0 + 2 * p) = o;
        v[i] = __bfloat1622float2(o);
        amax1(o.x, m, bad);
        amax1(o.y, m, bad);
    }
    if (!q) {
        cluster_sync(); // no block leaves while another still reads its shared memory
        return;
    }
    const float amax = cluster_amax<ADD_CL>(m, bad, sh, cs + 1);
    float sc;
    const float qi = e4m3_scale(amax, amax == __int_as_float(0x7f800000), &sc);
    if (rank == 0 && tid == 0) qscale[r] = sc;
#pragma unroll
    for (int i = 0; i < ADD_CL_PR; i++) {
        const int p = tid + i * ADD_CL_THREADS;
        if (p < np)
            *reinterpret_cast<unsigned short*>(q + r * H + c0 + 2 * p) =
                __nv_cvt_float2_to_fp8x2(make_float2(v[i].x * qi, v[i].y * qi), __NV_SATFINITE, __NV_E4M3);
    }
}

// lora_shrink: tmp[i, k] = scale * x[rows[i]] . A[k] for each LoRA row i
// (rows[i] its activation row, slots[i] its adapter slot) and k < that
// adapter's rank. grid (n, ceil(max_rank/8)), block 256: one warp per k.
extern "C" __global__ void lora_shrink(float* tmp, const bf16* x, const LoraEntry* table, const int* rows, const int* slots,
                                       int entry_base, int entry_stride, int in_f, int x_stride, int t_stride) {
    pdl_entry();
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
    pdl_entry();
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

#ifdef PEFTD_KCAT // kcat.go, not in the engine yet: built with PEFTD_KERNEL_DEFINES=-DPEFTD_KCAT
// lora_cat_e4m3: the input side of a LoRA update carried in an FP8
// product's K (runtime/gpu/kcat.go): [qx | S'] . [qw | B']^T, both row
// scaled, adds S . B^T to x . W^T. For each row t (grid.x = rows) it writes
// the E = slices * P * R extension columns at xq + t * ldq: column
// (s * P + p) * R + j holds e4m3(S[t, s, j] * fac[slot * slices + s] / sx[t])
// where slot is row t's adapter (rl), p its K position (kpos[slot]), j below
// its rank for slice s, and S the shrink's sum over ks partials in tmp
// ([ks][rows_total][t_stride], slice s from s * max_rank, the adapter's
// scale applied); every other column 0, so rows of no adapter or no
// position add nothing. sx[t] is the row's e4m3 scale (a NaN row scale
// gives NaN, as the base product's does).
extern "C" __global__ void lora_cat_e4m3(unsigned char* __restrict__ xq, i64 ldq, const float* __restrict__ tmp,
                                         const float* __restrict__ sx, const int* __restrict__ rl,
                                         const int* __restrict__ kpos, const float* __restrict__ fac,
                                         const LoraEntry* __restrict__ table, int entry_base, int entry_stride,
                                         int m0, int m1, int m2, int slices, int P, int R, int ks, int rows_total,
                                         int t_stride, int max_rank) {
    pdl_entry();
    const int t = blockIdx.x, slot = rl[t];
    const int p = slot >= 0 ? kpos[slot] : -1;
    const float inv = 1.f / sx[t];
    unsigned char* row = xq + (i64)t * ldq;
    const int E = slices * P * R;
    for (int c = threadIdx.x; c < E; c += blockDim.x) {
        const int s = c / (P * R), j = c % R;
        float v = 0.f;
        if ((c / R) % P == p) {
            const LoraEntry e = table[entry_base + slot * entry_stride + sg_mod(s, m0, m1, m2)];
            if (j < e.rank && j < max_rank) {
                float sum = 0.f;
                for (int z = 0; z < ks; z++) sum += tmp[((i64)z * rows_total + t) * t_stride + s * max_rank + j];
                v = sum * fac[slot * slices + s] * inv;
            }
        }
        row[c] = __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);
    }
}

// kcat_select_split_e4m3: lora_cat_e4m3 from a dense shrink (x against
// every position's A rows in the extension's column order, (s * P + p) *
// R + j; the adapter's scale and fac folded into A) as K-split float32
// partials (part [splits][rows_total][E], cuBLASLt's GemmTNSplitK): column
// c of row t's extension is e4m3(sum * g[c]) with g the e4m3 A rows'
// scales (an e4m3 shrink: x's scale cancels), or e4m3(sum / sx[t]) where
// g is null (a bf16 shrink), where c's position is the row adapter's
// (kpos[rl[t]]), else 0. grid (rows), block 128.
extern "C" __global__ void kcat_select_split_e4m3(unsigned char* __restrict__ xq, i64 ldq, const float* __restrict__ part, int splits,
                                                  int rows_total, const float* __restrict__ g, const float* __restrict__ sx,
                                                  const int* __restrict__ rl, const int* __restrict__ kpos, int E, int P, int R) {
    pdl_entry();
    const int t = blockIdx.x, slot = rl[t];
    const int p = slot >= 0 ? kpos[slot] : -1;
    const float inv = 1.f / sx[t];
    unsigned char* row = xq + (i64)t * ldq;
    for (int c = threadIdx.x; c < E; c += blockDim.x) {
        float v = 0.f;
        if (p >= 0 && (c / R) % P == p) {
            for (int z = 0; z < splits; z++) v += part[((i64)z * rows_total + t) * E + c];
            v *= g ? g[c] : inv;
        }
        row[c] = __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);
    }
}
#endif

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
    if constexpr (NB == 1 && SG_SU > 0) {
        // SG_SU K-iterations' loads of x and A in flight together. Written
        // plainly, the compiler issues each iteration's loads only after the
        // previous one's MMAs (SASS of v0.45: one load ahead), so a block of
        // kchunk = 1,024 waits for four round trips in a row, microseconds
        // each beside a product that fills DRAM. dep makes the first MMA
        // wait for every load (one word of each: a load's words land
        // together), so all of them are issued before it; masked by kchunk's
        // sign bit it adds zero (kchunk > 0), which the compiler cannot
        // know. Registers, not cp.async staging: beside fp8_stream's blocks
        // (190 KB of shared memory an SM) a staged block does not fit.
        constexpr int U = SG_SU > 0 ? SG_SU : 1; // 1: -DSG_SU=0 must still compile this discarded branch
        const unsigned zero = (unsigned)(kchunk >> 31);
        for (int cb = kbeg + warp * 32; cb < kend; cb += 32 * SG_WARPS * U)
            shrink_round<U, 32 * SG_WARPS>(c[0], x0, x1, ar[0], cb, kend, q, v0, v1, va[0], zero);
    } else
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
    pdl_entry();
    __shared__ float red[SG_WARPS * SG_TR * 8];
    shrink_body<1>(SHRINK_PASS, red);
}

extern "C" __global__ void __launch_bounds__(32 * SG_WARPS) sgmv_shrink4(SHRINK_ARGS) {
    pdl_entry();
    __shared__ float red[SG_WARPS * SG_TR * 32];
    shrink_body<4>(SHRINK_PASS, red);
}

// sgmv_shrink64: sgmv_shrink for steps of many rows, on tiles of up to 64
// rows of one adapter (the step's big tiles: {first row, rows, slot, 0})
// and 32 rank rows a block: each x tile is read once per 32 ranks instead
// of once per 8, each A row once per 64 rows instead of once per 16.
// grid (big tiles, slices * rank tiles of 32, ksplit), block 256. It gives
// sgmv_shrink's bits: the 8 warps split the block's K range as there (warp
// w the 32-column chunks w, w + 8, ...; the same MMA chain for every
// output element: an MMA's element depends only on its row of x, its rank
// row and its own accumulator), each warp now over all 64 rows and 32
// ranks, and the warps' sums are added in warp order from 0 as there. So
// for the same K split the two give the same bits. Each lane loads 8
// contiguous columns of its 8 rows of x and its 4 rank rows, two chunks'
// worth before their 64 MMAs.
#define SB_ROWS 64
#define SB_MT (SB_ROWS / 16) // m16 tiles a block
#define SB_RW 40             // red's row stride in floats (32 ranks + 8: fewer bank conflicts)

// sb_load_a: a lane's A loads for a round of sgmv_shrink64 (chunks cb and
// cb + 256, rank rows ar, zero past kend or the rank); EARLY: issued before
// griddepcontrol.wait (ldg16_early).
template <bool EARLY>
__device__ __forceinline__ void sb_load_a(uint4 (&av)[2][4], const bf16* const (&ar)[4], const bool (&va)[4], int cb, int kend, int q) {
#pragma unroll
    for (int u = 0; u < 2; u++)
#pragma unroll
        for (int nb = 0; nb < 4; nb++) {
            const int col = cb + 256 * u + q * 8;
            const bool ok = col < kend && va[nb];
            av[u][nb] = !ok ? make_uint4(0, 0, 0, 0) : (EARLY ? ldg16_early(ar[nb] + col) : ldg16(ar[nb] + col));
        }
}

// sb_rows: a lane's rows of sgmv_shrink64's tile: of x 8h + g (h = 0..7:
// m16 tile h / 2, its rows g and g + 8), of A the ranks k0 + 8nb + g; v*:
// inside the tile / the adapter's rank (else row 0, read as zeros).
__device__ __forceinline__ void sb_rows(const bf16* (&xr)[2 * SB_MT], bool (&vx)[2 * SB_MT], const bf16* (&ar)[4], bool (&va)[4], const bf16* x,
                                        int x_stride, int4 tile, const LoraEntry& e, int k0, int in_f, int g) {
#pragma unroll
    for (int h = 0; h < 2 * SB_MT; h++) {
        vx[h] = 8 * h + g < tile.y;
        xr[h] = x + (i64)(tile.x + (vx[h] ? 8 * h + g : 0)) * x_stride;
    }
#pragma unroll
    for (int nb = 0; nb < 4; nb++) {
        va[nb] = k0 + nb * 8 + g < e.rank;
        ar[nb] = e.a + (i64)(va[nb] ? k0 + nb * 8 + g : 0) * in_f;
    }
}

__device__ __forceinline__ void sb_zero(float (&c)[SB_MT][4][4]) {
#pragma unroll
    for (int m = 0; m < SB_MT; m++)
#pragma unroll
        for (int nb = 0; nb < 4; nb++) c[m][nb][0] = c[m][nb][1] = c[m][nb][2] = c[m][nb][3] = 0.f;
}

// sb_mma: one 32-column chunk's MMAs of a warp of sgmv_shrink64 (x pieces
// xv: rows 8h + g, A pieces av: ranks 8nb + g; 8 columns from 8q each).
__device__ __forceinline__ void sb_mma(float (&c)[SB_MT][4][4], const uint4 (&xv)[2 * SB_MT], const uint4 (&av)[4]) {
#pragma unroll
    for (int m = 0; m < SB_MT; m++) {
        const uint4 xa = xv[2 * m], xb = xv[2 * m + 1];
#pragma unroll
        for (int nb = 0; nb < 4; nb++) {
            mma16816(c[m][nb], xa.x, xb.x, xa.y, xb.y, av[nb].x, av[nb].y);
            mma16816(c[m][nb], xa.z, xb.z, xa.w, xb.w, av[nb].z, av[nb].w);
        }
    }
}

// sb_finish: sgmv_shrink64's end. The warps' sums in warp order, from 0
// (sgmv_shrink's order), through red (SG_WARPS / 2 warps' tiles at a
// time), scaled into tmp's K part blockIdx.z. Every thread of the block
// calls it (barriers).
__device__ __forceinline__ void sb_finish(const float (&c)[SB_MT][4][4], float (*red)[SB_ROWS * SB_RW], float* __restrict__ tmp, int4 tile,
                                          const LoraEntry& e, int s, int k0, int max_rank, int t_stride, int rows_total) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    // element i = threadIdx.x + 256j is row i / 32, rank i % 32
    constexpr int PER = SB_ROWS * 32 / (32 * SG_WARPS);
    float sum[PER];
#pragma unroll
    for (int j = 0; j < PER; j++) sum[j] = 0.f;
#pragma unroll
    for (int half = 0; half < 2; half++) {
        if (warp / (SG_WARPS / 2) == half) {
            float* rw = red[warp % (SG_WARPS / 2)];
#pragma unroll
            for (int m = 0; m < SB_MT; m++)
#pragma unroll
                for (int nb = 0; nb < 4; nb++) {
                    const int r = 16 * m + g, k = nb * 8 + 2 * q;
                    *reinterpret_cast<float2*>(rw + r * SB_RW + k) = make_float2(c[m][nb][0], c[m][nb][1]);
                    *reinterpret_cast<float2*>(rw + (r + 8) * SB_RW + k) = make_float2(c[m][nb][2], c[m][nb][3]);
                }
        }
        __syncthreads();
#pragma unroll
        for (int j = 0; j < PER; j++) {
            const int i = threadIdx.x + 32 * SG_WARPS * j, r = i >> 5, k = i & 31;
#pragma unroll
            for (int w = 0; w < SG_WARPS / 2; w++) sum[j] += red[w][r * SB_RW + k];
        }
        __syncthreads();
    }
    float* out = tmp + ((i64)blockIdx.z * rows_total + tile.x) * t_stride + s * max_rank + k0;
#pragma unroll
    for (int j = 0; j < PER; j++) {
        const int i = threadIdx.x + 32 * SG_WARPS * j, r = i >> 5, k = i & 31;
        if (r < tile.y && k0 + k < e.rank) out[(i64)r * t_stride + k] = sum[j] * e.scale;
    }
}

// SB_START: the start of sgmv_shrink64 and sgmv_shrink64p (a macro: it
// returns from the kernel): the tile, slice s, rank tile k0 and table
// entry e (a block with nothing to do waits and leaves), the lane's place
// (warp, g, q), its K range [kbeg, kend), its rows (sb_rows) and the
// zeroed accumulators c.
#define SB_START                                                                                                 \
    const int4 tile = tiles[blockIdx.x];                                                                         \
    const int s = blockIdx.y / rank_tiles, k0 = (blockIdx.y % rank_tiles) * 32;                                  \
    LoraEntry e = {};                                                                                            \
    if (tile.y > 0) e = table[entry_base + tile.z * entry_stride + sg_mod(s, m0, m1, m2)];                       \
    if (tile.y == 0 || k0 >= e.rank) { /* uniform: a spare tile (a recording's), or ranks past this adapter's */ \
        pdl_entry();                                                                                             \
        return;                                                                                                  \
    }                                                                                                            \
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;                     \
    const int kbeg = blockIdx.z * kchunk, kend = min(in_f, kbeg + kchunk);                                       \
    const bf16* xr[2 * SB_MT];                                                                                   \
    bool vx[2 * SB_MT];                                                                                          \
    const bf16* ar[4];                                                                                           \
    bool va[4];                                                                                                  \
    sb_rows(xr, vx, ar, va, x, x_stride, tile, e, k0, in_f, g);                                                  \
    float c[SB_MT][4][4];                                                                                        \
    sb_zero(c);

extern "C" __global__ void __launch_bounds__(32 * SG_WARPS, 1) sgmv_shrink64(SHRINK_ARGS) {
    __shared__ float red[SG_WARPS / 2][SB_ROWS * SB_RW]; // half the warps' sums at a time
    // Before griddepcontrol.wait: the tile (step metadata, copied before the
    // step), the table entry and A. Every block waits before it exits (a
    // kernel that waits for this one then finds the one before done too).
    SB_START
    const uint4 z4 = make_uint4(0, 0, 0, 0);
    // a round: two of the warp's chunks (cb, cb + 256), every load issued
    // before its MMAs; the first round's A rows before griddepcontrol.wait
    // (adapter weights, which no kernel of the step writes), so only x's
    // loads wait for the kernel before
    const int cb0 = kbeg + warp * 32;
    uint4 av[2][4];
    sb_load_a<true>(av, ar, va, cb0, kend, q);
    pdl_entry(); // x is the previous kernel's output
    for (int cb = cb0; cb < kend; cb += 2 * 32 * SG_WARPS) {
        if (cb != cb0) sb_load_a<false>(av, ar, va, cb, kend, q);
        uint4 xv[2][2 * SB_MT];
#pragma unroll
        for (int u = 0; u < 2; u++)
#pragma unroll
            for (int h = 0; h < 2 * SB_MT; h++) {
                const int col = cb + 256 * u + q * 8;
                xv[u][h] = (col < kend && vx[h]) ? ldg16(xr[h] + col) : z4;
            }
#pragma unroll
        for (int u = 0; u < 2; u++) {
            if (cb + 256 * u >= kend) break; // sgmv_shrink's chain has no MMA for a chunk past the range
            sb_mma(c, xv[u], av[u]);
        }
    }
    sb_finish(c, red, tmp, tile, e, s, k0, max_rank, t_stride, rows_total);
}

// sgmv_shrink64p: sgmv_shrink64 with each lane's loads in its own ring in
// shared memory, SBP_ST - 1 chunks ahead of its MMAs (cp.async), instead
// of two chunks' loads into registers, a wait, then their MMAs. ncu, the
// 4 x 512 prefill (H200): sgmv_shrink64 at 14-35% of DRAM's throughput,
// long scoreboard its top stall. A lane reads back only what it copied
// itself, so cp.async.wait_group orders it: no barrier in the loop. The
// ring is [stage][piece][thread] (a warp's 16-byte pieces side by side:
// no bank conflicts). The same chunks, MMAs in the same order and the same
// reduction: sgmv_shrink64's bits. Dynamic shared memory SBP_SHARED
// (runtime/gpu's sbpShared); red reuses it after the loop.
#define SBP_ST 4
#define SBP_PIECES (2 * SB_MT + 4) // a lane's 16-byte pieces a chunk: 8 of x, 4 of A
#define SBP_SHARED (SBP_ST * SBP_PIECES * 32 * SG_WARPS * 16)
static_assert(SG_WARPS / 2 * SB_ROWS * SB_RW * 4 <= SBP_SHARED, "sgmv_shrink64p: red fits in the ring");

__device__ __forceinline__ unsigned sbp_at(unsigned ring, int st, int piece) { return ring + (unsigned)((st * SBP_PIECES + piece) * 32 * SG_WARPS * 16); }

// sbp_copy_a / sbp_copy_x: a lane's A / x pieces of the chunk at column cb
// (8 columns from cb + 8q) into ring stage st, zeros past kend or outside
// the rank / tile, as sgmv_shrink64 loads them.
__device__ __forceinline__ void sbp_copy_a(unsigned ring, int st, const bf16* const (&ar)[4], const bool (&va)[4], int cb, int kend, int q) {
    const int col = cb + q * 8;
#pragma unroll
    for (int nb = 0; nb < 4; nb++) {
        const bool ok = col < kend && va[nb];
        cp_async16(sbp_at(ring, st, 2 * SB_MT + nb), ar[nb] + (ok ? col : 0), ok ? 16 : 0);
    }
}
__device__ __forceinline__ void sbp_copy_x(unsigned ring, int st, const bf16* const (&xr)[2 * SB_MT], const bool (&vx)[2 * SB_MT], int cb, int kend, int q) {
    const int col = cb + q * 8;
#pragma unroll
    for (int h = 0; h < 2 * SB_MT; h++) {
        const bool ok = col < kend && vx[h];
        cp_async16(sbp_at(ring, st, h), xr[h] + (ok ? col : 0), ok ? 16 : 0);
    }
}

extern "C" __global__ void __launch_bounds__(32 * SG_WARPS, 1) sgmv_shrink64p(SHRINK_ARGS) {
    extern __shared__ __align__(16) unsigned char sbp_ring[];
    SB_START
    // the warp's chunks: columns c0 + 256j, j < nch (sgmv_shrink64's cb, cb + 256, ...)
    const int c0 = kbeg + warp * 32;
    const int nch = c0 < kend ? (kend - c0 + 255) / 256 : 0;
    const unsigned ring = (unsigned)__cvta_generic_to_shared(sbp_ring) + threadIdx.x * 16;
    // the first stages' A before griddepcontrol.wait (adapter weights,
    // which no kernel of the step writes), x after it; a group a stage
#pragma unroll
    for (int j = 0; j < SBP_ST - 1; j++) sbp_copy_a(ring, j, ar, va, c0 + 256 * j, kend, q);
    pdl_entry(); // x is the previous kernel's output
#pragma unroll
    for (int j = 0; j < SBP_ST - 1; j++) {
        sbp_copy_x(ring, j, xr, vx, c0 + 256 * j, kend, q);
        cp_async_commit();
    }
    for (int j = 0; j < nch; j++) {
        // chunk j + SBP_ST - 1 into the stage chunk j - 1 left (this lane
        // read it into registers for MMAs already issued)
        const int jn = j + SBP_ST - 1, sn = jn % SBP_ST;
        if (jn < nch) {
            sbp_copy_a(ring, sn, ar, va, c0 + 256 * jn, kend, q);
            sbp_copy_x(ring, sn, xr, vx, c0 + 256 * jn, kend, q);
        }
        cp_async_commit(); // empty past the end: the group count stays uniform
        cp_async_wait<SBP_ST - 1>(); // chunk j's group has landed
        const int st = j % SBP_ST;
        uint4 xv[2 * SB_MT], av[4];
#pragma unroll
        for (int h = 0; h < 2 * SB_MT; h++) xv[h] = lds16(sbp_at(ring, st, h));
#pragma unroll
        for (int nb = 0; nb < 4; nb++) av[nb] = lds16(sbp_at(ring, st, 2 * SB_MT + nb));
        sb_mma(c, xv, av);
    }
    cp_async_wait<0>();
    __syncthreads(); // every warp done with its ring: red takes it
    sb_finish(c, reinterpret_cast<float(*)[SB_ROWS * SB_RW]>(sbp_ring), tmp, tile, e, s, k0, max_rank, t_stride, rows_total);
}

// sgmv_expand: out[row][off_s + j] += sum_k tmp[row][s*max_rank + k] * B_s[j][k]
// (tmp summed over the ksplit partials); with accum 0, out is float32 (rows
// o_stride floats apart) and gets the sum alone, zero where the slice has no
// adapter (a LoRA update computed beside its projection). grid (tiles, ceil(out_total/256)),
// block 128: each thread owns two adjacent output columns. Its B rows (the
// first 64 ranks, 16 bytes a load) and the tile's output values are loaded
// before the tile's tmp rows are staged in shared memory, so the three
// streams are in flight together; then every row of the tile is updated.
#define SG_EX_THREADS 128

extern "C" __global__ void __launch_bounds__(SG_EX_THREADS) sgmv_expand(
    bf16* __restrict__ out, const float* __restrict__ tmp, const LoraEntry* __restrict__ table, const int4* __restrict__ tiles,
    int entry_base, int entry_stride, int m0, int m1, int m2, int nslices, int off1, int off2, int out_total,
    int max_rank, int o_stride, int t_stride, int rows_total, int ksplit, int accum) {
    pdl_entry();
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
    for (int r = 0; r < SG_TR; r++) {
        ov[r] = __floats2bfloat162_rn(0.f, 0.f);
        if (accum && r < n && rank > 0) ov[r] = *reinterpret_cast<const __nv_bfloat162*>(out + (i64)(tile.x + r) * o_stride + j);
    }
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
            if (accum)
                *reinterpret_cast<__nv_bfloat162*>(out + (i64)(tile.x + r) * o_stride + j) = __floats2bfloat162_rn(v.x + acc0[r], v.y + acc1[r]);
            else
                *reinterpret_cast<float2*>(reinterpret_cast<float*>(out) + (i64)(tile.x + r) * o_stride + j) = make_float2(acc0[r], acc1[r]);
        }
    }
}

// sgmv_expand_tc{1,2,4}: the expand on the tensor cores, for adapters whose
// ranks are multiples of 8 (at most 32*KC) and slices whose widths are
// multiples of 8. Same contract as sgmv_expand (accum, tmp partials, tile
// and table layout). grid (sum over slices of ceil(width_s / block
// columns), tiles), block 256: each block takes one slice's column range
// of one tile; blk1 and blk2 are the first blockIdx.x of slices 1 and 2.
// Each warp takes 8*NG columns: lane (g, q) loads 8 consecutive ranks
// [32kc + 8q, +8) of column g of each 8-column group (16 bytes of B's row),
// all of them before anything else waits; the tile's rows of tmp (summed
// over the K-split partials) go to shared memory, and from there into A
// fragments whose K order is permuted the same way (MMA k 2q, 2q+1, 2q+8,
// 2q+9 <-> ranks 8q..8q+3, then 8q+4..8q+7), split into a bf16 high part
// and the bf16 residual so the product keeps float32 precision. Versus
// sgmv_expand: B is read with 16-byte loads that are all in flight at once
// and the products run as MMAs, so a block of 256 threads covers 512
// columns (rank 32) with ~16 instructions per column group.
template <int KC, int MT = 1>
struct TcShape {
    static constexpr int NG = (KC == 1 ? 8 : (KC == 2 ? 4 : 2)) / MT; // 8-column groups per warp
    static constexpr int COLS = 8 * 8 * NG;                            // columns per block (8 warps)
    static_assert(NG >= 1, "TcShape: MT m16 tiles leave a warp no column group");
};

//
// MT (sgmv_expand_tc64s: KC 1, MT 4): a block takes MT m16 tiles of rows
// (the step's 64-row tiles of one adapter) and NG / MT column groups a
// warp: each B column is then read once per 16 MT rows. The MMAs of each
// output are the same in the same order: the bits of MT 1.
//
// ST (sgmv_expand_tc64s; kernelForce.stageOut): adding in place, the
// block's output tile moves between global and shared memory in 16-byte
// pieces of whole rows (cp.async in right after griddepcontrol.wait, in
// flight with tmp's loads; coalesced stores out after the adds), and each
// thread adds its MMA values to the tile in shared memory, instead of
// 4-byte loads and stores in the MMA fragment's layout (8 rows x 16 bytes
// an instruction: half of each 32-byte sector). The same adds: the same
// bits. Needs 16-byte aligned rows (o_stride % 8 == 0, out 16-byte
// aligned: runtime/gpu checks). With HS (sgmv_expand_tch1s) the tile is
// the bf16 update alone: nothing is loaded into it first; the fragments'
// rounded pairs land in it and it leaves the same way.
//
// PEFTD_EXPAND_TS (a diagnostic build for TestDecodeBench's
// PEFTD_EXPAND_TS=1): every expand takes one more argument, xts; where the
// Backend passes one (the gate/up group's expand), block b writes
// XTS_WORDS words at xts + XTS_WORDS b: %globaltimer at its entry, after
// griddepcontrol.wait and at its end, and the SM it ran on (zeros for a
// spare tile's block), so the last launch's blocks can be laid out in time.
#ifdef PEFTD_EXPAND_TS
#define XTS_WORDS 4
#define XTS_PARAM , unsigned long long* __restrict__ xts
#define XTS_ARG , xts
// xts_put: thread 0 of a block that records writes word w of its stamps
// (the address worked out again each time: nothing held in registers
// across the kernel, so the build keeps the expand's occupancy)
__device__ __forceinline__ void xts_put(unsigned long long* xts, int w, unsigned long long v) {
    if (xts != nullptr && threadIdx.x == 0) xts[XTS_WORDS * ((i64)blockIdx.y * gridDim.x + blockIdx.x) + w] = v;
}
#else
#define XTS_PARAM
#define XTS_ARG
#endif
template <int KC, int MT = 1, bool ST = false, bool HS = false>
__device__ __forceinline__ void expand_tc_body(
    bf16* __restrict__ out, const float* __restrict__ tmp, const LoraEntry* __restrict__ table, const int4* __restrict__ tiles,
    int entry_base, int entry_stride, int m0, int m1, int m2, int blk1, int blk2, int off1, int off2, int out_total,
    int max_rank, int o_stride, int t_stride, int rows_total, int ksplit, int accum XTS_PARAM) {
#ifdef PEFTD_EXPAND_TS
    xts_put(xts, 0, globaltimer_ns());
#endif
    constexpr int NG = TcShape<KC, MT>::NG, R = 32 * KC, W = R + 4;
    // ST: the output tile, rows of COLS + 8 bf16 (the 8: a thread's
    // fragment rows g = 0..7 land 4 banks apart)
    constexpr int COLS = TcShape<KC, MT>::COLS, OW = COLS + 8;
    __shared__ __align__(16) float ts[SG_TR * MT * W];
    __shared__ __align__(16) bf16 os[ST ? 16 * MT * OW : 8];
    // Before griddepcontrol.wait (pdl_entry) this block reads only what no
    // kernel of the step writes: its tile (step metadata, copied before the
    // step), its table entry and its columns of B (adapter weights). So
    // with PDL the fetch of B overlaps the shrink's tail. Every block waits
    // before it exits, spare ones too: a kernel after this one that waits
    // for it then also finds the shrink's writes complete.
    const int4 tile = tiles[blockIdx.y];
    if (tile.y == 0) { // no rows (a recorded step's spare tile)
        pdl_entry();
#ifdef PEFTD_EXPAND_TS
        xts_put(xts, 0, 0);
#endif
        return;
    }
    const int bx = blockIdx.x;
    const int s = bx >= blk2 ? 2 : (bx >= blk1 ? 1 : 0);
    const int sOff = s == 0 ? 0 : (s == 1 ? off1 : off2);
    const int sEnd = s == 0 ? off1 : (s == 1 ? off2 : out_total);
    const int chunk = bx - (s == 0 ? 0 : (s == 1 ? blk1 : blk2));
    const LoraEntry e = table[entry_base + tile.z * entry_stride + sg_mod(s, m0, m1, m2)];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    const int col0 = sOff + chunk * TcShape<KC, MT>::COLS + warp * 8 * NG;
    const int n = tile.y, rank = e.rank;
    uint4 bv[NG][KC];
#pragma unroll
    for (int ng = 0; ng < NG; ng++) {
        const int c = col0 + ng * 8 + g;
#pragma unroll
        for (int kc = 0; kc < KC; kc++) {
            const int k = kc * 32 + q * 8;
            bv[ng][kc] = (c < sEnd && k < rank) ? ldg16_early(e.b + (i64)(c - sOff) * rank + k) : make_uint4(0, 0, 0, 0);
        }
    }
    pdl_entry(); // tmp is the shrink's output
#ifdef PEFTD_EXPAND_TS
    xts_put(xts, 1, globaltimer_ns());
#endif
    // ST: the block's output tile into os (the product before this kernel
    // wrote it: after the wait), in flight with tmp's loads; 16-byte
    // pieces, piece i row i / (COLS / 8)
    const int bcol0 = sOff + chunk * COLS; // the block's first column
    const bool staged = ST && !HS && accum && rank > 0;
    if constexpr (ST) {
        if (staged) {
            for (int i = threadIdx.x; i < 16 * MT * (COLS / 8); i += 256) {
                const int r = i / (COLS / 8), col = bcol0 + 8 * (i % (COLS / 8));
                if (r < n && col < sEnd)
                    cp_async16(static_cast<unsigned>(__cvta_generic_to_shared(os + r * OW + col - bcol0)), out + (i64)(tile.x + r) * o_stride + col, 16);
            }
            cp_async_commit();
        }
    }
    if (rank > 0) {
        // The tile's rows of tmp, summed over the K parts (sum_kparts):
        // each thread's PER values (rows r0 + DR * u, rank k), EX_ZU / PER
        // K parts of each in flight together.
        constexpr int PER = SG_TR * MT * R / 256, ZU = EX_ZU / PER > 0 ? EX_ZU / PER : 1, DR = 256 / R;
        const int r0 = threadIdx.x / R, k = threadIdx.x % R;
        bool ok[PER];
#pragma unroll
        for (int u = 0; u < PER; u++) ok[u] = r0 + DR * u < n && k < rank;
        float v[PER];
        sum_kparts<ZU>(v, tmp + ((i64)tile.x + r0) * t_stride + s * max_rank + k, (i64)DR * t_stride, (i64)rows_total * t_stride, ksplit, ok);
#pragma unroll
        for (int u = 0; u < PER; u++) ts[(r0 + DR * u) * W + k] = v[u];
    }
    if constexpr (ST) {
        if (staged) cp_async_wait<0>(); // this thread's pieces of os have landed (the barrier: everyone's)
    }
    __syncthreads();
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
        if (MT > 1 && 16 * mt >= n) break; // uniform: no row of this m16 tile
        const float* tr = ts + 16 * mt * W;
        float c[NG][4];
#pragma unroll
        for (int ng = 0; ng < NG; ng++) c[ng][0] = c[ng][1] = c[ng][2] = c[ng][3] = 0.f;
        if (rank > 0) {
#pragma unroll
            for (int kc = 0; kc < KC; kc++) {
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    const int k = kc * 32 + q * 8 + 4 * h;
                    const float4 t0 = *reinterpret_cast<const float4*>(tr + g * W + k);
                    const float4 t1 = *reinterpret_cast<const float4*>(tr + (g + 8) * W + k);
                    unsigned ah[4], al[4];
                    split2(t0.x, t0.y, ah[0], al[0]);
                    split2(t1.x, t1.y, ah[1], al[1]);
                    split2(t0.z, t0.w, ah[2], al[2]);
                    split2(t1.z, t1.w, ah[3], al[3]);
#pragma unroll
                    for (int ng = 0; ng < NG; ng++) {
                        const unsigned b0 = h == 0 ? bv[ng][kc].x : bv[ng][kc].z;
                        const unsigned b1 = h == 0 ? bv[ng][kc].y : bv[ng][kc].w;
                        mma16816(c[ng], ah[0], ah[1], ah[2], ah[3], b0, b1);
                        mma16816(c[ng], al[0], al[1], al[2], al[3], b0, b1);
                    }
                }
            }
        } else if (!HS && accum) {
#ifdef PEFTD_EXPAND_TS
            xts_put(xts, 0, 0);
#endif
            return; // nothing to add
        }
#pragma unroll
        for (int ng = 0; ng < NG; ng++) {
            const int col = col0 + ng * 8 + 2 * q;
            if (col >= sEnd) continue;
#pragma unroll
            for (int half = 0; half < 2; half++) {
                const int r = 16 * mt + g + 8 * half;
                if (r >= n) continue;
                const float v0 = c[ng][2 * half], v1 = c[ng][2 * half + 1];
                if (HS) { // the update alone, rounded to bf16
                    const __nv_bfloat162 h = __floats2bfloat162_rn(v0, v1);
                    if constexpr (ST) { // into the tile in shared memory: out in whole rows below
                        *reinterpret_cast<__nv_bfloat162*>(os + r * OW + col - bcol0) = h;
                    } else {
                        *reinterpret_cast<__nv_bfloat162*>(out + (i64)(tile.x + r) * o_stride + col) = h;
                    }
                } else if (ST && accum) {
                    __nv_bfloat162* p = reinterpret_cast<__nv_bfloat162*>(os + r * OW + col - bcol0);
                    const float2 o = __bfloat1622float2(*p);
                    *p = __floats2bfloat162_rn(o.x + v0, o.y + v1);
                } else if (accum) {
                    __nv_bfloat162* p = reinterpret_cast<__nv_bfloat162*>(out + (i64)(tile.x + r) * o_stride + col);
                    const float2 o = __bfloat1622float2(*p);
                    *p = __floats2bfloat162_rn(o.x + v0, o.y + v1);
                } else {
                    *reinterpret_cast<float2*>(reinterpret_cast<float*>(out) + (i64)(tile.x + r) * o_stride + col) = make_float2(v0, v1);
                }
            }
        }
    }
    if constexpr (ST) {
        if (staged || HS) { // the summed tile (HS: the update) out in 16-byte pieces of whole rows
            __syncthreads();
            for (int i = threadIdx.x; i < 16 * MT * (COLS / 8); i += 256) {
                const int r = i / (COLS / 8), col = bcol0 + 8 * (i % (COLS / 8));
                if (r < n && col < sEnd)
                    *reinterpret_cast<uint4*>(out + (i64)(tile.x + r) * o_stride + col) = *reinterpret_cast<const uint4*>(os + r * OW + col - bcol0);
            }
        }
    }
#ifdef PEFTD_EXPAND_TS
    {
        unsigned sm;
        asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
        xts_put(xts, 2, globaltimer_ns());
        xts_put(xts, 3, sm);
    }
#endif
}

#define EXPAND_TC_ARGS                                                                                                   \
    bf16 *__restrict__ out, const float *__restrict__ tmp, const LoraEntry *__restrict__ table, const int4 *__restrict__ tiles, \
        int entry_base, int entry_stride, int m0, int m1, int m2, int blk1, int blk2, int off1, int off2, int out_total,  \
        int max_rank, int o_stride, int t_stride, int rows_total, int ksplit, int accum XTS_PARAM
#define EXPAND_TC_PASS                                                                                                   \
    out, tmp, table, tiles, entry_base, entry_stride, m0, m1, m2, blk1, blk2, off1, off2, out_total, max_rank, o_stride, \
        t_stride, rows_total, ksplit, accum XTS_ARG

extern "C" __global__ void __launch_bounds__(256) sgmv_expand_tc1(EXPAND_TC_ARGS) { expand_tc_body<1>(EXPAND_TC_PASS); }
extern "C" __global__ void __launch_bounds__(256) sgmv_expand_tc2(EXPAND_TC_ARGS) { expand_tc_body<2>(EXPAND_TC_PASS); }
extern "C" __global__ void __launch_bounds__(256) sgmv_expand_tc4(EXPAND_TC_ARGS) { expand_tc_body<4>(EXPAND_TC_PASS); }
// sgmv_expand_tch{1,2,4}: sgmv_expand_tc{kc} writing the update alone as
// bf16 (HS; accum not read): out is bf16, rows o_stride values apart, zero
// where the slice has no adapter (the gate/up update silu_mul_h / _o2h /
// _clh read: kernelForce.guHalf, runtime/gpu's accHalf).
extern "C" __global__ void __launch_bounds__(256) sgmv_expand_tch1(EXPAND_TC_ARGS) { expand_tc_body<1, 1, false, true>(EXPAND_TC_PASS); }
extern "C" __global__ void __launch_bounds__(256) sgmv_expand_tch2(EXPAND_TC_ARGS) { expand_tc_body<2, 1, false, true>(EXPAND_TC_PASS); }
extern "C" __global__ void __launch_bounds__(256) sgmv_expand_tch4(EXPAND_TC_ARGS) { expand_tc_body<4, 1, false, true>(EXPAND_TC_PASS); }
// sgmv_expand_tch1s: sgmv_expand_tch1 with its output tile staged (ST):
// the fragments' bf16 pairs go to shared memory, and the tile leaves in
// 16-byte pieces of whole rows (a warp's store: 512 bytes of one row, full
// 32-byte sectors) instead of 4-byte pieces of 8 rows an instruction (half
// of each sector). The same values: tch1's bits. Needs 16-byte aligned
// rows (o_stride % 8 == 0, out 16-byte aligned: runtime/gpu checks).
extern "C" __global__ void __launch_bounds__(256) sgmv_expand_tch1s(EXPAND_TC_ARGS) { expand_tc_body<1, 1, true, true>(EXPAND_TC_PASS); }
// sgmv_expand_tc64s: sgmv_expand_tc1 adding in place on the step's 64-row
// tiles of one adapter (the big tiles sgmv_shrink64 takes: {first row,
// rows, slot, 0}), 128 columns a block instead of 512 (expand_tc_body's MT
// 4), the output tile staged in shared memory (ST): 16-byte whole-row
// loads and stores of the values it adds to. Each B column is read once
// per 64 rows of its adapter, not once per 16. By default from
// stageOutMinRows LoRA rows (kernelForce.stageOut). The same bits as tc1.
// (Without the staging, sgmv_expand_tc64, and tc1 with the output values
// loaded early, sgmv_expand_tcp*, lost: PERFORMANCE v0.75-v0.78, removed
// in v0.80.)
#define X64_COLS 128 // TcShape<1, 4>::COLS; x64Cols in runtime/gpu
extern "C" __global__ void __launch_bounds__(256) sgmv_expand_tc64s(EXPAND_TC_ARGS) {
    static_assert(TcShape<1, 4>::COLS == X64_COLS, "sgmv_expand_tc64s: runtime/gpu's x64Cols");
    expand_tc_body<1, 4, true>(EXPAND_TC_PASS);
}

// l2_flush: reads n 16-byte words (a buffer larger than L2) and writes nothing
// unless the impossible happens, so the cache ends up full of clean lines.
// Benchmarks run it between timed replays (a memset would leave dirty lines
// whose write-back lands in the next timed region).
extern "C" __global__ void l2_flush(const uint4* __restrict__ p, i64 n, unsigned* sink) {
    pdl_entry();
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

// logit_adjust: the penalties and logit bias of the rows about to be
// sampled (sample.Apply in runtime/sample): entry i, four words (row,
// token, rep and add as float bits), changes logits[row * V + token] x to
// x / rep when x > 0, else x * rep, then adds add, each operation rounded
// on its own as the host does. Entries name each (row, token) at most once.
extern "C" __global__ void logit_adjust(float* logits, const int* ent, int n, int V) {
    pdl_entry();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int* e = ent + 4 * i;
    const float rep = __int_as_float(e[2]), add = __int_as_float(e[3]);
    float* p = logits + (long long)e[0] * V + e[1];
    float x = *p;
    if (rep != 1.f) x = x > 0.f ? __fdiv_rn(x, rep) : __fmul_rn(x, rep);
    *p = __fadd_rn(x, add);
}

// kept: inside the cut (K, I) of the order (key desc, id asc).
__device__ __forceinline__ bool in_cut(unsigned key, int i, unsigned K, int I) { return key > K || (key == K && i <= I); }

extern "C" __global__ void __launch_bounds__(SM_THREADS) sample_rows(int* out, const float* logits, const int* params, int V, int* ring) {
    pdl_entry();
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
        if (ring) ring[blockIdx.x] = chosen; // for a step chained behind this one (embed's tok_from)
    }
}

// ---------------------------------------------------------------------------
// gemm_skinny: out[M, N] = x[M, K] . w[N, K]^T for the few rows of a decode
// step (M <= 16), bf16 in, float32 accumulate, bf16 out; x, w and out whole
// rows (ld K, K, N), 16-byte aligned. Such a product is the weights' bytes:
// the kernel streams them once, in a grid of one wave (N / BN blocks,
// runtime/gpu/bf16_skinny.go picks BN), without cuBLASLt's split-K reduce
// launch. Block b takes weight rows [b BN, (b + 1) BN) and all of K in tiles
// of BK columns (the rows' contiguous BK * 2 bytes), copied with x's M rows
// into ST shared stages by cp.async, ST - 1 tiles ahead of the one multiplied
// (m16n8k16 MMAs, both operands by ldmatrix from rows whose 16-byte chunks
// are XOR-swizzled in groups of 8). Two layouts of the 4 warps:
//   - gemm_skinny_n{32,48} (WK): BK 256; warp w multiplies columns [64 w,
//     64 w + 64) of each tile for all BN outputs, and the warps' sums meet
//     in shared memory at the end (narrow blocks: many rows' bytes each);
//   - gemm_skinny_n224: BK 64; warp w owns outputs [BN/4 w, BN/4 (w + 1)).
// opts bit 0: the first ST - 1 weight tiles are requested before
// griddepcontrol.wait (no kernel of a step writes weights), so their DRAM
// latency runs under the kernel before.
//
// gemm_skinny_lora_n{32,48}_x{8,16} (XR extra rows): the same product, and
// with it the shrink of the group's LoRA update (runtime/gpu/lora_inline.go): each
// block streams XR rows of the step's adapters' A matrices beside its BN
// weight rows, as extra outputs of its m16 tile. The step's tiles x slices x
// ranks (n_extra rows, the SGMV shrink's items one rank row each) are dealt
// to the blocks interleaved (row e of block b is e = j * gridDim.x + b), so
// the few live ones spread over the grid; a row past a tile's adapter rank,
// or of a spare tile, streams zeros. Step row m gets the value of extra row
// (tile t, slice s, rank k) in tmp[m][s * rank + k] (scaled, float32: the
// SGMV shrink's layout with one K part) where m is one of t's rows. The
// shrink then costs its A bytes inside a product that streams the weights
// anyway, instead of a launch beside it; sgmv_expand_tc writes the update
// after the product.
#define SK_THREADS 128

template <int BN, bool WK, int XR = 0> struct SkShape {
    static constexpr int BW = BN + XR;                     // rows of weight (and A) a block streams
    static constexpr int BK = WK ? 256 : 64;
    static constexpr int ROW_B = BK * 2;                   // bytes of a tile row
    static constexpr int NT = WK ? BW / 8 : BN / 32;       // n8 tiles a warp multiplies
    static constexpr int STAGE_B = (BW + 16) * ROW_B;      // the weight tile, then x's 16 rows
    static constexpr int ST = (190 * 1024) / STAGE_B < 8 ? (190 * 1024) / STAGE_B : 8;
    static_assert(ST >= 3, "gemm_skinny: too few stages");
    static_assert(!WK || 4 * 16 * BW * 4 <= ST * STAGE_B, "gemm_skinny: the warps' sums do not fit the stages");
    static_assert(XR == 0 || WK, "gemm_skinny: LoRA rows only in the warps-along-K layout");
};

// SkLora: where gemm_skinny_lora finds the step's adapters and puts the shrink.
struct SkLora {
    float* tmp;
    const LoraEntry* table;
    const int4* tiles;
    int entry_base, entry_stride, m0, m1, m2, nslices, rank, n_extra, t_stride;
};

// sk_lora_row: extra row j of this block: its A row (nullptr: zeros), and
// where its values go (tile, tmp column, scale).
struct SkLoraRow {
    const bf16* a;
    int4 tile;
    int col;
    float scale;
};

__device__ __forceinline__ SkLoraRow sk_lora_row(const SkLora& L, int j, int K) {
    SkLoraRow r;
    r.a = nullptr, r.tile.x = r.tile.y = r.tile.z = r.tile.w = 0, r.col = 0, r.scale = 0.f;
    const int e = j * gridDim.x + blockIdx.x, per = L.nslices * L.rank;
    if (e >= L.n_extra) return r;
    const int t = e / per, s = (e - t * per) / L.rank, k = e - t * per - s * L.rank;
    r.tile = L.tiles[t];
    if (r.tile.y == 0) return r;
    const LoraEntry en = L.table[L.entry_base + r.tile.z * L.entry_stride + sg_mod(s, L.m0, L.m1, L.m2)];
    if (k >= en.rank) return r;
    r.a = en.a + (i64)k * K;
    r.col = s * L.rank + k;
    r.scale = en.scale;
    return r;
}

template <int BN, bool WK, int XR = 0>
__device__ __forceinline__ void gemm_skinny_body(bf16* __restrict__ out, const bf16* __restrict__ x, const bf16* __restrict__ w,
                                                 int M, int N, int K, int opts, const SkLora& L) {
    typedef SkShape<BN, WK, XR> S;
    constexpr int CH = S::ROW_B / 16; // 16-byte chunks a tile row
    constexpr int XI = XR * CH / SK_THREADS; // extra rows' chunks a thread copies each tile
    extern __shared__ __align__(128) unsigned char ssm[];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int n0 = blockIdx.x * BN, nk = K / S::BK;
    const unsigned sb = (unsigned)__cvta_generic_to_shared(ssm);
    const bf16* xa[XI > 0 ? XI : 1]; // this thread's extra rows (A rows; nullptr: zeros)
    auto issue_wb = [&](int t) { // weight tile t into stage t % ST
        if (t < nk) {
            const unsigned d = sb + (t % S::ST) * S::STAGE_B;
            const bf16* src = w + (i64)n0 * K + t * S::BK;
#pragma unroll
            for (int i = 0; i < BN * CH / SK_THREADS; i++) {
                const int idx = tid + i * SK_THREADS, r = idx / CH, c = idx % CH;
                cp_async16(sk_slot(d, S::ROW_B, r, c), src + (i64)r * K + c * 8, 16);
            }
        }
    };
    auto issue_wx = [&](int t) { // the extra rows' tile t, after the weight tile in stage t % ST
        if constexpr (XR > 0) {
            if (t < nk) {
                const unsigned d = sb + (t % S::ST) * S::STAGE_B;
#pragma unroll
                for (int i = 0; i < XI; i++) {
                    const int idx = tid + i * SK_THREADS, r = idx / CH, c = idx % CH;
                    cp_async16(sk_slot(d, S::ROW_B, BN + r, c), xa[i] ? xa[i] + t * S::BK + c * 8 : w, xa[i] ? 16 : 0);
                }
            }
        }
    };
    auto issue_w = [&](int t) {
        issue_wb(t);
        issue_wx(t);
    };
    auto issue_x = [&](int t) { // x's M rows of tile t (rows past M are never stored: their outputs are dropped)
        if (t < nk) {
            const unsigned d = sb + (t % S::ST) * S::STAGE_B + S::BW * S::ROW_B;
            const bf16* src = x + t * S::BK;
            for (int idx = tid; idx < M * CH; idx += SK_THREADS) {
                const int r = idx / CH, c = idx % CH;
                cp_async16(sk_slot(d, S::ROW_B, r, c), src + (i64)r * K + c * 8, 16);
            }
        }
    };
    const bool early = opts & 1;
    if (early) // the weight tiles first: the extra rows' addresses wait for two dependent loads
        for (int t = 0; t < S::ST - 1; t++) issue_wb(t);
    if constexpr (XR > 0) {
#pragma unroll
        for (int i = 0; i < XI; i++) xa[i] = sk_lora_row(L, (tid + i * SK_THREADS) / CH, K).a;
        if (early)
            for (int t = 0; t < S::ST - 1; t++) issue_wx(t);
    }
    pdl_entry();
    for (int t = 0; t < S::ST - 1; t++) {
        if (!early) issue_w(t);
        issue_x(t);
        cp_async_commit(); // one group per tile (the early weight tiles join the first)
    }
    float acc[S::NT][4];
#pragma unroll
    for (int j = 0; j < S::NT; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
    // this warp's k16 steps of a tile and its first output row (n8 tile)
    const int kc0 = WK ? warp * 8 : 0, r0 = WK ? 0 : warp * 8 * S::NT;
    for (int t = 0; t < nk; t++) {
        cp_async_wait<S::ST - 2>();
        __syncthreads(); // tile t has landed for every thread; every warp is done with the stage the next issue overwrites
        issue_w(t + S::ST - 1);
        issue_x(t + S::ST - 1);
        cp_async_commit();
        const unsigned wb = sb + (t % S::ST) * S::STAGE_B, xb = wb + S::BW * S::ROW_B;
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            const int kc = kc0 + 2 * kk; // the k16 step's first chunk
            unsigned a[4];
            ldsm4(sk_slot(xb, S::ROW_B, lane & 15, kc + (lane >> 4)), a);
#pragma unroll
            for (int j = 0; j < S::NT; j += 2) {
                // lanes 0-15: n tile j, chunks kc and kc + 1 (b0, b1);
                // lanes 16-31: n tile j + 1 (the same tile again past NT)
                const int jj = j + 1 < S::NT ? j + (lane >> 4) : j;
                unsigned b[4];
                ldsm4(sk_slot(wb, S::ROW_B, r0 + jj * 8 + (lane & 7), kc + ((lane >> 3) & 1)), b);
                mma16816(acc[j], a[0], a[1], a[2], a[3], b[0], b[1]);
                if (j + 1 < S::NT) mma16816(acc[j + 1], a[0], a[1], a[2], a[3], b[2], b[3]);
            }
        }
    }
    cp_async_wait<0>();
    const int g = lane >> 2, c2 = 2 * (lane & 3);
    if constexpr (!WK) {
#pragma unroll
        for (int j = 0; j < S::NT; j++) {
            const int n = n0 + r0 + j * 8 + c2;
            if (g < M) *reinterpret_cast<__nv_bfloat162*>(out + (i64)g * N + n) = __floats2bfloat162_rn(acc[j][0], acc[j][1]);
            if (g + 8 < M) *reinterpret_cast<__nv_bfloat162*>(out + (i64)(g + 8) * N + n) = __floats2bfloat162_rn(acc[j][2], acc[j][3]);
        }
        return;
    }
    // the warps' sums [warp][16][BW] meet in shared memory, added in warp order
    constexpr int BW = S::BW;
    float* red = reinterpret_cast<float*>(ssm);
    __syncthreads(); // every warp is done with the stages
#pragma unroll
    for (int j = 0; j < S::NT; j++) {
        const int n = j * 8 + c2;
        *reinterpret_cast<float2*>(red + (warp * 16 + g) * BW + n) = make_float2(acc[j][0], acc[j][1]);
        *reinterpret_cast<float2*>(red + (warp * 16 + g + 8) * BW + n) = make_float2(acc[j][2], acc[j][3]);
    }
    __syncthreads();
    for (int p = tid; p < M * BN / 2; p += SK_THREADS) {
        const int m = 2 * p / BN, n = 2 * p - m * BN;
        float2 s = make_float2(0.f, 0.f);
#pragma unroll
        for (int q = 0; q < 4; q++) {
            const float2 v = *reinterpret_cast<const float2*>(red + (q * 16 + m) * BW + n);
            s.x += v.x, s.y += v.y;
        }
        *reinterpret_cast<__nv_bfloat162*>(out + (i64)m * N + n0 + n) = __floats2bfloat162_rn(s.x, s.y);
    }
    if constexpr (XR > 0) {
        if (tid < XR) { // thread j: extra row j, for each of the step's rows its tile holds
            const SkLoraRow r = sk_lora_row(L, tid, K);
            if (r.a) {
                for (int m = max(0, r.tile.x); m < min(M, r.tile.x + r.tile.y); m++) {
                    float s = 0.f;
#pragma unroll
                    for (int q = 0; q < 4; q++) s += red[(q * 16 + m) * BW + BN + tid];
                    L.tmp[(i64)m * L.t_stride + r.col] = s * r.scale;
                }
            }
        }
    }
}

#define GEMM_SKINNY_ARGS bf16 *out, const bf16 *x, const bf16 *w, int M, int N, int K, int opts
#define GEMM_SKINNY(BN, WK, name)                                                                               \
    extern "C" __global__ void __launch_bounds__(SK_THREADS) name(GEMM_SKINNY_ARGS) {                           \
        gemm_skinny_body<BN, WK>(out, x, w, M, N, K, opts, SkLora{});                                           \
    }
GEMM_SKINNY(32, true, gemm_skinny_n32)
GEMM_SKINNY(48, true, gemm_skinny_n48)
GEMM_SKINNY(224, false, gemm_skinny_n224)

#define GEMM_SKINNY_LORA(BN, XR)                                                                                \
    extern "C" __global__ void __launch_bounds__(SK_THREADS) gemm_skinny_lora_n##BN##_x##XR(                   \
        GEMM_SKINNY_ARGS, float* tmp, const LoraEntry* table, const int4* tiles, int entry_base, int entry_stride, \
        int m0, int m1, int m2, int nslices, int rank, int n_extra, int t_stride) {                             \
        gemm_skinny_body<BN, true, XR>(out, x, w, M, N, K, opts,                                                \
            SkLora{tmp, table, tiles, entry_base, entry_stride, m0, m1, m2, nslices, rank, n_extra, t_stride}); \
    }
GEMM_SKINNY_LORA(32, 8)
GEMM_SKINNY_LORA(32, 16)
GEMM_SKINNY_LORA(48, 8)
GEMM_SKINNY_LORA(48, 16)

// gemm_ws_n{32,48,64,96,128,224,256}: the bf16 product of 17-64 rows
// streamed through wgmma (ws_body in common.cuh: the activation rows the
// wgmma's M, BN weight rows a block, one wave, the K split met in the
// kernel; runtime/gpu ws.go plans it). sx and sw are null: fp8_ws's
// argument list, so that one launcher takes both. Only with PEFTD_WS
// (which leaves every other kernel's SASS as it is) or PEFTD_WG, on
// sm_90a: runtime/gpu loads that build (kernels.BF16Wgmma) for bf16
// weights there, and the products no LoRA update runs beside take it
// (PERFORMANCE v0.68: with two K atoms a stage, bf16 decode at 32 / 64
// rows -4% on an H200; v0.56 had it 5-6% slower there with one).
#if defined(PEFTD_WS) || defined(PEFTD_WG)
#define GEMM_WS_ARGS                                                                                    \
    bf16 *out, float *part, int *done, const bf16 *x, const float *sx, const bf16 *w, const float *sw, \
        int M, int N, int K, int opts
#define GEMM_WS_PASS out, part, done, (const unsigned char*)x, sx, (const unsigned char*)w, sw, M, N, K, opts
WS_WIDTHS(gemm_ws, ws_body, 2, GEMM_WS_ARGS, GEMM_WS_PASS, 128)
// gemm_ws_silu_n*, gemm_wsh_n*, gemm_wsh_silu_n*, gemm_ws_norm_n*: the
// fused and half-row kernels (WS_FUSED_KERNELS, common.cuh) on bf16
// operands. Their argument lists are fp8_ws's (q, qscale and sync are
// not used by the bf16 SILU and NORM ends: no quantized rows).
#define GEMM_WS_SILU_ARGS GEMM_WS_ARGS, unsigned char *q, float *qscale, unsigned *sync
#define GEMM_WS_NORM_ARGS GEMM_WS_ARGS, bf16 *xr, bf16 *nout, const bf16 *nw, float eps, unsigned char *q, float *qscale, unsigned *sync
#define GEMM_WS_NORM_PASS GEMM_WS_PASS, WsSiluQ{}, WsNorm{xr, nout, nw, eps, nullptr, nullptr, sync}
WS_FUSED_KERNELS(gemm_ws, 2, GEMM_WS_ARGS, GEMM_WS_PASS, GEMM_WS_SILU_ARGS, GEMM_WS_PASS, GEMM_WS_NORM_ARGS, GEMM_WS_NORM_PASS)
#endif

