// Package stallwatch notices when the process stops running its goroutines
// for longer than a serving step takes: a goroutine sleeps a short interval
// and measures how late it wakes. A stop-the-world pause that waits for a
// goroutine stuck in a long assembly routine (a copy or hash of hundreds of
// MB), a starved scheduler or a descheduled process all show up as a late
// wake; the number of GC cycles that began meanwhile says whether the
// collector was part of it.
package stallwatch

import (
	"context"
	"runtime/metrics"
	"time"
)

// Stall is one late wake.
type Stall struct {
	At       time.Time     // when the watcher woke
	Late     time.Duration // how much later than asked
	GCCycles uint64        // GC cycles that began since the wake before
}

// Watch sleeps interval at a time until ctx ends and calls report for every
// wake later than threshold past its time. It returns when ctx ends.
func Watch(ctx context.Context, interval, threshold time.Duration, report func(Stall)) {
	d := detector{interval: interval, threshold: threshold}
	sample := []metrics.Sample{{Name: "/gc/cycles/total:gc-cycles"}}
	gcCycles := func() uint64 {
		metrics.Read(sample)
		if sample[0].Value.Kind() == metrics.KindUint64 {
			return sample[0].Value.Uint64()
		}
		return 0
	}
	d.start(time.Now(), gcCycles())
	t := time.NewTimer(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			if s, late := d.observe(now, gcCycles()); late {
				report(s)
			}
			t.Reset(interval)
		}
	}
}

// detector turns wake times into stalls.
type detector struct {
	interval, threshold time.Duration
	last                time.Time
	lastGC              uint64
}

func (d *detector) start(now time.Time, gc uint64) { d.last, d.lastGC = now, gc }

// observe records a wake at now (gc: GC cycles begun so far) and reports
// whether it came more than threshold after the interval since the last.
func (d *detector) observe(now time.Time, gc uint64) (Stall, bool) {
	late := now.Sub(d.last) - d.interval
	s := Stall{At: now, Late: late, GCCycles: gc - d.lastGC}
	d.last, d.lastGC = now, gc
	return s, late > d.threshold
}
