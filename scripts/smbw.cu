// smbw.cu: how many bytes a second one SM moves, alone and beside others,
// from DRAM and from L2, with per-thread 16-byte loads and stores (as
// fp8_wgsk's sums and the LoRA expands do) and with the TMA's bulk copies.
// A probe for choosing a kernel's form, not part of the engine:
//
//   nvcc -arch=sm_90a -O3 -o smbw scripts/smbw.cu && ./smbw
//
// Each block (one an SM: every kernel asks for 200 KB of shared memory)
// moves `per` bytes starting at (block x per) mod span; span 1 GB reads
// DRAM, span 16 MB (read once before) reads L2. Median of 5 launches.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#define CK(x)                                                                             \
    do {                                                                                  \
        cudaError_t e = (x);                                                              \
        if (e != cudaSuccess) {                                                           \
            fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); \
            exit(1);                                                                      \
        }                                                                                 \
    } while (0)

constexpr int SMEM = 200 * 1024;

// ld_f4: 16-byte L2 loads (ld.global.cg), U in flight a thread.
template <int U>
__global__ void ld_f4(const float4* __restrict__ src, size_t per, size_t span, float* sink) {
    const size_t n = per / 16;
    const float4* p = src + ((size_t)blockIdx.x * per % span) / 16;
    float acc = 0.f;
    for (size_t i = threadIdx.x; i < n; i += (size_t)blockDim.x * U) {
        float4 q[U];
#pragma unroll
        for (int k = 0; k < U; k++) {
            const size_t j = i + (size_t)k * blockDim.x;
            q[k] = j < n ? __ldcg(p + j) : make_float4(0.f, 0.f, 0.f, 0.f);
        }
#pragma unroll
        for (int k = 0; k < U; k++) acc += q[k].x + q[k].y + q[k].z + q[k].w;
    }
    if (acc == 1234.5f) sink[threadIdx.x] = acc;
}

// st_f4: 16-byte stores (st.global.cg).
__global__ void st_f4(float4* __restrict__ dst, size_t per, size_t span) {
    const size_t n = per / 16;
    float4* p = dst + ((size_t)blockIdx.x * per % span) / 16;
    const float4 v = make_float4(threadIdx.x, 1.f, 2.f, 3.f);
    for (size_t i = threadIdx.x; i < n; i += blockDim.x) __stcg(p + i, v);
}

__device__ __forceinline__ unsigned smem_addr(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

// ld_bulk: one thread keeps NB bulk copies of CH bytes in flight into
// shared memory (cp.async.bulk, counted in at an mbarrier each).
template <int NB, int CH>
__global__ void ld_bulk(const char* __restrict__ src, size_t per, size_t span, float* sink) {
    extern __shared__ __align__(128) char sm[];
    __shared__ __align__(8) unsigned long long bar[NB];
    if (threadIdx.x != 0) return;
    const char* p = src + (size_t)blockIdx.x * per % span;
    for (int i = 0; i < NB; i++) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(&bar[i])));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    const size_t nch = per / CH;
    auto issue = [&](size_t c) {
        const int s = c % NB;
        const unsigned b = smem_addr(&bar[s]);
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(b), "r"(CH) : "memory");
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(smem_addr(sm + s * CH)),
                     "l"(p + c * CH), "r"(CH), "r"(b)
                     : "memory");
    };
    for (size_t c = 0; c < nch && c < NB; c++) issue(c);
    for (size_t c = 0; c < nch; c++) {
        const unsigned b = smem_addr(&bar[c % NB]), par = (c / NB) & 1;
        asm volatile("{\n.reg .pred P;\nW:\nmbarrier.try_wait.parity.shared::cta.b64 P, [%0], %1;\n@!P bra W;\n}" ::"r"(b), "r"(par) : "memory");
        if (c + NB < nch) issue(c + NB);
    }
    if (sm[0] == 123) sink[0] = 1.f;
}

// st_bulk: one thread keeps up to 8 bulk stores of CH bytes from shared
// memory in flight (cp.async.bulk.global.shared::cta, bulk groups).
template <int CH>
__global__ void st_bulk(char* __restrict__ dst, size_t per, size_t span) {
    extern __shared__ __align__(128) char sm[];
    for (int i = threadIdx.x; i < CH / 4; i += blockDim.x) reinterpret_cast<float*>(sm)[i] = i;
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    __syncthreads();
    if (threadIdx.x != 0) return;
    char* p = dst + (size_t)blockIdx.x * per % span;
    const size_t nch = per / CH;
    for (size_t c = 0; c < nch; c++) {
        asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(p + c * CH), "r"(smem_addr(sm)), "r"(CH) : "memory");
        asm volatile("cp.async.bulk.commit_group;" ::: "memory");
        asm volatile("cp.async.bulk.wait_group.read 7;" ::: "memory");
    }
    asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

int main() {
    int dev = 0, sms = 0;
    CK(cudaSetDevice(dev));
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, dev));
    const size_t big = 1ull << 30, small = 16ull << 20;
    char *buf, *obuf;
    float* sink;
    CK(cudaMalloc(&buf, big));
    CK(cudaMalloc(&obuf, big));
    CK(cudaMalloc(&sink, 4096));
    CK(cudaMemset(buf, 0, big));
    CK(cudaMemset(obuf, 0, big));
    auto attr = [](const void* f) { CK(cudaFuncSetAttribute(f, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM)); };
    attr((const void*)ld_f4<8>);
    attr((const void*)ld_f4<16>);
    attr((const void*)st_f4);
    attr((const void*)ld_bulk<6, 32768>);
    attr((const void*)ld_bulk<12, 16384>);
    attr((const void*)st_bulk<32768>);
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    printf("smbw: %s, %d SMs; GB/s an SM (and all blocks together), median of 5\n", prop.name, sms);
    printf("%-24s %-5s", "kernel", "from");
    const int grids[] = {1, 4, 20, 48, 84, 132};
    for (int g : grids)
        if (g <= sms) printf(" %15s", (std::to_string(g) + " SMs").c_str());
    printf("\n");
    struct K {
        const char* name;
        int threads;
        int kind; // 0 ld_f4<8>, 1 ld_f4<16>, 2 st_f4, 3 ld_bulk 6x32K, 4 ld_bulk 12x16K, 5 st_bulk 32K
    } ks[] = {{"ld.cg f4 x8, 256 thr", 256, 0}, {"ld.cg f4 x16, 256 thr", 256, 1}, {"ld.cg f4 x8, 512 thr", 512, 0},
              {"st.cg f4, 256 thr", 256, 2},    {"bulk ld 6 x 32 KB", 32, 3},      {"bulk ld 12 x 16 KB", 32, 4},
              {"bulk st 32 KB, 8 groups", 128, 5}};
    for (const K& k : ks)
        for (int where = 0; where < 2; where++) {
            const size_t span = where == 0 ? big : small, per = where == 0 ? (4ull << 20) : (2ull << 20);
            printf("%-24s %-5s", k.name, where == 0 ? "DRAM" : "L2");
            for (int g : grids) {
                if (g > sms) continue;
                auto launch = [&]() {
                    switch (k.kind) {
                    case 0: ld_f4<8><<<g, k.threads, SMEM>>>((const float4*)buf, per, span, sink); break;
                    case 1: ld_f4<16><<<g, k.threads, SMEM>>>((const float4*)buf, per, span, sink); break;
                    case 2: st_f4<<<g, k.threads, SMEM>>>((float4*)obuf, per, span); break;
                    case 3: ld_bulk<6, 32768><<<g, k.threads, SMEM>>>(buf, per, span, sink); break;
                    case 4: ld_bulk<12, 16384><<<g, k.threads, SMEM>>>(buf, per, span, sink); break;
                    case 5: st_bulk<32768><<<g, k.threads, SMEM>>>(obuf, per, span); break;
                    }
                };
                std::vector<float> ms;
                for (int r = 0; r < 6; r++) {
                    if (where == 0) CK(cudaMemset(obuf + (big - (64ull << 20)), r, 64ull << 20)); // push L2's lines out
                    CK(cudaEventRecord(e0));
                    launch();
                    CK(cudaEventRecord(e1));
                    CK(cudaEventSynchronize(e1));
                    CK(cudaGetLastError());
                    float t;
                    CK(cudaEventElapsedTime(&t, e0, e1));
                    if (r > 0) ms.push_back(t); // the first warms (and, from L2, loads the span)
                }
                std::sort(ms.begin(), ms.end());
                const double s = ms[ms.size() / 2] * 1e-3;
                printf("   %5.0f (%5.0f)", per / s / 1e9, g * per / s / 1e9);
            }
            printf("\n");
        }
    return 0;
}
