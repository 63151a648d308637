package sampletest

import (
	"context"

	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/sample"
)

// ScorePrompt feeds prompt to e as one sequence on slot, in the chunks
// that end at cuts (ascending, the last len(prompt)), scoring every token
// after the first (engine Sampling.Targets, top alternatives), as the
// scheduler does for echo; the last chunk samples greedily. It returns the
// scores of prompt tokens 1.. and the sampled token, and releases the
// sequence.
func ScorePrompt(ctx context.Context, e *engine.Engine, prompt []int32, cuts []int, slot, top int) ([]sample.Choice, sample.Choice, error) {
	var s engine.Sequence
	defer e.Release(&s)
	var scores []sample.Choice
	var last sample.Choice
	from := 0
	for _, to := range cuts {
		toks := prompt[from:to]
		sp := engine.Sampling{Skip: to < len(prompt), Params: sample.Params{Logprobs: top}, Targets: make([]int32, len(toks)), Scores: make([]sample.Choice, len(toks))}
		for j := range toks {
			sp.Targets[j] = -1
			if p := from + j + 1; p < len(prompt) {
				sp.Targets[j] = prompt[p]
			}
		}
		out, err := e.StepSample(ctx, []engine.Input{{Seq: &s, Tokens: toks, Slot: slot, AllLogits: true}}, []engine.Sampling{sp})
		if err != nil {
			return nil, last, err
		}
		for j, tg := range sp.Targets {
			if tg >= 0 {
				scores = append(scores, sp.Scores[j])
			}
		}
		last = out[0]
		from = to
	}
	return scores, last, nil
}
