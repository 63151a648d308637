package sample

import (
	"fmt"
	"slices"
)

// Penalties are the repetition controls and logit bias of OpenAI (and
// vLLM) requests. They change a row's logits before anything else the
// sampler does (temperature, top-k, top-p), and the log-probabilities
// returned are those of the changed logits. The zero value changes nothing.
type Penalties struct {
	// Presence and Frequency (OpenAI, [-2, 2]) lower the logit of every
	// token generated so far: by Presence once, and by Frequency times the
	// number of times it was generated.
	Presence, Frequency float64
	// Repetition (vLLM, > 0; 0 and 1 change nothing) divides the positive
	// logits and multiplies the negative ones of every token of the prompt
	// and the output: above 1 it discourages repeats, below 1 it favours them.
	Repetition float64
	// LogitBias is added to the logit of each token it names ([-100, 100]).
	LogitBias map[int32]float64
}

// MaxBias bounds a logit bias (OpenAI's range).
const MaxBias = 100

// Neutral reports whether p changes nothing.
func (p Penalties) Neutral() bool {
	return p.Presence == 0 && p.Frequency == 0 && (p.Repetition == 0 || p.Repetition == 1) && len(p.LogitBias) == 0
}

// Validate checks the ranges (the token ids of LogitBias against the
// vocabulary are the caller's to check).
func (p Penalties) Validate() error {
	for _, x := range []struct {
		name string
		v    float64
	}{{"presence_penalty", p.Presence}, {"frequency_penalty", p.Frequency}} {
		if !(x.v >= -2 && x.v <= 2) {
			return fmt.Errorf("%w: %s %v outside [-2, 2]", ErrParams, x.name, x.v)
		}
	}
	if !(p.Repetition >= 0 && p.Repetition <= 100) || (p.Repetition > 0 && p.Repetition < 1e-3) {
		return fmt.Errorf("%w: repetition_penalty %v outside (0, 100]", ErrParams, p.Repetition)
	}
	for id, b := range p.LogitBias {
		if id < 0 {
			return fmt.Errorf("%w: logit_bias names token %d", ErrParams, id)
		}
		if !(b >= -MaxBias && b <= MaxBias) {
			return fmt.Errorf("%w: logit_bias of token %d is %v, outside [-%d, %d]", ErrParams, id, b, MaxBias, MaxBias)
		}
	}
	return nil
}

// Adjust changes one token's logit x: x / Rep when x > 0, else x * Rep,
// then + Add.
type Adjust struct {
	Token    int32
	Rep, Add float32
}

// Apply changes logits by adj (each token at most once). Each operation
// is rounded to float32 on its own (no fused multiply-add), as the
// device's logit_adjust does.
func Apply(logits []float32, adj []Adjust) {
	for _, a := range adj {
		x := logits[a.Token]
		if a.Rep != 1 {
			if x > 0 {
				x = float32(x / a.Rep)
			} else {
				x = float32(x * a.Rep)
			}
		}
		logits[a.Token] = float32(x + a.Add)
	}
}

// Tracker keeps a sequence's adjustments up to date as its tokens are
// generated: one entry per token of the prompt (with a repetition
// penalty), the output or the bias, changed in place as counts grow.
type Tracker struct {
	p     Penalties
	adj   []Adjust
	at    map[int32]int // token -> its entry
	count []int32       // times generated, per entry
}

// NewTracker starts the adjustments of a sequence whose prompt is prompt;
// nil when p is neutral (nothing to track). p must be valid.
func NewTracker(p Penalties, prompt []int32) *Tracker {
	if p.Neutral() {
		return nil
	}
	t := &Tracker{p: p, at: map[int32]int{}}
	ids := make([]int32, 0, len(p.LogitBias))
	for id := range p.LogitBias {
		ids = append(ids, id)
	}
	slices.Sort(ids) // a fixed order: the same request gives the same list
	for _, id := range ids {
		t.entry(id, false)
	}
	if t.repeats() {
		for _, id := range prompt {
			t.entry(id, true)
		}
	}
	return t
}

func (t *Tracker) repeats() bool { return t.p.Repetition != 0 && t.p.Repetition != 1 }

// entry is id's entry, made if new; seen: id is in the prompt or output.
func (t *Tracker) entry(id int32, seen bool) int {
	i, ok := t.at[id]
	if !ok {
		i = len(t.adj)
		t.at[id] = i
		t.adj = append(t.adj, Adjust{Token: id, Rep: 1})
		t.count = append(t.count, 0)
		t.set(i)
	}
	if seen && t.repeats() && t.adj[i].Rep == 1 {
		t.adj[i].Rep = float32(t.p.Repetition)
	}
	return i
}

// set recomputes entry i's Add.
func (t *Tracker) set(i int) {
	a := &t.adj[i]
	add := t.p.LogitBias[a.Token]
	if c := t.count[i]; c > 0 {
		add -= t.p.Presence + t.p.Frequency*float64(c)
	}
	a.Add = float32(add)
}

// Static reports whether Adjust stays the same whatever is generated (no
// presence, frequency or repetition penalty: logit bias at most). A nil
// Tracker is static.
func (t *Tracker) Static() bool {
	return t == nil || (t.p.Presence == 0 && t.p.Frequency == 0 && !t.repeats())
}

// Generated counts a new output token.
func (t *Tracker) Generated(id int32) {
	if t.Static() {
		return
	}
	i := t.entry(id, true)
	t.count[i]++
	t.set(i)
}

// Adjust is the current list (nil for a nil Tracker); it changes with the
// next Generated.
func (t *Tracker) Adjust() []Adjust {
	if t == nil {
		return nil
	}
	return t.adj
}
