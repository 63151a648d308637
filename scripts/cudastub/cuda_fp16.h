#pragma once
#include "cuda_prelude.h"
struct __align__(2) __half { unsigned short x; };
struct __align__(4) __half2 { __half x, y; };
__device__ float __half2float(__half);
__device__ float2 __half22float2(__half2);
__device__ __half2 __floats2half2_rn(float, float);
