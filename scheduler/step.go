package scheduler

import (
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"time"

	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/sample"
)

// step runs one engine step over the running sequences and reports it
// (also when it had nothing to run: the gauges must not keep the load of a
// step whose sequences have all been cancelled since).
func (s *Scheduler) step() {
	t0 := time.Now()
	stats := StepStats{TotalBlocks: s.e.Options().KVBlocks}
	defer func() { s.reportStep(&stats) }()
	s.stepped = false
	s.admit()
	// Drop cancelled sequences first: their pages free at once.
	live := s.running[:0]
	for _, q := range s.running {
		if err := q.ctx.Err(); err != nil {
			s.release(q)
			s.finish(q, "", err)
			continue
		}
		live = append(live, q)
	}
	clear(s.running[len(live):])
	s.running = live
	if len(s.running) == 0 {
		return
	}
	// Plan, then give every planned sequence its KV pages before the step
	// is issued; when the pool runs short, preempt the most recently
	// admitted sequence and plan again. The engine never fails the step
	// for want of pages.
	var in []engine.Input
	var who []*seq
	for {
		in, who = s.plan(&stats)
		if len(in) == 0 {
			return
		}
		err := s.reserve(in)
		if err == nil {
			break
		}
		if !s.preempt() {
			s.failAll(fmt.Errorf("scheduler: a lone sequence does not fit the KV cache: %w", err))
			return
		}
		stats.Preempted++
	}
	start := time.Now()
	stats.Plan = start.Sub(t0)
	sp := make([]engine.Sampling, len(in))
	for k, q := range who {
		n := len(in[k].Tokens)
		sp[k] = engine.Sampling{Skip: q.fed+n < len(q.tokens) || q.req.MaxTokens == 0, Params: q.req.Sampling, Seed: q.seed,
			Index: uint64(q.fed + n), CPU: q.sampler, Adjust: q.pen.Adjust()}
		if tg := q.targets(n); tg != nil {
			in[k].AllLogits = true
			sp[k].Targets, sp[k].Scores = tg, make([]sample.Choice, n)
		}
	}
	s.stepped = true
	choices, err := s.e.StepSample(context.Background(), in, sp)
	var bad *engine.SlotError
	if errors.As(err, &bad) {
		s.failSlot(bad.Slot, err) // the others run again at the next step
		return
	}
	s.stepDone(err)
	if err != nil {
		s.failAll(err)
		return
	}
	if s.cfg.IdleWarm && !s.warmFailed && s.e.MissedRecording() {
		// the step ran without its program: record it when idle, or
		// between steps when the load never leaves the engine idle
		s.warming = true
		if s.missed++; s.missed >= busyWarmEvery {
			s.missed = 0
			defer func() { // after the step's tokens are out
				s.flush(nil)
				s.warmOne()
			}()
		}
	}
	end := time.Now()
	stats.Duration = end.Sub(start)
	if d, ok := s.e.DeviceTime(); ok {
		stats.Device = d
	}
	et := s.e.LastStepTimes()
	stats.Prepare, stats.Issue, stats.Wait = et.Prepare, et.Issue, et.Wait
	s.afterStep(in, who, choices, sp)
	stats.Emit = time.Since(end)
}

// reserve gives each input's sequence the pages its tokens need, in plan
// order (decode rows first); pages reserved before a failure stay with
// their sequences.
func (s *Scheduler) reserve(in []engine.Input) error {
	for _, x := range in {
		n := x.Seq.Len() + len(x.Tokens)
		if short := s.e.BlocksFor(n) - len(x.Seq.Blocks()) - s.e.FreeBlocks(); short > 0 && s.cache != nil {
			s.cache.evict(short) // cached prefixes nobody uses give way first
		}
		if err := s.e.Reserve(x.Seq, n); err != nil {
			return err
		}
	}
	return nil
}

// reportStep completes a step's statistics with the state after it and
// hands them to OnStep.
func (s *Scheduler) reportStep(stats *StepStats) {
	if s.cfg.OnStep == nil {
		return
	}
	stats.FreeBlocks = s.e.FreeBlocks()
	stats.Running = len(s.running)
	seen := map[string]bool{}
	for _, q := range s.running {
		if !seen[q.req.Adapter] && q.req.Adapter != "" {
			seen[q.req.Adapter] = true
			stats.RunningAdapters = append(stats.RunningAdapters, q.req.Adapter)
		}
	}
	s.report(*stats)
}

// report adds the waiting queues and the prefix cache to stats and calls
// OnStep.
func (s *Scheduler) report(stats StepStats) {
	if s.cfg.OnStep == nil {
		return
	}
	stats.PrefixQueries, stats.PrefixHits = s.prefixQueries, s.prefixHits
	s.prefixQueries, s.prefixHits = 0, 0
	if s.cache != nil {
		stats.CachedPages, stats.EvictablePages = len(s.cache.pages), s.cache.evictable()
	}
	s.mu.Lock()
	for _, a := range s.order {
		stats.Waiting += len(s.queues[a])
		stats.WaitingAdapters = append(stats.WaitingAdapters, a)
	}
	s.mu.Unlock()
	s.flush(&stats) // OnStep runs on the emitter
}

// plan packs decode rows first, then prefill chunks, within the token budget.
func (s *Scheduler) plan(st *StepStats) ([]engine.Input, []*seq) {
	budget := s.e.Options().MaxTokens
	var in []engine.Input
	var who []*seq
	adapters := map[int]bool{}
	add := func(q *seq, n int) {
		in = append(in, engine.Input{Seq: &q.kv, Tokens: q.tokens[q.fed : q.fed+n], Slot: q.slot})
		who = append(who, q)
		adapters[q.slot] = true
		budget -= n
	}
	*st = StepStats{TotalBlocks: st.TotalBlocks, Preempted: st.Preempted}
	for _, q := range s.running {
		if budget > 0 && len(q.tokens)-q.fed == 1 {
			add(q, 1)
			st.Decode++
		}
	}
	scoreBudget := scoreChunk // scored rows this step, all sequences together
	for _, q := range s.running {
		if n := len(q.tokens) - q.fed; budget > 0 && n > 1 {
			if q.req.PromptLogprobs && len(q.scores) < len(q.req.Prompt)-1 {
				if scoreBudget == 0 {
					continue // its logits rows wait for the next step
				}
				n = min(n, scoreBudget) // every row's logits come to the host
				scoreBudget -= min(n, budget)
			}
			add(q, min(n, budget))
			st.Prefill++
		}
	}
	st.Sequences, st.Adapters = len(in), len(adapters)
	for _, x := range in {
		st.Rows += len(x.Tokens)
	}
	return in, who
}

// failSlot ends the running requests on slot, whose adapter the engine
// cannot use (engine.SlotError: the step did nothing); the others keep
// their state.
func (s *Scheduler) failSlot(slot int, err error) {
	s.log.Error("engine step failed for one adapter slot", "slot", slot, "err", err)
	live := s.running[:0]
	for _, q := range s.running {
		if q.slot != slot {
			live = append(live, q)
			continue
		}
		s.release(q)
		s.finish(q, "", err)
	}
	clear(s.running[len(live):])
	s.running = live
}

func (s *Scheduler) failAll(err error) {
	s.log.Error("engine step failed", "err", err)
	for _, q := range s.running {
		s.release(q)
		s.finish(q, "", err)
	}
	s.running = nil
}

// scoreChunk bounds the prompt rows that scoring sequences feed per step,
// together: each row's logits come to the host (128k floats at Llama 3's
// vocabulary: 256 rows are 131 MB).
const scoreChunk = 256

// targets are the tokens the next n rows of q scores (engine
// Sampling.Targets), or nil when they score none: with PromptLogprobs, row
// j predicts token q.fed+j+1, scored when it is a prompt token not scored
// yet (a recompute after preemption scores nothing again), else -1.
func (q *seq) targets(n int) []int32 {
	if !q.req.PromptLogprobs || len(q.scores) >= len(q.req.Prompt)-1 {
		return nil
	}
	tg := make([]int32, n)
	some := false
	for j := range tg {
		tg[j] = -1
		if p := q.fed + j + 1; p > len(q.scores) && p < len(q.req.Prompt) {
			tg[j] = q.req.Prompt[p]
			some = true
		}
	}
	if !some {
		return nil
	}
	return tg
}

// firstEvent adds to q's first event what comes with it: where its adapter
// was loaded from, and its prompt's scores.
func (s *Scheduler) firstEvent(q *seq, ev *Event) {
	if r, ok := q.lease.(LoadReporter); ok {
		ev.Loaded = r.LoadSource()
	}
	if q.req.PromptLogprobs {
		ev.Prompt = q.scores
	}
}

func (s *Scheduler) afterStep(in []engine.Input, who []*seq, choices []sample.Choice, sp []engine.Sampling) {
	var ended []*seq
	for k, q := range who {
		for j, t := range sp[k].Targets {
			if t >= 0 {
				q.scores = append(q.scores, sp[k].Scores[j])
			}
		}
		q.fed += len(in[k].Tokens)
		s.keepPages(q)
		if q.fed < len(q.tokens) {
			continue // more prompt (or recompute) to feed
		}
		if q.req.MaxTokens == 0 { // the prompt scored, nothing to generate
			ev := Event{}
			s.firstEvent(q, &ev)
			s.release(q)
			s.finishWith(q, engine.FinishLength, nil, ev)
			ended = append(ended, q)
			continue
		}
		c := choices[k]
		if math.IsNaN(c.Logprob) || math.IsInf(c.Logprob, 0) {
			s.release(q)
			adapter := q.req.Adapter
			if adapter == "" {
				adapter = "the base model"
			}
			s.finish(q, "", fmt.Errorf("%w at generated token %d (adapter %s)", ErrNonFinite, q.gen, adapter))
			ended = append(ended, q)
			continue
		}
		q.tokens = append(q.tokens, c.ID)
		q.gen++
		q.pen.Generated(c.ID)
		ev := Event{Token: c}
		if q.gen == 1 {
			s.firstEvent(q, &ev)
		}
		s.post(q, ev)
		reason := ""
		switch {
		case slices.Contains(q.req.Stop, c.ID):
			reason = engine.FinishStop
		case q.gen >= q.req.MaxTokens:
			reason = engine.FinishLength
		}
		if reason != "" {
			s.release(q)
			s.finish(q, reason, nil)
			ended = append(ended, q)
		}
	}
	if len(ended) > 0 {
		s.running = slices.DeleteFunc(s.running, func(q *seq) bool { return slices.Contains(ended, q) })
	}
}

// release returns a sequence's KV pages (those the prefix cache keeps stay
// with it).
func (s *Scheduler) release(q *seq) {
	if s.cache != nil {
		s.cache.done(q.kv.Blocks())
	}
	s.e.Release(&q.kv)
	q.chain, q.keyed = prefixKey{}, 0
}
