// FP8 (e4m3) quantization kernels for peftd's FP8 weight path (runtime/gpu
// fp8.go). Weights are quantized once at upload with one float32 scale per
// output row; activations per token (row) before each FP8 GEMM. The GEMM
// itself is cuBLASLt's (outer-vector scales on both operands, bf16 out).
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
