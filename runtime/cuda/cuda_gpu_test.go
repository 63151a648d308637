//go:build cuda

package cuda

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"
)

var (
	testCtxOnce sync.Once
	testCtx     *Context
	testCtxErr  error
)

func ctx(t *testing.T) *Context {
	t.Helper()
	testCtxOnce.Do(func() { testCtx, testCtxErr = NewContext(0) })
	if testCtxErr != nil {
		t.Fatal(testCtxErr)
	}
	return testCtx
}

func TestGPUDevice(t *testing.T) {
	c := ctx(t)
	v, _ := DriverVersion()
	maj, min, err := NVRTCVersion()
	if err != nil {
		t.Fatal(err)
	}
	bv, err := CublasLtVersion()
	if err != nil {
		t.Fatal(err)
	}
	free, total, err := c.MemInfo()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("device %v; driver %s CUDA %d; NVRTC %d.%d (%s); cuBLASLt %d (%s); free %d/%d MiB",
		c.Device(), DriverPath(), v, maj, min, NVRTCPath(), bv, CublasLtPath(), free>>20, total>>20)
}

func TestGPUCopyRoundTrip(t *testing.T) {
	c := ctx(t)
	s, err := c.NewStream()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Destroy()
	for _, n := range []int{1, 7, 4099, 1 << 20} {
		src := make([]float32, n)
		for i := range src {
			src[i] = rand.Float32()*2 - 1
		}
		d, err := c.Alloc(4 * n)
		if err != nil {
			t.Fatal(err)
		}
		if err := CopyHtoD(s, d.Ptr(), src); err != nil {
			t.Fatal(err)
		}
		// pinned path back
		h, err := c.AllocHost(4 * n)
		if err != nil {
			t.Fatal(err)
		}
		if err := CopyDtoH(s, h.Float32s(), d.Ptr()); err != nil {
			t.Fatal(err)
		}
		if err := s.Synchronize(); err != nil {
			t.Fatal(err)
		}
		for i, v := range h.Float32s() {
			if v != src[i] {
				t.Fatalf("n=%d: element %d = %v, want %v", n, i, v, src[i])
			}
		}
		h.Free()
		d.Free()
	}
}

func TestGPUOutOfMemory(t *testing.T) {
	c := ctx(t)
	_, err := c.Alloc(1 << 50)
	if !errors.Is(err, ErrOutOfMemory) {
		t.Fatalf("1 PiB allocation: %v, want ErrOutOfMemory", err)
	}
	t.Logf("OOM: %v", err)
}

const saxpy = `
extern "C" __global__ void saxpy(float* y, const float* x, float a, int n) {
	int i = blockIdx.x * blockDim.x + threadIdx.x;
	if (i < n) y[i] = a * x[i] + y[i];
}`

func TestGPUCompileLaunchEvents(t *testing.T) {
	c := ctx(t)
	cubin, log, err := Compile(saxpy, "saxpy.cu", []string{"-arch=" + c.Device().Arch()})
	if err != nil {
		t.Fatal(err)
	}
	if log != "" {
		t.Logf("nvrtc log: %s", log)
	}
	_, _, err = Compile("this is not C++", "bad.cu", []string{"-arch=" + c.Device().Arch()})
	if !errors.Is(err, ErrCompile) {
		t.Errorf("bad source: %v, want ErrCompile", err)
	}
	m, err := c.LoadModule(cubin)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Unload()
	f, err := m.Function("saxpy")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Function("nope"); err == nil {
		t.Error("missing kernel found")
	}
	s, _ := c.NewStream()
	defer s.Destroy()
	n := 100003
	x, y, dx, dy := saxpyInputs(t, c, s, n)
	e0, _ := c.NewEvent(true)
	e1, _ := c.NewEvent(true)
	e0.Record(s)
	if err := f.Launch(s, Dim3{X: (n + 255) / 256}, Dim3{X: 256}, 0, dy, dx, float32(2.5), n); err != nil {
		t.Fatal(err)
	}
	e1.Record(s)
	got := make([]float32, n)
	if err := CopyDtoH(s, got, dy.Ptr()); err != nil {
		t.Fatal(err)
	}
	if err := e1.Synchronize(); err != nil {
		t.Fatal(err)
	}
	ms, err := e1.Since(e0)
	if err != nil {
		t.Fatal(err)
	}
	for i := range got {
		if want := 2.5*x[i] + y[i]; math.Abs(float64(got[i]-want)) > 1e-6 {
			t.Fatalf("y[%d] = %v, want %v", i, got[i], want)
		}
	}
	t.Logf("saxpy n=%d: %.3f ms", n, ms)
	// A launch from a goroutine other than the executor works (Do hops).
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := f.Launch(s, Dim3{X: (n + 255) / 256}, Dim3{X: 256}, 0, dy, dx, float32(0), n); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if err := s.Synchronize(); err != nil {
		t.Fatal(err)
	}
}

// saxpyKernel is the saxpy kernel compiled for c's card, its module
// unloaded when t ends.
func saxpyKernel(t *testing.T, c *Context) *Function {
	t.Helper()
	cubin, _, err := Compile(saxpy, "saxpy.cu", []string{"-arch=" + c.Device().Arch()})
	if err != nil {
		t.Fatal(err)
	}
	m, err := c.LoadModule(cubin)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Unload() })
	f, err := m.Function("saxpy")
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// saxpyInputs is n random x and y values and their copies on the device
// (enqueued on s), freed when t ends.
func saxpyInputs(t *testing.T, c *Context, s *Stream, n int) (x, y []float32, dx, dy *DeviceBuffer) {
	t.Helper()
	x, y = make([]float32, n), make([]float32, n)
	for i := range x {
		x[i], y[i] = rand.Float32(), rand.Float32()
	}
	var err error
	if dx, err = c.Alloc(4 * n); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dx.Free() })
	if dy, err = c.Alloc(4 * n); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dy.Free() })
	if err := errors.Join(CopyHtoD(s, dx.Ptr(), x), CopyHtoD(s, dy.Ptr(), y)); err != nil {
		t.Fatal(err)
	}
	return x, y, dx, dy
}

func bf16(x float32) uint16 {
	b := math.Float32bits(x)
	b += 0x7fff + (b>>16)&1
	return uint16(b >> 16)
}

func unbf16(h uint16) float32 { return math.Float32frombits(uint32(h) << 16) }

func TestGPUGemmTN(t *testing.T) {
	c, s, mm := matmulRig(t)
	for _, sh := range [][3]int{{1, 64, 64}, {5, 77, 172}, {33, 512, 128}, {7, 300, 9}} {
		T, N, K := sh[0], sh[1], sh[2]
		for _, outT := range []DataType{R16BF, R32F} {
			in, w := randBF16(T*K), randBF16(N*K)
			din, _ := c.Alloc(2 * len(in))
			dw, _ := c.Alloc(2 * len(w))
			dout, _ := c.Alloc(outT.Size() * T * N)
			CopyHtoD(s, din.Ptr(), in)
			CopyHtoD(s, dw.Ptr(), w)
			if err := mm.GemmTN(s, dout.Ptr(), outT, din.Ptr(), R16BF, dw.Ptr(), R16BF, T, N, K, 1, 0); err != nil {
				t.Fatalf("%v %v: %v", sh, outT, err)
			}
			got := make([]float32, T*N)
			if outT == R32F {
				CopyDtoH(s, got, dout.Ptr())
			} else {
				h := make([]uint16, T*N)
				CopyDtoH(s, h, dout.Ptr())
				for i := range h {
					got[i] = unbf16(h[i])
				}
			}
			rel := gemmRelErr(in, w, T, N, K, 1, func(r, j int) float64 { return float64(got[r*N+j]) })
			tol := 1e-5
			if outT == R16BF {
				tol = 5e-3
			}
			if !(rel <= tol) {
				t.Errorf("GemmTN %v -> %v: relative error %.3g > %.1g", sh, outT, rel, tol)
			}
			t.Logf("GemmTN T=%d N=%d K=%d -> %v: maxrel=%.3g", T, N, K, outT, rel)
			din.Free()
			dw.Free()
			dout.Free()
		}
	}
}

func TestMain(m *testing.M) {
	code := m.Run()
	if testCtx != nil {
		if err := testCtx.Close(); err != nil {
			fmt.Fprintln(os.Stderr, "close:", err)
			code = 1
		}
	}
	_ = filepath.Join
	os.Exit(code)
}

// TestGPUGraphCapture captures a memset and a copy, replays the graph twice
// with the source changed in between, and checks the destination each time.
func TestGPUGraphCapture(t *testing.T) {
	c := ctx(t)
	s, err := c.NewStream()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Destroy()
	const n = 1 << 16
	src, err := c.Alloc(4 * n)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Free()
	dst, err := c.Alloc(4 * n)
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Free()
	if err := s.BeginCapture(); err != nil {
		t.Fatal(err)
	}
	if err := s.Memset32(dst.Ptr(), 0xdeadbeef, n); err != nil {
		t.Fatal(err)
	}
	if err := s.CopyDtoD(dst.Ptr(), src.Ptr(), 4*n-8); err != nil { // the last two words keep the memset value
		t.Fatal(err)
	}
	g, err := s.EndCapture()
	if err != nil {
		t.Fatal(err)
	}
	defer g.Destroy()
	ge, err := g.Instantiate()
	if err != nil {
		t.Fatal(err)
	}
	defer ge.Destroy()
	for round := uint32(1); round <= 2; round++ {
		v := make([]uint32, n)
		for i := range v {
			v[i] = rand.Uint32()
		}
		if err := CopyHtoD(s, src.Ptr(), v); err != nil {
			t.Fatal(err)
		}
		if err := ge.Launch(s); err != nil {
			t.Fatal(err)
		}
		got := make([]uint32, n)
		if err := CopyDtoH(s, got, dst.Ptr()); err != nil {
			t.Fatal(err)
		}
		if err := s.Synchronize(); err != nil {
			t.Fatal(err)
		}
		for i := range got {
			want := v[i]
			if i >= n-2 {
				want = 0xdeadbeef
			}
			if got[i] != want {
				t.Fatalf("round %d: word %d = %#x, want %#x", round, i, got[i], want)
			}
		}
	}
}

// TestTuneGemmTN tunes two 8B projection shapes (64 and 256 rows, weights
// in four copies) and checks the products GemmTN runs afterwards, with
// whatever algorithm was kept, against a float64 reference.
func TestTuneGemmTN(t *testing.T) {
	c, s, mm := matmulRig(t)
	for _, sh := range [][3]int{{64, 4096, 4096}, {256, 1024, 4096}} {
		T, N, K := sh[0], sh[1], sh[2]
		in, w := randBF16(T*K), randBF16(N*K)
		din, _ := c.Alloc(2 * len(in))
		dout, _ := c.Alloc(2 * T * N)
		var ws []DevicePtr
		for range 4 {
			dw, err := c.Alloc(2 * len(w))
			if err != nil {
				t.Fatal(err)
			}
			defer dw.Free()
			CopyHtoD(s, dw.Ptr(), w)
			ws = append(ws, dw.Ptr())
		}
		CopyHtoD(s, din.Ptr(), in)
		res, err := mm.TuneGemmTN(s, dout.Ptr(), R16BF, din.Ptr(), R16BF, ws, R16BF, T, N, K, 8, 10)
		if err != nil {
			t.Fatalf("%v: %v", sh, err)
		}
		if len(res.Us) > 0 && (res.Kept < 0 || res.Kept >= len(res.Us)) {
			t.Fatalf("%v: kept %d of %d", sh, res.Kept, len(res.Us))
		}
		t.Logf("TuneGemmTN T=%d N=%d K=%d: us %.1f, kept %d", T, N, K, res.Us, res.Kept)
		if err := mm.GemmTN(s, dout.Ptr(), R16BF, din.Ptr(), R16BF, ws[0], R16BF, T, N, K, 1, 0); err != nil {
			t.Fatal(err)
		}
		h := make([]uint16, T*N)
		CopyDtoH(s, h, dout.Ptr())
		if rel := gemmRelErr(in, w, T, N, K, 7, func(r, j int) float64 { return float64(unbf16(h[r*N+j])) }); !(rel <= 5e-3) {
			t.Errorf("GemmTN %v after tuning: relative error %.3g > 5e-3", sh, rel)
		}
		din.Free()
		dout.Free()
	}
}

// gemmRelErr is the relative (Frobenius) error of got(r, j) against the
// float64 product of the bf16 rows in [T, K] and w [N, K] transposed, over
// every rowStep-th row.
func gemmRelErr(in, w []uint16, T, N, K, rowStep int, got func(r, j int) float64) float64 {
	var d, nn float64
	for r := 0; r < T; r += rowStep {
		for j := 0; j < N; j++ {
			var ref float64
			for k := 0; k < K; k++ {
				ref += float64(unbf16(in[r*K+k])) * float64(unbf16(w[j*K+k]))
			}
			x := got(r, j) - ref
			d += x * x
			nn += ref * ref
		}
	}
	return math.Sqrt(d / nn)
}

// randBF16 is n bf16 values uniform in [-1, 1).
func randBF16(n int) []uint16 {
	v := make([]uint16, n)
	for i := range v {
		v[i] = bf16(rand.Float32()*2 - 1)
	}
	return v
}

// matmulRig is a context, a stream and a Matmul (32 MiB of workspace),
// released when the test ends.
func matmulRig(t *testing.T) (*Context, *Stream, *Matmul) {
	t.Helper()
	c := ctx(t)
	s, err := c.NewStream()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Destroy() })
	mm, err := c.NewMatmul(32 << 20)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mm.Close() })
	return c, s, mm
}

// clusterRing: each block of a cluster of 4 writes its rank into its shared
// memory and then reads the next block's through the cluster.
const clusterRing = `
extern "C" __global__ void ring(int* out) {
    __shared__ int v;
    unsigned r, a, remote;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    if (threadIdx.x == 0) v = (int)r + 100 * blockIdx.x;
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
    if (threadIdx.x == 0) {
        a = (unsigned)__cvta_generic_to_shared(&v);
        asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(a), "r"((r + 1) % 4));
        int x;
        asm volatile("ld.shared::cluster.s32 %0, [%1];" : "=r"(x) : "r"(remote) : "memory");
        out[blockIdx.x] = x;
    }
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
`

// testKernel compiles src for c's device, loads it as a module (as a
// context-independent library with lib) that is unloaded when the test
// ends, and returns its kernel name.
func testKernel(t *testing.T, c *Context, src, name string, lib ...bool) *Function {
	t.Helper()
	cubin, _, err := Compile(src, name+".cu", []string{"-arch=" + c.Device().Arch()})
	if err != nil {
		t.Fatal(err)
	}
	load := c.LoadModule
	if len(lib) > 0 && lib[0] {
		load = c.LoadLibrary
	}
	m, err := load(cubin)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Unload() })
	f, err := m.Function(name)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// TestGPUClusterLaunch: LaunchCluster groups the grid's blocks in clusters
// whose blocks read each other's shared memory (sm_90 and later), with and
// without programmatic launch after another kernel; a grid the clusters do
// not divide is refused.
func TestGPUClusterLaunch(t *testing.T) {
	c := ctx(t)
	if c.Device().Major < 9 {
		t.Skipf("%s: no thread-block clusters before sm_90", c.Device().Arch())
	}
	f := testKernel(t, c, clusterRing, "ring")
	s, err := c.NewStream()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Destroy()
	const blocks = 16
	out, err := c.Alloc(4 * blocks)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Free()
	for _, pdl := range []bool{false, true} {
		if err := s.SetProgrammaticLaunch(pdl); err != nil && pdl {
			t.Logf("no programmatic launch: %v", err)
			continue
		}
		if err := CopyHtoD(s, out.Ptr(), make([]int32, blocks)); err != nil {
			t.Fatal(err)
		}
		for range 2 { // the second launch follows a kernel: programmatic when pdl
			if err := f.LaunchCluster(s, Dim3{X: blocks}, Dim3{X: 32}, Dim3{X: 4, Y: 1, Z: 1}, 0, out); err != nil {
				t.Fatal(err)
			}
		}
		got := make([]int32, blocks)
		if err := CopyDtoH(s, got, out.Ptr()); err != nil {
			t.Fatal(err)
		}
		if err := s.Synchronize(); err != nil {
			t.Fatal(err)
		}
		for b, x := range got {
			next := b - b%4 + (b%4+1)%4 // the next block of b's cluster
			if want := int32(next%4 + 100*next); x != want {
				t.Fatalf("pdl %v: block %d read %d, want %d", pdl, b, x, want)
			}
		}
	}
	if err := f.LaunchCluster(s, Dim3{X: 6}, Dim3{X: 32}, Dim3{X: 4, Y: 1, Z: 1}, 0, out); !errors.Is(err, ErrInvalidValue) {
		t.Errorf("6 blocks in clusters of 4: %v, want ErrInvalidValue", err)
	}
}

// TestGPUL2Window: L2 set aside for persisting lines and a kernel launched
// with an access window over its output: the limit reads back, the launch
// is accepted (a bad attribute layout fails it) and computes as without,
// and setting 0 returns the L2.
func TestGPUL2Window(t *testing.T) {
	c := ctx(t)
	d := c.Device()
	t.Logf("L2 %d MB, persisting at most %d MB, windows at most %d MB", d.L2Bytes>>20, d.PersistL2Max>>20, d.WindowMax>>20)
	if d.PersistL2Max == 0 || d.WindowMax == 0 {
		t.Skip("no L2 persistence on this card or driver")
	}
	f := saxpyKernel(t, c)
	set := min(d.PersistL2Max, 8<<20)
	if err := c.SetPersistingL2(set); err != nil {
		t.Fatal(err)
	}
	defer c.SetPersistingL2(0)
	if got, err := c.PersistingL2(); err != nil || got < set {
		t.Fatalf("PersistingL2 = %d, %v; want at least %d", got, err, set)
	}
	if err := c.SetPersistingL2(d.PersistL2Max + 1); err == nil {
		t.Error("a set-aside over PersistL2Max: no error")
	}
	s, _ := c.NewStream()
	defer s.Destroy()
	n := 1 << 20
	x, y, dx, dy := saxpyInputs(t, c, s, n)
	if err := s.SetAccessWindow(AccessWindow{Base: dy.Ptr(), Bytes: 4 * n, HitRatio: 1}); err != nil {
		t.Fatal(err)
	}
	for r := 0; r < 3; r++ { // y = 2.5x + y three times, the window over y
		if err := f.Launch(s, Dim3{X: (n + 255) / 256}, Dim3{X: 256}, 0, dy, dx, float32(2.5), n); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.SetAccessWindow(AccessWindow{}); err != nil {
		t.Fatal(err)
	}
	got := make([]float32, n)
	if err := CopyDtoH(s, got, dy.Ptr()); err != nil {
		t.Fatal(err)
	}
	for i := range got {
		want := y[i]
		for r := 0; r < 3; r++ {
			want = 2.5*x[i] + want
		}
		if math.Abs(float64(got[i]-want)) > 1e-5*math.Max(1, math.Abs(float64(want))) {
			t.Fatalf("y[%d] = %v, want %v", i, got[i], want)
		}
	}
	if err := c.SetPersistingL2(0); err != nil {
		t.Fatal(err)
	}
	if got, err := c.PersistingL2(); err != nil || got != 0 {
		t.Errorf("after SetPersistingL2(0): %d, %v", got, err)
	}
}
