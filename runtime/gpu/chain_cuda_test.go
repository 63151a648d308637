//go:build cuda

package gpu

import (
	"context"
	"maps"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/sample"
)

// TestChainedStepsMatch decodes 12 sequences of the tiny fixture (four on
// adapters, half greedy, half sampled with seeds) for 10 steps twice: each
// step launched behind the one in flight, its rows reading that step's
// draws on the device (Options.ChainSteps), and each step launched once the
// tokens of the one before are on the host. Every token must be the same,
// and every chained launch must chain (a launch that could not would fail
// with ErrInFlight).
func TestChainedStepsMatch(t *testing.T) {
	m, adapters, _ := loadFixture(t)
	names := slices.Sorted(maps.Keys(adapters))
	opts := engine.Options{MaxTokens: 512, KVBlocks: 1024, BlockSize: 16, AdapterSlots: len(names)}
	const nSeq, steps = 12, 10
	rng := rand.New(rand.NewPCG(5, 6))
	prompts := make([][]int32, nSeq)
	slot := make([]int, nSeq)
	sp := make([]sample.Params, nSeq)
	for i := range nSeq {
		prompts[i] = make([]int32, 3+rng.IntN(20))
		for j := range prompts[i] {
			prompts[i][j] = int32(1 + rng.IntN(m.Config.VocabSize-1))
		}
		slot[i] = -1
		if i%3 == 0 {
			slot[i] = (i / 3) % len(names)
		}
		if i%2 == 1 {
			sp[i] = sample.Params{Temperature: 0.8, TopP: 0.95}
		}
	}
	ctx := context.Background()
	run := func(chain bool) [][]int32 {
		e := newEngineWith(t, m, opts, Options{ChainSteps: chain})
		for i, n := range names {
			if err := e.LoadAdapter(i, adapters[n]); err != nil {
				t.Fatal(err)
			}
		}
		if err := e.Warmup(); err != nil {
			t.Fatal(err)
		}
		if b := e.Backend().(*Backend); b.Chains() != chain {
			t.Fatalf("ChainSteps %v: the backend chains: %v", chain, b.Chains())
		}
		seqs := make([]*engine.Sequence, nSeq)
		in := make([]engine.Input, nSeq)
		for i := range nSeq {
			seqs[i] = &engine.Sequence{}
			in[i] = engine.Input{Seq: seqs[i], Tokens: prompts[i], Slot: slot[i]}
		}
		out := make([][]int32, nSeq)
		samplings := func(step int) []engine.Sampling {
			s := make([]engine.Sampling, nSeq)
			for i := range s {
				s[i] = engine.Sampling{Params: sp[i], Seed: uint64(100 + i), Index: uint64(len(prompts[i]) + step)}
			}
			return s
		}
		p, err := e.Prepare(ctx, in)
		if err != nil {
			t.Fatal(err)
		}
		fl, err := e.Launch(p, samplings(0))
		if err != nil {
			t.Fatal(err)
		}
		for step := 1; step <= steps; step++ {
			next := make([]engine.Input, nSeq)
			for i := range nSeq {
				next[i] = engine.Input{Seq: seqs[i], Tokens: []int32{0}, Slot: slot[i], Later: true}
			}
			p, err := e.Prepare(ctx, next)
			if err != nil {
				t.Fatal(err)
			}
			var f2 *engine.Flight
			if chain {
				for i := range nSeq {
					if err := p.SetTokenFrom(i, fl, i); err != nil {
						t.Fatal(err)
					}
				}
				if f2, err = e.Launch(p, samplings(step)); err != nil {
					t.Fatalf("step %d: chained launch: %v", step, err)
				}
			}
			got, err := fl.Wait()
			if err != nil {
				t.Fatalf("step %d: %v", step, err)
			}
			for i := range nSeq {
				out[i] = append(out[i], got[i].ID)
			}
			if !chain {
				for i := range nSeq {
					if err := p.SetToken(i, got[i].ID); err != nil {
						t.Fatal(err)
					}
				}
				if f2, err = e.Launch(p, samplings(step)); err != nil {
					t.Fatalf("step %d: %v", step, err)
				}
			}
			fl = f2
		}
		got, err := fl.Wait()
		if err != nil {
			t.Fatal(err)
		}
		for i := range nSeq {
			out[i] = append(out[i], got[i].ID)
			e.Release(seqs[i])
		}
		if rec, _ := e.Backend().(*Backend).GraphStats(); chain && rec == 0 {
			t.Error("no graph recorded: nothing could chain")
		}
		return out
	}
	want, got := run(false), run(true)
	for i := range nSeq {
		if !slices.Equal(got[i], want[i]) {
			t.Errorf("sequence %d (slot %d, %+v): chained %v, from the host %v", i, slot[i], sp[i], got[i], want[i])
		}
	}
	t.Logf("%d sequences x %d tokens: chained and unchained agree", nSeq, steps+1)
}
