// Package sample turns logits into tokens: greedy, temperature, top-k,
// top-p, seeded, with log-probabilities of the raw logits.
package sample

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"sort"
)

// ErrParams marks invalid sampling parameters.
var ErrParams = errors.New("sample: bad parameters")

// MaxLogprobs bounds the alternatives returned per token.
const MaxLogprobs = 20

// Params choose how tokens are drawn. Temperature 0 is greedy.
type Params struct {
	Temperature float64
	TopK        int     // 0: no limit
	TopP        float64 // 0 or 1: no limit
	Seed        *uint64 // nil: a random seed
	Logprobs    int     // alternatives to return per token (0..MaxLogprobs)
	// Penalties change the logits first (a Tracker per sequence turns
	// them into the list of Adjusts a step applies).
	Penalties Penalties
}

// Validate checks the ranges.
func (p Params) Validate() error {
	switch {
	case p.Temperature < 0 || math.IsNaN(p.Temperature) || p.Temperature > 100:
		return fmt.Errorf("%w: temperature %v outside [0, 100]", ErrParams, p.Temperature)
	case p.TopK < 0:
		return fmt.Errorf("%w: top_k %d < 0", ErrParams, p.TopK)
	case p.TopP < 0 || p.TopP > 1 || math.IsNaN(p.TopP):
		return fmt.Errorf("%w: top_p %v outside [0, 1]", ErrParams, p.TopP)
	case p.Logprobs < 0 || p.Logprobs > MaxLogprobs:
		return fmt.Errorf("%w: logprobs %d outside [0, %d]", ErrParams, p.Logprobs, MaxLogprobs)
	}
	return p.Penalties.Validate()
}

// TokenLogprob is a token and its log-probability.
type TokenLogprob struct {
	ID      int32   `json:"token_id"`
	Logprob float64 `json:"logprob"`
}

// Choice is one sampled token.
type Choice struct {
	ID      int32
	Logprob float64        // log-softmax of the raw logits at ID
	Top     []TokenLogprob // the Params.Logprobs most likely tokens
}

// Sampler draws tokens for one sequence; its random stream is reproducible
// from the seed.
type Sampler struct {
	p   Params
	rng *rand.Rand
	idx []int32
	prb []float64
}

// New makes a sampler; p must be valid.
func New(p Params) (*Sampler, error) {
	if err := p.Validate(); err != nil {
		return nil, err
	}
	var seed uint64
	if p.Seed != nil {
		seed = *p.Seed
	} else {
		seed = rand.Uint64()
	}
	return &Sampler{p: p, rng: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))}, nil
}

// Sample picks the next token from logits (not modified).
func (s *Sampler) Sample(logits []float32) Choice {
	var id int32
	if s.p.Temperature == 0 {
		id = Argmax(logits)
	} else {
		id = s.draw(logits)
	}
	return Score(logits, id, s.p.Logprobs)
}

// Score is the Choice of token id under logits (not modified): its
// log-softmax, and the top most likely tokens with theirs; what Sample
// reports had it drawn id. Prompt tokens are scored so (echo, prompt
// logprobs).
func Score(logits []float32, id int32, top int) Choice {
	lse := logSumExp(logits)
	c := Choice{ID: id, Logprob: float64(logits[id]) - lse}
	if top > 0 {
		for _, t := range TopN(logits, top) {
			c.Top = append(c.Top, TokenLogprob{ID: t, Logprob: float64(logits[t]) - lse})
		}
	}
	return c
}

// logSumExp is log(sum(exp(logits))) in float64.
func logSumExp(logits []float32) float64 {
	maxL := math.Inf(-1)
	for _, x := range logits {
		if float64(x) > maxL {
			maxL = float64(x)
		}
	}
	var sum float64
	for _, x := range logits {
		sum += math.Exp(float64(x) - maxL)
	}
	return maxL + math.Log(sum)
}

// draw samples with temperature, then top-k, then top-p (as transformers' warpers).
func (s *Sampler) draw(logits []float32) int32 {
	n := len(logits)
	k := n
	if s.p.TopK > 0 && s.p.TopK < n {
		k = s.p.TopK
	}
	if cap(s.idx) < n {
		s.idx = make([]int32, n)
		s.prb = make([]float64, n)
	}
	idx := s.idx[:n]
	for i := range idx {
		idx[i] = int32(i)
	}
	// Sort descending by logit; ties by lower id for determinism.
	sort.Slice(idx, func(a, b int) bool {
		la, lb := logits[idx[a]], logits[idx[b]]
		if la != lb {
			return la > lb
		}
		return idx[a] < idx[b]
	})
	idx = idx[:k]
	t := s.p.Temperature
	prb := s.prb[:k]
	top := float64(logits[idx[0]]) / t
	var sum float64
	for i, id := range idx {
		prb[i] = math.Exp(float64(logits[id])/t - top)
		sum += prb[i]
	}
	if p := s.p.TopP; p > 0 && p < 1 {
		// Keep the smallest prefix whose mass reaches p (at least one token).
		var acc float64
		cut := k
		for i := range prb {
			acc += prb[i] / sum
			if acc >= p {
				cut = i + 1
				break
			}
		}
		prb = prb[:cut]
		sum = 0
		for _, x := range prb {
			sum += x
		}
	}
	u := s.rng.Float64() * sum
	for i, x := range prb {
		u -= x
		if u < 0 {
			return idx[i]
		}
	}
	return idx[len(prb)-1]
}

// Argmax is the index of the largest value (the first on ties).
func Argmax(v []float32) int32 {
	best := 0
	for i, x := range v {
		if x > v[best] {
			best = i
		}
	}
	return int32(best)
}

// TopN returns the indices of the n largest values, largest first.
func TopN(v []float32, n int) []int32 {
	if n > len(v) {
		n = len(v)
	}
	out := make([]int32, 0, n+1)
	for i, x := range v {
		if len(out) == n && x <= v[out[n-1]] {
			continue
		}
		j := len(out)
		if j < n {
			out = append(out, 0)
		} else {
			j = n - 1
		}
		for j > 0 && v[out[j-1]] < x {
			out[j] = out[j-1]
			j--
		}
		out[j] = int32(i)
	}
	return out
}
