package engine_test

import (
	"context"
	"fmt"
	"testing"

	"github.com/peftd/peftd/internal/fixture"
	"github.com/peftd/peftd/runtime/cpu"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/lora"
)

// BenchmarkDecode measures decode steps of a batch on the CPU backend, every
// sequence with an adapter (round-robin over the loaded ones). Reports tokens/s.
func BenchmarkDecode(b *testing.B) {
	for _, mc := range []struct {
		name, dir string
		adapters  []string
	}{
		{"stories260K", stories, []string{"../../models/adapters/pirate", "../../models/adapters/space"}},
		{"tiny-llama-lora", fixture.Dir() + "/base", []string{fixture.Dir() + "/adapters/all-r16", fixture.Dir() + "/adapters/mlp-r64"}},
	} {
		m, err := llama.Open(mc.dir)
		if err != nil {
			b.Fatal(err)
		}
		defer m.Close()
		for _, batch := range []int{1, 8, 16} {
			for _, withLoRA := range []bool{false, true} {
				b.Run(fmt.Sprintf("%s/batch=%d/lora=%v", mc.name, batch, withLoRA), func(b *testing.B) {
					benchDecode(b, m, mc.adapters, batch, withLoRA)
				})
			}
		}
	}
}

func benchDecode(b *testing.B, m *llama.Model, adapters []string, batch int, withLoRA bool) {
	e, err := engine.New(m, cpu.New(0), engine.DefaultOptions())
	if err != nil {
		b.Fatal(err)
	}
	for i, dir := range adapters {
		a, err := lora.Load(dir, m.Config)
		if err != nil {
			b.Fatal(err)
		}
		if err := e.LoadAdapter(i, a); err != nil {
			b.Fatal(err)
		}
	}
	ctx := context.Background()
	const promptLen, steps = 32, 64
	prompt := make([]int32, promptLen)
	for i := range prompt {
		prompt[i] = int32(3 + i)
	}
	in := make([]engine.Input, batch)
	b.ResetTimer()
	b.StopTimer()
	for it := 0; it < b.N; it++ {
		seqs := make([]engine.Sequence, batch)
		for i := range in {
			slot := -1
			if withLoRA {
				slot = i % len(adapters)
			}
			in[i] = engine.Input{Seq: &seqs[i], Tokens: prompt, Slot: slot}
		}
		if _, err := e.Step(ctx, in); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		for s := 0; s < steps; s++ {
			for i := range in {
				in[i].Tokens = []int32{int32(5 + s)}
			}
			if _, err := e.Step(ctx, in); err != nil {
				b.Fatal(err)
			}
		}
		b.StopTimer()
		for i := range seqs {
			e.Release(&seqs[i])
		}
	}
	b.ReportMetric(float64(b.N*steps*batch)/b.Elapsed().Seconds(), "tokens/s")
}
