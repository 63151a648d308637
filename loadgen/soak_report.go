package loadgen

import (
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"time"
)

// Window is a time span; the zero Window holds nothing.
type Window struct{ Start, End time.Time }

// Overlaps reports whether [start, end] meets w.
func (w Window) Overlaps(start, end time.Time) bool {
	return !w.Start.IsZero() && !start.After(w.End) && !end.Before(w.Start)
}

// Verdict is how a soak sample counts.
type Verdict int

// Verdicts.
const (
	VerdictOK      Verdict = iota // served
	VerdictAllowed                // a cold adapter refused with a 503 naming the store during the outage
	VerdictFailed
)

func (v Verdict) String() string {
	switch v {
	case VerdictOK:
		return "ok"
	case VerdictAllowed:
		return "allowed"
	case VerdictFailed:
		return "failed"
	}
	return fmt.Sprintf("Verdict(%d)", int(v))
}

// Classify judges a sample against the outage window (its grace
// included): a 200 with no error is served; a 503 for a cold adapter that
// overlaps the outage and whose message names the store is allowed;
// anything else — a hot adapter refused, another status, a 503 outside the
// outage or one that does not say the store failed, no response — is a
// failure.
func Classify(s SoakSample, outage Window) Verdict {
	switch {
	case s.Status == http.StatusOK && s.Message == "":
		return VerdictOK
	case s.Status == http.StatusServiceUnavailable && !s.Hot && outage.Overlaps(s.Start, s.End) &&
		strings.Contains(strings.ToLower(s.Message), "store"):
		return VerdictAllowed
	}
	return VerdictFailed
}

// GroupStats are latency percentiles of the served requests of a group.
type GroupStats struct {
	Served   int
	P50, P99 time.Duration
}

// SoakReport is the outcome of a soak run.
type SoakReport struct {
	Duration  time.Duration // of the timed load
	Requests  int           // every request sent, warm-up and recovery included
	Served    int
	Allowed   int         // 503s for cold adapters during the outage
	Failed    int         // everything else
	ByStatus  map[int]int // failures by status (0: no response)
	Examples  []string    // a few failure messages
	AllowedEx string      // one allowed 503's message
	Tokens    int
	TokensPS  float64 // completion tokens per second of the timed load
	Overall   GroupStats
	Hot, Cold GroupStats
	// HotOutage are the hot adapters' requests that overlapped the outage
	// (its grace included); Refusal is how long the allowed 503s took.
	HotOutage, Refusal GroupStats
	// Served requests per second of the timed load before, during and
	// after the outage (by start time; the grace counts as after).
	RateBefore, RateDuring, RateAfter float64
	ByRoute                           map[string]int // requests per route (stream marked "+stream")

	Outage      Window // without the grace
	OutageGrace time.Duration
	OutageErr   string
	// ReserveMet are the requests for reserve (store-only) adapters that
	// met the outage; ReserveServed those served between the return of the
	// command stopping the store and the call of the one restarting it,
	// which only a store that is not down can do.
	ReserveMet, ReserveServed int
	Refused                   []string // cold adapters refused during the outage
	Recovered                 int      // of them, served after the outage
	NotRecovered              []string

	ReplaceID                string
	OldVersion, NewVersion   string
	ReplacedAt               time.Time
	ReplaceErr               string
	ReplacedServed           int // requests for the replaced adapter served after the replacement
	ReplacedFailed           int
	OutputBefore, OutputSame string `json:",omitempty"`

	Start, End  Snapshot
	RSSLimit    int64 // the most RSS may grow (0: not checked)
	Problems    []string
	WarmupTook  time.Duration
	WarmupCount int
}

// OK is true when the soak passed.
func (r *SoakReport) OK() bool { return len(r.Problems) == 0 }

// summarize fills the report from the samples and sets its problems.
func (k *soaker) summarize(r *SoakReport, start, loadEnd time.Time) {
	k.mu.Lock()
	defer k.mu.Unlock()
	w := k.outageLocked()
	r.Outage = k.outage
	var all, hot, cold, hotOut, refusal []time.Duration
	var nBefore, nDuring, nAfter int
	seenMsg := map[string]bool{}
	var replAt time.Time
	if ns := k.replacedAt.Load(); ns != 0 {
		replAt = time.Unix(0, ns)
	}
	for _, s := range k.samples {
		r.Requests++
		route := s.Route
		if s.Stream {
			route += "+stream"
		}
		r.ByRoute[route]++
		v := Classify(s, w)
		if s.Reserve && k.outage.End.After(k.downAt) && (Window{k.outage.Start, k.outage.End}).Overlaps(s.Start, s.End) {
			r.ReserveMet++
			if v == VerdictOK && !s.Start.Before(k.downAt) && !s.End.After(k.upAt) {
				r.ReserveServed++
			}
		}
		if s.Adapter == r.ReplaceID && !replAt.IsZero() && s.Start.After(replAt) {
			if v == VerdictOK {
				r.ReplacedServed++
			} else {
				r.ReplacedFailed++
			}
		}
		switch v {
		case VerdictOK:
			r.Served++
			if s.Phase == PhaseLoad {
				switch {
				case k.outage.Start.IsZero() || s.Start.Before(k.outage.Start):
					nBefore++
				case s.Start.Before(k.outage.End):
					nDuring++
				default:
					nAfter++
				}
			}
			d := s.End.Sub(s.Start)
			all = append(all, d)
			if s.Hot {
				hot = append(hot, d)
				if w.Overlaps(s.Start, s.End) {
					hotOut = append(hotOut, d)
				}
			} else {
				cold = append(cold, d)
			}
			if s.Phase == PhaseLoad {
				r.Tokens += s.Tokens
			}
		case VerdictAllowed:
			r.Allowed++
			refusal = append(refusal, s.End.Sub(s.Start))
			if r.AllowedEx == "" {
				r.AllowedEx = s.Adapter + ": " + s.Message
			}
		default:
			r.Failed++
			r.ByStatus[s.Status]++
			// one example per status and hot/cold, then other messages
			key := fmt.Sprint(s.Status, s.Hot)
			if !seenMsg[key] || (len(r.Examples) < 6 && !seenMsg[key+s.Message]) {
				seenMsg[key], seenMsg[key+s.Message] = true, true
				kind := "cold"
				if s.Hot {
					kind = "hot"
				}
				when := s.Start.Sub(start).Round(100 * time.Millisecond)
				r.Examples = append(r.Examples, fmt.Sprintf("HTTP %d %s %s %s (%s, t=%v): %s", s.Status, s.Route, kind, s.Adapter, s.Phase, when, s.Message))
			}
		}
	}
	r.TokensPS = float64(r.Tokens) / loadEnd.Sub(start).Seconds()
	gs := func(ds []time.Duration) GroupStats {
		st := stats(ds)
		return GroupStats{Served: len(ds), P50: st.P50, P99: st.P99}
	}
	r.Overall, r.Hot, r.Cold, r.HotOutage, r.Refusal = gs(all), gs(hot), gs(cold), gs(hotOut), gs(refusal)
	if o := k.outage; !o.Start.IsZero() && !o.End.IsZero() {
		r.RateBefore = float64(nBefore) / o.Start.Sub(start).Seconds()
		r.RateDuring = float64(nDuring) / o.End.Sub(o.Start).Seconds()
		if d := loadEnd.Sub(o.End).Seconds(); d > 0 {
			r.RateAfter = float64(nAfter) / d
		}
	} else {
		r.RateBefore = float64(nBefore) / loadEnd.Sub(start).Seconds()
	}
	r.Refused = k.refusedLocked()
	for _, a := range r.Refused {
		ok := false
		for _, s := range k.samples {
			if s.Adapter == a && s.Start.After(k.outage.End) && Classify(s, w) == VerdictOK {
				ok = true
				break
			}
		}
		if ok {
			r.Recovered++
		} else {
			r.NotRecovered = append(r.NotRecovered, a)
		}
	}

	// The verdict.
	if r.Failed > 0 {
		r.Problems = append(r.Problems, fmt.Sprintf("%d failed requests", r.Failed))
	}
	if k.cfg.OutageStart != nil {
		switch {
		case r.OutageErr != "":
			r.Problems = append(r.Problems, "the outage commands failed: "+r.OutageErr)
		case k.outage.Start.IsZero() || k.outage.End.IsZero():
			r.Problems = append(r.Problems, "the run ended before the outage was over")
		case k.cfg.Reserve > 0 && r.ReserveMet == 0:
			r.Problems = append(r.Problems, "no request for a store-only (reserve) adapter met the outage")
		case r.ReserveServed > 0:
			r.Problems = append(r.Problems, fmt.Sprintf("%d requests for store-only (reserve) adapters were served while the store was down: was it?", r.ReserveServed))
		}
		if len(r.NotRecovered) > 0 {
			r.Problems = append(r.Problems, fmt.Sprintf("%d adapters refused during the outage were not served after it: %s",
				len(r.NotRecovered), strings.Join(r.NotRecovered[:min(5, len(r.NotRecovered))], ", ")))
		}
	}
	if k.cfg.ReplaceBody != nil {
		switch {
		case r.ReplaceErr != "":
			r.Problems = append(r.Problems, "replacement: "+r.ReplaceErr)
		case r.ReplacedAt.IsZero():
			r.Problems = append(r.Problems, "the run ended before the replacement")
		case r.ReplacedServed == 0:
			r.Problems = append(r.Problems, fmt.Sprintf("no request for %s was served after its replacement", r.ReplaceID))
		}
	}
	if k.cfg.Mem != nil && r.Start.Mem.RSS > 0 && r.End.Mem.RSS > 0 {
		r.RSSLimit = max(int64(k.cfg.MaxRSSGrowth*float64(r.Start.Mem.RSS)), k.cfg.RSSSlack)
		if g := r.End.Mem.RSS - r.Start.Mem.RSS; g > r.RSSLimit {
			r.Problems = append(r.Problems, fmt.Sprintf("server RSS grew by %s (%s -> %s), more than %s", mib(g),
				mib(r.Start.Mem.RSS), mib(r.End.Mem.RSS), mib(r.RSSLimit)))
		}
	}
	if r.Start.GPUUsed >= 0 && r.End.GPUUsed >= 0 {
		if g := r.End.GPUUsed - r.Start.GPUUsed; g > k.cfg.GPUSlack {
			r.Problems = append(r.Problems, fmt.Sprintf("GPU memory grew by %s (%s -> %s), more than %s", mib(g),
				mib(r.Start.GPUUsed), mib(r.End.GPUUsed), mib(k.cfg.GPUSlack)))
		}
	}
	if p := r.End.Counters["peftd_panics_total"]; p > 0 {
		r.Problems = append(r.Problems, fmt.Sprintf("the server recovered from %.0f panics (peftd_panics_total)", p))
	}
}

func mib(b int64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }

// Print writes the report.
func (r *SoakReport) Print(w io.Writer) {
	ms := func(d time.Duration) string { return fmt.Sprintf("%.1f ms", float64(d)/1e6) }
	g := func(name string, s GroupStats) {
		fmt.Fprintf(w, "latency %-12s p50 %s  p99 %s  (%d served)\n", name, ms(s.P50), ms(s.P99), s.Served)
	}
	fmt.Fprintf(w, "== soak report: %.0fs of load", r.Duration.Seconds())
	if r.WarmupCount > 0 {
		fmt.Fprintf(w, " after a %.1fs warm-up (%d adapters)", r.WarmupTook.Seconds(), r.WarmupCount)
	}
	fmt.Fprintln(w)
	routes := make([]string, 0, len(r.ByRoute))
	for k, n := range r.ByRoute {
		routes = append(routes, fmt.Sprintf("%s %d", k, n))
	}
	slices.Sort(routes)
	fmt.Fprintf(w, "requests      %d (%s)\n", r.Requests, strings.Join(routes, ", "))
	fmt.Fprintf(w, "served        %d\n", r.Served)
	fmt.Fprintf(w, "allowed 503s  %d (cold adapters during the outage)", r.Allowed)
	if r.AllowedEx != "" {
		fmt.Fprintf(w, ", e.g. %s", r.AllowedEx)
	}
	fmt.Fprintln(w)
	codes := make([]int, 0, len(r.ByStatus))
	for c := range r.ByStatus {
		codes = append(codes, c)
	}
	slices.Sort(codes)
	var fs []string
	for _, c := range codes {
		name := fmt.Sprint(c)
		if c == 0 {
			name = "no response"
		}
		fs = append(fs, fmt.Sprintf("%s: %d", name, r.ByStatus[c]))
	}
	fmt.Fprintf(w, "failures      %d", r.Failed)
	if len(fs) > 0 {
		fmt.Fprintf(w, " (%s)", strings.Join(fs, ", "))
	}
	fmt.Fprintln(w)
	for _, e := range r.Examples {
		fmt.Fprintf(w, "  e.g. %s\n", e)
	}
	g("overall", r.Overall)
	g("hot", r.Hot)
	g("cold", r.Cold)
	if r.HotOutage.Served > 0 {
		g("hot/outage", r.HotOutage)
	}
	fmt.Fprintf(w, "throughput    %.1f completion tokens/s (%d tokens)\n", r.TokensPS, r.Tokens)
	if !r.Outage.Start.IsZero() {
		fmt.Fprintf(w, "outage        %.1fs (+%v grace): %d requests for store-only adapters met it; %d cold adapters refused, %d of them served after",
			r.Outage.End.Sub(r.Outage.Start).Seconds(), r.OutageGrace, r.ReserveMet, len(r.Refused), r.Recovered)
		if r.Allowed == 0 && r.ReserveMet > 0 {
			fmt.Fprint(w, " (no 503: their store calls outlasted the outage)")
		}
		if r.OutageErr != "" {
			fmt.Fprintf(w, "; error: %s", r.OutageErr)
		}
		fmt.Fprintln(w)
		if r.Refusal.Served > 0 {
			fmt.Fprintf(w, "time to 503   p50 %s  p99 %s  (%d allowed 503s)\n", ms(r.Refusal.P50), ms(r.Refusal.P99), r.Refusal.Served)
		}
		fmt.Fprintf(w, "served/s      %.1f before the outage, %.1f during, %.1f after\n", r.RateBefore, r.RateDuring, r.RateAfter)
	}
	if r.ReplaceID != "" {
		fmt.Fprintf(w, "replacement   %s: version %s -> %s; %d served, %d failed after it", r.ReplaceID, orNone(r.OldVersion), orNone(r.NewVersion),
			r.ReplacedServed, r.ReplacedFailed)
		if r.OutputSame != "" {
			fmt.Fprintf(w, "; same greedy output as before: %s", r.OutputSame)
		}
		if r.ReplaceErr != "" {
			fmt.Fprintf(w, "; error: %s", r.ReplaceErr)
		}
		fmt.Fprintln(w)
	}
	if r.Start.Mem.RSS > 0 {
		fmt.Fprintf(w, "server RSS    start %s, end %s (%+.1f MiB; limit +%s) [anon %s -> %s, file %s -> %s]\n",
			mib(r.Start.Mem.RSS), mib(r.End.Mem.RSS), float64(r.End.Mem.RSS-r.Start.Mem.RSS)/(1<<20), mib(r.RSSLimit),
			mib(r.Start.Mem.RSSAnon), mib(r.End.Mem.RSSAnon), mib(r.Start.Mem.RSSFile), mib(r.End.Mem.RSSFile))
	} else {
		fmt.Fprintln(w, "server RSS    not read (no --pid)")
	}
	if r.Start.GPUUsed >= 0 || r.End.GPUUsed >= 0 {
		fmt.Fprintf(w, "GPU memory    start %s, end %s\n", mib(r.Start.GPUUsed), mib(r.End.GPUUsed))
	} else {
		fmt.Fprintln(w, "GPU memory    not exported (no peftd_gpu_memory_used_bytes: CPU or no NVML)")
	}
	var cs []string
	for _, name := range soakCounters {
		d := r.End.Counters[name] - r.Start.Counters[name]
		cs = append(cs, fmt.Sprintf("%s +%.0f", strings.TrimSuffix(strings.TrimPrefix(name, "peftd_"), "_total"), d))
	}
	fmt.Fprintf(w, "server        %s\n", strings.Join(cs, ", "))
	if r.OK() {
		fmt.Fprintln(w, "PASS")
		return
	}
	for _, p := range r.Problems {
		fmt.Fprintf(w, "FAIL: %s\n", p)
	}
}

func orNone(s string) string {
	if s == "" {
		return "?"
	}
	return s
}
