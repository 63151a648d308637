package scheduler

import (
	"context"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/peftd/peftd/internal/enginetest"
	"github.com/peftd/peftd/internal/fixture"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/sample"
)

// BenchmarkSchedulerHost measures the host work of serving, per engine step,
// with a backend that computes nothing (nullBackend): 64 clients in a closed
// loop, each request a 128-token prompt and 64 new tokens, over the base
// model and the four fixture adapters; 256 requests per iteration (the
// serve8b load). host_us/step is what a GPU step must hide, or what is
// added to it when the host is the bottleneck.
func BenchmarkSchedulerHost(b *testing.B) {
	f, err := fixture.Load()
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	opts := engine.DefaultOptions()
	opts.AdapterSlots = len(fixture.AdapterNames)
	e, err := engine.New(f.Model, &enginetest.Null{}, opts)
	if err != nil {
		b.Fatal(err)
	}
	defer e.Close()
	res := Static{}
	for i, n := range fixture.AdapterNames {
		if err := e.LoadAdapter(i, f.Adapters[n]); err != nil {
			b.Fatal(err)
		}
		res[n] = i
	}
	var steps, rows int
	var mu sync.Mutex
	s := New(e, res, Config{MaxQueue: 1024, OnStep: func(st StepStats) {
		if st.Rows > 0 {
			mu.Lock()
			steps++
			rows += st.Rows
			mu.Unlock()
		}
	}})
	defer s.Close()
	const clients, perClient, prompt, maxTok = 64, 4, 128, 64
	models := append([]string{""}, fixture.AdapterNames...)
	b.ResetTimer()
	t0 := time.Now()
	for range b.N {
		closedLoop(b, s, clients, perClient, prompt, maxTok, f.Model.Config.VocabSize, models)
	}
	el := time.Since(t0)
	b.StopTimer()
	mu.Lock()
	defer mu.Unlock()
	if steps > 0 {
		b.ReportMetric(float64(el.Microseconds())/float64(steps), "host_us/step")
		b.ReportMetric(float64(rows)/float64(steps), "rows/step")
		b.ReportMetric(float64(b.N*clients*perClient*maxTok)/el.Seconds(), "tok/s")
	}
}

// closedLoop runs clients goroutines that each submit perClient requests in
// turn (prompt token ids of the given length, maxTok new tokens, adapters
// round-robin over models) and read every token; each request must get
// maxTok tokens (the null backend never picks a stop token).
func closedLoop(b testing.TB, s *Scheduler, clients, perClient, prompt, maxTok, vocab int, models []string) (ttft []time.Duration) {
	V := int32(vocab)
	var mu sync.Mutex
	var wg sync.WaitGroup
	for c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for r := range perClient {
				p := make([]int32, prompt)
				for i := range p {
					p[i] = 3 + int32(c*131+r*17+i)%(V-3)
				}
				t0 := time.Now()
				ch, err := s.Submit(context.Background(), Request{Adapter: models[(c+r)%len(models)], Prompt: p, MaxTokens: maxTok})
				if err != nil {
					b.Error(err)
					return
				}
				n := 0
				for ev := range ch {
					if n == 0 && !ev.Done {
						mu.Lock()
						ttft = append(ttft, time.Since(t0))
						mu.Unlock()
					}
					if ev.Done {
						if ev.Err != nil {
							b.Error(ev.Err)
						}
						break
					}
					n++
				}
				if n != maxTok {
					b.Errorf("request got %d tokens, want %d", n, maxTok)
				}
			}
		}()
	}
	wg.Wait()
	return ttft
}

// BenchmarkSchedulerModeled serves serve8b's load in process (64 clients in
// a closed loop, 128-token prompts, 64 new tokens, 384 requests an
// iteration) on a backend whose every step takes 6 ms (the H200's FP8 step
// at ~115 rows): whether the scheduler keeps every client in the batch
// (seqs/step, decodes/step: 64 at most), and the host time each step adds
// (plan, prepare, emit). sync: Execute takes the 6 ms, so nothing overlaps
// it; async: the step runs until its tokens are read, as on a GPU, so the
// next step's planning overlaps it (step.go), and steps chain (the next
// launched behind the one in flight); late: as the CUDA backend without
// --chain-steps, the draw (0.4 ms) issued when the host asks for the
// tokens, no chaining; chained: the same draw, steps chained (--chain-steps).
// tok/s is what the load would reach if the device took 6 ms a step and
// the HTTP path cost nothing; ttft_p50_ms is the median time from Submit
// to the first token.
func BenchmarkSchedulerModeled(b *testing.B) {
	const step, draw = 6 * time.Millisecond, 400 * time.Microsecond
	for _, v := range []struct {
		name string
		null enginetest.Null
	}{
		{"sync", enginetest.Null{Step: step}},
		{"async", enginetest.Null{Step: step, Async: true}},
		{"late", enginetest.Null{Step: step, Sample: draw, Async: true, NoChain: true}},
		{"chained", enginetest.Null{Step: step, Sample: draw, Async: true}},
	} {
		b.Run(v.name, func(b *testing.B) { benchModeled(b, v.null) })
	}
}

func benchModeled(b *testing.B, null enginetest.Null) {
	f, err := fixture.Load()
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	nl := &null
	e := nullEngine(b, f, nl, 4096)
	var sum StepStats
	var steps, ahead, chained int
	var mu sync.Mutex
	s := New(e, Static{}, Config{MaxQueue: 1024, OnStep: func(st StepStats) {
		if st.Rows == 0 {
			return
		}
		mu.Lock()
		steps++
		if st.Ahead {
			ahead++
		}
		if st.Chained {
			chained++
		}
		sum.Rows += st.Rows
		sum.Sequences += st.Sequences
		sum.Decode += st.Decode
		sum.Plan += st.Plan
		sum.Prepare += st.Prepare
		sum.Issue += st.Issue
		sum.Emit += st.Emit
		mu.Unlock()
	}})
	defer s.Close()
	const clients, perClient, prompt, maxTok = 64, 6, 128, 64
	var ttft []time.Duration
	b.ResetTimer()
	t0 := time.Now()
	for range b.N {
		ttft = append(ttft, closedLoop(b, s, clients, perClient, prompt, maxTok, f.Model.Config.VocabSize, []string{""})...)
	}
	el := time.Since(t0)
	b.StopTimer()
	mu.Lock()
	defer mu.Unlock()
	if steps == 0 {
		return
	}
	per := func(x int) float64 { return float64(x) / float64(steps) }
	us := func(d time.Duration) float64 { return float64(d.Microseconds()) / float64(steps) }
	b.ReportMetric(per(sum.Sequences), "seqs/step")
	b.ReportMetric(per(sum.Decode), "decodes/step")
	b.ReportMetric(per(sum.Rows), "rows/step")
	b.ReportMetric(per(ahead), "ahead/step")
	b.ReportMetric(per(chained), "chained/step")
	b.ReportMetric(us(nl.Idle), "idle_us/step")
	b.ReportMetric(us(sum.Plan), "plan_us")
	b.ReportMetric(us(sum.Prepare), "prepare_us")
	b.ReportMetric(us(sum.Emit), "emit_us")
	b.ReportMetric(float64(el.Microseconds())/1000/float64(steps), "ms/step")
	b.ReportMetric(float64(b.N*clients*perClient*maxTok)/el.Seconds(), "tok/s")
	slices.Sort(ttft)
	if len(ttft) > 0 {
		b.ReportMetric(float64(ttft[len(ttft)/2].Microseconds())/1000, "ttft_p50_ms")
	}
}

// nullEngine is an engine on the fixture's model over n with blocks KV
// pages, closed when the test ends.
func nullEngine(tb testing.TB, f *fixture.Fixture, n *enginetest.Null, blocks int) *engine.Engine {
	tb.Helper()
	opts := engine.DefaultOptions()
	opts.KVBlocks = blocks
	e, err := engine.New(f.Model, n, opts)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { e.Close() })
	return e
}

// TestModeledAsyncSteps runs a closed loop on the modeled GPU backend
// (enginetest.Null with Async: a step runs until its tokens are read), where
// the next step is planned while the one in flight runs: every request
// gets all its tokens, most steps are planned ahead, every page comes back.
func TestModeledAsyncSteps(t *testing.T) {
	f, err := fixture.Load()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	const blocks = 1024
	e := nullEngine(t, f, &enginetest.Null{Step: time.Millisecond, Async: true}, blocks)
	var steps, ahead atomic.Int64
	count := countAhead(&ahead)
	s := New(e, Static{}, Config{OnStep: func(st StepStats) {
		if st.Rows > 0 {
			steps.Add(1)
		}
		count(st)
	}})
	defer s.Close()
	ttft := closedLoop(t, s, 16, 3, 40, 24, f.Model.Config.VocabSize, []string{""})
	if len(ttft) != 16*3 {
		t.Errorf("%d first tokens, want %d", len(ttft), 16*3)
	}
	if a, n := ahead.Load(), steps.Load(); a*2 < n {
		t.Errorf("%d of %d steps planned ahead", a, n)
	}
	if free := freeBlocks(s); free != blocks {
		t.Errorf("%d of %d pages free", free, blocks)
	}
}

// TestModeledLateSampling: on a modeled GPU that draws the tokens only
// when the host asks for them (the CUDA backend's unchained path), steps
// planned ahead keep their pace: a step lasts about its device time, the
// forward plus the draw. The plan of the next step waits until shortly
// before the step in flight should end (planDelay, from the device time).
// On the H200 that margin was an eighth of the device time, and the device
// time counted the device's wait for the host, so each late plan made the
// next one later: steps settled at 11.4 ms for 8.1 ms of work
// (docs/PERFORMANCE.md v0.20). In this model, with the wait counted and an
// eighth's margin, the median step took 10.3 ms for 5 ms of work; now
// (the wait not counted, a quarter's margin) 5.4-5.7.
func TestModeledLateSampling(t *testing.T) {
	if testing.Short() {
		t.Skip("a closed loop of modeled steps")
	}
	f, err := fixture.Load()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	const step, draw = 4 * time.Millisecond, time.Millisecond
	e := nullEngine(t, f, &enginetest.Null{Step: step, Sample: draw, Async: true, NoChain: true}, 1024)
	var mu sync.Mutex
	var durs []time.Duration
	s := New(e, Static{}, Config{OnStep: func(st StepStats) {
		if st.Rows > 0 && st.Ahead {
			mu.Lock()
			durs = append(durs, st.Duration)
			mu.Unlock()
		}
	}})
	defer s.Close()
	closedLoop(t, s, 16, 2, 40, 32, f.Model.Config.VocabSize, []string{""})
	mu.Lock()
	defer mu.Unlock()
	if len(durs) < 20 {
		t.Fatalf("%d steps planned ahead, want >= 20", len(durs))
	}
	slices.Sort(durs)
	med, want := durs[len(durs)/2], step+draw
	t.Logf("%d steps planned ahead: median %v from launch to tokens (device %v)", len(durs), med, want)
	if med > want*7/5 {
		t.Errorf("median step %v from launch to tokens, device time %v: the plan of the next step is late", med, want)
	}
}

// TestChainedMatchesUnchained: on the modeled GPU backend, whose draws
// depend on each row's input token, steps launched before the tokens of
// the step before them are back (their decode rows reading those tokens
// on the "device") give every request exactly the tokens that steps
// launched after them give: with stop tokens met while the next step is
// already queued (its rows for them are dropped), and with penalties
// (never chained: they need the token on the host).
func TestChainedMatchesUnchained(t *testing.T) {
	f, err := fixture.Load()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	V := int32(f.Model.Config.VocabSize)
	type req struct {
		prompt []int32
		max    int
		stop   []int32
		pen    bool
	}
	var reqs []req
	for i := range 24 {
		p := make([]int32, 10+i%7)
		for j := range p {
			p[j] = 3 + int32(i*37+j*11)%(V-3)
		}
		reqs = append(reqs, req{prompt: p, max: 6 + i%9, pen: i%5 == 0})
	}
	run := func(noChain bool, reqs []req) (out [][]int32, chained, steps int) {
		const blocks = 512
		e := nullEngine(t, f, &enginetest.Null{Step: 300 * time.Microsecond, Async: true, NoChain: noChain}, blocks)
		var nc, ns atomic.Int64
		s := New(e, Static{}, Config{OnStep: func(st StepStats) {
			if st.Chained {
				nc.Add(1)
			}
			if st.Rows > 0 {
				ns.Add(1)
			}
		}})
		defer s.Close()
		out = make([][]int32, len(reqs))
		var wg sync.WaitGroup
		for i, r := range reqs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				seed := uint64(1000 + i)
				sp := sample.Params{Seed: &seed}
				if r.pen {
					sp.Penalties.Frequency = 0.5
				}
				ch, err := s.Submit(context.Background(), Request{Prompt: r.prompt, MaxTokens: r.max, Stop: r.stop, Sampling: sp})
				if err != nil {
					t.Error(err)
					return
				}
				for ev := range ch {
					if ev.Done {
						if ev.Err != nil {
							t.Errorf("request %d: %v", i, ev.Err)
						}
						break
					}
					out[i] = append(out[i], ev.Token.ID)
				}
			}()
		}
		wg.Wait()
		if free := freeBlocks(s); free != blocks {
			t.Errorf("noChain %v: %d of %d pages free", noChain, free, blocks)
		}
		return out, int(nc.Load()), int(ns.Load())
	}
	want, _, _ := run(true, reqs)
	// stop tokens met mid-way: the third token of every other request
	for i := range reqs {
		if i%2 == 1 && len(want[i]) > 3 {
			reqs[i].stop = []int32{want[i][2]}
			want[i] = want[i][:slices.Index(want[i], want[i][2])+1]
		}
	}
	got, chained, steps := run(false, reqs)
	for i := range reqs {
		if !slices.Equal(got[i], want[i]) {
			t.Errorf("request %d (stop %v, penalties %v): chained %v, unchained %v", i, reqs[i].stop, reqs[i].pen, got[i], want[i])
		}
	}
	if chained == 0 {
		t.Errorf("no step of %d was chained", steps)
	}
	t.Logf("%d of %d steps chained", chained, steps)
}
