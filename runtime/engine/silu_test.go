package engine_test

import (
	"fmt"
	"testing"

	"github.com/peftd/peftd/runtime/cpu"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
)

// siluCPU is the CPU backend whose programs see engine.LinearSiLUOps:
// LinearSiLU takes every other call (into its own gate/up scratch, then
// SiLUMul of its halves) and declines the rest, counting both, and
// records a call in a step whose adapters change gate or up (which the
// engine must not make).
type siluCPU struct {
	*cpu.Backend
	gateUp, gate, up engine.Buffer
	calls, took      int
	loraGate         bool // the step being run applies adapters to gate or up
	bad              []string
}

func (s *siluCPU) Init(cfg *llama.Config, spec engine.Spec) error {
	if err := s.Backend.Init(cfg, spec); err != nil {
		return err
	}
	var err error
	if s.gateUp, err = s.NewBuffer(spec.MaxTokens, 2*cfg.Intermediate); err != nil {
		return err
	}
	if s.gate, err = s.NewView(s.gateUp, 0, cfg.Intermediate); err != nil {
		return err
	}
	s.up, err = s.NewView(s.gateUp, cfg.Intermediate, cfg.Intermediate)
	return err
}

func (s *siluCPU) Execute(meta *engine.StepMeta, prog engine.Program) error {
	s.loraGate = prog.Shape.LoRA&(1<<llama.Gate|1<<llama.Up) != 0
	return s.Backend.Execute(meta, engine.Program{Shape: prog.Shape, Run: func(o engine.Ops) { prog.Run(siluOps{o, s}) }})
}

// siluOps are a step's ops with LinearSiLU added.
type siluOps struct {
	engine.Ops
	s *siluCPU
}

func (o siluOps) LinearSiLU(act, in engine.Buffer, w engine.Weight) bool {
	s := o.s
	s.calls++
	if s.loraGate {
		s.bad = append(s.bad, fmt.Sprintf("call %d in a step with a gate/up LoRA update", s.calls))
	}
	if s.calls%2 == 1 {
		return false
	}
	s.took++
	o.Linear(s.gateUp, in, w)
	o.SiLUMul(act, s.gate, s.up)
	return true
}

// TestLinearSiLUOps: the engine offers a backend with LinearSiLUOps every
// gate/up product no adapter changes, issues Linear and SiLUMul itself
// where the backend declines, and never offers it in steps whose adapters
// change gate or up; the fixture's cases, one by one and co-batched, stay
// within the reference's limits either way (the CPU backend against
// transformers+PEFT).
func TestLinearSiLUOps(t *testing.T) {
	m, adapters, cases := loadFixture(t)
	b := &siluCPU{Backend: cpu.New(0)}
	e, slots := fixtureEngineOn(t, m, adapters, b)
	for _, c := range cases { // one by one: the cases without an adapter make steps without LoRA
		runCases(t, e, slots, []refCase{c})
	}
	runCases(t, e, slots, cases) // co-batched
	if b.took == 0 || b.took == b.calls {
		t.Errorf("LinearSiLU took %d of %d calls: want some taken and some declined", b.took, b.calls)
	}
	for _, s := range b.bad {
		t.Error(s)
	}
	t.Logf("LinearSiLU: %d calls, %d taken", b.calls, b.took)
}
