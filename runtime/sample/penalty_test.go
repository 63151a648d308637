package sample

import (
	"errors"
	"math"
	"math/rand/v2"
	"testing"
)

// penalized is the reference: every token's logit changed as vLLM does,
// from the whole prompt and output (no incremental state).
func penalized(logits []float32, p Penalties, prompt, output []int32) []float32 {
	out := make([]float32, len(logits))
	count := map[int32]int{}
	seen := map[int32]bool{}
	for _, t := range prompt {
		seen[t] = true
	}
	for _, t := range output {
		seen[t] = true
		count[t]++
	}
	for t, x := range logits {
		id := int32(t)
		if p.Repetition != 0 && p.Repetition != 1 && seen[id] {
			if x > 0 {
				x /= float32(p.Repetition)
			} else {
				x *= float32(p.Repetition)
			}
		}
		add := p.LogitBias[id]
		if c := count[id]; c > 0 {
			add -= p.Presence + p.Frequency*float64(c)
		}
		out[t] = x + float32(add)
	}
	return out
}

// TestTracker: the adjustments a Tracker keeps as tokens are generated,
// applied to a row, give the reference's logits at every step, for each
// penalty alone and all together; a neutral request tracks nothing.
func TestTracker(t *testing.T) {
	const V = 50
	rng := rand.New(rand.NewPCG(1, 2))
	for _, c := range []struct {
		name string
		p    Penalties
	}{
		{"presence", Penalties{Presence: 1.5}},
		{"frequency", Penalties{Frequency: 0.7}},
		{"negative", Penalties{Presence: -1, Frequency: -0.5}},
		{"repetition", Penalties{Repetition: 1.3}},
		{"repetition<1", Penalties{Repetition: 0.8}},
		{"bias", Penalties{LogitBias: map[int32]float64{3: 100, 7: -100, 49: 2.5}}},
		{"all", Penalties{Presence: 0.5, Frequency: 0.25, Repetition: 1.2, LogitBias: map[int32]float64{3: 5, 10: -5}}},
	} {
		t.Run(c.name, func(t *testing.T) {
			if err := c.p.Validate(); err != nil {
				t.Fatal(err)
			}
			prompt := []int32{1, 2, 3, 2, 9}
			tr := NewTracker(c.p, prompt)
			var output []int32
			for step := range 30 {
				logits := make([]float32, V)
				for i := range logits {
					logits[i] = float32(rng.NormFloat64() * 3)
				}
				want := penalized(logits, c.p, prompt, output)
				got := append([]float32(nil), logits...)
				Apply(got, tr.Adjust())
				for i := range got {
					if math.Abs(float64(got[i]-want[i])) > 1e-4*(1+math.Abs(float64(want[i]))) {
						t.Fatalf("step %d token %d: %v, want %v", step, i, got[i], want[i])
					}
				}
				seen := map[int32]bool{}
				for _, a := range tr.Adjust() {
					if seen[a.Token] {
						t.Fatalf("step %d: token %d has two entries", step, a.Token)
					}
					seen[a.Token] = true
				}
				id := int32(rng.IntN(12)) // repeats likely
				output = append(output, id)
				tr.Generated(id)
			}
		})
	}
	if tr := NewTracker(Penalties{Repetition: 1}, []int32{1, 2}); tr != nil || tr.Adjust() != nil {
		t.Errorf("a neutral request made a tracker: %+v", tr)
	}
	var nilTr *Tracker
	nilTr.Generated(3) // no-op
}

func TestPenaltiesValidate(t *testing.T) {
	for _, c := range []struct {
		p  Penalties
		ok bool
	}{
		{Penalties{}, true},
		{Penalties{Presence: 2, Frequency: -2, Repetition: 100}, true},
		{Penalties{Presence: 2.01}, false},
		{Penalties{Frequency: math.NaN()}, false},
		{Penalties{Repetition: -1}, false},
		{Penalties{Repetition: 1e-9}, false},
		{Penalties{Repetition: math.Inf(1)}, false},
		{Penalties{LogitBias: map[int32]float64{-1: 1}}, false},
		{Penalties{LogitBias: map[int32]float64{5: 100.5}}, false},
		{Penalties{LogitBias: map[int32]float64{5: -100}}, true},
	} {
		err := c.p.Validate()
		if (err == nil) != c.ok || (err != nil && !errors.Is(err, ErrParams)) {
			t.Errorf("%+v: %v, want ok=%v", c.p, err, c.ok)
		}
		if perr := (Params{Penalties: c.p}).Validate(); (perr == nil) != c.ok {
			t.Errorf("Params with %+v: %v, want ok=%v", c.p, perr, c.ok)
		}
	}
}
