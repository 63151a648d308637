package gpu

import (
	"errors"

	"github.com/peftd/peftd/runtime/cuda"
)

// stepTimer times one step's device work with events on the compute
// stream: beg before its metadata copy, fwd at the end of its forward
// (Execute), tail at its first result call (SampleRows, IssueSample, Read)
// and end before its result copy. The device time is end - beg less tail -
// fwd: between the forward's end and the first result call the device
// waits for the host to ask, and a host that plans the next step during
// this one asks late on purpose (counting that wait as device time made a
// step look longer, so that the host planned later still: docs/PERFORMANCE.md
// v0.20).
type stepTimer struct {
	beg, fwd, tail, end         *cuda.Event
	timed, fwdOK, tailOK, endOK bool
}

// open makes the events (once).
func (t *stepTimer) open(c *cuda.Context) error {
	for _, e := range []**cuda.Event{&t.beg, &t.fwd, &t.tail, &t.end} {
		if *e != nil {
			continue
		}
		var err error
		if *e, err = c.NewEvent(true); err != nil {
			return err
		}
	}
	return nil
}

// start begins a step: timed when on (and the events are open).
func (t *stepTimer) start(s *cuda.Stream, on bool) error {
	t.timed, t.fwdOK, t.tailOK, t.endOK = false, false, false, false
	if !on || t.beg == nil {
		return nil
	}
	if err := t.beg.Record(s); err != nil {
		return err
	}
	t.timed = true
	return nil
}

func (t *stepTimer) markForward(s *cuda.Stream) error {
	if !t.timed || t.fwdOK {
		return nil
	}
	t.fwdOK = true
	return t.fwd.Record(s)
}

func (t *stepTimer) markTail(s *cuda.Stream) error {
	if !t.timed || !t.fwdOK || t.tailOK {
		return nil
	}
	t.tailOK = true
	return t.tail.Record(s)
}

// markEnd records the end (again, when a later result call comes: the last wins).
func (t *stepTimer) markEnd(s *cuda.Stream) error {
	if !t.timed {
		return nil
	}
	t.endOK = true
	return t.end.Record(s)
}

// ms is the step's device time once its end event has completed, and
// whether there is one; it ends the timing.
func (t *stepTimer) ms() (float32, bool) {
	if !t.timed || !t.endOK {
		return 0, false
	}
	t.timed = false
	ms, err := t.end.Since(t.beg)
	if err != nil {
		return 0, false
	}
	if t.fwdOK && t.tailOK {
		if gap, err := t.tail.Since(t.fwd); err == nil && gap > 0 {
			ms -= gap
		}
	}
	return ms, true
}

func (t *stepTimer) close() error {
	return errors.Join(t.beg.Destroy(), t.fwd.Destroy(), t.tail.Destroy(), t.end.Destroy())
}
