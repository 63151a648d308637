package cuda

import (
	"fmt"
	"slices"
)

// MedianMs runs fn(i) for i < warm+reps on s, each between two timing
// events, and returns the median device milliseconds of the last reps
// (the first warm load kernels, fill caches). It waits for s each time.
func (s *Stream) MedianMs(warm, reps int, fn func(i int) error) (float64, error) {
	if reps <= 0 {
		return 0, fmt.Errorf("%w: MedianMs of %d runs", ErrInvalidValue, reps)
	}
	e0, err := s.c.NewEvent(true)
	if err != nil {
		return 0, err
	}
	defer e0.Destroy()
	e1, err := s.c.NewEvent(true)
	if err != nil {
		return 0, err
	}
	defer e1.Destroy()
	ms := make([]float64, 0, reps)
	for i := range warm + reps {
		if err := e0.Record(s); err != nil {
			return 0, err
		}
		if err := fn(i); err != nil {
			return 0, err
		}
		if err := e1.Record(s); err != nil {
			return 0, err
		}
		if err := e1.Synchronize(); err != nil {
			return 0, err
		}
		x, err := e1.Since(e0)
		if err != nil {
			return 0, err
		}
		if i >= warm {
			ms = append(ms, float64(x))
		}
	}
	slices.Sort(ms)
	return ms[len(ms)/2], nil
}

// GraphMedianUs records fn(0..calls-1) on s as one CUDA graph and returns
// the median device microseconds per call over reps replays (after two).
// Launched one by one from the host, short kernels would be timed waiting
// for their launches; a replayed graph keeps the device fed.
func (s *Stream) GraphMedianUs(calls, reps int, fn func(i int) error) (float64, error) {
	if calls <= 0 {
		return 0, fmt.Errorf("%w: GraphMedianUs of %d calls", ErrInvalidValue, calls)
	}
	if err := s.BeginCapture(); err != nil {
		return 0, err
	}
	for i := range calls {
		if err := fn(i); err != nil {
			s.EndCapture()
			return 0, err
		}
	}
	g, err := s.EndCapture()
	if err != nil {
		return 0, err
	}
	ge, err := g.Instantiate()
	g.Destroy()
	if err != nil {
		return 0, err
	}
	defer ge.Destroy()
	ms, err := s.MedianMs(2, reps, func(int) error { return ge.Launch(s) })
	return ms * 1000 / float64(calls), err
}
