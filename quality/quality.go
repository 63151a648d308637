// Package quality measures what a change of numerics costs a model: a
// reference engine and a candidate engine (bf16 against fp8 weights, an
// exact CPU against a GPU, ...) run the same tokens, teacher-forced, and
// the candidate's next-token distributions are compared with the
// reference's at every position: KL divergence, greedy (top-1) agreement,
// and the perplexity each gives held-out text.
//
// Two kinds of streams: held-out text (Score: whole documents in prefill
// steps, every position compared and scored) and generated text (Generate:
// the reference's greedy continuations of prompts, fed to both engines one
// decode step at a time, co-batched, so that the decode path is the one
// measured).
package quality

import (
	"context"
	"errors"
	"fmt"
	"math"
	"slices"

	"github.com/peftd/peftd/internal/parallel"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/sample"
)

// Engine is what the comparison needs of an engine (*engine.Engine).
type Engine interface {
	Step(ctx context.Context, in []engine.Input) ([][]float32, error)
	Release(s *engine.Sequence)
	Config() *llama.Config
	Options() engine.Options
}

// ErrInput reports documents or prompts the engines cannot run.
var ErrInput = errors.New("quality")

// Stats accumulate the comparison of a candidate's logits rows with a
// reference's.
type Stats struct {
	Rows   int     // positions compared
	KLSum  float64 // sum over rows of KL(reference || candidate), nats
	KLMax  float64
	Agree  int // rows whose argmax is the same
	Scored int // tokens whose log-probability was scored (held-out text)
	// NLLRef and NLLCand are the negative log-likelihoods of the scored
	// tokens under each engine (nats, summed).
	NLLRef, NLLCand float64
}

// MeanKL is the mean KL divergence per row (nats).
func (s Stats) MeanKL() float64 { return s.KLSum / float64(max(s.Rows, 1)) }

// Agreement is the fraction of rows with the same argmax.
func (s Stats) Agreement() float64 { return float64(s.Agree) / float64(max(s.Rows, 1)) }

// PPLRef is the reference's perplexity on the scored tokens.
func (s Stats) PPLRef() float64 { return math.Exp(s.NLLRef / float64(max(s.Scored, 1))) }

// PPLCand is the candidate's perplexity on the scored tokens.
func (s Stats) PPLCand() float64 { return math.Exp(s.NLLCand / float64(max(s.Scored, 1))) }

// Add merges o into s.
func (s *Stats) Add(o Stats) {
	s.Rows += o.Rows
	s.KLSum += o.KLSum
	s.KLMax = max(s.KLMax, o.KLMax)
	s.Agree += o.Agree
	s.Scored += o.Scored
	s.NLLRef += o.NLLRef
	s.NLLCand += o.NLLCand
}

// LogSoftmax returns log(softmax(x)) in float64.
func LogSoftmax(x []float32) []float64 {
	m := math.Inf(-1)
	for _, v := range x {
		m = max(m, float64(v))
	}
	var sum float64
	for _, v := range x {
		sum += math.Exp(float64(v) - m)
	}
	lse := m + math.Log(sum)
	out := make([]float64, len(x))
	for i, v := range x {
		out[i] = float64(v) - lse
	}
	return out
}

// KL is KL(softmax(ref) || softmax(cand)) in nats (0 for equal rows; NaN
// when a row is not finite).
func KL(ref, cand []float32) float64 {
	lp, lq := LogSoftmax(ref), LogSoftmax(cand)
	return klOf(lp, lq)
}

func klOf(lp, lq []float64) float64 {
	var kl float64
	for i := range lp {
		if p := math.Exp(lp[i]); p > 0 {
			kl += p * (lp[i] - lq[i])
		}
	}
	if math.IsNaN(kl) {
		return kl
	}
	return max(kl, 0) // rounding can leave -1e-17 for equal rows
}

// rowResult is the comparison of one row.
type rowResult struct {
	kl              float64
	agree           bool
	scored          bool
	nllRef, nllCand float64
	err             error
}

// compareRow compares one row: ref and cand are the two engines' logits
// for the same position; next >= 0 is the token that follows, scored.
func compareRow(ref, cand []float32, next int32) rowResult {
	if len(ref) != len(cand) {
		return rowResult{err: fmt.Errorf("%w: logits rows of %d and %d values", ErrInput, len(ref), len(cand))}
	}
	lp, lq := LogSoftmax(ref), LogSoftmax(cand)
	kl := klOf(lp, lq)
	if math.IsNaN(kl) {
		return rowResult{err: fmt.Errorf("%w: the candidate's logits are not finite", ErrInput)}
	}
	r := rowResult{kl: kl, agree: sample.Argmax(ref) == sample.Argmax(cand)}
	if next >= 0 {
		r.scored, r.nllRef, r.nllCand = true, -lp[next], -lq[next]
	}
	return r
}

// add adds one row's result.
func (s *Stats) add(r rowResult) {
	s.Rows++
	s.KLSum += r.kl
	s.KLMax = max(s.KLMax, r.kl)
	if r.agree {
		s.Agree++
	}
	if r.scored {
		s.Scored++
		s.NLLRef += r.nllRef
		s.NLLCand += r.nllCand
	}
}

// compareRows compares n rows on every core (a row is a pass over the
// vocabulary: 128k exponentials at Llama 3's) and returns their results in
// order, so that the sums do not depend on the split.
func compareRows(n int, row func(i int) (ref, cand []float32, next int32)) []rowResult {
	out := make([]rowResult, n)
	parallel.Ranges(n, 1, func(lo, hi int) error {
		for i := lo; i < hi; i++ {
			out[i] = compareRow(row(i))
		}
		return nil
	})
	return out
}

// Score runs each document (token ids, starting as the model's input
// starts: with BOS where the model wants one) through both engines under
// adapter slot (-1: the base model) in prefill steps of at most the
// engines' step size, and compares every position; every token after a
// document's first is scored. A document longer than the engines' context
// is an error (split it first).
func Score(ctx context.Context, ref, cand Engine, slot int, docs [][]int32) (Stats, error) {
	var st Stats
	if err := sameModel(ref, cand); err != nil {
		return st, err
	}
	limit := maxContext(ref, cand)
	chunk := min(ref.Options().MaxTokens, cand.Options().MaxTokens)
	for i, d := range docs {
		if len(d) < 2 {
			return st, fmt.Errorf("%w: document %d has %d tokens (want 2 or more)", ErrInput, i, len(d))
		}
		if len(d) > limit {
			return st, fmt.Errorf("%w: document %d has %d tokens, more than the engines' context of %d", ErrInput, i, len(d), limit)
		}
		if err := scoreDoc(ctx, ref, cand, slot, d, chunk, &st); err != nil {
			return st, fmt.Errorf("document %d: %w", i, err)
		}
	}
	return st, nil
}

// scoreDoc runs document d through both engines as one sequence each, in
// steps of at most chunk tokens, comparing each step's rows before the
// next (only a step's logits are held, not the document's).
func scoreDoc(ctx context.Context, ref, cand Engine, slot int, d []int32, chunk int, st *Stats) error {
	seqs := [2]*engine.Sequence{{}, {}}
	defer ref.Release(seqs[0])
	defer cand.Release(seqs[1])
	V := ref.Config().VocabSize
	for lo := 0; lo < len(d); lo += chunk {
		hi := min(lo+chunk, len(d))
		var rows [2][]float32
		for k, e := range []Engine{ref, cand} {
			out, err := e.Step(ctx, []engine.Input{{Seq: seqs[k], Tokens: d[lo:hi], Slot: slot, AllLogits: true}})
			if err != nil {
				return err
			}
			rows[k] = out[0]
		}
		res := compareRows(hi-lo, func(r int) ([]float32, []float32, int32) {
			next := int32(-1)
			if p := lo + r; p+1 < len(d) {
				next = d[p+1]
			}
			return rows[0][r*V : (r+1)*V], rows[1][r*V : (r+1)*V], next
		})
		for r, x := range res {
			if x.err != nil {
				return fmt.Errorf("position %d: %w", lo+r, x.err)
			}
			st.add(x)
		}
	}
	return nil
}

// Job is one generation: a prompt under an adapter slot (-1: base).
type Job struct {
	Slot   int
	Prompt []int32
}

// Generated is what Generate made of one job: the reference's greedy
// tokens after the prompt, and the comparison at each of them.
type Generated struct {
	Tokens []int32
	Stats  Stats
}

// Generate continues each job's prompt greedily with the reference engine,
// for at most maxNew tokens or until it picks a stop token, and feeds the
// candidate the same tokens: every generated position (the prompt's last,
// then each new token's) is compared, the reference's logits against the
// candidate's. Jobs run co-batched, at most batch at a time (adapters
// mixed in a step, as a server batches them): one prefill step for those
// that start together, then decode steps of one token per running job.
// The Stats returned are the sum of the jobs'.
func Generate(ctx context.Context, ref, cand Engine, jobs []Job, maxNew, batch int, stop []int32) (Stats, []Generated, error) {
	var st Stats
	if err := sameModel(ref, cand); err != nil {
		return st, nil, err
	}
	if maxNew <= 0 || batch <= 0 {
		return st, nil, fmt.Errorf("%w: max new tokens %d and batch %d must be positive", ErrInput, maxNew, batch)
	}
	limit := maxContext(ref, cand)
	chunk := min(ref.Options().MaxTokens, cand.Options().MaxTokens)
	batch = min(batch, chunk) // a decode step of every running job fits a step
	for i, j := range jobs {
		if len(j.Prompt) == 0 || len(j.Prompt) > chunk || len(j.Prompt) >= limit {
			return st, nil, fmt.Errorf("%w: prompt %d has %d tokens (want 1 to %d)", ErrInput, i, len(j.Prompt), min(chunk, limit-1))
		}
	}
	out := make([]Generated, len(jobs))
	type running struct {
		job     int
		seq     [2]*engine.Sequence
		pending int32 // the reference's pick at the last step, not yet recorded
	}
	release := func(r *running) {
		ref.Release(r.seq[0])
		cand.Release(r.seq[1])
	}
	var live []*running
	defer func() {
		for _, r := range live {
			release(r)
		}
	}()
	// step runs one step of inputs on both engines, compares each input's
	// last row and sets its job's pending token to the reference's argmax.
	step := func(in [2][]engine.Input, rs []*running) error {
		var rows [2][][]float32
		for k, e := range []Engine{ref, cand} {
			r, err := e.Step(ctx, in[k])
			if err != nil {
				return err
			}
			rows[k] = r
		}
		res := compareRows(len(rs), func(i int) ([]float32, []float32, int32) { return rows[0][i], rows[1][i], -1 })
		for i, r := range rs {
			if res[i].err != nil {
				return res[i].err
			}
			out[r.job].Stats.add(res[i])
			r.pending = sample.Argmax(rows[0][i])
		}
		return nil
	}
	for next := 0; ; {
		// Start jobs while there is room: one prefill step for them all.
		var in [2][]engine.Input
		var started []*running
		rows := 0
		for next < len(jobs) && len(live)+len(started) < batch && rows+len(jobs[next].Prompt) <= chunk {
			j := jobs[next]
			r := &running{job: next, seq: [2]*engine.Sequence{{}, {}}}
			for k := range 2 {
				in[k] = append(in[k], engine.Input{Seq: r.seq[k], Tokens: j.Prompt, Slot: j.Slot})
			}
			started = append(started, r)
			rows += len(j.Prompt)
			next++
		}
		live = append(live, started...)
		if len(started) > 0 {
			if err := step(in, started); err != nil {
				return st, nil, err
			}
		}
		if len(live) == 0 {
			for _, g := range out {
				st.Add(g.Stats)
			}
			return st, out, nil
		}
		// Record each job's pick; feed it back unless the job is done.
		in = [2][]engine.Input{}
		kept := live[:0]
		for _, r := range live {
			j := jobs[r.job]
			g := &out[r.job]
			g.Tokens = append(g.Tokens, r.pending)
			if len(g.Tokens) == maxNew || slices.Contains(stop, r.pending) || len(j.Prompt)+len(g.Tokens) >= limit {
				release(r)
				continue
			}
			for k := range 2 {
				in[k] = append(in[k], engine.Input{Seq: r.seq[k], Tokens: []int32{r.pending}, Slot: j.Slot})
			}
			kept = append(kept, r)
		}
		clear(live[len(kept):])
		live = kept
		if len(live) > 0 {
			if err := step(in, live); err != nil {
				return st, nil, err
			}
		}
	}
}

func sameModel(ref, cand Engine) error {
	if a, b := ref.Config().VocabSize, cand.Config().VocabSize; a != b {
		return fmt.Errorf("%w: the engines' vocabularies differ (%d and %d tokens)", ErrInput, a, b)
	}
	return nil
}

// maxContext is the tokens a sequence may hold on both engines.
func maxContext(ref, cand Engine) int {
	n := math.MaxInt
	for _, e := range []Engine{ref, cand} {
		c := e.Options().MaxContext
		if c <= 0 {
			c = e.Config().MaxPositions
		}
		if c > 0 {
			n = min(n, c)
		}
	}
	return n
}
