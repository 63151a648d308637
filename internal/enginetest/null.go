// Package enginetest holds engine backends for tests and benchmarks of the
// layers above the engine.
package enginetest

import (
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
// seed, never below 3 (so never a stop token of the test models); its
// logits read as zeros.
//
// Async models a GPU's asynchrony: Execute returns at once and the step's
// Step of wall time runs until SampleRows or Read, which wait for its end;
// the step's device time is then Step (engine.StepTimer).
type Null struct {
	Step   time.Duration
	Async  bool
	vocab  int
	issued time.Time // Async: when the step in flight was executed
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
func (n *Null) Execute(*engine.StepMeta, engine.Program) error {
	if n.Async {
		n.issued = time.Now()
	} else if n.Step > 0 {
		time.Sleep(n.Step)
	}
	return nil
}

// wait is the end of the step in flight (Async).
func (n *Null) wait() {
	if n.Async {
		time.Sleep(time.Until(n.issued.Add(n.Step)))
	}
}

// StepDeviceTime is Step, the modeled device time of every step.
func (n *Null) StepDeviceTime() (time.Duration, bool) { return n.Step, n.Step > 0 }
func (n *Null) End() error                            { return nil }
func (n *Null) Close() error                          { return nil }
func (n *Null) Read(b engine.Buffer, rows int, dst []float32) error {
	n.wait()
	clear(dst[:rows*b.Cols()])
	return nil
}
func (n *Null) SampleRows(_ engine.Buffer, rows []engine.RowSample, out []sample.Choice) error {
	n.wait()
	for i, r := range rows {
		out[i] = sample.Choice{ID: int32(3 + (r.Counter*7919+r.Seed)%uint64(n.vocab-3)), Logprob: -1}
	}
	return nil
}

var (
	_ engine.Backend       = (*Null)(nil)
	_ engine.DeviceSampler = (*Null)(nil)
	_ engine.StepTimer     = (*Null)(nil)
)
