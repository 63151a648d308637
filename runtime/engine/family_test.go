package engine_test

import (
	"maps"
	"path/filepath"
	"slices"
	"testing"

	"github.com/peftd/peftd/internal/fixture"
	"github.com/peftd/peftd/runtime/cpu"
	"github.com/peftd/peftd/runtime/engine"
)

// TestFamilyFixtures: tiny Qwen2 (q/k/v biases, tied embeddings), Qwen3
// (per-head q/k norms, head_dim != hidden/heads) and Mistral models with
// PEFT adapters, made by transformers + PEFT (tools/tiny-*-lora.json),
// co-batched in one engine each and one by one, within the Llama
// fixture's limits.
func TestFamilyFixtures(t *testing.T) {
	for _, fam := range []string{"qwen2", "qwen3", "mistral"} {
		t.Run(fam, func(t *testing.T) {
			f, err := fixture.LoadDir(filepath.Join("..", "..", "testdata", "tiny-"+fam+"-lora"))
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if got := f.Model.Config.Family(); got != fam {
				t.Fatalf("family %q, want %q", got, fam)
			}
			opts := engine.DefaultOptions()
			opts.BlockSize, opts.KVBlocks = 16, 256
			e, err := engine.New(f.Model, cpu.New(0), opts)
			if err != nil {
				t.Fatal(err)
			}
			slots := map[string]int{}
			for _, n := range slices.Sorted(maps.Keys(f.Adapters)) {
				slots[n] = len(slots)
				if err := e.LoadAdapter(slots[n], f.Adapters[n]); err != nil {
					t.Fatal(err)
				}
			}
			runCases(t, e, slots, f.Cases)
			for _, c := range f.Cases {
				runCases(t, e, slots, []refCase{c})
			}
		})
	}
}
