//go:build cuda

package gpu

import (
	"context"
	"fmt"
	"testing"
	"time"

	fx "github.com/peftd/peftd/internal/fixture"
	"github.com/peftd/peftd/runtime/cuda"
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

// TestGatedAdapterLoad commits an adapter whose upload is still under way
// and steps at once, three ways: its copies held behind ~100 ms of device
// copies (the step must run gated: each layer's LoRA ops wait for that
// layer's part of the image, which the uploader copies in chunks small
// enough for each layer to have its own); the same with
// kernelForce.wholeLoad (the step waits for the whole image first); and
// its host fill slowed to 5 ms a chunk (PrepareAdapter returns before the
// fill is done: the gated step waits on the host for each layer's copies
// to be enqueued). Every way the logits must be exactly those of an engine
// that loaded the adapter synchronously, in that step and the next. (The
// synchronous engine runs the gated step's shape as a replay of the first
// step's graph, bucket 8, while the gated engine runs it eagerly in the
// graph layout: that is the eager-versus-replay comparison. The step after
// it is the first of its shape on both engines, so both run it eagerly
// before recording it.)
func TestGatedAdapterLoad(t *testing.T) {
	m, adapters, cases := loadFixture(t)
	opts := engine.DefaultOptions()
	first, late := adapters["qv-r8"], adapters["mlp-r64"]
	ctx := context.Background()
	prompt := cases[0].Prompt
	for _, mode := range []struct {
		name        string
		hold, whole bool
		slow        time.Duration
		gated       int
		kept        bool // the image comes from kept pinned blocks (filled by an earlier upload): DMA alone
	}{{"held", true, false, 0, 1, false}, {"held+wholeLoad", true, true, 0, 0, false}, {"slow fill", false, false, 5 * time.Millisecond, 1, false},
		{"held, kept image", true, false, 0, 1, true}} {
		eS, eA := newEngine(t, m, opts), newEngine(t, m, opts)
		for _, e := range []*engine.Engine{eS, eA} {
			if err := e.LoadAdapter(0, first); err != nil {
				t.Fatal(err)
			}
		}
		if err := eS.LoadAdapter(2, late); err != nil {
			t.Fatal(err)
		}
		b := eA.Backend().(*Backend)
		b.force.wholeLoad, b.force.slowFill = mode.whole, mode.slow
		img, err := b.slotLayout(late)
		if err != nil {
			t.Fatal(err)
		}
		// chunks of ~1/(2 layers) of the image, a ring that never makes Upload wait
		chunk := max(256, (2*img.total/(2*m.Config.Layers)+255)&^255)
		nChunks := (2*img.total + chunk - 1) / chunk
		if !mode.kept {
			swapUploader(t, b, nChunks+2, chunk, 0)
		} else {
			swapUploader(t, b, 2, chunk, nChunks)
			// an earlier upload fills the kept blocks (its slot emptied after)
			p, err := b.PrepareAdapter(late)
			if err != nil {
				t.Fatal(err)
			}
			if err := p.(*preparedAdapter).tr.Wait(); err != nil {
				t.Fatal(err)
			}
			p.Release()
			waitFills(t, b, 1)
		}
		seqs := [2][2]*engine.Sequence{{{}, {}}, {{}, {}}}
		step := func(k int, e *engine.Engine, in []engine.Input) [][]float32 {
			out, err := e.Step(ctx, in)
			if err != nil {
				t.Fatalf("%s: engine %d: %v", mode.name, k, err)
			}
			return out
		}
		for k, e := range []*engine.Engine{eS, eA} {
			step(k, e, []engine.Input{{Seq: seqs[k][0], Tokens: prompt, Slot: 0}})
		}
		var held *cuda.Event
		if mode.hold {
			// hold the uploader's stream behind ~0.5-1 s of device copies
			// (2,000 x 1 GiB): 200 (~60 ms on the H200) ended before
			// PrepareAdapter and LoadPrepared returned
			hold, err := b.ctx.NewStream()
			if err != nil {
				t.Fatal(err)
			}
			const gb = 1 << 30
			src, err := b.ctx.Alloc(gb)
			if err != nil {
				t.Fatal(err)
			}
			dst, err := b.ctx.Alloc(gb)
			if err != nil {
				t.Fatal(err)
			}
			for range 2000 {
				if err := hold.CopyDtoD(dst.Ptr(), src.Ptr(), gb); err != nil {
					t.Fatal(err)
				}
			}
			if held, err = b.ctx.NewEvent(false); err != nil {
				t.Fatal(err)
			}
			if err := held.Record(hold); err != nil {
				t.Fatal(err)
			}
			if err := b.up.After(held); err != nil {
				t.Fatal(err)
			}
			defer func() {
				hold.Synchronize()
				src.Free()
				dst.Free()
				held.Destroy()
				hold.Destroy()
			}()
		}
		t0 := time.Now()
		p, err := eA.PrepareAdapter(late)
		if err != nil {
			t.Fatal(err)
		}
		prep := time.Since(t0)
		if err := eA.LoadPrepared(2, p); err != nil {
			t.Fatal(err)
		}
		if held != nil {
			if done, err := held.Done(); err != nil || done {
				t.Fatalf("%s: the hold ended before the step (done %v, %v; PrepareAdapter and LoadPrepared took %v): the test cannot see the gate", mode.name, done, err, time.Since(t0))
			}
		}
		var outs [2][][]float32
		tok := []int32{(prompt[0]*7 + 3) % int32(m.Config.VocabSize)}
		t1 := time.Now()
		for _, k := range []int{1, 0} { // the engine loading asynchronously first
			e := []*engine.Engine{eS, eA}[k]
			outs[k] = step(k, e, []engine.Input{{Seq: seqs[k][0], Tokens: tok, Slot: 0}, {Seq: seqs[k][1], Tokens: prompt, Slot: 2}})
			if k == 1 {
				t1 = time.Now()
			}
		}
		gated := b.gatedSteps
		for k, e := range []*engine.Engine{eS, eA} {
			o := step(k, e, []engine.Input{{Seq: seqs[k][0], Tokens: tok, Slot: 0}, {Seq: seqs[k][1], Tokens: tok, Slot: 2}})
			outs[k] = append(outs[k], o...)
		}
		for j := range outs[0] {
			if d := fx.RelErr(outs[1][j], outs[0][j]); d != 0 {
				t.Errorf("%s: output %d differs from the synchronous load (rel %.3g)", mode.name, j, d)
			}
		}
		if gated != mode.gated || b.gatedSteps != mode.gated {
			t.Errorf("%s: %d gated steps (%d after the next step), want %d", mode.name, gated, b.gatedSteps, mode.gated)
		}
		if st := b.PinnedStats(); mode.kept && st.Hits != 1 {
			t.Errorf("%s: image cache %+v: the upload should have been a hit", mode.name, st)
		}
		if mode.slow > 0 && prep > mode.slow*time.Duration(nChunks)/2 {
			t.Errorf("%s: PrepareAdapter took %v, as long as the fill (%d chunks x %v): it should return at once", mode.name, prep, nChunks, mode.slow)
		}
		for k, e := range []*engine.Engine{eS, eA} {
			for _, s := range seqs[k] {
				e.Release(s)
			}
		}
		t.Logf("%s: %d-byte image in %d chunks of %d bytes; PrepareAdapter %v, gated step %v; gated steps %d, outputs identical",
			mode.name, 2*img.total, nChunks, chunk, prep, t1.Sub(t0)-prep, gated)
	}
}

// TestCanceledAdapterLoad: an adapter whose host fill is slow (20 ms a
// chunk, ~1 s in all) is prepared and committed, then its slot is emptied
// at once: UnloadAdapter stops the upload instead of waiting for the rest
// of the fill; a prepared adapter released before its commit stops the
// same way; and the slot then loads (synchronously) and computes exactly
// as on an engine that never saw the canceled upload.
func TestCanceledAdapterLoad(t *testing.T) {
	m, adapters, cases := loadFixture(t)
	opts := engine.DefaultOptions()
	late := adapters["mlp-r64"]
	eS, eA := newEngine(t, m, opts), newEngine(t, m, opts)
	b := eA.Backend().(*Backend)
	img, err := b.slotLayout(late)
	if err != nil {
		t.Fatal(err)
	}
	const chunks = 50
	chunk := max(256, (2*img.total/chunks+255)&^255)
	swapUploader(t, b, 4, chunk, 0)
	const slow = 20 * time.Millisecond
	fill := slow * time.Duration((2*img.total+chunk-1)/chunk)
	b.force.slowFill = slow
	p, err := eA.PrepareAdapter(late)
	if err != nil {
		t.Fatal(err)
	}
	if err := eA.LoadPrepared(2, p); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	if err := eA.UnloadAdapter(2); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(t0); d > fill/4 {
		t.Errorf("UnloadAdapter during the upload took %v (the fill takes %v): it waited instead of canceling", d, fill)
	}
	p, err = eA.PrepareAdapter(late)
	if err != nil {
		t.Fatal(err)
	}
	t0 = time.Now()
	p.Release()
	if d := time.Since(t0); d > fill/4 {
		t.Errorf("Release of an uncommitted upload took %v (the fill takes %v)", d, fill)
	}
	b.force.slowFill = 0
	for _, e := range []*engine.Engine{eS, eA} {
		if err := e.LoadAdapter(2, late); err != nil {
			t.Fatal(err)
		}
	}
	var outs [2][]float32
	for k, e := range []*engine.Engine{eS, eA} {
		s := &engine.Sequence{}
		out, err := e.Step(context.Background(), []engine.Input{{Seq: s, Tokens: cases[0].Prompt, Slot: 2}})
		if err != nil {
			t.Fatal(err)
		}
		outs[k] = out[0]
		e.Release(s)
	}
	if d := fx.RelErr(outs[1], outs[0]); d != 0 {
		t.Errorf("after the canceled uploads the slot computes differently (rel %.3g)", d)
	}
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

// TestPinnedImageReuse: an adapter uploaded once (its image filled into
// kept pinned blocks) and loaded again after its slot was emptied uploads
// by DMA alone from the kept image; both loads compute exactly as a
// synchronous load. A new version (another *lora.Adapter of the same
// name) never takes the old image.
func TestPinnedImageReuse(t *testing.T) {
	m, adapters, cases := loadFixture(t)
	opts := engine.DefaultOptions()
	late := adapters["mlp-r64"]
	eS, eA := newEngine(t, m, opts), newEngine(t, m, opts)
	b := eA.Backend().(*Backend)
	if err := eS.LoadAdapter(2, late); err != nil {
		t.Fatal(err)
	}
	stepOn := func(e *engine.Engine) []float32 {
		s := &engine.Sequence{}
		defer e.Release(s)
		out, err := e.Step(context.Background(), []engine.Input{{Seq: s, Tokens: cases[0].Prompt, Slot: 2}})
		if err != nil {
			t.Fatal(err)
		}
		return out[0]
	}
	want := stepOn(eS)
	load := func(a *lora.Adapter) {
		p, err := eA.PrepareAdapter(a)
		if err != nil {
			t.Fatal(err)
		}
		if err := eA.LoadPrepared(2, p); err != nil {
			t.Fatal(err)
		}
	}
	second := *late // a new version: same name and values, another adapter
	for i, c := range []struct {
		name        string
		a           *lora.Adapter
		hits, fills int64
	}{{"first load", late, 0, 1}, {"again", late, 1, 1}, {"new version", &second, 1, 2}, {"new version again", &second, 2, 2}} {
		load(c.a)
		if d := fx.RelErr(stepOn(eA), want); d != 0 {
			t.Errorf("%s: output differs from the synchronous load (rel %.3g)", c.name, d)
		}
		if err := eA.UnloadAdapter(2); err != nil {
			t.Fatal(err)
		}
		waitFills(t, b, c.fills)
		if st := b.PinnedStats(); st.Hits != c.hits || st.Fills != c.fills || st.Ring != 0 {
			t.Errorf("%s (%d): image cache %+v, want %d hits, %d fills, none through the ring", c.name, i, st, c.hits, c.fills)
		}
	}
	t.Logf("image cache %+v", b.PinnedStats())
}
