package engine_test

import (
	"context"
	"slices"
	"testing"

	"github.com/peftd/peftd/runtime/engine"
)

// TestAttachSharedPrefix: a sequence attached to another's full pages
// computes exactly the logits it computes alone (the CPU backend computes
// every row alike), and pages are freed only when both let go.
func TestAttachSharedPrefix(t *testing.T) {
	m, adapters, cases := loadFixture(t)
	e, slots := newFixtureEngine(t, m, adapters, 4)
	ctx := context.Background()
	for _, c := range cases {
		k := (len(c.Prompt) - 1) / 4
		if k == 0 {
			continue
		}
		slot := -1
		if c.Adapter != nil {
			slot = slots[*c.Adapter]
		}
		var alone, writer, reader engine.Sequence
		want, err := e.Step(ctx, []engine.Input{{Seq: &alone, Tokens: c.Prompt, Slot: slot, AllLogits: true}})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := e.Step(ctx, []engine.Input{{Seq: &writer, Tokens: c.Prompt[:k*4], Slot: slot}}); err != nil {
			t.Fatal(err)
		}
		if err := e.Attach(&reader, writer.Blocks()[:k], k*4); err != nil {
			t.Fatal(err)
		}
		e.Release(&writer) // the reader still holds the pages
		got, err := e.Step(ctx, []engine.Input{{Seq: &reader, Tokens: c.Prompt[k*4:], Slot: slot, AllLogits: true}})
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(got[0], want[0][k*4*e.Config().VocabSize:]) {
			t.Errorf("case %d: logits after %d shared tokens differ from the unshared run", c.ID, k*4)
		}
		e.Release(&reader)
		e.Release(&alone)
	}
	if e.FreeBlocks() != e.Options().KVBlocks {
		t.Errorf("pages leaked: %d free of %d", e.FreeBlocks(), e.Options().KVBlocks)
	}
}
