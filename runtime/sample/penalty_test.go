package sample_test

import (
	"errors"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/peftd/peftd/internal/sampletest"
	"github.com/peftd/peftd/runtime/sample"
)

// TestTracker: the adjustments a Tracker keeps as tokens are generated,
// applied to a row, give the reference's logits at every step, for each
// penalty alone and all together; a neutral request tracks nothing.
func TestTracker(t *testing.T) {
	const V = 50
	rng := rand.New(rand.NewPCG(1, 2))
	for _, c := range []struct {
		name string
		p    sample.Penalties
	}{
		{"presence", sample.Penalties{Presence: 1.5}},
		{"frequency", sample.Penalties{Frequency: 0.7}},
		{"negative", sample.Penalties{Presence: -1, Frequency: -0.5}},
		{"repetition", sample.Penalties{Repetition: 1.3}},
		{"repetition<1", sample.Penalties{Repetition: 0.8}},
		{"bias", sample.Penalties{LogitBias: map[int32]float64{3: 100, 7: -100, 49: 2.5}}},
		{"all", sample.Penalties{Presence: 0.5, Frequency: 0.25, Repetition: 1.2, LogitBias: map[int32]float64{3: 5, 10: -5}}},
	} {
		t.Run(c.name, func(t *testing.T) {
			if err := c.p.Validate(); err != nil {
				t.Fatal(err)
			}
			prompt := []int32{1, 2, 3, 2, 9}
			tr := sample.NewTracker(c.p, prompt)
			var output []int32
			for step := range 30 {
				logits := make([]float32, V)
				for i := range logits {
					logits[i] = float32(rng.NormFloat64() * 3)
				}
				want := sampletest.Penalized(logits, c.p, prompt, output)
				got := append([]float32(nil), logits...)
				sample.Apply(got, tr.Adjust())
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
	if tr := sample.NewTracker(sample.Penalties{Repetition: 1}, []int32{1, 2}); tr != nil || tr.Adjust() != nil {
		t.Errorf("a neutral request made a tracker: %+v", tr)
	}
	var nilTr *sample.Tracker
	nilTr.Generated(3) // no-op
}

func TestPenaltiesValidate(t *testing.T) {
	for _, c := range []struct {
		p  sample.Penalties
		ok bool
	}{
		{sample.Penalties{}, true},
		{sample.Penalties{Presence: 2, Frequency: -2, Repetition: 100}, true},
		{sample.Penalties{Presence: 2.01}, false},
		{sample.Penalties{Frequency: math.NaN()}, false},
		{sample.Penalties{Repetition: -1}, false},
		{sample.Penalties{Repetition: 1e-9}, false},
		{sample.Penalties{Repetition: math.Inf(1)}, false},
		{sample.Penalties{LogitBias: map[int32]float64{-1: 1}}, false},
		{sample.Penalties{LogitBias: map[int32]float64{5: 100.5}}, false},
		{sample.Penalties{LogitBias: map[int32]float64{5: -100}}, true},
	} {
		err := c.p.Validate()
		if (err == nil) != c.ok || (err != nil && !errors.Is(err, sample.ErrParams)) {
			t.Errorf("%+v: %v, want ok=%v", c.p, err, c.ok)
		}
		if perr := (sample.Params{Penalties: c.p}).Validate(); (perr == nil) != c.ok {
			t.Errorf("Params with %+v: %v, want ok=%v", c.p, perr, c.ok)
		}
	}
}
