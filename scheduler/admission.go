package scheduler

import "slices"

// Adapter slot admission. A request for an adapter takes its lease when its
// turn in the deficit round robin comes, not when it arrives, so the
// scheduler, not a race between waiting goroutines, decides which adapter
// gets a device slot when hot adapters outnumber slots:
//
//   - an adapter on the device is leased at once (SlotAdmission.TryAcquire,
//     no waiting, no store call) and its requests are admitted as pages and
//     deficit allow;
//   - an adapter that needs a slot starts its load (Residency.Acquire, on
//     its own goroutine) only when a slot is free for it; until then it
//     keeps its place in the round robin, is fetched into host memory
//     (Prefetcher), and one adapter that holds a slot yields it: its
//     waiting requests are held back (it is "draining") so its running ones
//     finish and release the slot. Without this a hot adapter with a steady
//     stream of requests would keep its slot forever;
//   - anything else (an unknown or replaced adapter, a version not checked
//     against the store lately) goes to Acquire at once, which answers or
//     waits as the loader decides.

// Admission is what SlotAdmission.TryAcquire found.
type Admission int

const (
	// Leased: the adapter is on the device and the lease is taken.
	Leased Admission = iota
	// NeedsSlot: a known, valid version that is not on the device: its
	// load takes a free slot.
	NeedsSlot
	// AcquireNow: let Acquire decide (it may check the store, fail, or wait
	// for a load already under way).
	AcquireNow
)

// SlotAdmission is an optional Residency capability: with it the
// scheduler's round robin decides which adapter takes a free device slot
// (see above); without it every request calls Acquire when its turn comes.
type SlotAdmission interface {
	// TryAcquire leases id at once when it is on the device (Leased);
	// else it reports what a lease would need. It never waits and never
	// calls the store.
	TryAcquire(id string) (Lease, Admission)
	// FreeSlots is the number of device slots a load could take now:
	// empty, or holding an adapter nobody leases or pins.
	FreeSlots() int
}

// Prefetcher is an optional SlotAdmission capability: an adapter that waits
// for a slot is brought to host memory meanwhile, so that its load, when a
// slot frees, is only the upload.
type Prefetcher interface {
	// Prefetch starts that and returns at once.
	Prefetch(id string)
}

// leaseLocked tries to give q (waiting, at the head of its adapter's queue,
// whose turn it is) its lease; true when it has one now. Otherwise the
// lease is on its way (an Acquire runs), or the adapter waits for a slot
// (and another adapter is asked to yield one), or the adapter is yielding
// its own. running counts the running sequences per adapter. s.mu is held.
func (s *Scheduler) leaseLocked(q *seq, running map[string]int) bool {
	a := q.req.Adapter
	if q.acquiring || s.draining[a] != "" {
		return false
	}
	adm, ok := s.res.(SlotAdmission)
	if !ok {
		s.acquireAsync(q, false)
		return false
	}
	l, st := adm.TryAcquire(a)
	switch st {
	case Leased:
		q.lease, q.slot = l, l.Slot()
		return true
	case NeedsSlot:
		if adm.FreeSlots() > s.loads {
			s.acquireAsync(q, true)
			return false
		}
		s.askToYield(a, running)
		if p, ok := s.res.(Prefetcher); ok {
			p.Prefetch(a)
		}
	default:
		s.acquireAsync(q, false)
	}
	return false
}

// askToYield picks an adapter to give up its slot for a, unless one already
// does: of the adapters with running sequences that are not waiting for a
// slot themselves and not yielding already, the one with the fewest running
// sequences (it frees its slot soonest), ties to the smallest name.
func (s *Scheduler) askToYield(a string, running map[string]int) {
	for _, beneficiary := range s.draining {
		if beneficiary == a {
			return
		}
	}
	victim := ""
	for b, n := range running {
		if b == "" || b == a || n == 0 || s.draining[b] != "" {
			continue
		}
		if victim == "" || n < running[victim] || (n == running[victim] && b < victim) {
			victim = b
		}
	}
	if victim != "" {
		s.draining[victim] = a
	}
}

// acquireAsync starts Acquire for q on its own goroutine; load says it will
// take a free slot (counted in s.loads until it returns). s.mu is held.
func (s *Scheduler) acquireAsync(q *seq, load bool) {
	q.acquiring = true
	if load {
		s.loads++
	}
	go func() {
		l, err := s.res.Acquire(q.ctx, q.req.Adapter)
		s.mu.Lock()
		q.acquiring = false
		if load {
			s.loads--
			// The load is done (or failed): the adapters that yielded a slot
			// for this one serve again.
			for b, beneficiary := range s.draining {
				if beneficiary == q.req.Adapter {
					delete(s.draining, b)
				}
			}
		}
		var failed bool
		switch {
		case q.ended: // cancelled and finished while acquiring
			if l != nil {
				l.Release()
			}
		case err != nil:
			s.removeWaitingLocked(q)
			failed = true
		default:
			q.lease, q.slot = l, l.Slot()
		}
		s.mu.Unlock()
		if failed {
			s.finishAway(q, err)
		}
		s.signal()
	}()
}

// removeWaitingLocked takes q out of its adapter's queue. s.mu is held.
func (s *Scheduler) removeWaitingLocked(q *seq) {
	a := q.req.Adapter
	s.queues[a] = slices.DeleteFunc(s.queues[a], func(x *seq) bool { return x == q })
	if len(s.queues[a]) == 0 {
		if i := slices.Index(s.order, a); i >= 0 {
			s.forgetQueueLocked(i)
		} else {
			delete(s.queues, a)
		}
	}
}

// signal wakes the engine goroutine if it waits for work.
func (s *Scheduler) signal() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

var _ SlotAdmission = Static(nil)

// TryAcquire leases a placed adapter's slot; an unknown one goes to
// Acquire (which says it is unknown).
func (s Static) TryAcquire(id string) (Lease, Admission) {
	if slot, ok := s[id]; ok {
		return staticLease(slot), Leased
	}
	return nil, AcquireNow
}

// FreeSlots: a Static residency never loads anything.
func (s Static) FreeSlots() int { return 0 }
