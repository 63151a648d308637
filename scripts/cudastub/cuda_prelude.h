// Declarations that let clang check the kernels' syntax and types with no
// CUDA toolkit (scripts/kernels-check.sh): the CUDA keywords, built-in
// variables and the intrinsics the kernels use, with the toolkit's
// signatures. Nothing here is compiled for a GPU.
#pragma once
#define __global__ __attribute__((global))
#define __device__ __attribute__((device))
#define __host__ __attribute__((host))
#define __shared__ __attribute__((shared))
#define __constant__ __attribute__((constant))
#define __forceinline__ __inline__ __attribute__((always_inline))
#define __launch_bounds__(...) __attribute__((launch_bounds(__VA_ARGS__)))
#define __align__(n) __attribute__((aligned(n)))
#define __grid_constant__ __attribute__((grid_constant))
#include <__clang_cuda_builtin_vars.h>
struct __align__(16) uint4 { unsigned x, y, z, w; };
struct __align__(16) int4 { int x, y, z, w; };
struct __align__(16) float4 { float x, y, z, w; };
struct __align__(8) uint2 { unsigned x, y; };
struct __align__(8) float2 { float x, y; };
__device__ uint4 make_uint4(unsigned, unsigned, unsigned, unsigned);
__device__ int4 make_int4(int, int, int, int);
__device__ uint2 make_uint2(unsigned, unsigned);
__device__ float2 make_float2(float, float);
__device__ float4 make_float4(float, float, float, float);
__device__ void __syncthreads();
__device__ void __syncwarp(unsigned = 0xffffffffu);
__device__ int __shfl_sync(unsigned, int, int, int = 32);
__device__ int __syncthreads_or(int);
__device__ void __threadfence();
__device__ void __threadfence_block();
__device__ void __trap();
__device__ void __nanosleep(unsigned);
__device__ float __shfl_xor_sync(unsigned, float, int, int = 32);
__device__ int __shfl_xor_sync(unsigned, int, int, int = 32);
__device__ unsigned __shfl_xor_sync(unsigned, unsigned, int, int = 32);
__device__ unsigned long long __shfl_xor_sync(unsigned, unsigned long long, int, int = 32);
__device__ float __shfl_up_sync(unsigned, float, unsigned, int = 32);
__device__ int __shfl_up_sync(unsigned, int, unsigned, int = 32);
__device__ unsigned __shfl_up_sync(unsigned, unsigned, unsigned, int = 32);
template <class T> __device__ T __ldg(const T*);
template <class T> __device__ T __ldcg(const T*);
__device__ float __int_as_float(int);
__device__ float __uint_as_float(unsigned);
__device__ int __float_as_int(float);
__device__ float __fdiv_rn(float, float);
__device__ float __fmul_rn(float, float);
__device__ float __fadd_rn(float, float);
__device__ unsigned __float_as_uint(float);
__device__ unsigned __umulhi(unsigned, unsigned);
__device__ float expf(float);
__device__ float exp2f(float);
__device__ int __ffs(int);
__device__ int __popc(unsigned);
__device__ int __popcll(unsigned long long);
__device__ unsigned __ballot_sync(unsigned, int);
__device__ unsigned long __cvta_generic_to_shared(const void*);
__device__ float logf(float);
__device__ float sqrtf(float);
__device__ float fabsf(float);
__device__ float fmaxf(float, float);
__device__ float fmaf(float, float, float);
__device__ float fminf(float, float);
__device__ void sincosf(float, float*, float*);
__device__ int atomicAdd(int*, int);
__device__ unsigned atomicAdd(unsigned*, unsigned);
__device__ float atomicAdd(float*, float);
__device__ unsigned long long atomicAdd(unsigned long long*, unsigned long long);
__device__ int atomicExch(int*, int);
__device__ unsigned atomicExch(unsigned*, unsigned);
__device__ int atomicMax(int*, int);
__device__ unsigned atomicMax(unsigned*, unsigned);
__device__ unsigned long long atomicMax(unsigned long long*, unsigned long long);
__device__ int min(int, int);
__device__ int max(int, int);
__device__ unsigned min(unsigned, unsigned);
__device__ unsigned max(unsigned, unsigned);
__device__ long long min(long long, long long);
__device__ long long max(long long, long long);
__device__ float min(float, float);
__device__ float max(float, float);
