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

// A step runs in two calls of step, so that the host plans step N+1 while
// the device runs step N: the first call plans and launches a step and
// returns with it in flight (s.fly); the next call admits requests and
// plans and prepares the next step meanwhile (its decode rows take their
// tokens from the step in flight: engine Input.Later), then lands the
// step in flight (its tokens, emitted by the emitter goroutine) and
// launches the next one at once. What the prepared step cannot know is
// settled when the tokens are back: a sequence that drew its stop token
// keeps its row, discarded (engine Planned.Discard), and the penalties see
// the token. Anything irregular (pages short, scored prompts, a recording
// to make, an engine command) lands the step in flight first and plans
// the next one after it, as one step at a time.

// flight is a launched step whose tokens are not back yet.
type flight struct {
	f     *engine.Flight
	in    []engine.Input
	who   []*seq
	sp    []engine.Sampling
	keep  []int // the inputs not discarded (indices of in, who and sp)
	stats StepStats
	start time.Time // when it was launched
}

// step plans and launches a step when none is in flight, else plans the
// next one, lands the one in flight and launches the next (stepAhead).
// Every step is reported, also one with nothing to run (the gauges must
// not keep the load of a step whose sequences have all been cancelled
// since).
func (s *Scheduler) step() {
	if s.fly != nil {
		s.stepAhead()
		return
	}
	t0 := time.Now()
	stats := StepStats{TotalBlocks: s.e.Options().KVBlocks}
	s.stepped = false
	s.admit()
	s.dropCancelled()
	if len(s.running) == 0 {
		s.reportStep(&stats)
		return
	}
	// Plan, then give every planned sequence its KV pages before the step
	// is issued; when the pool runs short, preempt the most recently
	// admitted sequence and plan again. The engine never fails the step
	// for want of pages.
	var in []engine.Input
	var who []*seq
	for {
		in, who = s.plan(&stats, false)
		if len(in) == 0 {
			s.reportStep(&stats)
			return
		}
		err := s.reserve(in)
		if err == nil {
			break
		}
		if !s.preempt() {
			s.failAll(fmt.Errorf("scheduler: a lone sequence does not fit the KV cache: %w", err))
			s.reportStep(&stats)
			return
		}
		stats.Preempted++
	}
	sp := make([]engine.Sampling, len(in))
	for k, q := range who {
		n := len(in[k].Tokens)
		if tg := q.targets(n); tg != nil {
			in[k].AllLogits = true
			sp[k].Targets, sp[k].Scores = tg, make([]sample.Choice, n)
		}
	}
	p, err := s.e.Prepare(context.Background(), in)
	stats.Plan = time.Since(t0)
	if err != nil {
		s.stepped = true
		s.launchFailed(err, &stats)
		return
	}
	s.launch(p, in, who, sp, nil, stats, time.Time{})
}

// stepAhead plans and prepares the next step while the one in flight runs,
// lands it, and launches the next one with the tokens it drew.
func (s *Scheduler) stepAhead() {
	if d := s.planDelay(); d > 0 {
		time.Sleep(d)
	}
	t0 := time.Now()
	stats := StepStats{TotalBlocks: s.e.Options().KVBlocks}
	s.admit()
	s.dropCancelled()
	var p *engine.Planned
	in, who := s.plan(&stats, true)
	if len(in) > 0 && s.reserve(in) == nil {
		p, _ = s.e.Prepare(context.Background(), in) // an error shows again when the step is planned after landing
	}
	stats.Plan, stats.Ahead = time.Since(t0), true
	if p != nil && s.chain(p, in, who, stats) {
		// the next step is queued behind the one in flight: land that one
		if s.fly != nil {
			s.landOne()
		}
		return
	}
	landed, waited, ok := s.land()
	if landed != nil {
		defer s.reportStep(landed) // after the next step is launched
	}
	if !ok || p == nil {
		return // the next call plans after the tokens are in
	}
	// What the step in flight decided: discard the rows of sequences that
	// ended, give the others the tokens they drew.
	sp := make([]engine.Sampling, len(in))
	discard := make([]bool, len(in))
	kept := 0
	for k, q := range who {
		x := in[k]
		switch {
		case q.ended:
			discard[k] = true
			p.Discard(k)
			continue
		case q.fed+len(x.Tokens) > len(q.tokens) || q.targets(len(x.Tokens)) != nil:
			return // not what was planned (cannot happen): plan again after it
		case x.Later:
			if len(q.tokens)-q.fed != 1 || p.SetToken(k, q.tokens[q.fed]) != nil {
				return
			}
		case !slices.Equal(x.Tokens, q.tokens[q.fed:q.fed+len(x.Tokens)]):
			return
		}
		kept++
	}
	if kept == 0 {
		return
	}
	s.launch(p, in, who, sp, discard, stats, waited)
}

// chain launches the prepared step p behind the one in flight, its decode
// rows reading the tokens that one draws on the device (engine Chainer),
// and reports whether it did. It does not when a sequence's sampling
// depends on those tokens (penalties), when a program may be recorded
// next (IdleWarm), or when the engine cannot chain this step; p is then
// intact for the path that lands the step in flight first.
func (s *Scheduler) chain(p *engine.Planned, in []engine.Input, who []*seq, stats StepStats) bool {
	fl := s.fly
	if fl == nil || s.next != nil || s.warming || !s.e.CanChain() {
		return false
	}
	sp := make([]engine.Sampling, len(in))
	keep := make([]int, 0, len(in))
	for k, q := range who {
		if !q.pen.Static() {
			return false
		}
		fed, drawn := q.view()
		n, total := len(in[k].Tokens), len(q.tokens)
		if drawn {
			total++ // the token in flight
		}
		if in[k].Later {
			j := slices.Index(fl.who, q)
			if j < 0 || p.SetTokenFrom(k, fl.f, j) != nil {
				return false
			}
		}
		sp[k] = q.sampling(sp[k], fed, total, n)
		keep = append(keep, k)
	}
	start := time.Now()
	stats.Chained = true
	f, err := s.e.Launch(p, sp)
	if errors.Is(err, engine.ErrInFlight) {
		return false // SetToken replaces the device tokens
	}
	s.stepped = true
	if err != nil {
		s.launchFailed(err, &stats)
		return true
	}
	s.next = s.flying(f, in, who, sp, keep, stats, start)
	return true
}

// planDelay is how long to wait before planning the step after the one in
// flight: requests that arrive meanwhile then make it into that step, as
// they do when steps run one at a time (planning at once delayed them by a
// whole step: TTFT p50 28 -> 42 ms on the H200 at concurrency 64). The
// plan starts a quarter of the expected device time (at least planMargin)
// before the step in flight should end; with no device time measured (or
// the result already in) it starts at once. A quarter, not less: where the
// draw is issued only when the host asks for the tokens (the CUDA
// backend's unchained steps), the device time ends with the draw, and the
// host must ask before the forward ends, the draw's time earlier.
func (s *Scheduler) planDelay() time.Duration {
	fl := s.fly
	if fl == nil || fl.f.Done() || s.devEst <= 0 {
		return 0
	}
	return time.Until(fl.start.Add(s.devEst - max(s.devEst/4, planMargin)))
}

// planMargin is the least time planDelay leaves for planning the next
// step and waking up (the H200 host plans a serving step in ~0.15 ms).
const planMargin = 500 * time.Microsecond

// launch completes the Samplings of a prepared step (sp may hold Targets)
// and launches it; discard marks the inputs Planned.Discard took out;
// waited, when set, is when the tokens of the step before it came back
// (StepStats.Settle).
func (s *Scheduler) launch(p *engine.Planned, in []engine.Input, who []*seq, sp []engine.Sampling, discard []bool, stats StepStats, waited time.Time) {
	keep := make([]int, 0, len(in))
	for k, q := range who {
		if discard != nil && discard[k] {
			sp[k] = engine.Sampling{Skip: true}
			continue
		}
		keep = append(keep, k)
		sp[k] = q.sampling(sp[k], q.fed, len(q.tokens), len(in[k].Tokens))
	}
	s.stepped = true
	start := time.Now()
	if !waited.IsZero() {
		stats.Settle = start.Sub(waited)
	}
	f, err := s.e.Launch(p, sp)
	if err != nil {
		s.launchFailed(err, &stats)
		return
	}
	s.fly = s.flying(f, in, who, sp, keep, stats, start)
}

// sampling completes s (which may hold Targets) for q's n rows fed after
// fed of its total tokens: a token is drawn only after its last prompt
// row, keyed by the new token's position.
func (q *seq) sampling(s engine.Sampling, fed, total, n int) engine.Sampling {
	s.Skip = fed+n < total || q.req.MaxTokens == 0
	s.Params, s.Seed, s.Index, s.CPU, s.Adjust = q.req.Sampling, q.seed, uint64(fed+n), q.sampler, q.pen.Adjust()
	return s
}

// flying records a launched step and marks its sequences.
func (s *Scheduler) flying(f *engine.Flight, in []engine.Input, who []*seq, sp []engine.Sampling, keep []int, stats StepStats, start time.Time) *flight {
	fl := &flight{f: f, in: in, who: who, sp: sp, keep: keep, stats: stats, start: start}
	for _, k := range keep {
		q := who[k]
		q.lastFly, q.flyRows, q.flySamples = fl, len(in[k].Tokens), !sp[k].Skip
	}
	return fl
}

// launchFailed ends what a step that could not be prepared or launched
// leaves: its adapter slot's requests (engine.SlotError), or all of them.
func (s *Scheduler) launchFailed(err error, stats *StepStats) {
	var bad *engine.SlotError
	if errors.As(err, &bad) {
		s.failSlot(bad.Slot, err) // the others run again at the next step
	} else {
		s.stepDone(err)
		s.failAll(err)
	}
	s.reportStep(stats)
}

// land waits for the step in flight and hands its tokens to its requests;
// it returns the step's statistics for the caller to report (nil when it
// reported them itself) and false when the step failed (its requests have
// ended) or when it recorded a missing program after it (a recording must
// not overlap a step: the step prepared meanwhile is planned again).
func (s *Scheduler) land() (st *StepStats, waited time.Time, ok bool) {
	fl := s.fly
	s.fly, s.next = s.next, nil
	choices, err := fl.f.Wait()
	end := time.Now()
	for _, q := range fl.who {
		if q.lastFly == fl {
			q.lastFly = nil
		}
	}
	if s.fly != nil {
		s.fly.start = end // the chained step starts on the device now
	}
	stats := fl.stats
	var bad *engine.SlotError
	if errors.As(err, &bad) {
		s.failSlot(bad.Slot, err) // the others run again at the next step
		s.reportStep(&stats)
		return nil, end, false
	}
	s.stepDone(err)
	if err != nil {
		s.failAll(err)
		s.reportStep(&stats)
		return nil, end, false
	}
	stats.Duration = end.Sub(fl.start)
	if d, ok := s.e.DeviceTime(); ok {
		stats.Device = d
		if s.devEst == 0 {
			s.devEst = d
		} else {
			s.devEst = (3*s.devEst + d) / 4
		}
	}
	et := s.e.LastStepTimes()
	stats.Prepare, stats.Issue, stats.Wait = et.Prepare, et.Issue, et.Wait
	keep := fl.keep
	if slices.ContainsFunc(keep, func(k int) bool { return fl.who[k].ended }) {
		// a chained step's rows of sequences that ended in the step before
		keep = slices.DeleteFunc(slices.Clone(keep), func(k int) bool { return fl.who[k].ended })
	}
	in, who, sp, ch := fl.in, fl.who, fl.sp, choices
	if len(keep) < len(in) {
		in, who, sp, ch = pick(fl.in, keep), pick(fl.who, keep), pick(fl.sp, keep), pick(choices, keep)
	}
	s.afterStep(in, who, ch, sp)
	stats.Emit = time.Since(end)
	warm := false
	if s.cfg.IdleWarm && !s.warmFailed && s.e.MissedRecording() && s.fly == nil {
		// the step ran without its program: record it when idle, or
		// between steps when the load never leaves the engine idle
		s.warming = true
		if s.missed++; s.missed >= busyWarmEvery {
			s.missed, warm = 0, true
		}
	}
	if warm {
		s.reportStep(&stats) // its tokens go out before the recording
		s.warmOne()
		return nil, end, false
	}
	return &stats, end, true
}

// pick is xs at the indices keep.
func pick[T any](xs []T, keep []int) []T {
	out := make([]T, len(keep))
	for i, k := range keep {
		out[i] = xs[k]
	}
	return out
}

// drain lands the step in flight, if any (before an engine command, the
// shutdown, or a wait: nothing runs on the engine while a step is in
// flight but the step after it).
func (s *Scheduler) drain() {
	for s.fly != nil {
		s.landOne()
	}
}

// landOne lands the step in flight and reports it.
func (s *Scheduler) landOne() {
	if st, _, _ := s.land(); st != nil {
		s.reportStep(st)
	}
}

// dropCancelled ends the running sequences whose requests were cancelled
// (their pages free at once), except those in the step in flight: they go
// at the next call, after it lands.
func (s *Scheduler) dropCancelled() {
	live := s.running[:0]
	for _, q := range s.running {
		if err := q.ctx.Err(); err != nil && q.lastFly == nil {
			s.release(q)
			s.finish(q, "", err)
			continue
		}
		live = append(live, q)
	}
	clear(s.running[len(live):])
	s.running = live
}

// reserve gives each input's sequence the pages its tokens need, in plan
// order (decode rows first); pages reserved before a failure stay with
// their sequences.
func (s *Scheduler) reserve(in []engine.Input) error {
	for _, x := range in {
		n := x.Seq.Next() + len(x.Tokens)
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

// plan packs decode rows first, then prefill chunks, within the token
// budget. ahead plans the step after the one in flight: a sequence is
// taken as that step leaves it (its rows fed, the token it draws as a
// decode row whose token comes later); cancelled sequences, those the step
// in flight ends by length, and scored prompts (their rows' logits) are
// left out, and a plan with a scored prompt is empty: it waits.
func (s *Scheduler) plan(st *StepStats, ahead bool) ([]engine.Input, []*seq) {
	budget := s.e.Options().MaxTokens
	var in []engine.Input
	var who []*seq
	adapters := map[int]bool{}
	add := func(q *seq, toks []int32, later bool) {
		in = append(in, engine.Input{Seq: &q.kv, Tokens: toks, Slot: q.slot, Later: later})
		who = append(who, q)
		adapters[q.slot] = true
		budget -= len(toks)
	}
	*st = StepStats{TotalBlocks: st.TotalBlocks, Preempted: st.Preempted}
	for _, q := range s.running {
		if budget <= 0 || ahead && q.ctx.Err() != nil {
			continue
		}
		fed, drawn := q.view()
		switch {
		case drawn:
			if q.gen+1 < q.req.MaxTokens { // else that token is its last
				add(q, []int32{0}, true)
				st.Decode++
			}
		case len(q.tokens)-fed == 1:
			add(q, q.tokens[fed:fed+1], false)
			st.Decode++
		}
	}
	if f := s.cfg.FillRows; f > 0 {
		if used := s.e.Options().MaxTokens - budget; used < f {
			budget = min(budget, f-used) // prompt chunks fill the step to FillRows
		}
	}
	scoreBudget := scoreChunk // scored rows this step, all sequences together
	for _, q := range s.running {
		fed, drawn := q.view()
		if n := len(q.tokens) - fed; budget > 0 && n > 1 && !drawn {
			if q.req.PromptLogprobs && len(q.scores) < len(q.req.Prompt)-1 {
				if ahead {
					return nil, nil
				}
				if scoreBudget == 0 {
					continue // its logits rows wait for the next step
				}
				n = min(n, scoreBudget) // every row's logits come to the host
				scoreBudget -= min(n, budget)
			}
			if ahead && q.ctx.Err() != nil {
				continue
			}
			add(q, q.tokens[fed:fed+min(n, budget)], false)
			st.Prefill++
		}
	}
	st.Sequences, st.Adapters = len(in), len(adapters)
	for sl := range adapters {
		st.LoRA = st.LoRA || sl >= 0 // the base model has no slot (-1)
	}
	for _, x := range in {
		st.Rows += len(x.Tokens)
	}
	return in, who
}

// view is q as the step in flight leaves it: its tokens fed, and whether
// that step draws its next token (not known yet).
func (q *seq) view() (fed int, drawn bool) {
	if q.lastFly == nil {
		return q.fed, false
	}
	fed = q.fed + q.flyRows
	return fed, fed == len(q.tokens) && q.flySamples
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
	for _, fl := range []*flight{s.fly, s.next} { // a panic left them: their results are not used
		if fl == nil {
			continue
		}
		fl.f.Wait()
		for _, q := range fl.who {
			q.lastFly = nil
		}
	}
	s.fly, s.next = nil, nil
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
