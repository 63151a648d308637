//go:build cuda

package gpu

import (
	"math"
	"os"
	"slices"
	"sort"
	"testing"
	"time"

	"github.com/peftd/peftd/runtime/cuda"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/sample"
)

// sampleRig is a step of B rows whose logits buffer holds given float32 rows.
type sampleRig struct {
	*rig
	B, V   int
	logits *Buffer
}

func newSampleRig(t *testing.T, B, V int) *sampleRig {
	cfg := testConfig(64, 128, 4, 2, 16, V, 1)
	r := newRig(t, cfg, B, engine.KVSpec{Layers: 1, Blocks: (B+15)/16 + 1, BlockSize: 16, KVHeads: 2, HeadDim: 16})
	lb := r.buffer(B, V)
	var err error
	if lb.f32, err = r.b.ctx.Alloc(B * V * 4); err != nil {
		t.Fatal(err)
	}
	lb.isF32 = true
	return &sampleRig{rig: r, B: B, V: V, logits: lb}
}

// draw uploads rows (B x V) and samples each row with its params.
func (s *sampleRig) draw(rows [][]float32, rs []engine.RowSample) []sample.Choice {
	s.t.Helper()
	flat := make([]float32, 0, s.B*s.V)
	for _, r := range rows {
		flat = append(flat, r...)
	}
	if err := cuda.CopyHtoD(s.b.s, s.logits.f32.Ptr(), flat); err != nil {
		s.t.Fatal(err)
	}
	s.begin(oneSeq(s.B, 16, zeros(s.B)))
	out := make([]sample.Choice, len(rs))
	err := s.b.Run(func() error { return s.b.SampleRows(s.logits, rs, out) })
	if err != nil {
		s.t.Fatal(err)
	}
	s.end()
	return out
}

// randRows is B rows of V normal logits times sc.
func (s *sampleRig) randRows(sc float32) [][]float32 {
	rows := make([][]float32, s.B)
	for i := range rows {
		rows[i] = make([]float32, s.V)
		for j := range rows[i] {
			rows[i][j] = float32(s.rng.NormFloat64()) * sc
		}
	}
	return rows
}

func cpuLogprob(l []float32, id int32) float64 {
	m := math.Inf(-1)
	for _, x := range l {
		m = math.Max(m, float64(x))
	}
	var sum float64
	for _, x := range l {
		sum += math.Exp(float64(x) - m)
	}
	return float64(l[id]) - m - math.Log(sum)
}

// keptProbs is the CPU sampler's kept set and probabilities (sample.draw).
func keptProbs(l []float32, p sample.Params) map[int32]float64 {
	n := len(l)
	idx := make([]int32, n)
	for i := range idx {
		idx[i] = int32(i)
	}
	sort.Slice(idx, func(a, b int) bool {
		if l[idx[a]] != l[idx[b]] {
			return l[idx[a]] > l[idx[b]]
		}
		return idx[a] < idx[b]
	})
	if p.TopK > 0 && p.TopK < n {
		idx = idx[:p.TopK]
	}
	prb := make([]float64, len(idx))
	var sum float64
	for i, id := range idx {
		prb[i] = math.Exp(float64(l[id])/p.Temperature - float64(l[idx[0]])/p.Temperature)
		sum += prb[i]
	}
	if p.TopP > 0 && p.TopP < 1 {
		acc := 0.0
		for i := range prb {
			acc += prb[i] / sum
			if acc >= p.TopP {
				idx, prb = idx[:i+1], prb[:i+1]
				break
			}
		}
		sum = 0
		for _, x := range prb {
			sum += x
		}
	}
	m := map[int32]float64{}
	for i, id := range idx {
		m[id] = prb[i] / sum
	}
	return m
}

// TestDeviceSampleGreedyLogprobs: greedy ids equal the CPU sampler's,
// logprobs (chosen and top-20) within 1e-4, at the 8B vocabulary.
func TestDeviceSampleGreedyLogprobs(t *testing.T) {
	const B, V = 64, 128256
	s := newSampleRig(t, B, V)
	rows := make([][]float32, B)
	rs := make([]engine.RowSample, B)
	for i := range rows {
		rows[i] = make([]float32, V)
		sc := float32(1 + i%7)
		for j := range rows[i] {
			rows[i][j] = float32(s.rng.NormFloat64()) * sc
		}
		if i%5 == 0 { // a tie at the maximum: the first id wins
			m := slices.Max(rows[i])
			rows[i][V-3], rows[i][17] = m, m
		}
		rs[i] = engine.RowSample{Row: i, Params: sample.Params{Logprobs: 1 + i%20}, Seed: uint64(i)}
	}
	got := s.draw(rows, rs)
	worst := 0.0
	for i, c := range got {
		seed := uint64(1)
		p := rs[i].Params
		p.Seed = &seed
		smp, _ := sample.New(p)
		want := smp.Sample(rows[i])
		if c.ID != want.ID {
			t.Errorf("row %d: greedy id %d, CPU %d", i, c.ID, want.ID)
			continue
		}
		worst = max(worst, math.Abs(c.Logprob-want.Logprob))
		if len(c.Top) != len(want.Top) {
			t.Errorf("row %d: %d alternatives, want %d", i, len(c.Top), len(want.Top))
			continue
		}
		for j := range c.Top {
			if c.Top[j].ID != want.Top[j].ID {
				t.Errorf("row %d alt %d: id %d, CPU %d", i, j, c.Top[j].ID, want.Top[j].ID)
			}
			worst = max(worst, math.Abs(c.Top[j].Logprob-want.Top[j].Logprob))
		}
	}
	t.Logf("greedy: %d rows of %d match; worst logprob error %.3g (maxrel=%.3g)", B, V, worst, worst)
	if worst > 1e-4 {
		t.Errorf("logprob error %.3g > 1e-4", worst)
	}
}

// TestDeviceSampleAdjust: rows with penalties and logit bias (a Tracker's
// lists, hundreds of tokens, the top token banned by a bias of -100 on
// some) mixed with rows without: greedy ids equal the CPU sampler's on the
// row changed by sample.Apply, and logprobs (of the changed row) within
// 1e-4.
func TestDeviceSampleAdjust(t *testing.T) {
	const B, V = 16, 32000
	s := newSampleRig(t, B, V)
	rows := s.randRows(3)
	rs := make([]engine.RowSample, B)
	for i := range rows {
		rs[i] = engine.RowSample{Row: i, Params: sample.Params{Logprobs: 5}, Seed: uint64(i)}
		if i%4 == 3 {
			continue // no adjustments
		}
		top := sample.Argmax(rows[i])
		pen := sample.Penalties{Presence: 0.5 * float64(i%3), Frequency: 0.3, Repetition: 1 + 0.1*float64(i%5),
			LogitBias: map[int32]float64{top: -100, int32(i): 7.5}}
		prompt := make([]int32, 300)
		for k := range prompt {
			prompt[k] = int32(s.rng.IntN(V))
		}
		tr := sample.NewTracker(pen, prompt)
		for range 40 {
			tr.Generated(int32(s.rng.IntN(200)))
		}
		rs[i].Adjust = tr.Adjust()
	}
	got := s.draw(rows, rs)
	worst := 0.0
	for i, c := range got {
		row := slices.Clone(rows[i])
		sample.Apply(row, rs[i].Adjust)
		seed := uint64(1)
		p := rs[i].Params
		p.Seed = &seed
		smp, _ := sample.New(p)
		want := smp.Sample(row)
		if c.ID != want.ID {
			t.Errorf("row %d (%d adjustments): greedy id %d, CPU %d", i, len(rs[i].Adjust), c.ID, want.ID)
			continue
		}
		if len(rs[i].Adjust) > 0 && c.ID == sample.Argmax(rows[i]) {
			t.Errorf("row %d: the banned top token %d was drawn", i, c.ID)
		}
		worst = max(worst, math.Abs(c.Logprob-want.Logprob))
		for j := range min(len(c.Top), len(want.Top)) {
			if c.Top[j].ID != want.Top[j].ID {
				t.Errorf("row %d alt %d: id %d, CPU %d", i, j, c.Top[j].ID, want.Top[j].ID)
			}
			worst = max(worst, math.Abs(c.Top[j].Logprob-want.Top[j].Logprob))
		}
	}
	t.Logf("adjusted rows: %d rows match the CPU sampler; worst logprob error %.3g (maxrel=%.3g)", B, worst, worst)
	if worst > 1e-4 {
		t.Errorf("logprob error %.3g > 1e-4", worst)
	}
}

// TestDeviceSampleDistribution: temperature / top-k / top-p draws land only
// in the CPU sampler's kept set and match its probabilities (chi-square);
// seeded draws repeat exactly; logprobs of the drawn tokens within 1e-4.
func TestDeviceSampleDistribution(t *testing.T) {
	const B, V = 256, 2000
	s := newSampleRig(t, B, V)
	cases := []struct {
		name string
		p    sample.Params
		tie  bool
	}{
		{"temp0.7", sample.Params{Temperature: 0.7}, false},
		{"topk40", sample.Params{Temperature: 1, TopK: 40}, false},
		{"topp0.8", sample.Params{Temperature: 1.3, TopP: 0.8}, false},
		{"topk50_topp0.9", sample.Params{Temperature: 0.9, TopK: 50, TopP: 0.9, Logprobs: 3}, false},
		{"ties_topk7", sample.Params{Temperature: 1, TopK: 7}, true},
		{"ties_topp0.5", sample.Params{Temperature: 2, TopP: 0.5}, true},
	}
	for ci, tc := range cases {
		l := make([]float32, V)
		for j := range l {
			l[j] = float32(s.rng.NormFloat64() * 2.5)
			if tc.tie {
				l[j] = float32(math.Round(float64(l[j]))) // many exact ties
			}
		}
		rows := make([][]float32, B)
		for i := range rows {
			rows[i] = l
		}
		kept := keptProbs(l, tc.p)
		counts := map[int32]int{}
		const calls = 40
		n := 0
		var first []sample.Choice
		worst := 0.0
		for c := 0; c < calls; c++ {
			rs := make([]engine.RowSample, B)
			for i := range rs {
				rs[i] = engine.RowSample{Row: i, Params: tc.p, Seed: uint64(1000*ci + 7), Counter: uint64(c*B + i)}
			}
			got := s.draw(rows, rs)
			if c == 0 {
				first = got
			}
			for _, g := range got {
				if _, ok := kept[g.ID]; !ok {
					t.Fatalf("%s: drew token %d outside the CPU kept set (%d tokens)", tc.name, g.ID, len(kept))
				}
				counts[g.ID]++
				n++
				worst = max(worst, math.Abs(g.Logprob-cpuLogprob(l, g.ID)))
			}
		}
		// reproducible: the same (seed, counter) again
		rs := make([]engine.RowSample, B)
		for i := range rs {
			rs[i] = engine.RowSample{Row: i, Params: tc.p, Seed: uint64(1000*ci + 7), Counter: uint64(i)}
		}
		again := s.draw(rows, rs)
		for i := range again {
			if again[i].ID != first[i].ID {
				t.Fatalf("%s: seeded draw %d not reproducible: %d then %d", tc.name, i, first[i].ID, again[i].ID)
			}
		}
		// chi-square over kept tokens, small expectations pooled
		ids := make([]int32, 0, len(kept))
		for id := range kept {
			ids = append(ids, id)
		}
		slices.Sort(ids)
		var chi float64
		df := -1
		var poolE, poolO float64
		for _, id := range ids {
			e := kept[id] * float64(n)
			o := float64(counts[id])
			if e < 5 {
				poolE += e
				poolO += o
				continue
			}
			chi += (o - e) * (o - e) / e
			df++
		}
		if poolE > 0 {
			chi += (poolO - poolE) * (poolO - poolE) / math.Max(poolE, 1)
			df++
		}
		df = max(df, 1)
		limit := float64(df) + 6*math.Sqrt(2*float64(df)) + 10 // far tail (p << 1e-6)
		t.Logf("%s: %d draws over %d kept tokens: chi2 %.1f, df %d (limit %.0f); logprob error %.3g", tc.name, n, len(kept), chi, df, limit, worst)
		if chi > limit {
			t.Errorf("%s: chi-square %.1f > %.0f", tc.name, chi, limit)
		}
		if worst > 1e-4 {
			t.Errorf("%s: logprob error %.3g", tc.name, worst)
		}
	}
}

// TestDeviceSampleTime: the sampling kernel's time for 256 rows of the 8B
// vocabulary (what replaces copying 131 MB of logits to the host).
func TestDeviceSampleTime(t *testing.T) {
	if os.Getenv("PEFTD_SAMPLE_BENCH") == "" {
		t.Skip("set PEFTD_SAMPLE_BENCH=1 to run (scripts/gpu-check.sh does in its tests phase)")
	}
	const B, V = 256, 128256
	s := newSampleRig(t, B, V)
	rows := make([][]float32, B)
	for i := range rows {
		rows[i] = make([]float32, V)
		for j := range rows[i] {
			rows[i][j] = float32(s.rng.NormFloat64() * 3)
		}
	}
	for _, p := range []sample.Params{{}, {Temperature: 0.8}, {Temperature: 0.8, TopP: 0.95}, {Temperature: 0.8, TopK: 50, TopP: 0.9, Logprobs: 5}} {
		rs := make([]engine.RowSample, B)
		for i := range rs {
			rs[i] = engine.RowSample{Row: i, Params: p, Seed: 1, Counter: uint64(i)}
		}
		s.draw(rows, rs) // warm
		var ts []float32
		for k := 0; k < 5; k++ {
			t0 := time.Now()
			s.begin(oneSeq(B, 16, zeros(B)))
			out := make([]sample.Choice, B)
			if err := s.b.Run(func() error { return s.b.SampleRows(s.logits, rs, out) }); err != nil {
				t.Fatal(err)
			}
			s.end()
			ts = append(ts, float32(time.Since(t0).Microseconds()))
		}
		bench("sample %d rows x %d vocab, temp %.1f top_k %d top_p %.2f logprobs %d: %.0f us wall (median of 5)", B, V, p.Temperature, p.TopK, p.TopP, p.Logprobs, median(ts))
	}
}

// TestLaunchOverhead: host time per tiny kernel launch issued from another
// goroutine (one executor hop each, as before engine.Runner) and from inside
// Backend.Run (inline on the CUDA thread, as the engine now issues a step).
func TestLaunchOverhead(t *testing.T) {
	r := newRig(t, testConfig(64, 128, 4, 2, 16, 256, 1), 16, engine.KVSpec{Layers: 1, Blocks: 4, BlockSize: 16, KVHeads: 2, HeadDim: 16})
	b := r.b
	x := r.buffer(1, 256)
	r.fill(x, r.rnd(256, 1))
	const n = 4000
	launch := func() error {
		return b.fn.siluMul.Launch(b.s, cuda.Dim3{X: 1}, cuda.Dim3{X: 256}, 0, x.mem, x.mem, x.mem, uint64(0), uint64(0), uint64(0), 1, 256, 256, 0, uint64(0), uint64(0))
	}
	measure := func(inline bool) float64 {
		if err := launch(); err != nil {
			t.Fatal(err)
		}
		b.s.Synchronize()
		t0 := time.Now()
		loop := func() error {
			for i := 0; i < n; i++ {
				if err := launch(); err != nil {
					return err
				}
			}
			return nil
		}
		var err error
		if inline {
			err = b.Run(loop)
		} else {
			err = loop()
		}
		if err != nil {
			t.Fatal(err)
		}
		host := time.Since(t0)
		if err := b.s.Synchronize(); err != nil {
			t.Fatal(err)
		}
		return float64(host.Nanoseconds()) / 1e3 / n
	}
	var hop, in []float32
	for k := 0; k < 5; k++ {
		hop = append(hop, float32(measure(false)))
		in = append(in, float32(measure(true)))
	}
	bench("launch host us per kernel: hop %.2f, inline (Backend.Run) %.2f (median of 5 x %d launches)", median(hop), median(in), n)
	t.Logf("host us per launch: hop %.2f, inline %.2f", median(hop), median(in))
}

// TestDeviceSampleNonFinite: a row holding NaN or +Inf logits comes back
// with a non-finite logprob (greedy and sampled), which the scheduler turns
// into an error for that request; finite rows beside it are unaffected.
func TestDeviceSampleNonFinite(t *testing.T) {
	const B, V = 8, 4096
	s := newSampleRig(t, B, V)
	rows := s.randRows(1)
	rs := make([]engine.RowSample, B)
	for i := range rows {
		p := sample.Params{}
		if i%2 == 1 {
			p = sample.Params{Temperature: 0.8, TopP: 0.9}
		}
		rs[i] = engine.RowSample{Row: i, Params: p, Seed: uint64(i)}
	}
	nan, inf := float32(math.NaN()), float32(math.Inf(1))
	rows[0][5], rows[1][7] = nan, nan // one NaN
	rows[2][9], rows[3][11] = inf, inf
	for j := range rows[4] { // every logit NaN (an Inf scale)
		rows[4][j], rows[5][j] = nan, nan
	}
	got := s.draw(rows, rs)
	for i, c := range got {
		bad := math.IsNaN(c.Logprob) || math.IsInf(c.Logprob, 0)
		if want := i < 6; bad != want {
			t.Errorf("row %d: logprob %v (non-finite %v, want %v)", i, c.Logprob, bad, want)
		}
	}
}
