package gpu

import (
	"errors"
	"fmt"
	"math"
	"math/bits"

	"github.com/peftd/peftd/runtime/cuda"
	"github.com/peftd/peftd/runtime/engine"
)

// Steps of up to the largest bucket's rows run as CUDA graph replays: one
// graph per (row bucket, program shape, LoRA rank class, mixed), recorded
// the first time that key is seen (Warmup records them all before serving)
// by running the program's ops under stream capture. A decode step (every
// sequence one new row) replays a decode graph; a step with prefill rows
// (mixed: prompt chunks beside decode rows) replays a mixed graph, which
// also launches attn_prefill over a fixed number of prefill tiles (tiles
// with no rows exit at once). What a recording must not change between
// replays is fixed:
//
//   - the step is padded to its bucket's rows; padded rows are one-row
//     sequences with no context, no KV slot (rope_store skips them), no
//     adapter, and their logits are never read; attn_decode takes the
//     decode sequences, then the padding, and its blocks past those exit;
//   - logits are computed for every row of the bucket (the step's logit
//     rows first), and only the step's are sampled or read;
//   - the metadata has one layout per backend (graphMeta), filled on the
//     host and copied to a fixed device buffer by one async copy before the
//     replay; attn_decode sizes its KV chunks per sequence on the device;
//   - the LoRA launches are sized for the bucket's worst case (tiles with
//     no rows exit at once) and a rank class (the loaded adapters' largest
//     rank rounded up to a power of two, at least 64), with their own
//     scratch, so loading or evicting adapters never forces a recording;
//   - every buffer a recording reads or writes is allocated at Init (or by
//     the eager run that precedes each recording) and never moves: the
//     pointers are checked before each replay and the graphs dropped if one
//     did (they are then recorded again).
//
// Larger steps, steps with more prefill tiles or LoRA tiles than a
// recording holds, and models without attn_prefill run their ops eagerly.

// graphBuckets are the step sizes decode graphs are recorded for; a decode
// step of n rows replays the smallest bucket >= n. The ones above
// defaultGraphRows are recorded only when Options.GraphRows asks.
var graphBuckets = []int{1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512}

// defaultGraphRows is the largest step recorded when Options.GraphRows is 0.
const defaultGraphRows = 256

// graphRowsFor is the largest bucket a backend of maxT rows a step records
// when Options.GraphRows is limit (0: defaultGraphRows); 0 when none fits.
func graphRowsFor(maxT, limit int) int {
	if limit <= 0 {
		limit = defaultGraphRows
	}
	rows := 0
	for _, n := range graphBuckets {
		if n <= min(maxT, limit) {
			rows = n
		}
	}
	return rows
}

// RecordedRows is the largest step, in rows, recorded as a CUDA graph
// when Options.GraphRows is graphRows (0: 256) and the engine allows any
// step size. When no --max-batch-tokens is given the server has prompt
// chunks fill a step only to it (scheduler.Config.FillRows), so that the
// steps of a moderate load replay a recording and chain behind the one in
// flight: v0.30 measured serve8b +4-9% tokens/s with 256-row steps against
// 512-row ones, where about a quarter of the steps carried 257-512 rows and
// ran op by op.
func RecordedRows(graphRows int) int { return graphRowsFor(math.MaxInt, graphRows) }

// minRankClass is the smallest LoRA rank class a recording is made for:
// steps whose adapters all have rank <= 32 run the rank-32 launches (half
// the shrink blocks and expand MMAs of rank 64's). The LoRA scratch is
// sized for scratchRank at least, so that the adapters' rank growing to 64
// re-records the graphs but never moves (frees) the scratch.
const (
	minRankClass = 32
	scratchRank  = 64
)

type graphKey struct {
	rows  int   // bucket
	lora  uint8 // engine.Shape.LoRA
	rank  int   // LoRA rank class; 0 without LoRA
	mixed bool  // the step has prefill rows: attn_prefill runs too
	// odd: a loaded adapter's rank is not a multiple of 8, so the expand
	// runs sgmv_expand, not the tensor-core kernels (tcChunks), whose
	// 16-byte loads of B need ranks in multiples of 8
	odd bool
	// logits: the rows whose logits the recording computes (the first
	// ones of the step's LogitRows; logitCaps): rows, or fewer in a mixed
	// recording
	logits int
}

// fewLogitsMinRows is the fewest rows of a mixed recording that comes in
// two (logitCaps): one computing the logits of half its rows, one of
// every row. A mixed step needs the logits of its decode rows and of each
// prompt chunk's last row only (serve8b's 256-row mixed steps: ~65 of
// them), and the lm_head product (vocabulary x hidden, the step's largest
// at 8B shapes: 1 GB of bf16) at 256 rows is bound by its FLOPs rather
// than its bytes: 449 µs of an H100's 8.7 ms bf16 mixed step (PERFORMANCE
// v0.90), against ~365 for its bytes. Below 128 rows it reads its bytes
// in the same time whatever the rows.
const fewLogitsMinRows = 128

// logitCaps is the logits rows of the recordings of n rows (mixed: with
// prefill rows), the fewest first: a step replays the first that holds
// its logit rows (logitCapFor).
func (b *Backend) logitCaps(n int, mixed bool) []int {
	if !mixed || n < fewLogitsMinRows || b.force.allLogits {
		return []int{n}
	}
	return []int{n / 2, n}
}

// logitCapFor is the logits rows of the recording a step of n rows
// (bucket) with logits logit rows replays.
func (b *Backend) logitCapFor(n int, mixed bool, logits int) int {
	for _, c := range b.logitCaps(n, mixed) {
		if logits <= c {
			return c
		}
	}
	return n
}

// graphState is the CUDA-graph side of the backend.
type graphState struct {
	off     bool // Options.Eager, or the driver lacks graph symbols
	maxRows int  // largest bucket that fits the backend's MaxTokens
	slots   int  // adapter slots the tiles are sized for (Spec.AdapterSlots)
	execs   map[graphKey]*cuda.GraphExec
	// fixed layout (int32 words) of the metadata, for maxRows rows; the
	// page tables follow the fixed part
	lay      metaOffsets
	pagesCap int
	// the pinned staging of the metadata copy; with chained steps
	// (chain.go) two, in turn: a step's copy may still be pending on the
	// device when the step chained behind it fills its own
	host, host2 *cuda.HostBuffer
	flip        bool
	dev         *cuda.DeviceBuffer
	part        *cuda.DeviceBuffer // attn_decode partials
	tmp         *cuda.DeviceBuffer // LoRA scratch
	tmpRank     int                // rank class tmp is sized for
	ptrs        [8]cuda.DevicePtr  // buffers the recordings use (see pointers)
	// Options.RecordIdle, and whether a step ran without its recording
	// since MissedRecording last asked
	recordIdle, missed bool
	rowsLimit          int // Options.GraphRows
	// primed: a program ran eagerly and was recorded since Init (what the
	// steps allocate is allocated): Warmup captures the rest directly
	primed bool
	// counters, for tests and the benchmark (Direct: recordings Warmup
	// captured without an eager run first)
	Recorded, Replayed, Direct int
	// the capture's join (and fork) nodes (pdljoin.go), and what
	// retypeJoins found, summed over the recordings
	capture captureSources
	joins   joinStats
	hoisted int // cuBLASLt memsets moved beside the kernel before them, and replaced by fill_rows by default (memsethoist.go)
}

// GraphStats reports how many decode graphs were recorded and how many
// steps replayed one.
func (b *Backend) GraphStats() (recorded, replayed int) { return b.g.Recorded, b.g.Replayed }

// MissedRecording reports whether a step ran without its recording
// (Options.RecordIdle) since the last call (engine.RecordMisser).
func (b *Backend) MissedRecording() bool {
	m := b.g.missed
	b.g.missed = false
	return m
}

// GraphsOn reports whether steps replay CUDA graphs (not Options.Eager).
func (b *Backend) GraphsOn() bool { return !b.g.off }

// preTilesCap is the attn_prefill tiles a mixed recording of n rows
// launches: enough for its prefill rows in whole tiles plus a partial tile
// for each of up to 16 prefill sequences. A step needing more runs eagerly.
func preTilesCap(n int) int { return (n+preRows-1)/preRows + min(n/2, 16) }

// tilesCap is the most SGMV tiles of rows rows (sgTileRows, or
// sgmv_shrink64's sgBigRows) a step of n rows can have with slots adapter
// slots: one partial tile per segment plus the full ones.
func tilesCap(n, slots, rows int) int { return min(n, (n+rows-1)/rows+max(slots, 1)) }

// decSplitFor is the KV split of attn_decode for a decode step of n rows.
// Blocks run in waves of decResident[decVariantFor(n)] (the blocks the GPU
// holds at once); a block costs its share of the context plus a fixed part
// (its pipeline's start, the merge: about an eighth of a whole context's
// time at 8B shapes), so the split minimizing waves x (1/split + 1/8) wins: one full
// wave of whole contexts beats two of halves, and few sequences get split
// until they fill a wave.
func (b *Backend) decSplitFor(n int) int {
	top := 64
	if b.decCluster() {
		top = decClusterMax
	}
	if b.force.decSplit > 0 {
		return min(b.force.decSplit, top)
	}
	return kvSplitFor(n*b.kv.KVHeads, b.decResident[b.decVariantFor(n)], top)
}

// kvSplitFor is decSplitFor's choice for pairs (sequence, KV head) blocks
// when the GPU holds resident blocks at once and a pair splits at most top
// ways.
func kvSplitFor(pairs, resident, top int) int {
	best, bestCost := 1, math.Inf(1)
	for s := 1; s <= top; s++ {
		waves := (pairs*s + resident - 1) / resident
		if c := float64(waves) * (1/float64(s) + 0.125); c < bestCost-1e-9 {
			best, bestCost = s, c
		}
	}
	return best
}

// initGraphs sizes the graph metadata for the backend's largest bucket.
func (b *Backend) initGraphs(maxContext int) error {
	b.g.execs = map[graphKey]*cuda.GraphExec{}
	b.g.maxRows = graphRowsFor(b.maxT, b.g.rowsLimit)
	if b.g.off || !b.decOK || b.g.maxRows == 0 {
		b.g.off = true
		return nil
	}
	M := b.g.maxRows
	o := metaOffsets{tokens: 0, pos: M, kvSlots: 2 * M, rowSeq: 3 * M, seqInfo: 4 * M}
	o.loraRows = 8 * M
	o.loraSlots = 9 * M
	o.rowLora = o.loraSlots // per row here: loraRows[i] = i
	o.logitRows = 10 * M
	o.decSeqs = (11*M + 3) &^ 3 // int4 aligned: decEntry's four words a row
	o.tiles = o.decSeqs + 4*M
	o.preTiles = o.tiles + 4*tilesCap(M, b.g.slots, sgTileRows)
	o.bigTiles = o.preTiles + 4*preTilesCap(M)
	o.pages = o.bigTiles + 4*tilesCap(M, b.g.slots, sgBigRows)
	o.preRows = o.pages // the per-row kernel never runs in a recording
	perSeq := (maxContext + b.kv.BlockSize - 1) / b.kv.BlockSize
	b.g.pagesCap = M * min(max(perSeq, 1), b.kv.Blocks)
	o.end = o.pages + b.g.pagesCap
	if b.chain.on {
		o.tokFrom = o.end // each row's source in the ring (-1: its token)
		o.end += M
	}
	b.g.lay = o
	var err error
	if b.g.host, err = b.ctx.AllocHost(4 * o.end); err != nil {
		return fmt.Errorf("gpu: graph metadata: %w", err)
	}
	if b.chain.on {
		if b.g.host2, err = b.ctx.AllocHost(4 * o.end); err != nil {
			return fmt.Errorf("gpu: graph metadata: %w", err)
		}
		if err := b.chain.open(b.ctx, M); err != nil {
			return err
		}
	}
	if b.g.dev, err = b.ctx.Alloc(4 * o.end); err != nil {
		return fmt.Errorf("gpu: graph metadata: %w", err)
	}
	part := 0
	for _, n := range graphBuckets[:bucketIndex(M)+1] {
		if s := b.decSplitFor(n); s > 1 {
			part = max(part, 4*n*b.cfg.Heads*s*(b.kv.HeadDim+2))
		}
	}
	if b.g.part, err = b.ctx.Alloc(max(part, 256)); err != nil {
		return fmt.Errorf("gpu: graph attention scratch: %w", err)
	}
	return b.growGraphTmp(scratchRank) // before any recording: growing it drops them
}

// graphsUsable reports whether the driver can record and replay graphs.
func graphsUsable() bool { return cuda.GraphsSupported() == nil }

func bucketIndex(n int) int {
	for i, v := range graphBuckets {
		if v >= n {
			return i
		}
	}
	return len(graphBuckets) - 1
}

// rankClass is the LoRA rank the recordings of a step are sized for.
func rankClass(maxRank int) int {
	if maxRank <= minRankClass {
		return minRankClass
	}
	return 1 << bits.Len(uint(maxRank-1))
}

// growGraphTmp sizes the graph LoRA scratch for rank class r (three fused
// slices, up to four K-split partials, maxRows rows). Growing it moves it,
// which drops the recordings (pointers).
func (b *Backend) growGraphTmp(r int) error {
	if b.g.tmp != nil && b.g.tmpRank >= r {
		return nil
	}
	if err := b.s.Synchronize(); err != nil {
		return err
	}
	b.g.tmp.Free()
	b.g.tmp = nil
	var err error
	if b.g.tmp, err = b.ctx.Alloc(4 * b.graphTmpFloats(r)); err != nil {
		return err
	}
	b.g.tmpRank = r
	return nil
}

func (b *Backend) graphTmpFloats(r int) int { return 4 * b.g.maxRows * 3 * r }

// pointers are the buffers a recording bakes in that are not fixed for the
// backend's life by construction.
func (b *Backend) pointers() [8]cuda.DevicePtr {
	var p [8]cuda.DevicePtr
	p[0] = b.table.Ptr()
	p[1] = b.normed.Ptr()
	if b.f8 != nil {
		p[2], p[3] = b.f8.actQ.Ptr(), b.f8.actS.Ptr()
		// the split products' partials and fp8_gemm_skinny's: sized once,
		// but a test or benchmark forcing a larger split grows them
		p[6], p[7] = b.f8.spPart.Ptr(), b.f8.skPart.Ptr()
	}
	p[4] = b.g.tmp.Ptr()
	for _, x := range b.buffers {
		p[5] ^= x.f32.Ptr() // the logits' float32 storage (allocated by the first Logits)
	}
	return p
}

// dropGraphs destroys every recording.
func (b *Backend) dropGraphs() error {
	var errs []error
	for k, e := range b.g.execs {
		errs = append(errs, e.Destroy())
		delete(b.g.execs, k)
	}
	return errors.Join(errs...)
}

// graphable reports whether a recording covers meta, and whether that is a
// mixed one (the step has prefill rows).
func (b *Backend) graphable(meta *engine.StepMeta) (ok, mixed bool) {
	T := len(meta.Tokens)
	if b.g.off || b.force.attnRows || T == 0 || T > b.g.maxRows {
		return false, false
	}
	n := graphBuckets[bucketIndex(T)]
	pre := 0
	for _, s := range meta.Seqs {
		if s.Len > 1 {
			pre += tilesOf(s.Len, preRows)
		}
	}
	if pre > 0 && (!b.preOK || pre > preTilesCap(n)) {
		return false, false
	}
	lt := 0
	for _, g := range meta.LoRA {
		lt += tilesOf(g.End-g.Start, sgTileRows)
	}
	if lt > tilesCap(n, b.g.slots, sgTileRows) {
		return false, false
	}
	return true, pre > 0
}

// Execute runs prog over the step: a step a recording covers replays (or
// first records) its bucket's CUDA graph; any other step runs the ops
// eagerly.
func (b *Backend) Execute(meta *engine.StepMeta, prog engine.Program) error {
	if err := b.freeStaging(); err != nil {
		return err
	}
	if ok, mixed := b.graphable(meta); ok {
		if err := b.replay(meta, prog, mixed); err != nil {
			return err
		}
		return b.markForward()
	}
	if err := b.Begin(meta); err != nil {
		return err
	}
	prog.Run(b)
	if b.err != nil {
		return nil // the step's error comes back from its result call
	}
	return b.markForward()
}

// replay fills the graph metadata for meta padded to its bucket and
// launches the bucket's graph, recording it first if needed.
func (b *Backend) replay(meta *engine.StepMeta, prog engine.Program, mixed bool) error {
	n := graphBuckets[bucketIndex(len(meta.Tokens))]
	key, err := b.graphKeyFor(n, prog.Shape, mixed, len(meta.LogitRows))
	if err != nil {
		return err
	}
	if err := b.fillGraphMeta(meta, key); err != nil {
		return err
	}
	gated, err := b.waitLoads(meta, true)
	if err != nil {
		return err
	}
	if err := b.checkPointers(); err != nil {
		return err
	}
	if err := b.startTiming(); err != nil {
		return err
	}
	if gated {
		// An adapter image the step uses is still being copied: run the
		// graph's ops eagerly (same layout, same kernels, same results),
		// each layer's LoRA waiting only for its own part of the image.
		// A later step records or replays the graph.
		prog.Run(b)
		return nil
	}
	if e := b.g.execs[key]; e != nil {
		b.g.Replayed++
		return e.Launch(b.s)
	}
	if b.g.recordIdle {
		// Warmup records it while the engine is idle: this step runs the
		// graph's ops eagerly (same layout, same kernels, same results)
		b.g.missed = true
		prog.Run(b)
		return nil
	}
	// First step of this kind: run it eagerly, then record it.
	err = b.runThenRecord(key, prog)
	if b.err != nil {
		return nil // the step's own ops failed: End reports it
	}
	return err
}

// graphKeyFor is the key of a recording for steps of rows rows, program
// shape s and logits logit rows, with the LoRA scratch sized for it.
func (b *Backend) graphKeyFor(rows int, s engine.Shape, mixed bool, logits int) (graphKey, error) {
	key := b.graphKeyOf(rows, s, mixed, logits)
	return key, b.sizeGraphTmp(key)
}

// sizeGraphTmp sizes the graph LoRA scratch for key's recording.
func (b *Backend) sizeGraphTmp(key graphKey) error {
	if key.lora == 0 {
		return nil
	}
	return b.growGraphTmp(key.rank)
}

// graphKeyOf is graphKeyFor's key alone (the scratch left as it is).
func (b *Backend) graphKeyOf(rows int, s engine.Shape, mixed bool, logits int) graphKey {
	key := graphKey{rows: rows, lora: s.LoRA, mixed: mixed, logits: b.logitCapFor(rows, mixed, logits)}
	if key.lora != 0 {
		key.rank, key.odd = rankClass(b.maxRank), b.oddRank
	}
	return key
}

// checkPointers drops every recording when a buffer they use has moved.
func (b *Backend) checkPointers() error {
	if p := b.pointers(); p != b.g.ptrs {
		if err := b.dropGraphs(); err != nil {
			return err
		}
		b.g.ptrs = p
	}
	return nil
}

// runThenRecord runs prog eagerly in the graph layout fillGraphMeta set
// (this also makes every lazy allocation and choice the recording needs),
// waits for it, then records the same ops as key's graph. An error of the
// eager run's ops stays in b.err.
func (b *Backend) runThenRecord(key graphKey, prog engine.Program) error {
	prog.Run(b)
	if b.err != nil {
		return b.err
	}
	if err := b.s.Synchronize(); err != nil {
		return err
	}
	if err := b.checkPointers(); err != nil { // the eager run allocated: earlier recordings are stale
		return err
	}
	e, err := b.record(key.rows, prog)
	if err != nil && b.joinMode() > 0 {
		b.force.pdlJoins = -1 // a driver that refuses programmatic joins: full ones
		e, err = b.record(key.rows, prog)
	}
	if err != nil && b.pdl {
		// a driver that cannot record programmatic launches: record (and
		// from now on launch) without them
		if b.s.SetProgrammaticLaunch(false) == nil && b.la.s.SetProgrammaticLaunch(false) == nil {
			b.pdl = false
			if derr := b.dropGraphs(); derr != nil {
				return derr
			}
			e, err = b.record(key.rows, prog)
		}
	}
	if err != nil {
		return fmt.Errorf("gpu: record decode graph for %d rows: %w", key.rows, err)
	}
	b.g.execs[key] = e
	b.g.Recorded++
	return nil
}

// warmRecord records key's program for Warmup (the metadata filled for
// padding alone). Once an eager run has sized what the steps allocate
// (g.primed), it captures the program directly: no eager run of the
// padding first, and no wait for it (about half of a recording's time).
// A capture that fails (an op that would allocate, or a driver that cannot
// record programmatic launches) falls back to runThenRecord, which runs
// the program first; so does the first recording after Init.
func (b *Backend) warmRecord(key graphKey, prog engine.Program) error {
	if b.g.primed {
		if err := b.checkPointers(); err != nil { // recordings of moved buffers go first
			return err
		}
		if e, err := b.record(key.rows, prog); err == nil {
			b.g.execs[key] = e
			b.g.Recorded++
			b.g.Direct++
			return nil
		}
		b.err = nil
	}
	if err := b.runThenRecord(key, prog); err != nil {
		return err
	}
	b.g.primed = true
	return nil
}

// record captures prog's ops on the compute stream as a graph.
func (b *Backend) record(rows int, prog engine.Program) (*cuda.GraphExec, error) {
	if err := b.s.BeginCapture(); err != nil {
		return nil, err
	}
	b.g.capture = newCaptureSources(b.joinMode())
	b.mm.TrackCaptures(b.memsetHoist() > 0)
	prog.Run(b)
	cs := b.g.capture
	b.g.capture = captureSources{}
	g, cerr := b.s.EndCapture()
	calls := b.mm.TrackCaptures(false)
	if err := errors.Join(b.err, cerr); err != nil {
		b.err = nil
		g.Destroy()
		return nil, err
	}
	defer g.Destroy()
	js, err := retypeJoins(g, cs)
	if err != nil {
		return nil, err
	}
	b.g.joins.add(js)
	n, err := hoistMemsets(g, calls, b.memsetHoist(), b.fn.fillRows)
	if err != nil {
		return nil, err
	}
	b.g.hoisted += n
	if b.nodePriority(rows) {
		return g.InstantiateNodePriority()
	}
	return g.Instantiate()
}

// nodePriority reports whether a recording of rows rows runs the LoRA
// stream's kernels at that stream's (high) priority rather than at the
// compute stream's, as a graph's kernels otherwise all run: FP8 steps of
// 1-4 rows, where fp8_gemv_seg's grids of thousands of small blocks would
// otherwise have every block dispatched before the LoRA kernels beside
// them start (v0.39, H200, 4 x r32: FP8 1 row 3.14 -> 3.01 ms). Elsewhere
// the products' grids are planned for the SMs the LoRA stream leaves them
// and the LoRA blocks jumping the queue made steps slower (bf16 64 / 256
// rows 6.69 / 12.64 -> 7.28 / 14.17 ms; FP8 16 / 64 rows 4.03 / 5.53 ->
// 4.12 / 5.89; bf16 1 and 16 rows equal).
func (b *Backend) nodePriority(rows int) bool {
	return forcedOn(b.force.nodePrio, b.f8 != nil && rows <= segMaxRows)
}

// fillGraphMeta writes meta, padded to n rows, in the graph layout and
// copies it to the device; it sets the step's launch parameters. key is
// the recording's: its rows (n), rank class, mixed (the step may have
// prefill rows: graphable checked their tiles fit) and logits rows.
func (b *Backend) fillGraphMeta(meta *engine.StepMeta, key graphKey) error {
	n, rank, mixed := key.rows, key.rank, key.mixed
	b.err = nil
	b.gen++
	b.la.pend, b.la.forkIn = pendingDelta{}, 0
	o := b.g.lay
	T, S := len(meta.Tokens), len(meta.Seqs)
	if len(meta.Positions) != T || len(meta.KVSlots) != T || S > T || len(meta.LogitRows) > T || len(meta.LogitRows) > key.logits || key.logits > n {
		return fmt.Errorf("%w: %d tokens, %d positions, %d KV slots, %d sequences, %d logit rows (the recording's %d of %d rows)", ErrBadStep, T, len(meta.Positions), len(meta.KVSlots), S, len(meta.LogitRows), key.logits, n)
	}
	hb := b.g.host
	if b.chain.on {
		if b.g.flip = !b.g.flip; b.g.flip {
			hb = b.g.host2
		}
	}
	h := hb.Int32s()
	for i := range n {
		h[o.loraRows+i], h[o.loraSlots+i], h[o.rowSeq+i], h[o.logitRows+i] = int32(i), -1, -1, 0
		if i >= T { // padding: token 0 at position 0, no KV slot
			h[o.tokens+i], h[o.pos+i], h[o.kvSlots+i] = 0, 0, -1
			continue
		}
		if err := b.checkRow(meta, i); err != nil {
			return err
		}
		h[o.tokens+i], h[o.pos+i], h[o.kvSlots+i] = meta.Tokens[i], meta.Positions[i], meta.KVSlots[i]
	}
	// the step's sequences, then one per padding row (no context); the
	// decode sequences and the padding ones go to attn_decode
	p, d := o.pages, o.decSeqs
	for si, s := range meta.Seqs {
		if err := b.checkSeq(si, s, T); err != nil {
			return err
		}
		if s.Len > 1 && !mixed {
			return fmt.Errorf("%w: sequence %d has %d rows in a decode step", ErrBadStep, si, s.Len)
		}
		if p+len(s.Blocks) > o.pages+b.g.pagesCap {
			return fmt.Errorf("%w: page tables exceed %d pages", ErrBadStep, b.g.pagesCap)
		}
		for r := s.Start; r < s.Start+s.Len; r++ {
			h[o.rowSeq+r] = int32(si)
		}
		h[o.seqInfo+4*si], h[o.seqInfo+4*si+1], h[o.seqInfo+4*si+2], h[o.seqInfo+4*si+3] = int32(s.Start), int32(s.Len), int32(s.Context), int32(p-o.pages)
		p += copy(h[p:], s.Blocks)
		if s.Len == 1 {
			d = decEntry(h, d, o, si)
		}
	}
	for i := range T {
		if h[o.rowSeq+i] < 0 {
			return fmt.Errorf("%w: row %d belongs to no sequence", ErrBadStep, i)
		}
	}
	for i := T; i < n; i++ {
		si := S + i - T
		h[o.rowSeq+i] = int32(si)
		h[o.seqInfo+4*si], h[o.seqInfo+4*si+1], h[o.seqInfo+4*si+2], h[o.seqInfo+4*si+3] = int32(i), 1, 0, 0
		d = decEntry(h, d, o, si)
	}
	for ; d < o.decSeqs+4*n; d += 4 {
		h[d], h[d+1], h[d+2], h[d+3] = 0, 0, 0, -1 // no sequence: the blocks exit
	}
	nPreTiles := 0
	if mixed {
		nPreTiles = preTilesCap(n)
		pt, end := o.preTiles, o.preTiles+4*nPreTiles
		for si, s := range meta.Seqs {
			if s.Len == 1 {
				continue
			}
			if pt+4*tilesOf(s.Len, preRows) > end {
				return fmt.Errorf("%w: more prefill tiles than %d", ErrBadStep, nPreTiles)
			}
			pt = putTiles(h, pt, s.Start, s.Start+s.Len, preRows, int32(si))
		}
		clear(h[pt:end]) // tiles with no rows
	}
	for i, r := range meta.LogitRows {
		if err := checkLogitRow(r, T); err != nil {
			return err
		}
		h[o.logitRows+i] = r
	}
	nTiles, tl := tilesCap(n, b.g.slots, sgTileRows), o.tiles
	nBig, bl := tilesCap(n, b.g.slots, sgBigRows), o.bigTiles
	for _, g := range meta.LoRA {
		if err := b.checkSegment(g, T); err != nil {
			return err
		}
		for r := g.Start; r < g.End; r++ {
			h[o.loraSlots+r] = int32(g.Slot)
		}
		if tl+4*tilesOf(g.End-g.Start, sgTileRows) > o.tiles+4*nTiles || bl+4*tilesOf(g.End-g.Start, sgBigRows) > o.bigTiles+4*nBig {
			return fmt.Errorf("%w: more LoRA tiles than %d (%d of %d rows)", ErrBadStep, nTiles, nBig, sgBigRows)
		}
		tl = putTiles(h, tl, g.Start, g.End, sgTileRows, int32(g.Slot))
		bl = putTiles(h, bl, g.Start, g.End, sgBigRows, int32(g.Slot))
	}
	clear(h[tl : o.tiles+4*nTiles])  // tiles with no rows
	clear(h[bl : o.bigTiles+4*nBig]) // the same
	if b.chain.on {                  // the rows' token sources, after the page tables
		src := h[o.tokFrom : o.tokFrom+n]
		if err := b.fillTokFrom(src, meta); err != nil {
			return err
		}
		if err := cuda.CopyHtoD(b.s, b.g.dev.Ptr()+cuda.DevicePtr(4*o.tokFrom), src); err != nil {
			return err
		}
	}
	if err := cuda.CopyHtoD(b.s, b.g.dev.Ptr(), h[:p]); err != nil {
		return err
	}
	b.meta, b.off, b.metaBase = meta, o, b.g.dev.Ptr()
	b.nRows, b.nLogit = n, key.logits
	b.nDec, b.nPre, b.nPreTiles = n, 0, nPreTiles
	b.decSplit, b.decV, b.part = b.decSplitFor(n), b.decVariantFor(n), b.g.part
	b.nLora, b.nTiles, b.nBig = 0, 0, 0
	b.stepRank, b.stepTmp, b.stepTmpFloats = 0, 0, 0
	if rank > 0 {
		b.nLora, b.nTiles, b.nBig = n, nTiles, nBig
		b.stepRank, b.stepTmp, b.stepTmpFloats = rank, b.g.tmp.Ptr(), b.graphTmpFloats(rank)
	}
	b.graphLayout = true
	return nil
}

// The engine finds Warmup by a type assertion: keep its signature.
var _ engine.Warmer = (*Backend)(nil)

// Warmup records the decode and mixed graphs of every bucket for progs
// (engine.Warmer), at most max of those still missing (max <= 0: all), in
// order of likely use (no adapters first, decode before mixed, small
// buckets first): each is run once on padding alone (no sequence is
// touched), then recorded. left is how many are still missing (a
// recording dropped meanwhile, when a buffer moved, is found by the next
// call, or recorded by the first step that needs it).
func (b *Backend) Warmup(progs []engine.Program, max int) (done, left int, err error) {
	if err := b.freeStaging(); err != nil {
		return 0, 0, err
	}
	if b.g.off {
		return 0, 0, nil
	}
	if err := b.tuneGemms(); err != nil {
		return 0, 0, err
	}
	empty := &engine.StepMeta{}
	kinds := []bool{false}
	if b.preOK {
		kinds = append(kinds, true)
	}
	for _, prog := range progs {
		for _, mixed := range kinds {
			for _, n := range graphBuckets[:bucketIndex(b.g.maxRows)+1] {
				for _, logits := range b.logitCaps(n, mixed) {
					key := b.graphKeyOf(n, prog.Shape, mixed, logits)
					if b.g.execs[key] != nil {
						continue
					}
					if max > 0 && done == max { // counted, not recorded: the scratch stays as it is
						left++
						continue
					}
					if err := b.sizeGraphTmp(key); err != nil {
						return done, 0, err
					}
					if err := b.fillGraphMeta(empty, key); err != nil {
						return done, 0, err
					}
					err = b.warmRecord(key, prog)
					b.meta, b.err = nil, nil
					if err != nil {
						return done, 0, fmt.Errorf("gpu: warm up %d rows (logits of %d): %w", n, key.logits, err)
					}
					done++
				}
			}
		}
	}
	return done, left, nil
}
