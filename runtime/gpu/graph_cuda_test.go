//go:build cuda

package gpu

import (
	"context"
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"testing"

	fx "github.com/peftd/peftd/internal/fixture"
	"github.com/peftd/peftd/runtime/cuda"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/lora"
	"github.com/peftd/peftd/runtime/sample"
)

// graphTol bounds the norm-wise relative difference of a logits row between
// a replayed decode step and the same step run op by op: both are the same
// bf16 kernels, but cuBLASLt may pick another algorithm for the padded row
// count, which changes the float32 summation order.
const graphTol = 1e-2

// TestGraphDecodeMatchesEager runs the same workload on two engines over
// the tiny fixture model, one replaying steps from CUDA graphs and one
// running every op eagerly: prompts of random lengths with the four fixture
// adapters (ranks 8-64, different projections) and the base model
// co-batched (prefill steps of up to 256 rows replay mixed graphs), then
// decode steps over changing subsets of the sequences (so most buckets,
// padding and page tables of every length are used), then mixed steps (new
// prompts beside decode rows), then the same after unloading three adapters
// (the program's LoRA shape changes, a graph is recorded for it) and with
// device sampling. Every logits row must agree within graphTol and the
// greedy choices must match (or be near-ties); after Warmup, steps with all
// adapters loaded need no new recording.
func TestGraphDecodeMatchesEager(t *testing.T) {
	m, adapters, _ := loadFixture(t)
	names := slices.Sorted(maps.Keys(adapters))
	opts := engine.Options{MaxTokens: 512, KVBlocks: 2048, BlockSize: 16, AdapterSlots: len(names)}
	mk := func(eager bool) (*engine.Engine, *Backend) {
		e := newEngineWith(t, m, opts, Options{Eager: eager})
		for i, n := range names {
			if err := e.LoadAdapter(i, adapters[n]); err != nil {
				t.Fatal(err)
			}
		}
		return e, e.Backend().(*Backend)
	}
	eg, gb := mk(false)
	ee, eb := mk(true)
	if err := eg.Warmup(); err != nil {
		t.Fatal(err)
	}
	if err := ee.Warmup(); err != nil {
		t.Fatal(err)
	}
	warm, _ := gb.GraphStats()
	if !gb.preOK {
		t.Fatal("the fixture model's head shape has no attn_prefill: mixed graphs are not tested")
	}
	want := 2 * recordingsPerProgram(gb)
	if few := 2 * (bucketIndex(gb.g.maxRows) - bucketIndex(fewLogitsMinRows) + 1); want != 2*2*(bucketIndex(gb.g.maxRows)+1)+few {
		t.Errorf("logitCaps: %d recordings, want %d (a few-logits mixed one from %d rows)", want, 2*2*(bucketIndex(gb.g.maxRows)+1)+few, fewLogitsMinRows)
	}
	if warm != want {
		t.Errorf("Warmup recorded %d graphs, want %d (two programs x decode and mixed x every bucket up to %d rows, mixed ones of %d rows and more twice: logitCaps)", warm, want, gb.g.maxRows, fewLogitsMinRows)
	}
	if n, _ := eb.GraphStats(); n != 0 {
		t.Errorf("the eager backend recorded %d graphs", n)
	}
	// after the first, Warmup captures without running the padding first
	// (a capture that fails falls back to running first: correct, slower)
	t.Logf("Warmup: %d of %d recordings captured without an eager run first", gb.g.Direct, warm)
	if gb.g.Direct == 0 {
		t.Errorf("Warmup captured none of its %d recordings directly: every one ran the padding eagerly first", warm)
	}
	ctx := context.Background()
	V := m.Config.VocabSize
	rng := rand.New(rand.NewPCG(11, 12))
	const nSeq = 100
	gs, es := make([]*engine.Sequence, nSeq), make([]*engine.Sequence, nSeq)
	slot := make([]int, nSeq)
	var prefG, prefE []engine.Input
	for i := range nSeq {
		gs[i], es[i] = &engine.Sequence{}, &engine.Sequence{}
		slot[i] = i%(len(names)+1) - 1
		toks := make([]int32, 1+rng.IntN(40))
		for k := range toks {
			toks[k] = int32(rng.IntN(V))
		}
		prefG = append(prefG, engine.Input{Seq: gs[i], Tokens: toks, Slot: slot[i]})
		prefE = append(prefE, engine.Input{Seq: es[i], Tokens: toks, Slot: slot[i]})
	}
	worst, rows, ties := 0.0, 0, 0
	compare := func(what string, got, want []float32) {
		r := fx.RelErr(got, want)
		worst = max(worst, r)
		rows++
		if !(r <= graphTol) {
			t.Errorf("%s: graph vs eager relative difference %.3g > %.0e", what, r, graphTol)
		}
		gi, wi := argmax(got), argmax(want)
		if gi != wi {
			if want[wi]-want[gi] > tieTol {
				t.Errorf("%s: graph picks token %d, eager %d (logits %.4f vs %.4f)", what, gi, wi, want[gi], want[wi])
			}
			ties++
		}
	}
	// stepBoth runs one step on each engine (ig on the graph one, ie on the
	// eager one) and returns both steps' logits.
	stepBoth := func(ig, ie []engine.Input) (og, oe [][]float32) {
		og, err := eg.Step(ctx, ig)
		if err != nil {
			t.Fatal(err)
		}
		oe, err = ee.Step(ctx, ie)
		if err != nil {
			t.Fatal(err)
		}
		return og, oe
	}
	// decodeRow appends sequence i's next (random) token to both steps' inputs.
	decodeRow := func(ig, ie *[]engine.Input, i int) {
		tok := int32(rng.IntN(V))
		*ig = append(*ig, engine.Input{Seq: gs[i], Tokens: []int32{tok}, Slot: slot[i]})
		*ie = append(*ie, engine.Input{Seq: es[i], Tokens: []int32{tok}, Slot: slot[i]})
	}
	for lo := 0; lo < nSeq; lo += 10 { // prefill in chunks: mixed graphs up to 256 rows, eager above
		og, oe := stepBoth(prefG[lo:lo+10], prefE[lo:lo+10])
		for k := range og {
			compare(fmt.Sprintf("prefill of seq %d (%d tokens)", lo+k, len(prefG[lo+k].Tokens)), og[k], oe[k])
		}
	}
	step := 0
	decode := func(sizes []int) {
		for _, n := range sizes {
			pick := rng.Perm(nSeq)[:n]
			var ig, ie []engine.Input
			for _, i := range pick {
				decodeRow(&ig, &ie, i)
			}
			og, oe := stepBoth(ig, ie)
			for k, i := range pick {
				compare(fmt.Sprintf("step %d (%d rows) seq %d slot %d", step, n, i, slot[i]), og[k], oe[k])
			}
			step++
		}
	}
	sizes := []int{1, 2, 3, 5, 8, 13, 16, 17, 24, 31, 40, 48, 63, 64, 65, 97, 100, 7, 1}
	decode(sizes)
	decode(sizes)
	// Mixed steps: a few new prompts (2-70 tokens) beside decode rows of
	// older sequences.
	for round := range 6 {
		var ig, ie []engine.Input
		var seqsG []*engine.Sequence
		for range 1 + round%3 {
			toks := make([]int32, 2+rng.IntN(69))
			for k := range toks {
				toks[k] = int32(rng.IntN(V))
			}
			sg, se := &engine.Sequence{}, &engine.Sequence{}
			seqsG = append(seqsG, sg, se)
			sl := rng.IntN(len(names)+1) - 1
			ig = append(ig, engine.Input{Seq: sg, Tokens: toks, Slot: sl})
			ie = append(ie, engine.Input{Seq: se, Tokens: toks, Slot: sl})
		}
		for _, i := range rng.Perm(nSeq)[:10+round*15] {
			decodeRow(&ig, &ie, i)
		}
		og, oe := stepBoth(ig, ie)
		for k := range og {
			compare(fmt.Sprintf("mixed round %d input %d (%d tokens)", round, k, len(ig[k].Tokens)), og[k], oe[k])
		}
		for i := 0; i < len(seqsG); i += 2 {
			eg.Release(seqsG[i])
			ee.Release(seqsG[i+1])
		}
	}
	if rec, rep := gb.GraphStats(); rec != warm || rep < 2*len(sizes)+6 {
		t.Errorf("after the decode and mixed steps: %d graphs recorded (Warmup: %d), %d replays (want >= %d)", rec, warm, rep, 2*len(sizes)+6)
	}
	// A step whose adapters touch fewer projections: another program shape.
	for i := range names[:len(names)-1] {
		for _, e := range []*engine.Engine{eg, ee} {
			if err := e.UnloadAdapter(i); err != nil {
				t.Fatal(err)
			}
		}
	}
	for i := range slot {
		if slot[i] >= 0 && slot[i] < len(names)-1 {
			slot[i] = -1
		}
	}
	decode([]int{9, 9, 33, 100})
	// Device sampling after a replay: same tokens, as both sample the same logits with the same keys.
	var ig, ie []engine.Input
	var sp []engine.Sampling
	for i := range 20 {
		decodeRow(&ig, &ie, i)
		sp = append(sp, engine.Sampling{Params: sample.Params{Temperature: 0}, Seed: uint64(i), Index: uint64(gs[i].Len())})
	}
	cg, err := eg.StepSample(ctx, ig, sp)
	if err != nil {
		t.Fatal(err)
	}
	ce, err := ee.StepSample(ctx, ie, sp)
	if err != nil {
		t.Fatal(err)
	}
	for i := range cg {
		if cg[i].ID != ce[i].ID {
			ties++ // checked as rows above; a greedy flip needs a near-tie
			t.Logf("sampled row %d: graph %d, eager %d", i, cg[i].ID, ce[i].ID)
		}
	}
	for i := range nSeq {
		eg.Release(gs[i])
		ee.Release(es[i])
	}
	if eg.FreeBlocks() != opts.KVBlocks {
		t.Errorf("pages leaked: %d free of %d", eg.FreeBlocks(), opts.KVBlocks)
	}
	rec, rep := gb.GraphStats()
	t.Logf("maxrel=%.3g over %d rows (graph vs eager), %d near-tie flips; %d graphs recorded, %d replays", worst, rows, ties, rec, rep)
}

func argmax(v []float32) int {
	best := 0
	for i, x := range v {
		if x > v[best] {
			best = i
		}
	}
	return best
}

// TestPDLMatchesSerialLaunch: Programmatic Dependent Launch only changes
// when blocks are scheduled, never what they compute: the tiny fixture
// model with its four adapters gives bit-identical logits with it (the
// default on sm_90+) and without it (NoPDL), over prefill, mixed and decode
// steps, eager and replayed; and it is on wherever the card supports it.
func TestPDLMatchesSerialLaunch(t *testing.T) {
	m, adapters, _ := loadFixture(t)
	ep, bp := newMatchEngine(t, m, adapters, Options{})
	es, bs := newMatchEngine(t, m, adapters, Options{NoPDL: true})
	if bs.PDL() {
		t.Fatal("NoPDL backend launches programmatically")
	}
	if d := bp.Device(); d.Major >= 9 && !bp.PDL() {
		t.Errorf("%s (sm_%d%d): Programmatic Dependent Launch is off", d.Name, d.Major, d.Minor)
	}
	if !bp.PDL() {
		t.Skip("this card or driver cannot launch programmatically: nothing to compare")
	}
	matchSteps(t, m, len(adapters), ep, es, "with and without PDL")
}

// TestLoRAVariantsMatch: with each LoRA kernel the defaults take only in
// some steps forced into every step (loraVariants: the rank-32-class
// expands adding in place on sgmv_expand_tc64s, kernelForce.stageOut 1,
// both engines' LoRA serial, where every update adds in place; the bf16
// updates beside the products written by sgmv_expand_tch1s,
// kernelForce.halfStage 1, against sgmv_expand_tch1 in every step), every
// logits row of the prefill, mixed and decode steps (replayed recordings
// and eager steps, adapters in them) is bit-identical to the reference
// engine's (the default kernels, or the variant's alternative forced), and
// each variant ran.
func TestLoRAVariantsMatch(t *testing.T) {
	m, all, _ := loadFixture(t)
	upTo32 := rank32Adapters(t, all)
	type key struct {
		n      int
		serial bool
	}
	defaults := map[key]*engine.Engine{}
	for _, v := range loraVariants {
		adapters := all
		if v.maxRank32 {
			adapters = upTo32
		}
		bo := Options{SerialLoRA: v.serial}
		k := key{len(adapters), v.serial}
		ed, against := defaults[k], "the default kernels"
		if v.ref != nil {
			ed, _ = forcedEngine(t, m, adapters, bo, v.ref)
			against = "its alternative"
		} else if ed == nil {
			ed, _ = newMatchEngine(t, m, adapters, bo)
			defaults[k] = ed
		}
		ev, bv := forcedEngine(t, m, adapters, bo, v.set)
		what := v.name + " and " + against
		if v.serial {
			what += ", LoRA serial"
		}
		matchSteps(t, m, len(adapters), ev, ed, what)
		if v.runs(bv) == 0 {
			t.Errorf("%s: no launch in the recordings or the steps", v.name)
		}
	}
}

// loraVariant is a LoRA kernel choice the defaults take only in some
// steps (or none), with the default kernels' bits: set forces it, runs
// counts its launches; op: it applies to one loraSlices call
// (TestOpLoRAFused), not only to a step's aside updates.
type loraVariant struct {
	name      string
	op        bool
	maxRank32 bool // it applies to the rank-32 class alone (steps of adapters of rank 32 or less)
	serial    bool // its kernel runs only where an update adds in place: TestLoRAVariantsMatch runs LoRA serially (Options.SerialLoRA) in both engines
	set       func(*kernelForce)
	runs      func(*Backend) int
	ref       func(*kernelForce) // the reference engine's setting: the kernel's alternative in every step (nil: the defaults)
}

var loraVariants = []loraVariant{
	{"sgmv_expand_tc64s", true, true, true, func(f *kernelForce) { f.stageOut = 1 }, func(b *Backend) int { return b.expandStageds }, nil},
	{"sgmv_expand_tch1s", false, true, false, func(f *kernelForce) { f.halfStage = 1 }, func(b *Backend) int { return b.halfStageds }, func(f *kernelForce) { f.halfStage = -1 }},
}

// rank32Adapters is the fixture's adapters of rank 32 or less: the rank-32
// class alone, for the kernels only it takes (sgmv_expand_tc64s; the
// fixture's rank-64 adapter puts every step it is in in the rank-64 class:
// tc 2).
func rank32Adapters(t *testing.T, all map[string]*lora.Adapter) map[string]*lora.Adapter {
	t.Helper()
	upTo32 := map[string]*lora.Adapter{}
	for n, a := range all {
		if adapterMaxRank(a) <= 32 {
			upTo32[n] = a
		}
	}
	if len(upTo32) == 0 || len(upTo32) == len(all) {
		t.Fatalf("the fixture's adapters: %d of %d of rank 32 or less, want some but not all", len(upTo32), len(all))
	}
	return upTo32
}

// adapterMaxRank is the largest rank of a's projections.
func adapterMaxRank(a *lora.Adapter) int {
	r := 0
	for _, l := range a.Layers {
		for _, p := range l {
			if p != nil {
				r = max(r, p.Rank)
			}
		}
	}
	return r
}

// TestProgrammaticJoinsMatch: with the LoRA stream's joins recorded as
// programmatic dependencies (kernelForce.pdlJoins modes 1, 2, the default,
// and 3; pdljoin.go) every logits row of the prefill, mixed and decode
// steps, adapters in them, is bit-identical to full joins' (-1), and the
// recordings did retype edges (the driver took them: the mode stayed on).
func TestProgrammaticJoinsMatch(t *testing.T) {
	m, adapters, _ := loadFixture(t)
	ef, bf := newMatchEngine(t, m, adapters, Options{})
	if !bf.PDL() {
		t.Skip("this card or driver cannot launch programmatically: no programmatic joins")
	}
	if err := cuda.EdgesSupported(); err != nil {
		t.Skip(err)
	}
	bf.force.pdlJoins = -1
	bf.g.joins = joinStats{} // the default's recordings, made by newMatchEngine
	if err := bf.dropGraphs(); err != nil {
		t.Fatal(err)
	}
	if err := ef.Warmup(); err != nil {
		t.Fatal(err)
	}
	if bf.g.joins.retyped != 0 {
		t.Errorf("full joins: %d edges made programmatic", bf.g.joins.retyped)
	}
	for _, mode := range []int{1, 0, 3} {
		ej, bj := newMatchEngine(t, m, adapters, Options{})
		bj.force.pdlJoins = mode
		bj.g.joins = joinStats{}
		if err := bj.dropGraphs(); err != nil {
			t.Fatal(err)
		}
		if err := ej.Warmup(); err != nil { // recorded again, retyped
			t.Fatal(err)
		}
		matchSteps(t, m, len(adapters), ej, ef, fmt.Sprintf("programmatic joins (mode %d) and full ones", mode))
		if bj.force.pdlJoins != mode {
			t.Errorf("mode %d: the driver refused a recording with programmatic joins (turned off)", mode)
		}
		if bj.g.joins.retyped == 0 {
			t.Errorf("mode %d: no edge retyped in %d recordings", mode, bj.g.Recorded)
		}
		t.Logf("mode %d: %d edges made programmatic over %d recordings; summed over them: %+v", mode, bj.g.joins.retyped, bj.g.Recorded, bj.g.joins)
	}
}

// TestGraphRowsMatchEager: with Options.GraphRows 512 the steps of 257-512
// rows (prefills of six prompts) replay the 384- and 512-row recordings,
// and every logits row is the same as the eager backend's. The eager
// backend has GraphRows 512 too: it sizes the LoRA update buffer, so both
// run a 420-row step's updates beside their products (with 256, the eager
// one ran them in place: since v0.83 the gate/up update beside its product
// is rounded to bf16 before silu_mul adds it, guHalf, and the two differ
// in the last bits).
func TestGraphRowsMatchEager(t *testing.T) {
	m, adapters, _ := loadFixture(t)
	eg, gb := newMatchEngine(t, m, adapters, Options{GraphRows: 512})
	ee, eb := newMatchEngine(t, m, adapters, Options{Eager: true, GraphRows: 512})
	if eb.la.rows != gb.la.rows {
		t.Fatalf("the LoRA update buffer holds %d rows eager, %d replayed", eb.la.rows, gb.la.rows)
	}
	if gb.g.maxRows != 512 {
		t.Fatalf("GraphRows 512: the largest recording has %d rows", gb.g.maxRows)
	}
	big := 0
	for k := range gb.g.execs {
		if k.rows > defaultGraphRows {
			big++
		}
	}
	if big == 0 {
		t.Fatal("Warmup recorded no graph above 256 rows")
	}
	// one prefill of 6 x 70 = 420 rows (over 256: the 512-row mixed
	// recording) on each engine: it replays, and the logits match
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(7, 8))
	var ig, ie []engine.Input
	for i := range 6 {
		toks := make([]int32, 70)
		for k := range toks {
			toks[k] = int32(rng.IntN(m.Config.VocabSize))
		}
		sl := i%(len(adapters)+1) - 1
		ig = append(ig, engine.Input{Seq: &engine.Sequence{}, Tokens: toks, Slot: sl})
		ie = append(ie, engine.Input{Seq: &engine.Sequence{}, Tokens: toks, Slot: sl})
	}
	_, before := gb.GraphStats()
	og, err := eg.Step(ctx, ig)
	if err != nil {
		t.Fatal(err)
	}
	if _, after := gb.GraphStats(); after != before+1 {
		t.Fatalf("the 420-row prefill replayed %d recordings, want 1", after-before)
	}
	oe, err := ee.Step(ctx, ie)
	if err != nil {
		t.Fatal(err)
	}
	for k := range og {
		if !slices.Equal(og[k], oe[k]) {
			t.Fatalf("420-row prefill, input %d: logits differ replayed and eager (relative %.3g)", k, fx.RelErr(og[k], oe[k]))
		}
	}
	for k := range ig {
		eg.Release(ig[k].Seq)
		ee.Release(ie[k].Seq)
	}
	matchSteps(t, m, len(adapters), eg, ee, "replayed (up to 512 rows) and eager")
	t.Logf("%d recordings above 256 rows", big)
}

// newMatchEngine is an engine on the fixture model with its adapters in
// slots 0.. (sorted by name) and its graphs recorded.
func newMatchEngine(t *testing.T, m *llama.Model, adapters map[string]*lora.Adapter, bo Options) (*engine.Engine, *Backend) {
	t.Helper()
	names := slices.Sorted(maps.Keys(adapters))
	opts := engine.Options{MaxTokens: 512, KVBlocks: 1024, BlockSize: 16, AdapterSlots: len(names)}
	e := newEngineWith(t, m, opts, bo)
	for i, n := range names {
		if err := e.LoadAdapter(i, adapters[n]); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.Warmup(); err != nil {
		t.Fatal(err)
	}
	return e, e.Backend().(*Backend)
}

// forcedEngine is newMatchEngine's engine with set applied to its kernel
// choices and its step graphs recorded again with them.
func forcedEngine(t *testing.T, m *llama.Model, adapters map[string]*lora.Adapter, bo Options, set func(*kernelForce)) (*engine.Engine, *Backend) {
	t.Helper()
	e, b := newMatchEngine(t, m, adapters, bo)
	set(&b.force)
	if err := b.dropGraphs(); err != nil {
		t.Fatal(err)
	}
	if err := e.Warmup(); err != nil {
		t.Fatal(err)
	}
	return e, b
}

// sameLogits runs one step of inputs ip on ep and the same rows is (each
// engine's own sequences) on es and fails unless every logits row is
// bit-identical; it returns the rows compared.
func sameLogits(t *testing.T, ep, es *engine.Engine, ip, is []engine.Input, what string) int {
	t.Helper()
	op, err := ep.Step(context.Background(), ip)
	if err != nil {
		t.Fatal(err)
	}
	ol, err := es.Step(context.Background(), is)
	if err != nil {
		t.Fatal(err)
	}
	for k := range op {
		if j := firstDiff(op[k], ol[k]); j >= 0 {
			t.Fatalf("%s, input %d: logits differ (first at %d: %g, %g; relative %.3g)", what, k, j, op[k][j], ol[k][j], fx.RelErr(op[k], ol[k]))
		}
	}
	return len(op)
}

// matchSteps runs the same prefill, mixed and decode steps (sequences on
// slots -1..adapters-1) on engines ep and es and fails unless every logits
// row is bit-identical.
func matchSteps(t *testing.T, m *llama.Model, adapters int, ep, es *engine.Engine, what string) {
	t.Helper()
	V := m.Config.VocabSize
	rng := rand.New(rand.NewPCG(5, 6))
	const nSeq = 24
	sp, ss := make([]*engine.Sequence, nSeq), make([]*engine.Sequence, nSeq)
	slot := make([]int, nSeq)
	rows := 0
	run := func(step string, ip, is []engine.Input) { rows += sameLogits(t, ep, es, ip, is, step+": "+what) }
	// prompts: 4-300 tokens (eager above 256 rows a step, mixed graphs below)
	for lo := 0; lo < nSeq; lo += 6 {
		var ip, is []engine.Input
		for i := lo; i < lo+6; i++ {
			sp[i], ss[i] = &engine.Sequence{}, &engine.Sequence{}
			slot[i] = i%(adapters+1) - 1
			toks := make([]int32, 4+rng.IntN(70))
			for k := range toks {
				toks[k] = int32(rng.IntN(V))
			}
			ip = append(ip, engine.Input{Seq: sp[i], Tokens: toks, Slot: slot[i]})
			is = append(is, engine.Input{Seq: ss[i], Tokens: toks, Slot: slot[i]})
		}
		run(fmt.Sprintf("prefill of sequences %d-%d", lo, lo+5), ip, is)
	}
	// decode steps over changing subsets (decode graphs)
	for _, n := range []int{1, 5, 16, 24, 9} {
		var ip, is []engine.Input
		for _, i := range rng.Perm(nSeq)[:n] {
			tok := int32(rng.IntN(V))
			ip = append(ip, engine.Input{Seq: sp[i], Tokens: []int32{tok}, Slot: slot[i]})
			is = append(is, engine.Input{Seq: ss[i], Tokens: []int32{tok}, Slot: slot[i]})
		}
		run(fmt.Sprintf("decode of %d", n), ip, is)
	}
	for i := range nSeq {
		ep.Release(sp[i])
		es.Release(ss[i])
	}
	t.Logf("%d logits rows bit-identical %s", rows, what)
}

// recordingsPerProgram is the recordings Warmup makes of one program on b:
// a decode one and the mixed ones (one for each of logitCaps) of every
// bucket.
func recordingsPerProgram(b *Backend) int {
	n := 0
	for _, rows := range graphBuckets[:bucketIndex(b.g.maxRows)+1] {
		n++ // decode
		if b.preOK {
			n += len(b.logitCaps(rows, true))
		}
	}
	return n
}

// TestWarmSomeOneAtATime: WarmSome(1), as the scheduler calls it while
// idle (--warm-graphs idle), records one graph a call, with an adapter on q
// and v loaded, until none is missing: Warmup's graphs (no adapters, and
// adapters on every projection) and those of steps with the loaded adapter
// (q and v); then a prefill and a decode step with it replay without
// recording.
func TestWarmSomeOneAtATime(t *testing.T) {
	m, adapters, cases := loadFixture(t)
	e := newEngineWith(t, m, engine.Options{MaxTokens: 512, KVBlocks: 512, BlockSize: 16, AdapterSlots: 2}, Options{})
	if err := e.LoadAdapter(0, adapters["qv-r8"]); err != nil {
		t.Fatal(err)
	}
	b := e.Backend().(*Backend)
	want := 3 * recordingsPerProgram(b) // three programs
	calls := 0
	for ; calls < 2*want; calls++ { // as the scheduler does: until a call finds nothing to record
		n, left, err := e.WarmSome(1)
		if err != nil {
			t.Fatal(err)
		}
		if n == 0 && left == 0 {
			break
		}
		if n != 1 || left >= want {
			t.Fatalf("call %d: recorded %d, %d left; want 1, and fewer than %d left", calls+1, n, left, want)
		}
	}
	rec, _ := b.GraphStats()
	if calls < want || rec < want || calls > 2*want-1 {
		t.Errorf("%d graphs recorded in %d calls, want %d in as many (more only where a moved buffer dropped some)", rec, calls, want)
	}
	seq := &engine.Sequence{}
	if _, err := e.Step(context.Background(), []engine.Input{{Seq: seq, Tokens: cases[0].Prompt, Slot: 0}}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.Step(context.Background(), []engine.Input{{Seq: seq, Tokens: []int32{1}, Slot: 0}}); err != nil {
		t.Fatal(err)
	}
	if rec2, rep := b.GraphStats(); rec2 != rec || rep < 1 {
		t.Errorf("after a prefill and a decode step: %d recorded (want %d: none new), %d replayed", rec2, rec, rep)
	}
	e.Release(seq)
}

// TestRecordIdle: with Options.RecordIdle a step whose graph is missing
// runs its ops eagerly in the graph's layout (the same logits as an engine
// that records and replays, bit for bit), records nothing and says so
// through MissedRecording; after WarmSome, the same steps replay.
func TestRecordIdle(t *testing.T) {
	m, adapters, cases := loadFixture(t)
	opts := engine.Options{MaxTokens: 512, KVBlocks: 512, BlockSize: 16, AdapterSlots: 2}
	idle := newEngineWith(t, m, opts, Options{RecordIdle: true})
	ref := newEngineWith(t, m, opts, Options{})
	for _, e := range []*engine.Engine{idle, ref} {
		if err := e.LoadAdapter(0, adapters["qv-r8"]); err != nil {
			t.Fatal(err)
		}
	}
	b := idle.Backend().(*Backend)
	// a prefill step and two decode steps, on both engines
	run := func(e *engine.Engine) [][]float32 {
		t.Helper()
		seq := &engine.Sequence{}
		defer e.Release(seq)
		var all [][]float32
		for _, toks := range [][]int32{cases[0].Prompt, {1}, {2}} {
			out, err := e.Step(context.Background(), []engine.Input{{Seq: seq, Tokens: toks, Slot: 0}})
			if err != nil {
				t.Fatal(err)
			}
			all = append(all, out...)
		}
		return all
	}
	same := func(what string, got, want [][]float32) {
		t.Helper()
		if len(got) != len(want) {
			t.Fatalf("%s: %d logit rows, want %d", what, len(got), len(want))
		}
		for i := range got {
			if !slices.Equal(got[i], want[i]) {
				t.Fatalf("%s: logit row %d differs from the recording engine's", what, i)
			}
		}
	}
	want := run(ref)
	same("before WarmSome", run(idle), want)
	if rec, rep := b.GraphStats(); rec != 0 || rep != 0 {
		t.Errorf("RecordIdle steps recorded %d and replayed %d graphs, want none", rec, rep)
	}
	if !idle.MissedRecording() {
		t.Error("MissedRecording: false after steps without their graphs")
	}
	if idle.MissedRecording() {
		t.Error("MissedRecording: true twice for the same steps")
	}
	if _, _, err := idle.WarmSome(0); err != nil {
		t.Fatal(err)
	}
	rec, _ := b.GraphStats()
	same("after WarmSome", run(idle), want)
	if rec2, rep := b.GraphStats(); rec2 != rec || rep < 2 {
		t.Errorf("after WarmSome: %d recorded (want %d: none new), %d replayed (want the decode steps at least)", rec2, rec, rep)
	}
	if idle.MissedRecording() {
		t.Error("MissedRecording: true after steps that replayed their graphs")
	}
}
