package engine_test

import (
	"context"
	"errors"
	"testing"

	"github.com/peftd/peftd/runtime/cpu"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
)

// TestReserve: Reserve allocates whole pages up front, all or nothing; a
// step over reserved sequences takes no page; a step that fails leaves its
// sequences' lengths and pages as they were.
func TestReserve(t *testing.T) {
	m, err := llama.Open(stories)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	e, err := engine.New(m, cpu.New(0), engine.Options{MaxTokens: 64, KVBlocks: 4, BlockSize: 4, AdapterSlots: 1})
	if err != nil {
		t.Fatal(err)
	}
	var a, b engine.Sequence
	if err := e.Reserve(&a, 9); err != nil || e.FreeBlocks() != 1 {
		t.Fatalf("reserve 9 tokens: %v, %d free (want 1)", err, e.FreeBlocks())
	}
	if err := e.Reserve(&a, 12); err != nil || e.FreeBlocks() != 1 {
		t.Fatalf("reserve within the held pages: %v, %d free", err, e.FreeBlocks())
	}
	if err := e.Reserve(&b, 8); !errors.Is(err, engine.ErrKVFull) || e.FreeBlocks() != 1 {
		t.Fatalf("over-reserve: %v, %d free (want ErrKVFull, nothing taken)", err, e.FreeBlocks())
	}
	prompt := []int32{1, 403, 407, 261, 378, 432, 261, 376, 282}
	if _, err := e.Step(context.Background(), []engine.Input{{Seq: &a, Tokens: prompt, Slot: -1}}); err != nil {
		t.Fatal(err)
	}
	if a.Len() != 9 || e.FreeBlocks() != 1 {
		t.Errorf("after the step: len %d, %d free (want 9, 1)", a.Len(), e.FreeBlocks())
	}
	// A failing step (an empty adapter slot) changes nothing.
	if _, err := e.Step(context.Background(), []engine.Input{{Seq: &a, Tokens: []int32{5}, Slot: 0}}); err == nil {
		t.Fatal("a step on an empty slot succeeded")
	}
	if a.Len() != 9 || e.FreeBlocks() != 1 {
		t.Errorf("after a failed step: len %d, %d free", a.Len(), e.FreeBlocks())
	}
	e.Release(&a)
	if e.FreeBlocks() != 4 {
		t.Errorf("after release: %d free", e.FreeBlocks())
	}
}
