//go:build cuda

package gpu

import (
	"context"
	"fmt"
	"testing"

	fx "github.com/peftd/peftd/internal/fixture"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/lora"
)

// TestAsyncAdapterLoad runs the same steps on two engines: one loads an
// adapter synchronously (LoadAdapter), the other prepares it on another
// goroutine while a step runs and commits it with LoadPrepared (upload on the
// copy stream, waited for only by the first step that uses the slot). Every
// logits row must match exactly: the sequences on other slots before, during
// and after the load, and the first step of the new slot.
func TestAsyncAdapterLoad(t *testing.T) {
	m, adapters, cases := loadFixture(t)
	opts := engine.DefaultOptions()
	eS, eA := newEngine(t, m, opts), newEngine(t, m, opts)
	first, late := adapters["qv-r8"], adapters["mlp-r64"]
	for _, e := range []*engine.Engine{eS, eA} {
		if err := e.LoadAdapter(0, first); err != nil {
			t.Fatal(err)
		}
	}
	if _, ok := eA.Backend().(engine.AdapterPreparer); !ok {
		t.Fatal("the CUDA backend is not an AdapterPreparer")
	}
	// A prepared adapter that is released, never loaded.
	if p, err := eA.PrepareAdapter(adapters["all-r16"]); err != nil {
		t.Fatal(err)
	} else {
		p.Release()
		p.Release()
	}
	ctx := context.Background()
	prompt := cases[0].Prompt
	V := int32(m.Config.VocabSize)
	type run struct {
		e    *engine.Engine
		seqs []*engine.Sequence
	}
	runs := []*run{{e: eS}, {e: eA}}
	for _, r := range runs {
		r.seqs = []*engine.Sequence{{}, {}, {}}
	}
	step := func(r *run, i int, withNew bool) [][]float32 {
		tok := []int32{(int32(i)*7 + 3) % V}
		in := []engine.Input{{Seq: r.seqs[0], Tokens: tok, Slot: 0}, {Seq: r.seqs[1], Tokens: tok, Slot: -1}}
		if i == 0 {
			in[0].Tokens, in[1].Tokens = prompt, prompt
		}
		if withNew {
			tk := tok
			if r.seqs[2].Len() == 0 {
				tk = prompt[:max(1, len(prompt)/2)]
			}
			in = append(in, engine.Input{Seq: r.seqs[2], Tokens: tk, Slot: 2})
		}
		out, err := r.e.Step(ctx, in)
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
	const loadAt, steps = 3, 8
	worst := 0.0
	for i := 0; i < steps; i++ {
		var outs [2][][]float32
		for k, r := range runs {
			withNew := i > loadAt
			if i == loadAt {
				if k == 0 {
					outs[k] = step(r, i, false)
					if err := r.e.LoadAdapter(2, late); err != nil {
						t.Fatal(err)
					}
				} else {
					// prepare on another goroutine while this step runs
					type res struct {
						p   *engine.Prepared
						err error
					}
					ch := make(chan res, 1)
					go func() {
						p, err := r.e.PrepareAdapter(late)
						ch <- res{p, err}
					}()
					outs[k] = step(r, i, false)
					x := <-ch
					if x.err != nil {
						t.Fatal(x.err)
					}
					if err := r.e.LoadPrepared(2, x.p); err != nil {
						t.Fatal(err)
					}
					x.p.Release() // no-op after a load
				}
				continue
			}
			outs[k] = step(r, i, withNew)
		}
		if len(outs[0]) != len(outs[1]) {
			t.Fatalf("step %d: %d vs %d outputs", i, len(outs[0]), len(outs[1]))
		}
		for j := range outs[0] {
			e := fx.RelErr(outs[1][j], outs[0][j])
			worst = max(worst, e)
			if e != 0 {
				t.Errorf("step %d input %d: async-load engine differs from the synchronous one (rel %.3g)", i, j, e)
			}
		}
	}
	// Unload right after a prepared load (the copy may still be in flight).
	p, err := eA.PrepareAdapter(adapters["all-r16"])
	if err != nil {
		t.Fatal(err)
	}
	if err := eA.LoadPrepared(1, p); err != nil {
		t.Fatal(err)
	}
	if err := eA.UnloadAdapter(1); err != nil {
		t.Fatal(err)
	}
	for _, r := range runs {
		for _, s := range r.seqs {
			r.e.Release(s)
		}
	}
	t.Logf("maxrel=%.3g (async vs synchronous load, every logits row of %d steps)", worst, steps)
}

// truncRank is a copy of a (float32 matrices) cut to rank r: A's first r
// rows, B's first r columns.
func truncRank(a *lora.Adapter, r int) *lora.Adapter {
	out := *a
	out.Name = fmt.Sprintf("%s-r%d", a.Name, r)
	out.Layers = make([][llama.NumModules]*lora.Pair, len(a.Layers))
	for l, lay := range a.Layers {
		for m, p := range lay {
			if p == nil {
				continue
			}
			af, bf := p.A, p.B
			if af == nil {
				af, bf = make([]float32, len(p.A16)), make([]float32, len(p.B16))
				for i, v := range p.A16 {
					af[i] = fromBF16(v)
				}
				for i, v := range p.B16 {
					bf[i] = fromBF16(v)
				}
			}
			in, outF := len(af)/p.Rank, len(bf)/p.Rank
			q := &lora.Pair{Rank: r, Scale: p.Scale, A: append([]float32(nil), af[:r*in]...), B: make([]float32, outF*r)}
			for o := range outF {
				copy(q.B[o*r:(o+1)*r], bf[o*p.Rank:o*p.Rank+r])
			}
			out.Layers[l][m] = q
		}
	}
	return &out
}

// TestOddRankAfterRecording: graphs recorded while every rank is a multiple
// of 8 use the tensor-core expand; an adapter of rank 4 loaded into the same
// slot afterwards must not replay them (their 16-byte loads of B need the
// ranks in multiples of 8): the graph key holds oddRank. The decode steps
// that follow match an engine that only ever had the rank-4 adapter.
func TestOddRankAfterRecording(t *testing.T) {
	m, adapters, cases := loadFixture(t)
	opts := engine.DefaultOptions()
	odd := truncRank(adapters["all-r16"], 4)
	eA, eS := newEngine(t, m, opts), newEngine(t, m, opts)
	if err := eA.LoadAdapter(0, adapters["all-r16"]); err != nil {
		t.Fatal(err)
	}
	if err := eS.LoadAdapter(0, odd); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	prompt := cases[0].Prompt
	tok := []int32{(prompt[0]*7 + 3) % int32(m.Config.VocabSize)}
	// eA records decode graphs with the rank-16 adapter
	var sa engine.Sequence
	for _, toks := range [][]int32{prompt, tok, tok, tok} {
		if _, err := eA.Step(ctx, []engine.Input{{Seq: &sa, Tokens: toks, Slot: 0}}); err != nil {
			t.Fatal(err)
		}
	}
	eA.Release(&sa)
	if err := eA.LoadAdapter(0, odd); err != nil {
		t.Fatal(err)
	}
	var outs [2][][]float32
	for k, e := range []*engine.Engine{eA, eS} {
		var s engine.Sequence
		for _, toks := range [][]int32{prompt, tok, tok, tok} {
			out, err := e.Step(ctx, []engine.Input{{Seq: &s, Tokens: toks, Slot: 0}})
			if err != nil {
				t.Fatalf("engine %d: %v", k, err)
			}
			outs[k] = append(outs[k], out[0])
		}
		e.Release(&s)
	}
	for j := range outs[0] {
		if d := fx.RelErr(outs[0][j], outs[1][j]); d != 0 {
			t.Errorf("step %d after the rank-4 load differs from an engine that only had it (rel %.3g)", j, d)
		}
	}
}
