//go:build cuda

package gpu

import (
	"encoding/binary"
	"fmt"
	"math"
	"testing"

	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/safetensors"
)

// TestSplitProduct: a product of the hidden width (o, down) split over K
// leaves its partials pending (split.go), and both ways of summing them
// give the product: add_rmsnorm taking them (the residual add, the
// product's buffer written too) and splitk_reduce when another op (here
// Read) needs the product first. bf16 weights: cuBLASLt's own product,
// bf16Split's choice, 2 and 8 slices; FP8 weights at rows fp8_gemv does
// not take (its split is automatic there). Each against a float64
// reference of the bf16 operands (FP8: of the e4m3-rounded weights is
// not computed here; the FP8 tolerance covers the quantization).
func TestSplitProduct(t *testing.T) {
	const H = 512
	for _, c := range []struct {
		fp8   bool
		T, K  int
		force int // kernelForce.bf16Split
	}{
		{false, 1, 1024, -1}, {false, 1, 1024, 0}, {false, 1, 1024, 2}, {false, 7, 512, 0}, {false, 64, 1536, 0}, {false, 64, 1536, 8},
		{true, 32, 1024, 0}, {true, 64, 1536, 0},
	} {
		for _, viaNorm := range []bool{true, false} {
			name := fmt.Sprintf("fp8=%v/T=%d/K=%d/force=%d/norm=%v", c.fp8, c.T, c.K, c.force, viaNorm)
			t.Run(name, func(t *testing.T) {
				opts := Options{}
				wname := "w"
				if c.fp8 {
					opts.WeightFormat = WeightsFP8
					wname = "model.layers.0.mlp.down_proj.weight"
				}
				cfg := testConfig(H, 4*H, 8, 2, 64, 32, 1)
				r := newRigWith(t, cfg, 64, engine.KVSpec{Layers: 1, Blocks: 8, BlockSize: 16, KVHeads: 2, HeadDim: 64}, opts)
				r.b.force.bf16Split = c.force
				T, K := c.T, c.K
				wv := r.rnd(H*K, 0.05)
				raw := make([]byte, 4*len(wv))
				for i, x := range wv {
					binary.LittleEndian.PutUint32(raw[4*i:], math.Float32bits(x))
				}
				w, err := r.b.Upload(wname, safetensors.F32, []int{H, K}, raw)
				if err != nil {
					t.Fatal(err)
				}
				nw, nwv := r.weight(1, H, 2)
				xv, resv := r.rnd(T*K, 1), r.rnd(T*H, 1)
				x, prod, res, out := r.buffer(T, K), r.buffer(T, H), r.buffer(T, H), r.buffer(T, H)
				r.fill(x, xv)
				r.fill(res, resv)
				r.poison(prod)
				r.poison(out)
				r.begin(oneSeq(T, 16, zeros(T)))
				r.b.Linear(prod, x, w)
				split := r.b.sp.part != 0
				wantSplit := c.force != -1 && (c.fp8 || c.force > 0 || splitWays(T, H, K, r.b.ctx.Device().SMs) > 1)
				if split != wantSplit {
					t.Fatalf("product pending as partials: %v, want %v (%d slices)", split, wantSplit, r.b.sp.S)
				}
				var gres, gout []float32
				if viaNorm {
					r.b.AddRMSNorm(res, prod, out, nw, 1e-5)
					if r.b.sp.part != 0 {
						t.Fatal("add_rmsnorm left the split pending")
					}
					gres, gout = r.read(res, T), r.read(out, T)
				}
				gprod := r.read(prod, T)
				r.end()
				tol := 4e-3
				if c.fp8 {
					tol = 6e-2
				}
				want := make([]float64, T*H)
				for i := 0; i < T; i++ {
					for j := 0; j < H; j++ {
						var s float64
						for k := 0; k < K; k++ {
							s += float64(xv[i*K+k]) * float64(wv[j*K+k])
						}
						want[i*H+j] = s
					}
				}
				r.compare("product", gprod, want, tol)
				if !viaNorm {
					return
				}
				// the residual add and norm of the product as the GPU stored it
				wantRes, wantOut := make([]float64, T*H), make([]float64, T*H)
				for i := 0; i < T; i++ {
					var ss float64
					for j := 0; j < H; j++ {
						v := fromBF16(safetensors.Float32ToBF16(resv[i*H+j] + gprod[i*H+j]))
						wantRes[i*H+j] = float64(v)
						ss += float64(v) * float64(v)
					}
					inv := 1 / math.Sqrt(ss/float64(H)+1e-5)
					for j := 0; j < H; j++ {
						wantOut[i*H+j] = float64(nwv[j]) * wantRes[i*H+j] * inv
					}
				}
				r.compare("residual", gres, wantRes, 1e-3)
				r.compare("normed", gout, wantOut, opTol)
			})
		}
	}
}
