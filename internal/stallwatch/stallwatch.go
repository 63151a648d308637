// Package stallwatch notices when the process stops running its goroutines
// for longer than a serving step takes: a goroutine sleeps a short interval
// and measures how late it wakes. A stop-the-world pause that waits for a
// goroutine stuck in a long copy or in page faults, a starved scheduler or
// a descheduled process all show up as a late wake; the number of GC
// stop-the-world pauses that ended meanwhile says whether the collector
// was part of it.
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
	GCPauses uint64        // GC stop-the-world pauses that ended since the wake before
}

// Watch sleeps interval at a time until ctx ends and calls report for every
// wake later than threshold past its time. It returns when ctx ends.
func Watch(ctx context.Context, interval, threshold time.Duration, report func(Stall)) {
	d := detector{interval: interval, threshold: threshold}
	sample := []metrics.Sample{{Name: "/sched/pauses/total/gc:seconds"}}
	gcPauses := func() uint64 {
		metrics.Read(sample)
		var n uint64
		if sample[0].Value.Kind() == metrics.KindFloat64Histogram {
			for _, c := range sample[0].Value.Float64Histogram().Counts {
				n += c
			}
		}
		return n
	}
	d.start(time.Now(), gcPauses())
	t := time.NewTimer(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			// the time of the wake (the channel's value is when the timer
			// was due), measured before the report so that its own work
			// is not counted as the next wake's lateness
			s, late := d.observe(time.Now(), gcPauses())
			t.Reset(interval)
			if late {
				report(s)
				d.last = time.Now()
			}
		}
	}
}

// detector turns wake times into stalls.
type detector struct {
	interval, threshold time.Duration
	last                time.Time // when the timer was last armed
	lastGC              uint64
}

func (d *detector) start(now time.Time, gc uint64) { d.last, d.lastGC = now, gc }

// observe records a wake at now (gc: GC pauses ended so far) and reports
// whether it came more than threshold after the interval since the last.
func (d *detector) observe(now time.Time, gc uint64) (Stall, bool) {
	late := now.Sub(d.last) - d.interval
	s := Stall{At: now, Late: late, GCPauses: gc - d.lastGC}
	d.last, d.lastGC = now, gc
	return s, late > d.threshold
}
