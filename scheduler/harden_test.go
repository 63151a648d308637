package scheduler

import (
	"context"
	"errors"
	"math"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/peftd/peftd/internal/fixture"
	"github.com/peftd/peftd/runtime/cpu"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/lora"
)

// TestHugeMaxTokens: a client's max tokens near the int limits is refused
// as too long (it used to overflow prompt+max and size a channel by it).
func TestHugeMaxTokens(t *testing.T) {
	s, f := setup(t, engine.Options{MaxTokens: 64, KVBlocks: 64, BlockSize: 4, AdapterSlots: 4}, Config{})
	p := f.Cases[0].Prompt
	for _, n := range []int{math.MaxInt, math.MaxInt - 1, math.MaxInt - len(p) + 1, math.MaxInt32, 1 << 40} {
		if _, err := s.Submit(context.Background(), Request{Prompt: p, MaxTokens: n}); !errors.Is(err, ErrTooLong) {
			t.Errorf("max tokens %d: %v, want ErrTooLong", n, err)
		}
	}
	ch, err := s.Submit(context.Background(), Request{Prompt: p, MaxTokens: 2})
	if err != nil {
		t.Fatal(err)
	}
	if toks, end := collect(t, ch); len(toks) != 2 || end.Err != nil {
		t.Errorf("after the refusals: %d tokens, %v", len(toks), end.Err)
	}
}

// panicky is the CPU backend whose step programs panic after their last op
// while armed.
type panicky struct {
	engine.Backend
	armed atomic.Bool
}

func (p *panicky) Execute(meta *engine.StepMeta, prog engine.Program) error {
	run := prog.Run
	prog.Run = func(o engine.Ops) {
		run(o)
		if p.armed.Load() {
			panic("injected fault")
		}
	}
	return p.Backend.Execute(meta, prog)
}

// TestStepPanicRecovered: a panic inside an engine step fails the requests
// of that step with ErrInternal, is counted, and the scheduler goes on
// serving with every KV page returned.
func TestStepPanicRecovered(t *testing.T) {
	f, err := fixture.Load()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	b := &panicky{Backend: cpu.New(0)}
	e, err := engine.New(f.Model, b, engine.Options{MaxTokens: 64, KVBlocks: 64, BlockSize: 4, AdapterSlots: 4})
	if err != nil {
		t.Fatal(err)
	}
	var panics atomic.Int64
	s := New(e, Static{}, Config{OnPanic: func() { panics.Add(1) }})
	t.Cleanup(s.Close)
	c := f.Cases[0]
	b.armed.Store(true)
	ch, err := s.Submit(context.Background(), Request{Prompt: c.Prompt, MaxTokens: 4})
	if err != nil {
		t.Fatal(err)
	}
	if _, end := collect(t, ch); !errors.Is(end.Err, ErrInternal) {
		t.Fatalf("request in a panicking step ended with %v, want ErrInternal", end.Err)
	}
	if panics.Load() != 1 {
		t.Errorf("OnPanic called %d times, want 1", panics.Load())
	}
	// A panicking engine command answers its caller with ErrInternal.
	if err := s.Do(context.Background(), func(*engine.Engine) error { panic("command fault") }); !errors.Is(err, ErrInternal) {
		t.Errorf("panicking command: %v, want ErrInternal", err)
	}
	b.armed.Store(false)
	ch, err = s.Submit(context.Background(), Request{Prompt: c.Prompt, MaxTokens: len(c.Greedy)})
	if err != nil {
		t.Fatal(err)
	}
	toks, end := collect(t, ch)
	if end.Err != nil || !slices.Equal(toks, c.Greedy) {
		t.Errorf("after the panic: %v %v, want %v", toks, end.Err, c.Greedy)
	}
	var free int
	s.Do(context.Background(), func(e *engine.Engine) error { free = e.FreeBlocks(); return nil })
	if free != 64 {
		t.Errorf("%d of 64 pages free after recovery", free)
	}
	if s.Pending() != 0 {
		t.Errorf("%d requests pending", s.Pending())
	}
}

// TestNonFiniteLogits: an adapter whose scale is +Inf (loaded behind the
// validator's back) makes NaN logits; its request fails with ErrNonFinite
// instead of emitting tokens, and the base model still serves.
func TestNonFiniteLogits(t *testing.T) {
	f, err := fixture.Load()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	e, err := engine.New(f.Model, cpu.New(0), engine.Options{MaxTokens: 64, KVBlocks: 64, BlockSize: 4, AdapterSlots: 4})
	if err != nil {
		t.Fatal(err)
	}
	src := f.Adapters[fixture.AdapterNames[1]]
	bad := *src
	bad.Layers = make([][llama.NumModules]*lora.Pair, len(src.Layers))
	for l, mods := range src.Layers {
		for m, p := range mods {
			if p != nil {
				q := *p
				q.Scale = float32(math.Inf(1))
				bad.Layers[l][m] = &q
			}
		}
	}
	if err := e.LoadAdapter(0, &bad); err != nil {
		t.Fatal(err)
	}
	s := New(e, Static{"inf": 0}, Config{})
	t.Cleanup(s.Close)
	c := f.Cases[0]
	ch, err := s.Submit(context.Background(), Request{Adapter: "inf", Prompt: c.Prompt, MaxTokens: 8})
	if err != nil {
		t.Fatal(err)
	}
	toks, end := collect(t, ch)
	if !errors.Is(end.Err, ErrNonFinite) || len(toks) != 0 {
		t.Errorf("non-finite adapter: %d tokens, %v; want none and ErrNonFinite", len(toks), end.Err)
	}
	ch, _ = s.Submit(context.Background(), Request{Prompt: c.Prompt, MaxTokens: 2})
	if _, end := collect(t, ch); end.Err != nil {
		t.Errorf("base after a non-finite adapter: %v", end.Err)
	}
}

// TestIdleReport: after every sequence is cancelled, the scheduler reports
// a step with nothing running or waiting (gauges must not stay stale).
func TestIdleReport(t *testing.T) {
	var last atomic.Pointer[StepStats]
	s, f := setup(t, engine.Options{MaxTokens: 64, KVBlocks: 64, BlockSize: 4, AdapterSlots: 4},
		Config{OnStep: func(st StepStats) { last.Store(&st) }})
	c := f.Cases[0]
	ctx, cancel := context.WithCancel(context.Background())
	var chans []<-chan Event
	for range 6 {
		ch, err := s.Submit(ctx, Request{Prompt: c.Prompt, MaxTokens: 50})
		if err != nil {
			t.Fatal(err)
		}
		chans = append(chans, ch)
	}
	<-chans[0] // running
	cancel()
	for _, ch := range chans {
		for range ch { // the forwarder closes every channel
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		st := last.Load()
		if st != nil && st.Running == 0 && st.Waiting == 0 && len(st.RunningAdapters) == 0 && st.FreeBlocks == st.TotalBlocks {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("last report after cancelling everything: %+v", st)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// badSlot is a CPU backend whose steps fail with an engine.SlotError, doing
// nothing, when they use slot bad (an adapter whose upload failed after it
// was committed).
type badSlot struct {
	engine.Backend
	bad int
}

func (b *badSlot) Execute(meta *engine.StepMeta, prog engine.Program) error {
	for _, g := range meta.LoRA {
		if g.Slot == b.bad && g.End > g.Start {
			return &engine.SlotError{Slot: b.bad, Err: errors.New("adapter image for slot 1: upload failed")}
		}
	}
	return b.Backend.Execute(meta, prog)
}

// TestSlotErrorFailsOnlyItsRequests: a step that fails for one adapter
// slot ends the requests on that slot, and only them; the others, co-batched
// with them, finish with the reference's tokens, and every page comes back.
func TestSlotErrorFailsOnlyItsRequests(t *testing.T) {
	f, err := fixture.Load()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	e, res := fixtureEngineOn(t, f, &badSlot{Backend: cpu.New(0), bad: 1}, engine.Options{MaxTokens: 256, KVBlocks: 256, BlockSize: 4, AdapterSlots: 4})
	s := New(e, res, Config{})
	t.Cleanup(s.Close)
	type sub struct {
		c  fixture.Case
		ch <-chan Event
	}
	var subs []sub
	for _, c := range f.Cases {
		ch, err := s.Submit(context.Background(), Request{Adapter: c.AdapterName(), Prompt: c.Prompt, MaxTokens: len(c.Greedy)})
		if err != nil {
			t.Fatal(err)
		}
		subs = append(subs, sub{c, ch})
	}
	failed := 0
	for _, x := range subs {
		toks, end := collect(t, x.ch)
		if x.c.AdapterName() == fixture.AdapterNames[1] {
			var se *engine.SlotError
			if !errors.As(end.Err, &se) || se.Slot != 1 {
				t.Errorf("case %d on the bad slot ended with %v, want its SlotError", x.c.ID, end.Err)
			}
			failed++
			continue
		}
		if end.Err != nil || !slices.Equal(toks, x.c.Greedy) {
			t.Errorf("case %d (adapter %q): %v, %v; want the reference's %v", x.c.ID, x.c.AdapterName(), toks, end.Err, x.c.Greedy)
		}
	}
	if failed == 0 {
		t.Fatal("no case used the bad slot: the test shows nothing")
	}
	var free int
	s.Do(context.Background(), func(e *engine.Engine) error { free = e.FreeBlocks(); return nil })
	if free != 256 {
		t.Errorf("%d of 256 pages free at the end", free)
	}
}

// brokenDevice fails every step while broken is set (a device with a
// sticky error, say).
type brokenDevice struct {
	engine.Backend
	broken atomic.Bool
}

func (b *brokenDevice) Execute(meta *engine.StepMeta, prog engine.Program) error {
	if b.broken.Load() {
		return errors.New("device lost")
	}
	return b.Backend.Execute(meta, prog)
}

// TestHealthy: Healthy is nil while steps succeed, and after failStreak
// failed steps in a row reports ErrEngineFailing for FailWindow; a step
// that fails for one slot does not count; one success resets the count.
func TestHealthy(t *testing.T) {
	f, err := fixture.Load()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	b := &brokenDevice{Backend: &badSlot{Backend: cpu.New(0), bad: 1}}
	e, res := fixtureEngineOn(t, f, b, engine.Options{MaxTokens: 256, KVBlocks: 256, BlockSize: 4, AdapterSlots: 4})
	s := New(e, res, Config{FailWindow: 300 * time.Millisecond})
	t.Cleanup(s.Close)
	c := f.Cases[0]
	run := func(adapter string) error {
		t.Helper()
		ch, err := s.Submit(context.Background(), Request{Adapter: adapter, Prompt: c.Prompt, MaxTokens: 1})
		if err != nil {
			t.Fatal(err)
		}
		_, end := collect(t, ch)
		return end.Err
	}
	if err := run(""); err != nil || s.Healthy() != nil {
		t.Fatalf("a good step: %v, healthy %v", err, s.Healthy())
	}
	for range 2 * failStreak { // failures of one slot's adapter only
		if err := run(fixture.AdapterNames[1]); err == nil {
			t.Fatal("a request on the bad slot succeeded")
		}
	}
	if err := s.Healthy(); err != nil {
		t.Errorf("after slot failures: %v, want healthy", err)
	}
	b.broken.Store(true)
	for i := range failStreak {
		if err := run(""); err == nil {
			t.Fatal("a step on the broken device succeeded")
		}
		if err := s.Healthy(); (err != nil) != (i == failStreak-1) {
			t.Errorf("after %d failed steps: healthy %v", i+1, err)
		}
	}
	if err := s.Healthy(); !errors.Is(err, ErrEngineFailing) || !strings.Contains(err.Error(), "device lost") {
		t.Errorf("Healthy = %v, want ErrEngineFailing naming the step's error", err)
	}
	time.Sleep(350 * time.Millisecond) // past FailWindow: tell again
	if err := s.Healthy(); err != nil {
		t.Errorf("after the window: %v", err)
	}
	if err := run(""); err == nil || s.Healthy() == nil {
		t.Errorf("one more failure after the window: %v, healthy %v; want failing at once (still in a row)", err, s.Healthy())
	}
	b.broken.Store(false)
	if err := run(""); err != nil || s.Healthy() != nil {
		t.Errorf("a good step again: %v, healthy %v", err, s.Healthy())
	}
}
