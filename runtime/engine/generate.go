package engine

import (
	"context"
	"fmt"
	"slices"

	"github.com/peftd/peftd/runtime/sample"
)

// Finish reasons.
const (
	FinishStop   = "stop"
	FinishLength = "length"
)

// Request is one sequence to generate.
type Request struct {
	Prompt    []int32
	Slot      int // adapter slot, -1 for the base model
	MaxTokens int
	Sampling  sample.Params
	Stop      []int32 // token ids that end the sequence (the model's EOS ids and any others)
	// OnToken, if set, is called with each generated token as it is sampled.
	OnToken func(sample.Choice)
}

// Result is one finished sequence.
type Result struct {
	Tokens       []int32
	Choices      []sample.Choice
	FinishReason string
}

type genSeq struct {
	req     *Request
	seq     Sequence
	sampler *sample.Sampler
	fed     int // prompt tokens already in the cache
	next    int32
	res     Result
	done    bool
}

// Generate runs every request to completion, co-batched: each step packs the
// decode token of every sequence past its prompt and prefill chunks of the
// others into one forward pass of at most Options.MaxTokens rows.
func (e *Engine) Generate(ctx context.Context, reqs []Request) ([]Result, error) {
	gs := make([]*genSeq, len(reqs))
	for i := range reqs {
		r := &reqs[i]
		if len(r.Prompt) == 0 {
			return nil, fmt.Errorf("%w: request %d has an empty prompt", ErrBadInput, i)
		}
		if r.MaxTokens <= 0 {
			return nil, fmt.Errorf("%w: request %d has max tokens %d", ErrBadInput, i, r.MaxTokens)
		}
		s, err := sample.New(r.Sampling)
		if err != nil {
			return nil, err
		}
		gs[i] = &genSeq{req: r, sampler: s}
	}
	defer func() {
		for _, g := range gs {
			e.Release(&g.seq)
		}
	}()
	for {
		var in []Input
		var who []*genSeq
		budget := e.opts.MaxTokens
		for _, g := range gs { // decodes first: one row each
			if !g.done && g.fed == len(g.req.Prompt) && budget > 0 {
				in = append(in, Input{Seq: &g.seq, Tokens: []int32{g.next}, Slot: g.req.Slot})
				who = append(who, g)
				budget--
			}
		}
		for _, g := range gs { // then prefill chunks in the remaining budget
			if !g.done && g.fed < len(g.req.Prompt) && budget > 0 {
				n := min(budget, len(g.req.Prompt)-g.fed)
				in = append(in, Input{Seq: &g.seq, Tokens: g.req.Prompt[g.fed : g.fed+n], Slot: g.req.Slot})
				who = append(who, g)
				budget -= n
			}
		}
		if len(in) == 0 {
			break
		}
		logits, err := e.Step(ctx, in)
		if err != nil {
			return nil, err
		}
		for k, g := range who {
			if g.fed < len(g.req.Prompt) {
				g.fed += len(in[k].Tokens)
				if g.fed < len(g.req.Prompt) {
					continue // more prompt to go
				}
			}
			c := g.sampler.Sample(logits[k])
			g.res.Tokens = append(g.res.Tokens, c.ID)
			g.res.Choices = append(g.res.Choices, c)
			if g.req.OnToken != nil {
				g.req.OnToken(c)
			}
			g.next = c.ID
			switch {
			case slices.Contains(g.req.Stop, c.ID):
				g.done, g.res.FinishReason = true, FinishStop
			case len(g.res.Tokens) >= g.req.MaxTokens:
				g.done, g.res.FinishReason = true, FinishLength
			case g.seq.n+1 > e.opts.MaxContext:
				g.done, g.res.FinishReason = true, FinishLength
			}
			if g.done {
				e.Release(&g.seq)
			}
		}
	}
	out := make([]Result, len(gs))
	for i, g := range gs {
		out[i] = g.res
	}
	return out, nil
}
