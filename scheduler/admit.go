package scheduler

import (
	"slices"
	"time"
)

// admit moves waiting requests into the running set by deficit round robin
// over adapter queues, while KV pages allow.
func (s *Scheduler) admit() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.dropCancelledLocked()
	for b, a := range s.draining { // nobody waits for the slot any more
		if len(s.queues[a]) == 0 {
			delete(s.draining, b)
		}
	}
	free := s.e.FreeBlocks()
	if s.cache != nil {
		free += s.cache.evictable() // evicted when pages are reserved
	}
	for _, q := range s.running {
		free -= s.e.BlocksFor(len(q.tokens)+1) - s.e.BlocksFor(q.fed) // pages running sequences still need soon
	}
	// A step has rows for at most MaxTokens sequences: admitting more would
	// leave the ones past it without a row (stalled mid-stream) until
	// earlier ones finish; they wait in their queue instead.
	maxRunning := s.e.Options().MaxTokens
	running := map[string]int{} // running sequences per adapter (drain candidates)
	for _, q := range s.running {
		running[q.req.Adapter]++
	}
	for progressed := true; progressed && len(s.order) > 0; {
		progressed = false
		for i := 0; i < len(s.order); i++ {
			a := s.order[i]
			if head := len(s.queues[a][0].tokens); true {
				// Credit a quantum, capped so a queue blocked on KV pages does not bank credit.
				s.deficit[a] = min(s.deficit[a]+s.cfg.Quantum, max(s.cfg.Quantum, head))
			}
			for len(s.queues[a]) > 0 {
				q := s.queues[a][0]
				cost := len(q.tokens)
				need := s.e.BlocksFor(len(q.tokens) + 1)
				if q.ctx.Err() == nil && (need > free || cost > s.deficit[a] || len(s.running) >= maxRunning) {
					break
				}
				if q.ctx.Err() == nil && q.lease == nil && a != "" && !s.leaseLocked(q, running) {
					break // acquiring, waiting for a slot, or yielding its slot
				}
				s.queues[a] = s.queues[a][1:]
				if q.ctx.Err() != nil {
					s.finish(q, "", q.ctx.Err())
					continue
				}
				s.deficit[a] -= cost
				free -= need
				q.admitted = time.Now()
				s.attachPrefix(q)
				s.running = append(s.running, q)
				running[a]++
				progressed = true
			}
			if len(s.queues[a]) == 0 {
				s.forgetQueueLocked(i)
				i--
			}
		}
	}
}

// forgetQueueLocked takes adapter s.order[i], whose queue is empty, out of
// the round robin. s.mu is held.
func (s *Scheduler) forgetQueueLocked(i int) {
	a := s.order[i]
	delete(s.queues, a)
	delete(s.deficit, a)
	s.order = slices.Delete(s.order, i, i+1)
}

// dropCancelledLocked ends the waiting requests whose context is done, in
// every queue (not only at the heads), so the queue gauges count only
// requests somebody still waits for.
func (s *Scheduler) dropCancelledLocked() {
	for i := 0; i < len(s.order); i++ {
		a := s.order[i]
		s.queues[a] = slices.DeleteFunc(s.queues[a], func(q *seq) bool {
			if err := q.ctx.Err(); err != nil {
				s.finish(q, "", err)
				return true
			}
			return false
		})
		if len(s.queues[a]) == 0 {
			s.forgetQueueLocked(i)
			i--
		}
	}
}

// preempt frees the pages of the most recently admitted sequence; it will
// recompute its tokens when pages allow. Reports whether one was preempted.
func (s *Scheduler) preempt() bool {
	if len(s.running) <= 1 {
		return false
	}
	victim := 0
	for i, q := range s.running {
		if q.admitted.After(s.running[victim].admitted) {
			victim = i
		}
	}
	q := s.running[victim]
	s.running = slices.Delete(s.running, victim, victim+1)
	s.release(q)
	q.fed = 0
	s.mu.Lock()
	if len(s.queues[q.req.Adapter]) == 0 {
		s.order = append(s.order, q.req.Adapter)
	}
	s.queues[q.req.Adapter] = append([]*seq{q}, s.queues[q.req.Adapter]...)
	s.mu.Unlock()
	s.log.Debug("preempted a sequence for KV pages", "adapter", q.req.Adapter, "tokens", len(q.tokens))
	return true
}

// attachPrefix starts an admitted sequence with no KV on the cached pages
// of the longest prefix of its tokens (whole pages, leaving at least its
// last token to compute).
func (s *Scheduler) attachPrefix(q *seq) {
	if s.cache == nil || q.fed != 0 || q.kv.Len() != 0 || q.req.PromptLogprobs {
		return // (a scored prompt needs every position's logits)
	}
	version := ""
	if q.lease != nil {
		version = q.lease.Version()
	}
	root := prefixRoot(q.req.Adapter, version)
	q.chain, q.keyed = root, 0
	bs := s.e.Options().BlockSize
	blocks, last := s.cache.match(root, q.tokens, bs, len(q.tokens)-1)
	s.prefixQueries += len(q.tokens)
	if len(blocks) == 0 {
		return
	}
	n := len(blocks) * bs
	if err := s.e.Attach(&q.kv, blocks, n); err != nil {
		s.log.Error("prefix cache: attach failed", "err", err)
		return
	}
	s.cache.use(blocks)
	q.chain, q.fed, q.keyed = last, n, n
	s.prefixHits += n
}

// keepPages offers the prefix cache the sequence's pages that its fed
// tokens have filled since the last call.
func (s *Scheduler) keepPages(q *seq) {
	if s.cache == nil {
		return
	}
	bs := s.e.Options().BlockSize
	blocks := q.kv.Blocks()
	for q.keyed+bs <= q.fed && q.keyed+bs <= len(q.tokens) {
		i := q.keyed / bs
		q.chain = q.chain.next(q.tokens[q.keyed : q.keyed+bs])
		s.cache.add(q.chain, blocks[i])
		q.keyed += bs
	}
}
