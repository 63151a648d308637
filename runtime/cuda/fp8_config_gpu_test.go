//go:build cuda

package cuda

import (
	"errors"
	"math"
	"math/rand/v2"
	"testing"
)

// TestFP8ConfigVariants runs the scaled FP8 product (GemmTNScaled's plan)
// in every configuration configVariants offers at the 8B shapes' o and
// down products (128 and 256 rows, fast accumulation as the Backend's
// default) against a float64 reference of the same e4m3 operands, so that
// a configuration TuneGemmTNScaled may keep is known to compute the
// product; then TuneGemmTNScaled itself, and GemmTNScaled after it.
func TestFP8ConfigVariants(t *testing.T) {
	c, s, m := matmulRig(t)
	if d := c.Device(); d.Major*10+d.Minor < 89 {
		t.Skipf("%s has no FP8 tensor cores (sm_89 and later)", d)
	}
	m.SetFastAccum(true)
	// e4m3 codes of exact values, their mean zero as a layer's inputs
	// are: 1, 0.5, 2, 0.75, -1, -0.5, -2, -0.75. (Session 74 ran these
	// with a positive mean, 0.53: every product summed one way, K=14336
	// sums near 4,000, and fast accumulation's truncated partial sums put
	// every configuration, the heuristic's too, 0.0147 off; the dot
	// products a model makes are sums of both signs.)
	codes := []byte{0x38, 0x30, 0x40, 0x34, 0xB8, 0xB0, 0xC0, 0xB4}
	vals := []float64{1, 0.5, 2, 0.75, -1, -0.5, -2, -0.75}
	rng := rand.New(rand.NewPCG(7, 11))
	for _, sh := range []struct {
		name    string
		T, N, K int
	}{{"o", 128, 4096, 4096}, {"o", 256, 4096, 4096}, {"down", 256, 4096, 14336}} {
		T, N, K := sh.T, sh.N, sh.K
		xq, wq := make([]byte, T*K), make([]byte, N*K)
		xv, wv := make([]float64, T*K), make([]float64, N*K)
		for i := range xq {
			j := rng.IntN(len(codes))
			xq[i], xv[i] = codes[j], vals[j]
		}
		for i := range wq {
			j := rng.IntN(len(codes))
			wq[i], wv[i] = codes[j], vals[j]
		}
		xs, wsc := make([]float32, T), make([]float32, N)
		for i := range xs {
			xs[i] = float32(0.01 * (1 + rng.Float64()))
		}
		for i := range wsc {
			wsc[i] = float32(0.02 * (1 + rng.Float64()))
		}
		// the reference at 16 rows of T (spread over the tiles) and every column
		refRows := []int{0, 1, 17, 63, 64, 65, 100, 127}
		if T > 128 {
			refRows = append(refRows, 128, 150, 191, 192, 200, 250, 254, 255)
		}
		ref := make(map[int][]float64)
		for _, r := range refRows {
			row := make([]float64, N)
			for n := range N {
				var acc float64
				for k := range K {
					acc += xv[r*K+k] * wv[n*K+k]
				}
				row[n] = acc * float64(xs[r]) * float64(wsc[n])
			}
			ref[r] = row
		}
		dx, dw := alloc(t, c, T*K), alloc(t, c, N*K)
		dxs, dws, dout := alloc(t, c, 4*T), alloc(t, c, 4*N), alloc(t, c, 2*T*N)
		for _, e := range []error{CopyHtoD(s, dx.Ptr(), xq), CopyHtoD(s, dw.Ptr(), wq), CopyHtoD(s, dxs.Ptr(), xs), CopyHtoD(s, dws.Ptr(), wsc)} {
			if e != nil {
				t.Fatal(e)
			}
		}
		check := func(label string) {
			t.Helper()
			got := make([]uint16, T*N)
			if err := CopyDtoH(s, got, dout.Ptr()); err != nil {
				t.Fatal(err)
			}
			if err := s.Synchronize(); err != nil {
				t.Fatalf("%s: %v", label, err)
			}
			worst := 0.0
			for _, r := range refRows {
				scale := 0.0
				for _, v := range ref[r] {
					scale = max(scale, math.Abs(v))
				}
				for n, want := range ref[r] {
					g := float64(math.Float32frombits(uint32(got[r*N+n]) << 16))
					worst = max(worst, math.Abs(g-want)/scale)
				}
			}
			// bf16 output: 2^-8 relative, on the row's largest value
			if !(worst <= 0.005) {
				t.Errorf("%s %d rows x [%d, %d] %s: largest error %.4g of the row's largest value (at most 0.005)", sh.name, T, N, K, label, worst)
			}
		}
		var algos [][heuristicResultSize]byte
		var cfgs []AlgoConfig
		var p *gemmPlan
		if err := c.Do(func() error {
			var err error
			if p, err = m.planScaled(scaledKey(T, N, K, R16BF, 0, true), dxs.Ptr(), dws.Ptr()); err != nil {
				return err
			}
			algos, cfgs, err = m.configVariants(p, &p.algo, false)
			return err
		}); err != nil {
			t.Fatal(err)
		}
		t.Logf("%s %d rows x [%d, %d]: %d configurations, the heuristic's %s", sh.name, T, N, K, len(cfgs), cfgs[0])
		for i := range algos {
			if err := s.Memset8(dout.Ptr(), 0xff, 2*T*N); err != nil { // NaNs: a configuration that writes nothing fails
				t.Fatal(err)
			}
			if err := c.Do(func() error { return m.enqueue(s, p, &algos[i], dout.Ptr(), dx.Ptr(), dw.Ptr(), 1, 0) }); err != nil {
				t.Fatalf("%s: %v", cfgs[i], err)
			}
			check(cfgs[i].String())
		}
		r, err := m.TuneGemmTNScaled(s, dout.Ptr(), dx.Ptr(), dxs.Ptr(), []DevicePtr{dw.Ptr()}, []DevicePtr{dws.Ptr()}, T, N, K, 3)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("%s %d rows: tuned %s %.1f us against %s %.1f us (weights from L2: the ranks, not the times, count)", sh.name, T, r.Configs[r.Kept], r.Us[r.Kept], r.Configs[0], r.Us[0])
		if err := s.Memset8(dout.Ptr(), 0xff, 2*T*N); err != nil {
			t.Fatal(err)
		}
		if err := m.GemmTNScaled(s, dout.Ptr(), R16BF, dx.Ptr(), dxs.Ptr(), dw.Ptr(), dws.Ptr(), T, N, K); err != nil {
			t.Fatal(err)
		}
		check("after TuneGemmTNScaled")
		// the kept configuration read back into a fresh Matmul (the
		// tuning cache's way), and one cuBLASLt has not
		m2, err := c.NewMatmul(32 << 20)
		if err != nil {
			t.Fatal(err)
		}
		m2.SetFastAccum(true)
		heur, err := m2.UseScaledConfig(dxs.Ptr(), dws.Ptr(), T, N, K, r.Configs[r.Kept])
		if err != nil {
			t.Fatal(err)
		}
		if heur != r.Configs[0] {
			t.Errorf("%s %d rows: UseScaledConfig's heuristic %s, TuneGemmTNScaled's %s", sh.name, T, heur, r.Configs[0])
		}
		if err := s.Memset8(dout.Ptr(), 0xff, 2*T*N); err != nil {
			t.Fatal(err)
		}
		if err := m2.GemmTNScaled(s, dout.Ptr(), R16BF, dx.Ptr(), dxs.Ptr(), dw.Ptr(), dws.Ptr(), T, N, K); err != nil {
			t.Fatal(err)
		}
		check("in the kept configuration, from UseScaledConfig")
		if _, err := m2.UseScaledConfig(dxs.Ptr(), dws.Ptr(), T, N, K, AlgoConfig{Tile: 9999, Stages: 36, Cluster: 2}); !errors.Is(err, ErrNotSupported) {
			t.Errorf("UseScaledConfig of tile 9999: %v, want ErrNotSupported", err)
		}
		if err := s.Synchronize(); err != nil {
			t.Fatal(err)
		}
		m2.Close()
		for _, b := range []*DeviceBuffer{dx, dw, dxs, dws, dout} {
			b.Free()
		}
	}
}

func alloc(t *testing.T, c *Context, n int) *DeviceBuffer {
	t.Helper()
	b, err := c.Alloc(n)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
