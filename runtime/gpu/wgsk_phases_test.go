package gpu

import (
	"fmt"
	"slices"
	"strings"
	"testing"
)

// wgskTimes is WK_TIMES (kernels/wgsk.cuh): the values fp8_wgsk stamps a
// block when its times argument is set (wgskProduct.times).
const wgskTimes = 8

// wgskPhaseSummary is one fp8_wgsk launch's phases from its blocks' stamps
// (wgskPhases), microseconds.
type wgskPhaseSummary struct {
	blocks, summers int        // blocks; those that summed a shared tile at their end
	total           float64    // the first block's start to the last block's end
	startSpread     float64    // the last block's start after the first's
	firstStage      float64    // median: start to the first stage landed
	loop            [3]float64 // min, median, max: start to the last stage's products done
	count           float64    // median, blocks whose last tile is shared: last stage done to the tile's partials all counted in (its store, its count, the wait for the others')
	sum             [2]float64 // median, max, summers: count done to end
	summerEnd       float64    // median end of the summers, from the first start
	otherEnd        float64    // median end of the others, from the first start
	flushes         float64    // median time in the flushes before the last
}

// wgskPhases summarizes ts, WK_TIMES globaltimer stamps a block as
// wgsk_body writes them: start, first stage landed, last stage done, last
// count done, end (nanoseconds, in that order), flags (1: last tile
// shared, 2: summed it), the earlier flushes' nanoseconds, stages.
func wgskPhases(ts []uint64) (wgskPhaseSummary, error) {
	var s wgskPhaseSummary
	if len(ts) == 0 || len(ts)%wgskTimes != 0 {
		return s, fmt.Errorf("wgsk phases: %d values, not whole blocks of %d", len(ts), wgskTimes)
	}
	s.blocks = len(ts) / wgskTimes
	first, lastEnd, lastStart := ts[0], ts[4], ts[0]
	for b := range s.blocks {
		p := ts[b*wgskTimes : (b+1)*wgskTimes]
		if p[7] == 0 || p[0] == 0 || p[5] > 3 {
			return s, fmt.Errorf("wgsk phases: block %d not stamped (stages %d, start %d, flags %d)", b, p[7], p[0], p[5])
		}
		for i := 1; i < 5; i++ {
			if p[i] < p[i-1] {
				return s, fmt.Errorf("wgsk phases: block %d's stamp %d (%d ns) before stamp %d (%d)", b, i, p[i], i-1, p[i-1])
			}
		}
		first, lastStart, lastEnd = min(first, p[0]), max(lastStart, p[0]), max(lastEnd, p[4])
	}
	us := func(ns uint64) float64 { return float64(ns) / 1e3 }
	med := func(v []float64) float64 {
		if len(v) == 0 {
			return 0
		}
		slices.Sort(v)
		return v[len(v)/2]
	}
	var firstStage, loop, count, sum, summerEnd, otherEnd, flushes []float64
	for b := range s.blocks {
		p := ts[b*wgskTimes : (b+1)*wgskTimes]
		firstStage = append(firstStage, us(p[1]-p[0]))
		loop = append(loop, us(p[2]-p[0]))
		flushes = append(flushes, us(p[6]))
		if p[5]&1 != 0 {
			count = append(count, us(p[3]-p[2]))
		}
		if p[5]&2 != 0 {
			sum = append(sum, us(p[4]-p[3]))
			summerEnd = append(summerEnd, us(p[4]-first))
		} else {
			otherEnd = append(otherEnd, us(p[4]-first))
		}
	}
	s.summers = len(sum)
	s.total, s.startSpread = us(lastEnd-first), us(lastStart-first)
	s.firstStage, s.count, s.flushes = med(firstStage), med(count), med(flushes)
	s.loop = [3]float64{slices.Min(loop), med(loop), slices.Max(loop)}
	if len(sum) > 0 {
		s.sum = [2]float64{med(sum), slices.Max(sum)}
	}
	s.summerEnd, s.otherEnd = med(summerEnd), med(otherEnd)
	return s, nil
}

func (s wgskPhaseSummary) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%d blocks, %.1f us in all (starts within %.1f): first stage %.1f, loop %.1f / %.1f / %.1f (min / median / max), earlier flushes %.1f, last count %.1f; ",
		s.blocks, s.total, s.startSpread, s.firstStage, s.loop[0], s.loop[1], s.loop[2], s.flushes, s.count)
	fmt.Fprintf(&b, "%d summed a tile in %.1f (max %.1f), ending at %.1f against the others' %.1f", s.summers, s.sum[0], s.sum[1], s.summerEnd, s.otherEnd)
	return b.String()
}

func TestWgskPhases(t *testing.T) {
	// three blocks: one whole last tile, one shared, one that summed it
	block := func(start, first, done, counted, end, flags, flushNs, stages uint64) []uint64 {
		return []uint64{start, first, done, counted, end, flags, flushNs, stages}
	}
	ts := slices.Concat(
		block(1000, 3000, 41000, 41000, 42000, 0, 0, 27),
		block(2000, 4000, 43000, 45000, 45000, 1, 2000, 27),
		block(1500, 3500, 42000, 46000, 70000, 3, 1000, 27),
	)
	s, err := wgskPhases(ts)
	if err != nil {
		t.Fatal(err)
	}
	want := wgskPhaseSummary{blocks: 3, summers: 1, total: 69, startSpread: 1, firstStage: 2,
		loop: [3]float64{40, 40.5, 41}, count: 4, sum: [2]float64{24, 24}, summerEnd: 69, otherEnd: 44, flushes: 1}
	if s != want {
		t.Fatalf("got  %+v\nwant %+v", s, want)
	}
	if !strings.Contains(s.String(), "1 summed a tile in 24.0") {
		t.Fatalf("summary line: %s", s)
	}
	for name, bad := range map[string][]uint64{
		"partial block": ts[:12],
		"unstamped":     slices.Concat(ts[:8], make([]uint64, 8)),
		"out of order":  block(1000, 900, 2000, 2000, 3000, 0, 0, 1),
		"bad flags":     block(1000, 1100, 2000, 2000, 3000, 4, 0, 1),
	} {
		if _, err := wgskPhases(bad); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
}
