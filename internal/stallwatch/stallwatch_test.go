package stallwatch

import (
	"context"
	"runtime"
	"sync"
	"testing"
	"time"
)

func TestObserve(t *testing.T) {
	t0 := time.Unix(1000, 0)
	d := detector{interval: 5 * time.Millisecond, threshold: 25 * time.Millisecond}
	d.start(t0, 7)
	for _, c := range []struct {
		gap   time.Duration
		gc    uint64
		late  time.Duration
		stall bool
		dgc   uint64
	}{
		{5 * time.Millisecond, 7, 0, false, 0},
		{6 * time.Millisecond, 8, time.Millisecond, false, 1},
		{30 * time.Millisecond, 8, 25 * time.Millisecond, false, 0}, // at the threshold: not over it
		{31 * time.Millisecond, 9, 26 * time.Millisecond, true, 1},
		{80 * time.Millisecond, 12, 75 * time.Millisecond, true, 3},
		{5 * time.Millisecond, 12, 0, false, 0},
	} {
		t0 = t0.Add(c.gap)
		s, stall := d.observe(t0, c.gc)
		if s.Late != c.late || stall != c.stall || s.GCPauses != c.dgc || !s.At.Equal(t0) {
			t.Errorf("gap %v: %+v stall %v, want late %v stall %v gc %d", c.gap, s, stall, c.late, c.stall, c.dgc)
		}
	}
}

// TestWatchSeesAStall: with one P, a goroutine inside one long copy (256 MB
// in one call: the runtime's memmove cannot be preempted) holds the
// watcher off for the copy's length, and Watch reports a stall of about
// that length; Watch returns when its context ends. (A stop-the-world GC
// phase waits for such a copy the same way, with every P.)
func TestWatchSeesAStall(t *testing.T) {
	if testing.Short() {
		t.Skip("timing")
	}
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
	ctx, cancel := context.WithCancel(context.Background())
	var mu sync.Mutex
	var got []Stall
	done := make(chan struct{})
	go func() {
		defer close(done)
		Watch(ctx, time.Millisecond, 5*time.Millisecond, func(s Stall) {
			mu.Lock()
			got = append(got, s)
			mu.Unlock()
		})
	}()
	buf := make([]byte, 512<<20)
	for i := 0; i < len(buf); i += 4096 { // touch every page first: the copy then only copies
		buf[i] = 1
	}
	time.Sleep(20 * time.Millisecond)
	t0 := time.Now()
	copy(buf[len(buf)/2:], buf[:len(buf)/2])
	held := time.Since(t0)
	time.Sleep(120 * time.Millisecond) // a loaded machine may run the watcher late
	cancel()
	<-done
	mu.Lock()
	defer mu.Unlock()
	if held < 12*time.Millisecond {
		t.Skipf("a 256 MB copy took %v: too short to test a 5 ms threshold", held)
	}
	// the longest stall that ended with the copy (touching the pages stalls
	// too): the watcher may run as the copy returns, before held is
	// measured, or (a loaded machine) some time after
	var worst time.Duration
	for _, s := range got {
		if s.At.After(t0) && s.At.Before(t0.Add(held+100*time.Millisecond)) {
			worst = max(worst, s.Late)
		}
	}
	t.Logf("the only P held %v; %d stalls reported, the one ending with the copy %v", held, len(got), worst)
	if worst < held/2 {
		t.Errorf("longest stall reported %v, want at least half the %v hold", worst, held)
	}
}
