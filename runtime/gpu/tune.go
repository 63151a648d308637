package gpu

import (
	"fmt"
	"slices"
	"time"

	"github.com/peftd/peftd/runtime/cuda"
)

// tuneMinRows is the fewest rows whose products are tuned: below it
// cuBLASLt's first choice was the fastest or within 2% for every 8B
// projection on the H200 (docs/PERFORMANCE.md v0.20, TestFP8AlgoSweep in
// bf16 mode).
const tuneMinRows = 32

// tuneState is Options.TuneGEMMs: whether to tune, whether it ran, and
// what it measured.
type tuneState struct {
	on, done bool
	results  []cuda.TuneResult
	took     time.Duration
}

// TuneStats reports what Options.TuneGEMMs measured (nil when it did not
// run): one result per (rows, weight shape, SM target) tuned, and the time
// it took.
func (b *Backend) TuneStats() ([]cuda.TuneResult, time.Duration) { return b.tune.results, b.tune.took }

// tuneGemms tunes cuBLASLt's algorithm for the bf16 products the recorded
// steps run (Options.TuneGEMMs), once, before the first recording: every
// shape of the layers' projection weights that several layers share, at
// each graph bucket of tuneMinRows rows and more, for every SM count
// target those steps set (all SMs, and the LoRA stream's partition when it
// runs beside the GEMMs). The weights of a shape are taken in turn, so the
// products read them from memory as a step does.
func (b *Backend) tuneGemms() error {
	if !b.tune.on || b.tune.done || b.g.off {
		return nil
	}
	b.tune.done = true
	t0 := time.Now()
	type shape struct{ n, k int }
	var order []shape
	byShape := map[shape][]cuda.DevicePtr{}
	for _, w := range b.weights {
		if !w.proj {
			continue
		}
		sh := shape{w.rows, w.cols}
		if byShape[sh] == nil {
			order = append(order, sh)
		}
		byShape[sh] = append(byShape[sh], w.mem.Ptr())
	}
	// a shape of one layer only would have its products read the weight
	// from L2: it is not tuned
	order = slices.DeleteFunc(order, func(sh shape) bool { return len(byShape[sh]) < 2 })
	var rows []int
	for _, n := range graphBuckets[:bucketIndex(b.g.maxRows)+1] {
		if n >= tuneMinRows {
			rows = append(rows, n)
		}
	}
	maxN, maxK := 0, 0
	for _, sh := range order {
		maxN, maxK = max(maxN, sh.n), max(maxK, sh.k)
	}
	if len(rows) == 0 || maxN == 0 {
		return nil
	}
	T := rows[len(rows)-1]
	in, err := b.ctx.Alloc(2 * T * maxK)
	if err != nil {
		return fmt.Errorf("gpu: tune: %w", err)
	}
	defer in.Free()
	out, err := b.ctx.Alloc(2 * T * maxN)
	if err != nil {
		return fmt.Errorf("gpu: tune: %w", err)
	}
	defer out.Free()
	if err := b.s.Memset8(in.Ptr(), 0x3c, 2*T*maxK); err != nil { // bf16 0x3c3c: ~0.011
		return fmt.Errorf("gpu: tune: %w", err)
	}
	defer b.mm.SetSMTarget(0)
	for _, n := range rows {
		for _, sh := range order {
			targets := []int{0}
			if hold := b.holdFor(n, sh.n, sh.k, false); b.la.on && hold > 0 {
				targets = append(targets, max(1, b.ctx.Device().SMs-hold))
			}
			for _, sms := range targets {
				b.mm.SetSMTarget(sms)
				r, err := b.mm.TuneGemmTN(b.s, out.Ptr(), cuda.R16BF, in.Ptr(), cuda.R16BF, byShape[sh], cuda.R16BF, n, sh.n, sh.k, 8, 5)
				if err != nil {
					return fmt.Errorf("gpu: tune %d rows x [%d, %d]: %w", n, sh.n, sh.k, err)
				}
				b.tune.results = append(b.tune.results, r)
			}
		}
	}
	b.tune.took = time.Since(t0)
	return nil
}
