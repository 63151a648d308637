package engine_test

import (
	"fmt"
	"testing"

	"github.com/peftd/peftd/runtime/cpu"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
)

// fusedCPU is the CPU backend whose programs see engine.LinearSiLUOps and
// engine.LinearAddRMSNormOps: LinearSiLU takes every other call and
// LinearAddRMSNorm every third (as their two ops: LinearSiLU into its own
// gate/up scratch, then SiLUMul of its halves) and declines the rest, counting both, and records a call
// in a step whose adapters change the product (which the engine must not
// make).
type fusedCPU struct {
	*cpu.Backend
	gateUp, gate, up engine.Buffer
	lora             uint32 // the step being run's adapted modules (Shape.LoRA)
	stepNorm         int    // LinearAddRMSNorm calls in the step being run: o, down, o, ... (the forward's order)
	silu, norm       fusedCount
	bad              []string
}

// fusedCount is one fused op's calls and those it took.
type fusedCount struct{ calls, took int }

// take counts a call and says whether this one is taken: every k-th.
func (c *fusedCount) take(k int) bool {
	c.calls++
	if c.calls%k != 0 {
		return false
	}
	c.took++
	return true
}

func (s *fusedCPU) Init(cfg *llama.Config, spec engine.Spec) error {
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

func (s *fusedCPU) Execute(meta *engine.StepMeta, prog engine.Program) error {
	s.lora, s.stepNorm = uint32(prog.Shape.LoRA), 0
	return s.Backend.Execute(meta, engine.Program{Shape: prog.Shape, Run: func(o engine.Ops) { prog.Run(fusedOps{o, s}) }})
}

// fusedOps are a step's ops with the fused ops added.
type fusedOps struct {
	engine.Ops
	s *fusedCPU
}

// adapted records a call for a product the step's adapters change.
func (s *fusedCPU) adapted(op string, n int, mods ...llama.Module) {
	for _, m := range mods {
		if s.lora&(1<<m) != 0 {
			s.bad = append(s.bad, fmt.Sprintf("%s call %d in a step with a %v LoRA update", op, n, m))
		}
	}
}

func (o fusedOps) LinearSiLU(act, in engine.Buffer, w engine.Weight) bool {
	s := o.s
	s.adapted("LinearSiLU", s.silu.calls+1, llama.Gate, llama.Up)
	if !s.silu.take(2) {
		return false
	}
	o.Linear(s.gateUp, in, w)
	o.SiLUMul(act, s.gate, s.up)
	return true
}

func (o fusedOps) LinearAddRMSNorm(delta, in engine.Buffer, w engine.Weight, x, out engine.Buffer, norm engine.Weight, eps float32) bool {
	s := o.s
	mod := llama.O // the forward's order: each layer's o, then its down
	if s.stepNorm%2 == 1 {
		mod = llama.Down
	}
	s.stepNorm++
	s.adapted("LinearAddRMSNorm", s.norm.calls+1, mod)
	// every third: o products and down products both taken and declined
	if !s.norm.take(3) {
		return false
	}
	o.Linear(delta, in, w)
	o.AddRMSNorm(x, delta, out, norm, eps)
	return true
}

// TestFusedOps: the engine offers a backend with LinearSiLUOps every
// gate/up product no adapter changes and one with LinearAddRMSNormOps
// every o and down product (with the add and norm after it, the last
// layer's add alone), issues the separate ops itself where the backend
// declines, and never offers them in steps whose adapters change the
// product; the fixture's cases, one by one and co-batched, stay within
// the reference's limits either way (the CPU backend against
// transformers+PEFT).
func TestFusedOps(t *testing.T) {
	m, adapters, cases := loadFixture(t)
	b := &fusedCPU{Backend: cpu.New(0)}
	e, slots := fixtureEngineOn(t, m, adapters, b)
	for _, c := range cases { // one by one: the cases without an adapter make steps without LoRA
		runCases(t, e, slots, []refCase{c})
	}
	runCases(t, e, slots, cases) // co-batched
	for _, c := range []struct {
		op string
		n  fusedCount
	}{{"LinearSiLU", b.silu}, {"LinearAddRMSNorm", b.norm}} {
		if c.n.took == 0 || c.n.took == c.n.calls {
			t.Errorf("%s took %d of %d calls: want some taken and some declined", c.op, c.n.took, c.n.calls)
		}
		t.Logf("%s: %d calls, %d taken", c.op, c.n.calls, c.n.took)
	}
	for _, s := range b.bad {
		t.Error(s)
	}
}
