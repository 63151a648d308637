//go:build cuda

package cuda

import (
	"fmt"
	"os"
	"testing"
)

// gridBarrierSrc: the probe for issue 9's next LoRA design (PERFORMANCE
// v0.74 Next 3: a group's shrink and expand in one launch, the shrink's
// partials met at a grid barrier). Phase one writes each block's value
// (its slice of A summed, plus epoch and its index); phase two reads its
// neighbour's (plus its slice of B). As two kernels (gb_write, gb_read:
// the read's B slice before griddepcontrol.wait, as the expand's weights
// would be) or as one (gb_fused: B before the barrier). The barrier is
// the counter-and-generation kind: the last block to arrive resets the
// counter and bumps the generation the others spin on; it needs every
// block resident at once (grids of at most the SM count here).
const gridBarrierSrc = `
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void pdl_launch() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }

// slice_sum: the block's share of words 16-byte words of src, folded into
// one float (thread 0's result), so that the loads cannot be dropped.
__device__ float slice_sum(const uint4* __restrict__ src, int words, float* red) {
    unsigned acc = 0;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < words; i += gridDim.x * blockDim.x) {
        const uint4 v = __ldg(src + i);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    red[threadIdx.x] = (float)(acc & 0xff);
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
        __syncthreads();
    }
    const float r = red[0];
    __syncthreads();
    return r;
}

__device__ __forceinline__ void grid_barrier(unsigned* cnt, volatile unsigned* gen) {
    __syncthreads();
    if (threadIdx.x == 0) {
        const unsigned g = *gen; // before arriving: it moves only once every block has
        __threadfence();
        if (atomicAdd(cnt, 1u) == gridDim.x - 1) {
            *cnt = 0;
            __threadfence();
            atomicAdd((unsigned*)gen, 1u);
        } else {
            // bounded: a block that never sees the others (not all
            // resident) gives up and reads stale values, which the test
            // reports, rather than hanging the card
            for (unsigned k = 0; *gen == g && k < (1u << 26); k++) {
            }
        }
        __threadfence();
    }
    __syncthreads();
}

extern "C" __global__ void __launch_bounds__(256) gb_write(float* part, const uint4* a, int wa, float epoch) {
    __shared__ float red[256];
    pdl_wait();
    const float s = slice_sum(a, wa, red);
    if (threadIdx.x == 0) part[blockIdx.x] = s * 0.f + epoch + blockIdx.x;
    pdl_launch();
}

extern "C" __global__ void __launch_bounds__(256) gb_read(float* out, const float* part, const uint4* b, int wb) {
    __shared__ float red[256];
    const float s = slice_sum(b, wb, red); // weights: before the wait
    pdl_wait();
    if (threadIdx.x == 0) out[blockIdx.x] = part[(blockIdx.x + 1) % gridDim.x] + s * 0.f;
    pdl_launch();
}

extern "C" __global__ void __launch_bounds__(256) gb_fused(float* out, float* part, const uint4* a, int wa, const uint4* b, int wb,
                                                      float epoch, unsigned* cnt, unsigned* gen) {
    __shared__ float red[256];
    const float sb = slice_sum(b, wb, red); // weights: before the wait
    pdl_wait();
    const float sa = slice_sum(a, wa, red);
    if (threadIdx.x == 0) part[blockIdx.x] = sa * 0.f + epoch + blockIdx.x;
    grid_barrier(cnt, gen);
    if (threadIdx.x == 0) out[blockIdx.x] = ((volatile float*)part)[(blockIdx.x + 1) % gridDim.x] + sb * 0.f;
    pdl_launch();
}
`

// TestGPUGridBarrier checks the grid barrier (every block reads its
// neighbour's value of this launch, over launches of changing epochs)
// and times one launch with a barrier against two launches, with and
// without PDL (PEFTD_BARRIER_BENCH=1), replayed as graphs (L2-hot: the fixed costs, not bytes).
// Bytes: 1 MB of A and 1.5 MB of B, four rank-32 adapters' q/k/v at one
// row. The probe's numbers decide whether the fused shrink+expand is worth
// writing (issue 9's few-row bars: 8 dependent kernels a layer now).
func TestGPUGridBarrier(t *testing.T) {
	c := ctx(t)
	cubin, log, err := Compile(gridBarrierSrc, "grid_barrier.cu", []string{"-arch=" + c.Device().Arch()})
	if err != nil {
		t.Fatalf("%v\n%s", err, log)
	}
	m, err := c.LoadModule(cubin)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Unload()
	fn := map[string]*Function{}
	for _, name := range []string{"gb_write", "gb_read", "gb_fused"} {
		if fn[name], err = m.Function(name); err != nil {
			t.Fatal(err)
		}
	}
	s, err := c.NewStream()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Destroy()
	sms := c.Device().SMs
	const aBytes, bBytes = 1 << 20, 3 << 19
	alloc := func(n int) *DeviceBuffer {
		d, err := c.Alloc(n)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { d.Free() })
		if err := s.Memset8(d.Ptr(), 0x5a, n); err != nil {
			t.Fatal(err)
		}
		return d
	}
	a, b := alloc(aBytes), alloc(bBytes)
	part, out, sync := alloc(4*sms), alloc(4*sms), alloc(8)
	if err := s.Memset8(sync.Ptr(), 0, 8); err != nil {
		t.Fatal(err)
	}
	cnt, gen := uint64(sync.Ptr()), uint64(sync.Ptr())+4
	blk := Dim3{X: 256}
	fused := func(g int, wa, wb int32, epoch float32) error {
		return fn["gb_fused"].Launch(s, Dim3{X: g}, blk, 0, out, part, a, wa, b, wb, epoch, cnt, gen)
	}
	pair := func(g int, wa, wb int32, epoch float32) error {
		if err := fn["gb_write"].Launch(s, Dim3{X: g}, blk, 0, part, a, wa, epoch); err != nil {
			return err
		}
		return fn["gb_read"].Launch(s, Dim3{X: g}, blk, 0, out, part, b, wb)
	}

	// The barrier holds: each launch's reads see that launch's writes.
	for _, g := range []int{1, 2, sms / 2, sms} {
		for e := range 50 {
			epoch := float32(1000 * (e + 1))
			if err := fused(g, aBytes/16, bBytes/16, epoch); err != nil {
				t.Fatal(err)
			}
			got := make([]float32, g)
			if err := CopyDtoH(s, got, out.Ptr()); err != nil {
				t.Fatal(err)
			}
			for i, v := range got {
				if want := epoch + float32((i+1)%g); v != want {
					t.Fatalf("grid %d, launch %d: block %d read %v, want %v (its neighbour's value of this launch)", g, e, i, v, want)
				}
			}
		}
	}

	if os.Getenv("PEFTD_BARRIER_BENCH") == "" {
		t.Log("the barrier holds; PEFTD_BARRIER_BENCH=1 times it")
		return
	}
	type row struct {
		name string
		pdl  bool
		g    int
		wa   int32
		wb   int32
		one  func(g int, wa, wb int32, epoch float32) error
	}
	var rows []row
	for _, g := range []int{sms / 2, sms} {
		for _, bytes := range []bool{false, true} {
			wa, wb := int32(0), int32(0)
			if bytes {
				wa, wb = aBytes/16, bBytes/16
			}
			for _, pdl := range []bool{false, true} {
				rows = append(rows, row{"two kernels", pdl, g, wa, wb, pair}, row{"one, barrier", pdl, g, wa, wb, fused})
			}
		}
	}
	t.Logf("%-13s %-5s %5s %9s %9s", "launch", "pdl", "grid", "MB", "us_each")
	for _, r := range rows {
		if err := s.SetProgrammaticLaunch(r.pdl); err != nil {
			t.Skipf("PDL: %v", err)
		}
		us, err := s.GraphMedianUs(64, 21, func(i int) error { return r.one(r.g, r.wa, r.wb, float32(i)) })
		if err != nil {
			t.Fatalf("%s pdl %v grid %d: %v", r.name, r.pdl, r.g, err)
		}
		mb := float64(r.wa+r.wb) * 16 / 1e6
		t.Logf("%-13s %-5v %5d %9.2f %9.2f", r.name, r.pdl, r.g, mb, us)
		fmt.Printf("BENCH grid barrier: %s, pdl %v, grid %d, %.2f MB: %.2f us a call (graph of 64, median of 21, L2-hot)\n", r.name, r.pdl, r.g, mb, us)
	}
	s.SetProgrammaticLaunch(false)
}
