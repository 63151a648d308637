package scheduler

// The engine goroutine hands what a step produced for others (tokens and
// Done events for the requests' outboxes, the step's statistics for OnStep)
// to one emitter goroutine instead of delivering it itself: each put can
// wake a request's forwarder, and those wake-ups and the metrics took ~0.15
// ms of the host time between two steps, time the device sat idle. The
// emitter delivers batches in the order they were flushed, so every request
// sees its events in order.

// posted is an event for one request's outbox.
type posted struct {
	box *outbox
	ev  Event
}

// emitBatch is what one flush hands over: a step's statistics (nil: none)
// and the events posted since the previous flush.
type emitBatch struct {
	stats *StepStats
	evs   []posted
}

// emitDepth is how many batches may wait for the emitter before a flush
// blocks the engine goroutine.
const emitDepth = 64

// post queues ev for q's outbox until the next flush (engine goroutine).
func (s *Scheduler) post(q *seq, ev Event) {
	s.posts = append(s.posts, posted{box: q.box, ev: ev})
}

// flush hands the posted events, and stats when not nil, to the emitter
// (engine goroutine). OnStep runs before the events are put, so a client
// that has seen a step's tokens finds the step in the statistics.
func (s *Scheduler) flush(stats *StepStats) {
	if len(s.posts) == 0 && (stats == nil || s.cfg.OnStep == nil) {
		return
	}
	b := emitBatch{evs: s.posts}
	if s.cfg.OnStep != nil {
		b.stats = stats
	}
	select {
	case s.posts = <-s.spare: // a slice the emitter is done with
	default:
		s.posts = nil
	}
	s.emitc <- b
}

// emit delivers the batches until emitc is closed, then closes emitted.
func (s *Scheduler) emit() {
	defer close(s.emitted)
	for b := range s.emitc {
		if b.stats != nil {
			s.cfg.OnStep(*b.stats)
		}
		for i, p := range b.evs {
			p.box.put(p.ev)
			b.evs[i] = posted{} // no reference kept to the request
		}
		if b.evs != nil {
			select {
			case s.spare <- b.evs[:0]:
			default:
			}
		}
	}
}

// stopEmitter delivers what is left and waits for the emitter to end
// (engine goroutine, when it exits).
func (s *Scheduler) stopEmitter() {
	s.flush(nil)
	close(s.emitc)
	<-s.emitted
}
