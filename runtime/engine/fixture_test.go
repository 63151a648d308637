package engine_test

import (
	"context"
	"testing"

	"github.com/peftd/peftd/internal/fixture"
	"github.com/peftd/peftd/runtime/cpu"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/lora"
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
// teacher-forced decode steps together) and checks every row.
func runCases(t *testing.T, e *engine.Engine, slots map[string]int, cases []refCase) {
	t.Helper()
	ctx := context.Background()
	V := e.Config().VocabSize
	seqs := make([]*engine.Sequence, len(cases))
	in := make([]engine.Input, len(cases))
	for i, c := range cases {
		seqs[i] = &engine.Sequence{}
		slot := -1
		if c.Adapter != nil {
			slot = slots[*c.Adapter]
		}
		in[i] = engine.Input{Seq: seqs[i], Tokens: c.Prompt, Slot: slot, AllLogits: true}
	}
	out, err := e.Step(ctx, in)
	if err != nil {
		t.Fatal(err)
	}
	worst := 0.0
	defer func() { t.Logf("%d cases: worst relative error %.3g", len(cases), worst) }()
	for i, c := range cases {
		r := fixture.RelErr(out[i], c.Prefill)
		worst = max(worst, r)
		if r > 1e-4 {
			t.Errorf("case %d (%v): prefill logits relative error %.3g > 1e-4", c.ID, name(c), r)
		}
		if g := sample.Argmax(out[i][len(out[i])-V:]); g != c.Greedy[0] {
			t.Errorf("case %d: first greedy token %d, want %d", c.ID, g, c.Greedy[0])
		}
	}
	for j := 0; ; j++ {
		var step []engine.Input
		var idx []int
		for i, c := range cases {
			if j < c.Decode {
				step = append(step, engine.Input{Seq: seqs[i], Tokens: []int32{c.Greedy[j]}, Slot: in[i].Slot})
				idx = append(idx, i)
			}
		}
		if len(step) == 0 {
			break
		}
		out, err := e.Step(ctx, step)
		if err != nil {
			t.Fatal(err)
		}
		for k, i := range idx {
			c := cases[i]
			r := fixture.RelErr(out[k], c.DecodeLogits[j*V:(j+1)*V])
			worst = max(worst, r)
			if r > 1e-4 {
				t.Errorf("case %d decode %d: relative error %.3g > 1e-4", c.ID, j, r)
			}
			if j+1 < len(c.Greedy) {
				if g := sample.Argmax(out[k]); g != c.Greedy[j+1] {
					t.Errorf("case %d decode %d: greedy %d, want %d", c.ID, j, g, c.Greedy[j+1])
				}
			}
		}
	}
	for _, s := range seqs {
		e.Release(s)
	}
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
