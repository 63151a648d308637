package scheduler

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/peftd/peftd/internal/fixture"
	"github.com/peftd/peftd/runtime/cpu"
	"github.com/peftd/peftd/runtime/engine"
)

// slowWarmer is the CPU backend with step programs to record: missing of
// them, each taking cost; fail makes the recording after that many fail.
type slowWarmer struct {
	engine.Backend
	cost time.Duration

	mu      sync.Mutex
	missing int
	calls   int
	fail    int // fail the call after this many recordings (0: never)
	done    int
	during  []bool // per call: was a step ever run between calls (set by Execute)
	stepped bool
	// missOnStep: the next step runs without its program (a recording
	// dropped meanwhile, say) and MissedRecording says so once;
	// missAlways: every step does
	missOnStep, missAlways, missed bool
}

func (w *slowWarmer) MissedRecording() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	m := w.missed
	w.missed = false
	return m
}

func (w *slowWarmer) Warmup(progs []engine.Program, max int) (int, int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.calls++
	w.during = append(w.during, w.stepped)
	n := w.missing
	if max > 0 {
		n = min(n, max)
	}
	if w.fail > 0 && w.done+n > w.fail {
		return 0, w.missing, errors.New("record failed")
	}
	time.Sleep(w.cost * time.Duration(n))
	w.missing -= n
	w.done += n
	return n, w.missing, nil
}

func (w *slowWarmer) Execute(meta *engine.StepMeta, prog engine.Program) error {
	w.mu.Lock()
	w.stepped = true
	if w.missOnStep || w.missAlways {
		w.missOnStep, w.missed = false, true
	}
	w.mu.Unlock()
	return w.Backend.Execute(meta, prog)
}

func (w *slowWarmer) state() (missing, calls, done int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.missing, w.calls, w.done
}

// TestIdleWarm: with IdleWarm the scheduler records the missing step
// programs one per call while idle, until none is left, and serves a
// request that arrives meanwhile with the reference's tokens before the
// warm-up ends; without it, it records none; a failed recording stops the
// warm-up and serving goes on.
func TestIdleWarm(t *testing.T) {
	f, err := fixture.Load()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	c := f.Cases[0]
	opts := engine.Options{MaxTokens: 256, KVBlocks: 256, BlockSize: 4, AdapterSlots: 4}
	serve := func(t *testing.T, s *Scheduler) {
		t.Helper()
		ch, err := s.Submit(context.Background(), Request{Adapter: c.AdapterName(), Prompt: c.Prompt, MaxTokens: len(c.Greedy)})
		if err != nil {
			t.Fatal(err)
		}
		if toks, end := collect(t, ch); end.Err != nil || !slices.Equal(toks, c.Greedy) {
			t.Errorf("%v, %v; want %v", toks, end.Err, c.Greedy)
		}
	}
	// start serves the fixture on w with cfg until the test ends
	start := func(t *testing.T, w *slowWarmer, cfg Config) *Scheduler {
		t.Helper()
		e, res := fixtureEngineOn(t, f, w, opts)
		s := New(e, res, cfg)
		t.Cleanup(s.Close)
		return s
	}
	waitWarm := func(t *testing.T, w *slowWarmer) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
			if m, _, _ := w.state(); m == 0 {
				return
			}
		}
		t.Fatal("the warm-up did not finish")
	}

	t.Run("while idle, a request in between", func(t *testing.T) {
		w := &slowWarmer{Backend: cpu.New(0), cost: 20 * time.Millisecond, missing: 40}
		s := start(t, w, Config{IdleWarm: true})
		time.Sleep(50 * time.Millisecond) // some recordings, not all (40 x 20 ms)
		serve(t, s)
		if m, _, _ := w.state(); m == 0 {
			t.Error("the request waited for the whole warm-up")
		}
		waitWarm(t, w)
		_, calls, done := w.state()
		if done != 40 || calls < 40 {
			t.Errorf("%d recorded in %d calls, want 40 in at least 40 (one a call)", done, calls)
		}
		w.mu.Lock()
		defer w.mu.Unlock()
		if !slices.Contains(w.during, true) || w.during[0] {
			t.Errorf("steps between warm-up calls %v: want the request's steps after the first calls", w.during)
		}
	})
	t.Run("a command starts another round", func(t *testing.T) {
		w := &slowWarmer{Backend: cpu.New(0), missing: 3}
		s := start(t, w, Config{IdleWarm: true})
		waitWarm(t, w)
		// an adapter load, say, leaves two programs missing
		if err := s.Do(context.Background(), func(*engine.Engine) error {
			w.mu.Lock()
			w.missing += 2
			w.mu.Unlock()
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		waitWarm(t, w)
		if _, _, done := w.state(); done != 5 {
			t.Errorf("%d recorded, want 3 and then 2", done)
		}
	})
	t.Run("a step without its program starts another round", func(t *testing.T) {
		w := &slowWarmer{Backend: cpu.New(0), missing: 3}
		s := start(t, w, Config{IdleWarm: true})
		waitWarm(t, w)
		// two recordings dropped; the next step runs without its program
		w.mu.Lock()
		w.missing += 2
		w.missOnStep = true
		w.mu.Unlock()
		serve(t, s)
		waitWarm(t, w)
		if _, _, done := w.state(); done != 5 {
			t.Errorf("%d recorded, want 3 and then 2", done)
		}
	})
	t.Run("a load that never idles still records", func(t *testing.T) {
		w := &slowWarmer{Backend: cpu.New(0)}
		s := start(t, w, Config{IdleWarm: true})
		waitWarm(t, w) // nothing missing at first
		w.mu.Lock()
		w.missing, w.missAlways = 2, true
		w.mu.Unlock()
		// one request of many steps: the engine is never idle while it runs
		const n = 4*busyWarmEvery + 4
		ch, err := s.Submit(context.Background(), Request{Prompt: c.Prompt, MaxTokens: n})
		if err != nil {
			t.Fatal(err)
		}
		got, doneMid := 0, 0
		for ev := range ch {
			if ev.Done {
				break
			}
			if got++; got == n-2 {
				_, _, doneMid = w.state()
			}
		}
		if doneMid != 2 {
			t.Errorf("%d programs recorded while the request ran (%d steps without theirs), want 2: one every %d such steps", doneMid, n-2, busyWarmEvery)
		}
	})
	t.Run("off", func(t *testing.T) {
		w := &slowWarmer{Backend: cpu.New(0), missing: 5}
		s := start(t, w, Config{})
		serve(t, s)
		time.Sleep(30 * time.Millisecond)
		if _, calls, _ := w.state(); calls != 0 {
			t.Errorf("%d warm-up calls without IdleWarm", calls)
		}
	})
	t.Run("a failed recording", func(t *testing.T) {
		w := &slowWarmer{Backend: cpu.New(0), missing: 10, fail: 3}
		s := start(t, w, Config{IdleWarm: true})
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
			if _, calls, _ := w.state(); calls >= 4 {
				break
			}
		}
		time.Sleep(30 * time.Millisecond) // no call after the failed one
		_, calls, done := w.state()
		if done != 3 || calls != 4 {
			t.Errorf("%d recorded in %d calls, want 3 and the failing 4th, then no more", done, calls)
		}
		serve(t, s)
	})
}
