package sample

import (
	"errors"
	"math"
	"testing"
)

func seed(s uint64) *uint64 { return &s }

func TestGreedyAndLogprobs(t *testing.T) {
	logits := []float32{1, 3, 2, 3, -1}
	s, err := New(Params{Logprobs: 3})
	if err != nil {
		t.Fatal(err)
	}
	c := s.Sample(logits)
	if c.ID != 1 {
		t.Fatalf("greedy = %d, want 1 (first of the tied maxima)", c.ID)
	}
	var z float64
	for _, x := range logits {
		z += math.Exp(float64(x))
	}
	if want := 3 - math.Log(z); math.Abs(c.Logprob-want) > 1e-12 {
		t.Errorf("logprob %v, want %v", c.Logprob, want)
	}
	if len(c.Top) != 3 || c.Top[0].ID != 1 || c.Top[1].ID != 3 || c.Top[2].ID != 2 {
		t.Errorf("top = %+v", c.Top)
	}
}

func TestSeededReproducible(t *testing.T) {
	logits := make([]float32, 100)
	for i := range logits {
		logits[i] = float32(math.Sin(float64(i)))
	}
	draw := func(p Params) []int32 {
		s, err := New(p)
		if err != nil {
			t.Fatal(err)
		}
		var out []int32
		for i := 0; i < 50; i++ {
			out = append(out, s.Sample(logits).ID)
		}
		return out
	}
	a := draw(Params{Temperature: 1, Seed: seed(7)})
	b := draw(Params{Temperature: 1, Seed: seed(7)})
	c := draw(Params{Temperature: 1, Seed: seed(8)})
	same := func(x, y []int32) bool {
		for i := range x {
			if x[i] != y[i] {
				return false
			}
		}
		return true
	}
	if !same(a, b) {
		t.Error("same seed gave different tokens")
	}
	if same(a, c) {
		t.Error("different seeds gave the same 50 tokens")
	}
}

func TestTopKTopPRestrict(t *testing.T) {
	logits := []float32{5, 4.9, 0, -1, -2, 4.8}
	for _, tc := range []struct {
		name    string
		p       Params
		allowed map[int32]bool
	}{
		{"top-k 2", Params{Temperature: 1, TopK: 2}, map[int32]bool{0: true, 1: true}},
		{"top-k 1", Params{Temperature: 5, TopK: 1}, map[int32]bool{0: true}},
		{"top-p small", Params{Temperature: 1, TopP: 0.3}, map[int32]bool{0: true}},
		{"top-p 0.9", Params{Temperature: 1, TopP: 0.9}, map[int32]bool{0: true, 1: true, 5: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.p.Seed = seed(1)
			s, _ := New(tc.p)
			seen := map[int32]bool{}
			for i := 0; i < 2000; i++ {
				id := s.Sample(logits).ID
				if !tc.allowed[id] {
					t.Fatalf("drew %d outside %v", id, tc.allowed)
				}
				seen[id] = true
			}
			if len(seen) != len(tc.allowed) {
				t.Errorf("drew %v, expected every one of %v", seen, tc.allowed)
			}
		})
	}
}

func TestDistribution(t *testing.T) {
	logits := []float32{0, float32(math.Log(3))} // p = 1/4, 3/4
	s, _ := New(Params{Temperature: 1, Seed: seed(3)})
	n, ones := 20000, 0
	for i := 0; i < n; i++ {
		if s.Sample(logits).ID == 1 {
			ones++
		}
	}
	if f := float64(ones) / float64(n); math.Abs(f-0.75) > 0.02 {
		t.Errorf("P(1) = %.3f, want 0.75", f)
	}
}

func TestValidate(t *testing.T) {
	for _, p := range []Params{{Temperature: -1}, {TopK: -1}, {TopP: 1.5}, {Logprobs: 21}, {Temperature: math.NaN()}} {
		if _, err := New(p); !errors.Is(err, ErrParams) {
			t.Errorf("%+v: err = %v", p, err)
		}
	}
}

func TestTopN(t *testing.T) {
	got := TopN([]float32{3, 9, 1, 9, 7, 2}, 4)
	want := []int32{1, 3, 4, 0}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("TopN = %v, want %v", got, want)
		}
	}
}
