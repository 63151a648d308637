package engine_test

import (
	"context"
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/peftd/peftd/internal/enginetest"
	"github.com/peftd/peftd/internal/fixture"

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

// TestLaunchChained: on a Chainer backend (enginetest.Null, Async), a step
// whose decode tokens come from the step in flight (SetTokenFrom) launches
// behind it; a third launch is refused while two are in flight, flights
// are waited for in order, and each sequence's Next length counts both.
// The chained step's rows took the draws of the step before: the same
// tokens as taking them from the host.
func TestLaunchChained(t *testing.T) {
	f, err := fixture.Load()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ctx := context.Background()
	mk := func(noChain bool) *engine.Engine {
		e, err := engine.New(f.Model, &enginetest.Null{Step: 100 * time.Microsecond, Async: true, NoChain: noChain}, engine.DefaultOptions())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { e.Close() })
		return e
	}
	prompts := [][]int32{{1, 5, 9, 13}, {1, 7}}
	sp := []engine.Sampling{{Seed: 1, Index: 4}, {Seed: 2, Index: 2}}
	// draws two steps: prompts, then one decode step, chained or not
	run := func(chain bool) [][]int32 {
		e := mk(!chain)
		s := []*engine.Sequence{{}, {}}
		p, err := e.Prepare(ctx, []engine.Input{{Seq: s[0], Tokens: prompts[0], Slot: -1}, {Seq: s[1], Tokens: prompts[1], Slot: -1}})
		if err != nil {
			t.Fatal(err)
		}
		f1, err := e.Launch(p, sp)
		if err != nil {
			t.Fatal(err)
		}
		p2, err := e.Prepare(ctx, []engine.Input{{Seq: s[0], Tokens: []int32{0}, Slot: -1, Later: true}, {Seq: s[1], Tokens: []int32{0}, Slot: -1, Later: true}})
		if err != nil {
			t.Fatal(err)
		}
		sp2 := []engine.Sampling{{Seed: 1, Index: 5}, {Seed: 2, Index: 3}}
		var f2 *engine.Flight
		if chain {
			for i := range 2 {
				if err := p2.SetTokenFrom(i, f1, i); err != nil {
					t.Fatal(err)
				}
			}
			if f2, err = e.Launch(p2, sp2); err != nil {
				t.Fatalf("chained launch: %v", err)
			}
			if s[0].Next() != len(prompts[0])+1 || s[0].Len() != 0 {
				t.Errorf("two steps in flight: sequence 0 at %d, next %d; want 0, %d", s[0].Len(), s[0].Next(), len(prompts[0])+1)
			}
			p3, err := e.Prepare(ctx, []engine.Input{{Seq: &engine.Sequence{}, Tokens: []int32{1}, Slot: -1}})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := e.Launch(p3, sp[:1]); !errors.Is(err, engine.ErrInFlight) {
				t.Errorf("a third step in flight: %v, want ErrInFlight", err)
			}
			if _, err := f2.Wait(); err == nil {
				t.Error("the second flight waited for before the first")
			}
		}
		c1, err := f1.Wait()
		if err != nil {
			t.Fatal(err)
		}
		if !chain {
			for i := range 2 {
				if err := p2.SetToken(i, c1[i].ID); err != nil {
					t.Fatal(err)
				}
			}
			if f2, err = e.Launch(p2, sp2); err != nil {
				t.Fatal(err)
			}
		}
		c2, err := f2.Wait()
		if err != nil {
			t.Fatal(err)
		}
		if s[0].Len() != len(prompts[0])+1 || s[0].Next() != s[0].Len() {
			t.Errorf("after both: sequence 0 at %d, next %d; want %d", s[0].Len(), s[0].Next(), len(prompts[0])+1)
		}
		return [][]int32{{c1[0].ID, c2[0].ID}, {c1[1].ID, c2[1].ID}}
	}
	want, got := run(false), run(true)
	for i := range want {
		if !slices.Equal(got[i], want[i]) {
			t.Errorf("sequence %d: chained %v, from the host %v", i, got[i], want[i])
		}
	}
}
