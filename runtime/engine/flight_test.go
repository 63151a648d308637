package engine_test

import (
	"context"
	"errors"
	"slices"
	"testing"

	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/sample"
)

// TestPrepareWhileInFlight: steps prepared while the one before them is in
// flight, their decode tokens set after it (Input.Later), draw the same
// greedy tokens as StepSample one step at a time; the engine refuses a
// second launch or a Step meanwhile, and a launch with a token missing; a
// discarded input neither advances nor draws.
func TestPrepareWhileInFlight(t *testing.T) {
	m, newEngine := storiesEngines(t)
	ctx := context.Background()
	prompts := [][]int32{{1, 403, 407, 261, 378}, {1, 65, 301}}
	const steps = 6
	greedy := []engine.Sampling{{}, {}}

	// one step at a time
	ref := newEngine()
	want := make([][]int32, len(prompts))
	rs := make([]engine.Sequence, len(prompts))
	in := []engine.Input{{Seq: &rs[0], Tokens: prompts[0], Slot: -1}, {Seq: &rs[1], Tokens: prompts[1], Slot: -1}}
	for range steps {
		got, err := ref.StepSample(ctx, in, greedy)
		if err != nil {
			t.Fatal(err)
		}
		for i := range in {
			want[i] = append(want[i], got[i].ID)
			in[i].Tokens = []int32{got[i].ID}
		}
	}

	// each step prepared while the one before it is in flight
	e := newEngine()
	ss := make([]engine.Sequence, len(prompts))
	p, err := e.Prepare(ctx, []engine.Input{{Seq: &ss[0], Tokens: prompts[0], Slot: -1}, {Seq: &ss[1], Tokens: prompts[1], Slot: -1}})
	if err != nil {
		t.Fatal(err)
	}
	f, err := e.Launch(p, greedy)
	if err != nil {
		t.Fatal(err)
	}
	got := make([][]int32, len(prompts))
	for k := range steps {
		var next *engine.Planned
		if k < steps-1 {
			later := []engine.Input{{Seq: &ss[0], Tokens: []int32{0}, Slot: -1, Later: true}, {Seq: &ss[1], Tokens: []int32{0}, Slot: -1, Later: true}}
			if next, err = e.Prepare(ctx, later); err != nil {
				t.Fatal(err)
			}
			if _, err := e.Launch(next, greedy); !errors.Is(err, engine.ErrInFlight) {
				t.Fatalf("a second launch in flight: %v, want ErrInFlight", err)
			}
			if _, err := e.Step(ctx, []engine.Input{{Seq: &engine.Sequence{}, Tokens: []int32{1}, Slot: -1}}); !errors.Is(err, engine.ErrInFlight) {
				t.Fatalf("Step with a step in flight: %v, want ErrInFlight", err)
			}
			if n := ss[0].Next(); n != len(prompts[0])+k {
				t.Fatalf("step %d: sequence 0 next at %d, want %d", k, n, len(prompts[0])+k)
			}
		}
		c, err := f.Wait()
		if err != nil {
			t.Fatal(err)
		}
		for i := range c {
			got[i] = append(got[i], c[i].ID)
		}
		if next == nil {
			break
		}
		for i := range c {
			if err := next.SetToken(i, c[i].ID); err != nil {
				t.Fatal(err)
			}
		}
		if f, err = e.Launch(next, greedy); err != nil {
			t.Fatal(err)
		}
	}
	for i := range want {
		if !slices.Equal(got[i], want[i]) {
			t.Errorf("sequence %d: prepared in flight %v, one at a time %v", i, got[i], want[i])
		}
	}
	if ss[0].Len() != rs[0].Len() || ss[1].Len() != rs[1].Len() {
		t.Errorf("lengths %d, %d; want %d, %d", ss[0].Len(), ss[1].Len(), rs[0].Len(), rs[1].Len())
	}

	// a Later token never set is refused; nothing is in flight after
	p, err = e.Prepare(ctx, []engine.Input{{Seq: &ss[0], Tokens: []int32{0}, Slot: -1, Later: true}})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.SetToken(0, int32(m.Config.VocabSize)); !errors.Is(err, engine.ErrBadInput) {
		t.Errorf("token outside the vocabulary: %v, want ErrBadInput", err)
	}
	if _, err := e.Launch(p, greedy[:1]); !errors.Is(err, engine.ErrBadInput) {
		t.Fatalf("launch without the token: %v, want ErrBadInput", err)
	}

	// a discarded input keeps its length and draws nothing
	n0, n1 := ss[0].Len(), ss[1].Len()
	p, err = e.Prepare(ctx, []engine.Input{{Seq: &ss[0], Tokens: []int32{5}, Slot: -1}, {Seq: &ss[1], Tokens: []int32{0}, Slot: -1, Later: true}})
	if err != nil {
		t.Fatal(err)
	}
	p.Discard(1)
	if f, err = e.Launch(p, []engine.Sampling{{}, {Params: sample.Params{Logprobs: 1}}}); err != nil {
		t.Fatal(err)
	}
	c, err := f.Wait()
	if err != nil {
		t.Fatal(err)
	}
	if ss[0].Len() != n0+1 || ss[1].Len() != n1 {
		t.Errorf("after a step discarding input 1: lengths %d, %d; want %d, %d", ss[0].Len(), ss[1].Len(), n0+1, n1)
	}
	if c[1].ID != 0 || c[1].Top != nil {
		t.Errorf("the discarded input drew %+v", c[1])
	}
	if _, err := f.Wait(); err == nil {
		t.Error("a flight waited for twice")
	}
}
