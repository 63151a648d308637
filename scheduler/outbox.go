package scheduler

import (
	"context"
	"sync"
	"time"
)

// outbox delivers a request's events in order without ever blocking the
// engine goroutine: the engine appends, a forwarder goroutine sends them on
// the request's channel at the reader's pace. Memory grows with the tokens
// actually generated, never with a number the client chose, and a reader
// that stops reading (a slow or vanished client) cannot stall a step.
type outbox struct {
	mu   sync.Mutex
	buf  []Event
	done bool          // the Done event is in buf or was sent
	wake chan struct{} // capacity 1: events are waiting
}

func newOutbox() *outbox { return &outbox{wake: make(chan struct{}, 1)} }

// put queues an event (never blocks).
func (o *outbox) put(ev Event) {
	o.mu.Lock()
	if o.done {
		o.mu.Unlock()
		return // nothing follows Done
	}
	o.buf = append(o.buf, ev)
	o.done = ev.Done
	o.mu.Unlock()
	select {
	case o.wake <- struct{}{}:
	default:
	}
}

// forward sends the queued events on out, at the reader's pace, until the
// Done event is sent, then closes out. Once ctx has ended the reader may be
// gone: tokens are dropped and the Done event (which the scheduler always
// sends, at its next step at the latest) is offered for a while, so the
// goroutine ends whether or not anybody still reads.
func (o *outbox) forward(ctx context.Context, out chan<- Event) {
	defer close(out)
	cancelled := ctx.Done()
	for {
		select {
		case <-o.wake:
		case <-cancelled:
			cancelled = nil // from now on only the Done event matters
		}
		o.mu.Lock()
		evs := o.buf
		o.buf = nil
		o.mu.Unlock()
		for _, ev := range evs {
			if ctx.Err() == nil {
				select {
				case out <- ev:
				case <-ctx.Done():
				}
			}
			if ev.Done {
				if ctx.Err() != nil {
					t := time.NewTimer(doneGrace)
					select {
					case out <- ev:
					case <-t.C:
					}
					t.Stop()
				}
				return
			}
		}
	}
}

// doneGrace is how long the Done event of a cancelled request waits for a
// reader.
const doneGrace = time.Second
