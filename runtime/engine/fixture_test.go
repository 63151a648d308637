package engine_test

import (
	"context"
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"testing"

	"github.com/peftd/peftd/runtime/cpu"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/lora"
	"github.com/peftd/peftd/runtime/safetensors"
)

const fixture = "../../testdata/tiny-llama-lora"

type fixtureCase struct {
	ID      int     `json:"id"`
	Adapter *string `json:"adapter"`
	Prompt  []int32 `json:"prompt"`
	Decode  int     `json:"decode"`
}

type refCase struct {
	fixtureCase
	prefill, decode []float32 // row-major [n, vocab]
	greedy          []int32
}

func loadFixture(t testing.TB) (*llama.Model, map[string]*lora.Adapter, []refCase) {
	t.Helper()
	m, err := llama.Open(filepath.Join(fixture, "base"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	var spec struct{ Cases []fixtureCase }
	b, err := os.ReadFile(filepath.Join(fixture, "cases.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &spec); err != nil {
		t.Fatal(err)
	}
	exp, err := safetensors.Open(filepath.Join(fixture, "expected.safetensors"))
	if err != nil {
		t.Fatal(err)
	}
	defer exp.Close()
	adapters := map[string]*lora.Adapter{}
	var cases []refCase
	for _, c := range spec.Cases {
		rc := refCase{fixtureCase: c}
		p := func(s string) string { return "case" + itoa(c.ID) + "." + s }
		if rc.prefill, _, err = exp.Float32(p("prefill_logits")); err != nil {
			t.Fatal(err)
		}
		if rc.decode, _, err = exp.Float32(p("decode_logits")); err != nil {
			t.Fatal(err)
		}
		g, _, err := exp.Int64(p("greedy"))
		if err != nil {
			t.Fatal(err)
		}
		for _, x := range g {
			rc.greedy = append(rc.greedy, int32(x))
		}
		if c.Adapter != nil && adapters[*c.Adapter] == nil {
			a, err := lora.Load(filepath.Join(fixture, "adapters", *c.Adapter), m.Config)
			if err != nil {
				t.Fatal(err)
			}
			adapters[*c.Adapter] = a
		}
		cases = append(cases, rc)
	}
	return m, adapters, cases
}

func itoa(i int) string { return string(rune('0' + i)) }

func relErr(got, want []float32) float64 {
	var d, n float64
	for i := range want {
		x := float64(got[i]) - float64(want[i])
		d += x * x
		n += float64(want[i]) * float64(want[i])
	}
	return math.Sqrt(d / n)
}

func argmax(v []float32) int32 {
	best := 0
	for i, x := range v {
		if x > v[best] {
			best = i
		}
	}
	return int32(best)
}

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
		r := relErr(out[i], c.prefill)
		worst = max(worst, r)
		if r > 1e-4 {
			t.Errorf("case %d (%v): prefill logits relative error %.3g > 1e-4", c.ID, name(c), r)
		}
		if g := argmax(out[i][len(out[i])-V:]); g != c.greedy[0] {
			t.Errorf("case %d: first greedy token %d, want %d", c.ID, g, c.greedy[0])
		}
	}
	for j := 0; ; j++ {
		var step []engine.Input
		var idx []int
		for i, c := range cases {
			if j < c.Decode {
				step = append(step, engine.Input{Seq: seqs[i], Tokens: []int32{c.greedy[j]}, Slot: in[i].Slot})
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
			r := relErr(out[k], c.decode[j*V:(j+1)*V])
			worst = max(worst, r)
			if r > 1e-4 {
				t.Errorf("case %d decode %d: relative error %.3g > 1e-4", c.ID, j, r)
			}
			if j+1 < len(c.greedy) {
				if g := argmax(out[k]); g != c.greedy[j+1] {
					t.Errorf("case %d decode %d: greedy %d, want %d", c.ID, j, g, c.greedy[j+1])
				}
			}
		}
	}
	for _, s := range seqs {
		e.Release(s)
	}
}

func name(c refCase) string {
	if c.Adapter == nil {
		return "base"
	}
	return *c.Adapter
}

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
	for _, n := range []string{"qv-r8", "all-r16", "attn-r32-rslora", "mlp-r64"} {
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
