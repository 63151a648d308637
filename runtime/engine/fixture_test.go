package engine_test

import (
	"fmt"
	"slices"
	"testing"

	"github.com/peftd/peftd/internal/fixture"
	"github.com/peftd/peftd/runtime/cpu"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/lora"
	"github.com/peftd/peftd/runtime/safetensors"
	"github.com/peftd/peftd/runtime/sample"
)

type refCase = fixture.Case

func loadFixture(t testing.TB) (*llama.Model, map[string]*lora.Adapter, []refCase) {
	t.Helper()
	f, err := fixture.Load()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f.Model, f.Adapters, f.Cases
}

func itoa(i int) string { return string(rune('0' + i)) }

// runCases runs the cases co-batched in one engine (prefill together, then
// teacher-forced decode steps together) and checks every row: the CPU
// backend computes in float32 as the reference does.
func runCases(t *testing.T, e *engine.Engine, slots map[string]int, cases []refCase) {
	t.Helper()
	V := e.Config().VocabSize
	worst := 0.0
	defer func() { t.Logf("%d cases: worst relative error %.3g", len(cases), worst) }()
	fixture.Run(t, e, slots, cases, func(r fixture.Row) {
		c := cases[r.Case]
		rel := fixture.RelErr(r.Got, r.Ref)
		worst = max(worst, rel)
		what := fmt.Sprintf("case %d (%v) prefill", c.ID, name(c))
		if r.Decode >= 0 {
			what = fmt.Sprintf("case %d decode %d", c.ID, r.Decode)
		}
		if rel > 1e-4 {
			t.Errorf("%s: logits relative error %.3g > 1e-4", what, rel)
		}
		if g := sample.Argmax(r.Got[len(r.Got)-V:]); r.Check && g != r.Want {
			t.Errorf("%s: greedy %d, want %d", what, g, r.Want)
		}
	})
}

func name(c refCase) string { return c.AdapterName() }

func newFixtureEngine(t *testing.T, m *llama.Model, adapters map[string]*lora.Adapter, blockSize int) (*engine.Engine, map[string]int) {
	t.Helper()
	opts := engine.DefaultOptions()
	opts.BlockSize = blockSize
	opts.KVBlocks = 4096 / blockSize
	e, err := engine.New(m, cpu.New(0), opts)
	if err != nil {
		t.Fatal(err)
	}
	slots := map[string]int{}
	for _, n := range fixture.AdapterNames {
		slots[n] = len(slots)
		if err := e.LoadAdapter(slots[n], adapters[n]); err != nil {
			t.Fatal(err)
		}
	}
	return e, slots
}

func TestFixtureCoBatched(t *testing.T) {
	m, adapters, cases := loadFixture(t)
	for _, bs := range []int{16, 1, 5} { // page sizes: typical, one token, odd
		t.Run("block"+itoa(bs%10), func(t *testing.T) {
			e, slots := newFixtureEngine(t, m, adapters, bs)
			runCases(t, e, slots, cases)
			if e.FreeBlocks() != e.Options().KVBlocks {
				t.Errorf("pages leaked: %d free of %d", e.FreeBlocks(), e.Options().KVBlocks)
			}
		})
	}
}

func TestFixtureOneByOne(t *testing.T) {
	m, adapters, cases := loadFixture(t)
	e, slots := newFixtureEngine(t, m, adapters, 16)
	for _, c := range cases {
		runCases(t, e, slots, []refCase{c})
	}
}

// partsCPU is the CPU backend with engine.PartsUploader: it records how
// many parts each stacked weight came in, then uploads them joined.
type partsCPU struct {
	*cpu.Backend
	parts map[string]int
}

func (p *partsCPU) UploadParts(name string, dtype safetensors.DType, shape []int, parts [][]byte) (engine.Weight, error) {
	p.parts[name] = len(parts)
	return p.Backend.Upload(name, dtype, shape, slices.Concat(parts...))
}

// TestUploadParts: a backend with engine.PartsUploader gets every stacked
// weight (q, k, v and gate, up of each layer) as its parts, in order (the
// fixture's logits then match the reference), and the others whole.
func TestUploadParts(t *testing.T) {
	m, adapters, cases := loadFixture(t)
	b := &partsCPU{Backend: cpu.New(0), parts: map[string]int{}}
	e, slots := fixtureEngineOn(t, m, adapters, b)
	if len(b.parts) != 2*m.Config.Layers {
		t.Errorf("%d stacked weights came in parts (%v), want q/k/v and gate/up of %d layers", len(b.parts), b.parts, m.Config.Layers)
	}
	for n, k := range b.parts {
		if k != 2 && k != 3 {
			t.Errorf("%s: %d parts, want 3 (q, k, v) or 2 (gate, up)", n, k)
		}
	}
	runCases(t, e, slots, cases)
}

// fixtureEngineOn is an engine of the fixture's model on backend b (256
// KV pages) with the fixture's adapters loaded, and their slots.
func fixtureEngineOn(t *testing.T, m *llama.Model, adapters map[string]*lora.Adapter, b engine.Backend) (*engine.Engine, map[string]int) {
	t.Helper()
	opts := engine.DefaultOptions()
	opts.KVBlocks = 256
	e, err := engine.New(m, b, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	slots := map[string]int{}
	for _, n := range fixture.AdapterNames {
		slots[n] = len(slots)
		if err := e.LoadAdapter(slots[n], adapters[n]); err != nil {
			t.Fatal(err)
		}
	}
	return e, slots
}
