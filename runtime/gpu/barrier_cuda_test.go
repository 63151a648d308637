//go:build cuda

package gpu

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/peftd/peftd/kernels"
	"github.com/peftd/peftd/runtime/cuda"
)

// gridMeetProbe: the probe for issue 9's next LoRA design (PERFORMANCE
// v0.74 Next 3: a group's shrink and expand in one launch, the shrink's
// partials met at a grid barrier), on the barrier the ws kernels' fused
// ends already use (grid_meet, grid_leave; common.cuh, prepended). Phase
// one writes each block's value (epoch plus its index, after its slice of
// A); phase two reads its neighbour's (after its slice of B). As two
// kernels (gb_write, gb_read: the read's B slice before pdl_entry, as the
// expand's weights would be) or as one (gb_fused: B before pdl_entry, the
// phases met at grid_meet).
const gridMeetProbe = `
// slice_sum: the block's share of words 16-byte words of src, folded into
// one float, so that the loads cannot be dropped.
__device__ float slice_sum(const uint4* __restrict__ src, int words, float* sh) {
    unsigned acc = 0;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < words; i += gridDim.x * blockDim.x) {
        const uint4 v = __ldg(src + i);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    return block_sum((float)(acc & 0xff), sh);
}

extern "C" __global__ void __launch_bounds__(256) gb_write(float* part, const uint4* a, int wa, float epoch) {
    __shared__ float sh[33];
    pdl_entry();
    const float s = slice_sum(a, wa, sh);
    if (threadIdx.x == 0) part[blockIdx.x] = s * 0.f + epoch + blockIdx.x;
}

extern "C" __global__ void __launch_bounds__(256) gb_read(float* out, const float* part, const uint4* b, int wb) {
    __shared__ float sh[33];
    const float s = slice_sum(b, wb, sh); // weights: before the wait
    pdl_entry();
    if (threadIdx.x == 0) out[blockIdx.x] = part[(blockIdx.x + 1) % gridDim.x] + s * 0.f;
}

extern "C" __global__ void __launch_bounds__(256) gb_fused(float* out, float* part, const uint4* a, int wa, const uint4* b, int wb,
                                                      float epoch, unsigned* sync) {
    __shared__ float sh[33];
    const float sb = slice_sum(b, wb, sh); // weights: before the wait
    pdl_entry();
    const float sa = slice_sum(a, wa, sh);
    if (threadIdx.x == 0) part[blockIdx.x] = sa * 0.f + epoch + blockIdx.x;
    grid_meet(sync);
    if (threadIdx.x == 0) out[blockIdx.x] = ((volatile float*)part)[(blockIdx.x + 1) % gridDim.x] + sb * 0.f;
    grid_leave(sync, 0, sync);
}
`

// TestGridMeetProbe checks the probe (every block reads its neighbour's
// value of this launch, over launches of changing epochs, at grids 1, 2,
// SMs/2 and SMs) and, with PEFTD_BARRIER_BENCH=1, times one launch with
// grid_meet against two launches, with and without PDL, replayed as graphs
// (L2-hot: the fixed costs, not bytes). Bytes: 1 MB of A and 1.5 MB of B,
// four rank-32 adapters' q/k/v at one row. The numbers decide whether the
// fused shrink+expand is worth writing (issue 9's few-row bars: eight
// dependent kernels a layer now).
func TestGridMeetProbe(t *testing.T) {
	if err := Available(); err != nil {
		t.Skipf("no GPU: %v", err)
	}
	c, err := cuda.NewContext(0)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	common, err := kernels.Source("common.cuh")
	if err != nil {
		t.Fatal(err)
	}
	inc := kernels.IncludeDir()
	// PEFTD_WS: grid_meet and grid_leave sit in common.cuh's ws section
	// (the Hopper build's, as the Backend loads it on sm_90a)
	opts := []string{"-arch=" + c.Device().Arch(), "-std=c++17", "-DPEFTD_WS", "-I" + inc, "-I" + filepath.Join(inc, "cccl")}
	cubin, log, err := cuda.Compile(common+gridMeetProbe, "grid_meet_probe.cu", opts)
	if err != nil {
		t.Fatalf("%v\n%s", err, log)
	}
	m, err := c.LoadModule(cubin)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Unload()
	fn := map[string]*cuda.Function{}
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
	alloc := func(n int, fill uint8) *cuda.DeviceBuffer {
		d, err := c.Alloc(n)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { d.Free() })
		if err := s.Memset8(d.Ptr(), fill, n); err != nil {
			t.Fatal(err)
		}
		return d
	}
	a, b := alloc(aBytes, 0x5a), alloc(bBytes, 0x5a)
	part, out, sync := alloc(4*sms, 0), alloc(4*sms, 0), alloc(8, 0) // sync: grid_meet's and grid_leave's counters
	blk := cuda.Dim3{X: 256}
	fused := func(g int, wa, wb int32, epoch float32) error {
		return fn["gb_fused"].Launch(s, cuda.Dim3{X: g}, blk, 0, out, part, a, wa, b, wb, epoch, sync)
	}
	pair := func(g int, wa, wb int32, epoch float32) error {
		if err := fn["gb_write"].Launch(s, cuda.Dim3{X: g}, blk, 0, part, a, wa, epoch); err != nil {
			return err
		}
		return fn["gb_read"].Launch(s, cuda.Dim3{X: g}, blk, 0, out, part, b, wb)
	}

	// The barrier holds: each launch's reads see that launch's writes.
	for _, g := range []int{1, 2, sms / 2, sms} {
		for e := range 50 {
			epoch := float32(1000 * (e + 1))
			if err := fused(g, aBytes/16, bBytes/16, epoch); err != nil {
				t.Fatal(err)
			}
			got := make([]float32, g)
			if err := cuda.CopyDtoH(s, got, out.Ptr()); err != nil {
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
		t.Log("grid_meet holds; PEFTD_BARRIER_BENCH=1 times it")
		return
	}
	type row struct {
		name   string
		pdl    bool
		g      int
		wa, wb int32
		one    func(g int, wa, wb int32, epoch float32) error
	}
	var rows []row
	for _, g := range []int{sms / 2, sms} {
		for _, bytes := range []bool{false, true} {
			wa, wb := int32(0), int32(0)
			if bytes {
				wa, wb = aBytes/16, bBytes/16
			}
			for _, pdl := range []bool{false, true} {
				rows = append(rows, row{"two kernels", pdl, g, wa, wb, pair}, row{"one, grid_meet", pdl, g, wa, wb, fused})
			}
		}
	}
	t.Logf("%-14s %-5s %5s %9s %9s", "launch", "pdl", "grid", "MB", "us_each")
	for _, r := range rows {
		if err := s.SetProgrammaticLaunch(r.pdl); err != nil {
			t.Skipf("PDL: %v", err)
		}
		us, err := s.GraphMedianUs(64, 21, func(i int) error { return r.one(r.g, r.wa, r.wb, float32(i)) })
		if err != nil {
			t.Fatalf("%s pdl %v grid %d: %v", r.name, r.pdl, r.g, err)
		}
		mb := float64(r.wa+r.wb) * 16 / 1e6
		t.Logf("%-14s %-5v %5d %9.2f %9.2f", r.name, r.pdl, r.g, mb, us)
		fmt.Printf("BENCH grid_meet: %s, pdl %v, grid %d, %.2f MB: %.2f us a call (graph of 64, median of 21, L2-hot)\n", r.name, r.pdl, r.g, mb, us)
	}
}
