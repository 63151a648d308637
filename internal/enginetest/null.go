// Package enginetest holds engine backends for tests and benchmarks of the
// layers above the engine.
package enginetest

import (
	"fmt"
	"time"

	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/lora"
	"github.com/peftd/peftd/runtime/safetensors"
	"github.com/peftd/peftd/runtime/sample"
)

// Null is an engine backend that computes nothing: steps cost only the
// host work of the layers above it, plus Step of wall time each (a GPU
// step's device time, modeled; 0: none). It samples on the "device"
// (engine.DeviceSampler): a token that depends on the row's counter and
// seed and on the token its row took in, never below 3 (so never a stop
// token of the test models); its logits read as zeros.
//
// Async models a GPU's asynchrony: Execute returns at once, a step runs
// Step of wall time after the one before it ends, and SampleRows or Read
// wait for its end; the step's device time is then Step
// (engine.StepTimer). With Async, Null is an engine.Chainer (unless
// NoChain): a step may be executed before the draws of the one before it
// are waited for, its rows taking those draws (StepMeta.TokenFrom).
//
// Sample models the draw's own device time: a draw runs Sample from the
// step's end or from when it is issued, whichever is later (SampleRows
// issues it when the host asks for the tokens, as the CUDA backend's
// unchained steps do; IssueSample before the next step is executed), and
// the next step starts after it. The step's device time is then Step +
// Sample, the device's wait for the host left out, as the CUDA backend
// reports it.
type Null struct {
	Step    time.Duration
	Sample  time.Duration
	Async   bool
	NoChain bool
	vocab   int
	steps   []*nullStep // executed, not yet waited for (oldest first)
	free    time.Time   // when the modeled device has run everything issued (Async)
	// Idle is the modeled device's time without work (Async): between a
	// step and the one after it, and before a draw issued after its step
	// ended.
	Idle time.Duration
	ring []int32 // the last issued step's draws, by sample row
}

// nullStep is an executed step: its rows' tokens, its logits rows, when it
// ends, and its draws once issued (and when they are done).
type nullStep struct {
	tokens, logitRows []int32
	end, drawn        time.Time
	out               []sample.Choice
}

type nullBuf int

func (b nullBuf) Cols() int { return int(b) }

func (n *Null) Name() string { return "null" }
func (n *Null) Init(cfg *llama.Config, _ engine.Spec) error {
	n.vocab = cfg.VocabSize
	return nil
}
func (n *Null) Upload(string, safetensors.DType, []int, []byte) (engine.Weight, error) {
	return struct{}{}, nil
}
func (n *Null) NewBuffer(_, cols int) (engine.Buffer, error) { return nullBuf(cols), nil }
func (n *Null) NewView(_ engine.Buffer, _, cols int) (engine.Buffer, error) {
	return nullBuf(cols), nil
}
func (n *Null) LoadAdapter(int, *lora.Adapter) error { return nil }
func (n *Null) UnloadAdapter(int) error              { return nil }

func (n *Null) Execute(meta *engine.StepMeta, _ engine.Program) error {
	st := &nullStep{tokens: append([]int32(nil), meta.Tokens...), logitRows: meta.LogitRows, end: time.Now()}
	for r, k := range meta.TokenFrom {
		if k < 0 {
			continue
		}
		if int(k) >= len(n.ring) || len(n.steps) == 0 {
			return fmt.Errorf("null: row %d takes draw %d of a step with %d", r, k, len(n.ring))
		}
		st.tokens[r] = n.ring[k]
	}
	switch {
	case n.Async:
		if n.free.After(st.end) { // the device is busy until then
			st.end = n.free
		} else if !n.free.IsZero() {
			n.Idle += st.end.Sub(n.free)
		}
		st.end = st.end.Add(n.Step)
		n.free = st.end
	case n.Step > 0:
		time.Sleep(n.Step)
	}
	n.steps = append(n.steps, st)
	return nil
}

// front is the oldest step not waited for, after its end.
func (n *Null) front() (*nullStep, error) {
	if len(n.steps) == 0 {
		return nil, fmt.Errorf("null: no step in flight")
	}
	st := n.steps[0]
	time.Sleep(time.Until(st.end))
	return st, nil
}

// StepDeviceTime is Step + Sample, the modeled device time of every step.
func (n *Null) StepDeviceTime() (time.Duration, bool) { return n.Step + n.Sample, n.Step > 0 }
func (n *Null) End() error {
	n.steps = n.steps[:0] // a step that failed, or one read: nothing is in flight after End
	return nil
}
func (n *Null) Close() error { return nil }
func (n *Null) Read(b engine.Buffer, rows int, dst []float32) error {
	if _, err := n.front(); err != nil {
		return err
	}
	clear(dst[:rows*b.Cols()])
	return nil
}

func (n *Null) SampleRows(logits engine.Buffer, rows []engine.RowSample, out []sample.Choice) error {
	if err := n.IssueSample(logits, rows); err != nil {
		return err
	}
	return n.WaitSample(out)
}

// IssueSample draws for the newest step not yet drawn for.
func (n *Null) IssueSample(_ engine.Buffer, rows []engine.RowSample) error {
	var st *nullStep
	for _, s := range n.steps {
		if s.out == nil {
			st = s
			break
		}
	}
	if st == nil {
		return fmt.Errorf("null: no step to draw for")
	}
	st.out = make([]sample.Choice, len(rows))
	st.drawn = st.end // the draw starts when the step has ended and it is issued
	if now := time.Now(); now.After(st.drawn) {
		n.Idle += now.Sub(st.drawn)
		st.drawn = now
	}
	st.drawn = st.drawn.Add(n.Sample)
	if n.Async && st.drawn.After(n.free) {
		n.free = st.drawn
	}
	n.ring = n.ring[:0]
	for i, r := range rows {
		if r.Row < 0 || r.Row >= len(st.logitRows) {
			return fmt.Errorf("null: sample row %d outside %d logits rows", r.Row, len(st.logitRows))
		}
		tok := uint64(st.tokens[st.logitRows[r.Row]])
		id := int32(3 + (r.Counter*7919+r.Seed+tok*31)%uint64(n.vocab-3))
		st.out[i] = sample.Choice{ID: id, Logprob: -1}
		n.ring = append(n.ring, id)
	}
	return nil
}

// WaitSample waits for the oldest step in flight and hands out its draws.
func (n *Null) WaitSample(out []sample.Choice) error {
	st, err := n.front()
	if err != nil {
		return err
	}
	if st.out == nil {
		return fmt.Errorf("null: wait for a step whose draw was not issued")
	}
	time.Sleep(time.Until(st.drawn))
	copy(out, st.out)
	n.steps = n.steps[1:]
	return nil
}

// Chainable: any step, on an Async Null without NoChain.
func (n *Null) Chainable(*engine.StepMeta, engine.Program) bool { return n.Chains() }

// Chains: on an Async Null without NoChain.
func (n *Null) Chains() bool { return n.Async && !n.NoChain }

var (
	_ engine.Backend   = (*Null)(nil)
	_ engine.Chainer   = (*Null)(nil)
	_ engine.StepTimer = (*Null)(nil)
)
