package quality

import (
	"testing"

	fx "github.com/peftd/peftd/internal/fixture"
	"github.com/peftd/peftd/runtime/cpu"
	"github.com/peftd/peftd/runtime/engine"
)

// TestEmulationMatchesGPU: on the tiny-llama-lora fixture (co-batched,
// teacher-forced, against transformers+PEFT float32), the CPU's emulation
// of the FP8 weight scheme gives the worst-case relative error the CUDA
// backend's fp8 path measured on the H200 (0.099, docs/PERFORMANCE.md
// v0.5): the emulation prices the scheme the GPU runs. Exact f32 stays at
// the reference, and FP8 keys stay under TestFP8KeysFixture's 0.1.
func TestEmulationMatchesGPU(t *testing.T) {
	f, err := fx.Load()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, tc := range []struct {
		name     string
		o        cpu.Options
		min, max float64
	}{
		{"f32", cpu.Options{}, 0, 1e-4},
		{"fp8 weights", cpu.Options{FP8Weights: true}, 0.09, 0.11}, // GPU: 0.099
		{"fp8 keys", cpu.Options{FP8Keys: true}, 0.01, 0.1},
	} {
		e, err := engine.New(f.Model, cpu.NewWith(tc.o), engine.DefaultOptions())
		if err != nil {
			t.Fatal(err)
		}
		slots := map[string]int{}
		for i, n := range fx.AdapterNames {
			if err := e.LoadAdapter(i, f.Adapters[n]); err != nil {
				t.Fatal(err)
			}
			slots[n] = i
		}
		acc := make([]fx.ErrAcc, len(f.Cases))
		fx.Run(t, e, slots, f.Cases, func(r fx.Row) { acc[r.Case].Add(r.Got, r.Ref) })
		e.Close()
		worst := 0.0
		for i := range acc {
			worst = max(worst, acc[i].Rel())
		}
		if worst < tc.min || worst > tc.max {
			t.Errorf("%s: worst case relative error %.4f, want [%g, %g]", tc.name, worst, tc.min, tc.max)
		}
		t.Logf("%s: worst case relative error %.4f", tc.name, worst)
	}
}
