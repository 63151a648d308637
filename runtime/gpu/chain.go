package gpu

import (
	"errors"
	"fmt"

	"github.com/peftd/peftd/runtime/cuda"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/sample"
)

// Chained steps (Options.ChainSteps; engine.Chainer): step N+1 is executed
// before N's tokens reach the host. N's draw is issued first (IssueSample):
// sample_rows writes each drawn id into the ring as well, and the rows of
// N+1 that continue a sequence read their token from it in embed (the
// graph metadata's tokFrom: the index of N's sample row, -1 for a token
// the host gives). Stream order does the rest: N's draw writes the ring
// before N+1's embed reads it and before N+1's draw overwrites it, and
// N+1's metadata copy lands after N's kernels read theirs. What the host
// keeps per step is made so two steps can be in flight: the graph
// metadata's pinned staging (two, in turn), the step timers (two), and
// the draws' staging (two): the engine issues a step's draw right behind
// its forward, so N's and N+1's draws may both be in flight. Only graph
// replays chain (Chainable).

// chainState is the Backend's chaining state.
type chainState struct {
	on     bool
	ring   *cuda.DeviceBuffer // int32 per sample row of a step (maxRows)
	rows   int                // the ring's capacity
	done   [2]*cuda.Event     // recorded after a draw's result copy, one per staging set
	issued []*draw            // the draws IssueSample started, not yet waited for (oldest first)
	drawn  int                // sample rows of the last draw (the ring entries a chained step may read)
}

// open allocates the ring (before any recording: the graphs bake its
// address) and the draw's event.
func (c *chainState) open(ctx *cuda.Context, rows int) error {
	var err error
	if c.ring, err = ctx.Alloc(4 * rows); err != nil {
		return fmt.Errorf("gpu: chained steps' ring: %w", err)
	}
	c.rows = rows
	for i := range c.done {
		if c.done[i], err = ctx.NewEvent(false); err != nil {
			return fmt.Errorf("gpu: chained steps: %w", err)
		}
	}
	return nil
}

func (c *chainState) close() error {
	c.ring.Free()
	c.ring = nil
	return errors.Join(c.done[0].Destroy(), c.done[1].Destroy())
}

// ready reports whether steps chain: the option is on and the ring is
// there (graphs record).
func (c *chainState) ready() bool { return c.on && c.ring != nil }

// ringPtr is where sample_rows writes a draw of n rows: the ring when
// steps chain and it holds them (0: nowhere; an eager step may sample more
// rows than a recording has, and no step chains behind it then).
func (c *chainState) ringPtr(n int) uint64 {
	if !c.ready() || n > c.rows {
		return 0
	}
	return uint64(c.ring.Ptr())
}

// fillTokFrom writes the rows' sources (meta.TokenFrom, -1 for none and
// for the padding rows) into h, one per row of the recording.
func (b *Backend) fillTokFrom(h []int32, meta *engine.StepMeta) error {
	for i := range h {
		h[i] = -1
	}
	if meta.TokenFrom == nil {
		return nil
	}
	if len(meta.TokenFrom) != len(meta.Tokens) {
		return fmt.Errorf("%w: %d token sources for %d rows", ErrBadStep, len(meta.TokenFrom), len(meta.Tokens))
	}
	for i, k := range meta.TokenFrom { // drawn <= rows: only a draw the ring holds counts
		if k >= int32(b.chain.drawn) {
			return fmt.Errorf("%w: row %d takes draw %d of a step that drew %d", ErrBadStep, i, k, b.chain.drawn)
		}
		if k >= 0 {
			h[i] = k
		}
	}
	return nil
}

// Chainable reports whether meta's step can be executed while the step in
// flight is (engine.Chainer): steps chain when Options.ChainSteps is set,
// the step in flight enqueued without error and at most its own draw in
// flight, and this one replays a recording that exists, with no buffer moved,
// no adapter upload in progress and the weight staging freed (nothing that
// would wait for the device on the host, or record).
func (b *Backend) Chainable(meta *engine.StepMeta, prog engine.Program) bool {
	if !b.chain.ready() || len(b.chain.issued) > 1 || b.meta == nil || b.err != nil || b.stage != nil || len(b.loads) > 0 || len(b.gates) > 0 {
		return false
	}
	ok, mixed := b.graphable(meta)
	if !ok {
		return false
	}
	key := b.graphKeyOf(graphBuckets[bucketIndex(len(meta.Tokens))], prog.Shape, mixed, len(meta.LogitRows))
	if key.lora != 0 && (b.g.tmp == nil || key.rank > b.g.tmpRank) {
		return false // the LoRA scratch would grow (a wait, and new recordings)
	}
	return b.g.execs[key] != nil && b.pointers() == b.g.ptrs
}

// Chains reports whether steps chain (Options.ChainSteps, with graphs).
func (b *Backend) Chains() bool { return b.chain.ready() }

// IssueSample starts the step's draw as SampleRows does, without waiting
// (engine.Chainer): the tokens come back with WaitSample.
func (b *Backend) IssueSample(logits engine.Buffer, rows []engine.RowSample) error {
	if !b.Chains() {
		return fmt.Errorf("%w: IssueSample without chained steps (Options.ChainSteps)", ErrBadStep)
	}
	if len(b.chain.issued) > 1 {
		return fmt.Errorf("%w: two draws are in flight already", ErrBadStep)
	}
	d, err := b.issueDraw(logits, rows)
	if err != nil {
		return err
	}
	if d == nil { // no rows: no staging used; the event marks the step's end all the same
		d = &draw{set: b.takeSet()}
	}
	if err := b.chain.done[d.set].Record(b.s); err != nil {
		return err
	}
	d.tm = b.curTimer()
	b.chain.issued = append(b.chain.issued, d)
	return nil
}

// WaitSample waits for the oldest draw IssueSample started and fills out
// as SampleRows would (engine.Chainer); the engine ends the backend's step
// (End) once no step is in flight.
func (b *Backend) WaitSample(out []sample.Choice) error {
	if len(b.chain.issued) == 0 {
		return fmt.Errorf("%w: WaitSample without a draw issued", ErrBadStep)
	}
	d := b.chain.issued[0]
	b.chain.issued = append(b.chain.issued[:0], b.chain.issued[1:]...)
	if err := b.chain.done[d.set].Synchronize(); err != nil {
		return fmt.Errorf("gpu: step failed: %w", err)
	}
	b.keepTime(d.tm)
	return d.parse(out)
}

// The engine finds the chaining methods by a type assertion.
var _ engine.Chainer = (*Backend)(nil)
