// Package sampletest holds the tests' reference for runtime/sample's
// penalties: computed from scratch, with none of sample.Tracker's
// incremental state.
package sampletest

import "github.com/peftd/peftd/runtime/sample"

// Penalized is logits changed by p as vLLM and OpenAI define it: a
// repetition penalty on every token of prompt and output (x / r when
// x > 0, else x * r), then minus presence once and frequency per count for
// every token of output, plus its logit bias. Each operation rounds to
// float32 on its own, as sample.Apply and the device's logit_adjust do.
func Penalized(logits []float32, p sample.Penalties, prompt, output []int32) []float32 {
	count := map[int32]int{}
	seen := map[int32]bool{}
	for _, t := range prompt {
		seen[t] = true
	}
	for _, t := range output {
		seen[t] = true
		count[t]++
	}
	out := make([]float32, len(logits))
	for i, x := range logits {
		id := int32(i)
		if r := float32(p.Repetition); seen[id] && r != 0 && r != 1 {
			if x > 0 {
				x = float32(x / r)
			} else {
				x = float32(x * r)
			}
		}
		add := p.LogitBias[id]
		if c := count[id]; c > 0 {
			add -= p.Presence + p.Frequency*float64(c)
		}
		out[i] = float32(x + float32(add))
	}
	return out
}
