package gpu

import (
	"fmt"

	"github.com/peftd/peftd/runtime/cuda"
	"github.com/peftd/peftd/runtime/engine"
)

type metaOffsets struct {
	tokens, pos, kvSlots, rowSeq, seqInfo, pages, loraRows, loraSlots, logitRows, tiles, decSeqs, preRows, preTiles, end int
	bigTiles                                                                                                             int // sgmv_shrink64's LoRA tiles (sgBigRows rows)
	rowLora                                                                                                              int // each row's adapter slot, -1 for none (the ops that add a LoRA update skip those rows)
	tokFrom                                                                                                              int // chained steps (graph layout, chain.go): each row's source in the ring, -1 for its token
}

func (b *Backend) i32(off int) cuda.DevicePtr { return b.metaBase + uint64(4*off) }

// The checks of a step's metadata, shared by Begin and fillGraphMeta (the
// eager and the recorded layouts).

// checkRow: row i's token is in the vocabulary and its KV slot in the cache.
func (b *Backend) checkRow(meta *engine.StepMeta, i int) error {
	if t := meta.Tokens[i]; t < 0 || t >= int32(b.cfg.VocabSize) {
		return fmt.Errorf("%w: token %d outside the vocabulary", ErrBadStep, t)
	}
	if s, n := meta.KVSlots[i], int32(b.kv.Blocks*b.kv.BlockSize); s < 0 || s >= n {
		return fmt.Errorf("%w: KV slot %d outside the cache (%d)", ErrBadStep, s, n)
	}
	return nil
}

// checkSeq: sequence si's rows lie within the step's T, its pages cover its
// context and are in the cache.
func (b *Backend) checkSeq(si int, s engine.SeqMeta, T int) error {
	if s.Start < 0 || s.Len <= 0 || s.Start+s.Len > T || s.Context < s.Len || (s.Context+b.kv.BlockSize-1)/b.kv.BlockSize > len(s.Blocks) {
		return fmt.Errorf("%w: sequence %d %+v", ErrBadStep, si, s)
	}
	for _, blk := range s.Blocks {
		if blk < 0 || int(blk) >= b.kv.Blocks {
			return fmt.Errorf("%w: KV block %d outside the cache (%d)", ErrBadStep, blk, b.kv.Blocks)
		}
	}
	return nil
}

// checkSegment: a LoRA segment lies within the step's T rows and uses a
// loaded slot.
func (b *Backend) checkSegment(g engine.Segment, T int) error {
	if g.Start < 0 || g.End > T || g.Start > g.End {
		return fmt.Errorf("%w: LoRA segment [%d,%d) outside %d rows", ErrBadStep, g.Start, g.End, T)
	}
	if g.Slot < 0 || g.Slot >= len(b.slots) || b.slots[g.Slot] == nil {
		return fmt.Errorf("%w: LoRA segment uses empty slot %d", ErrBadStep, g.Slot)
	}
	return nil
}

// tilesOf is how many tiles of up to size rows hold n rows.
func tilesOf(n, size int) int { return (n + size - 1) / size }

// putTiles writes the tiles {first row, rows, tag, 0} that cover rows
// [start, end) in pieces of up to size rows at h[at:] (LoRA tiles: tag is
// the adapter slot; prefill tiles: the sequence) and returns the index
// after them.
func putTiles(h []int32, at, start, end, size int, tag int32) int {
	for r := start; r < end; r += size {
		h[at], h[at+1], h[at+2], h[at+3] = int32(r), int32(min(size, end-r)), tag, 0
		at += 4
	}
	return at
}

// checkLogitRow: a logits row is one of the step's T rows.
func checkLogitRow(r int32, T int) error {
	if r < 0 || int(r) >= T {
		return fmt.Errorf("%w: logit row %d outside %d rows", ErrBadStep, r, T)
	}
	return nil
}

// Begin validates the step's metadata and uploads it in one copy.
func (b *Backend) Begin(meta *engine.StepMeta) error {
	b.err = nil
	b.gen++
	b.la.pend, b.la.forkIn = pendingDelta{}, 0
	T := len(meta.Tokens)
	if T == 0 || T > b.maxT {
		return fmt.Errorf("%w: %d rows (max %d)", ErrBadStep, T, b.maxT)
	}
	for _, k := range meta.TokenFrom {
		if k >= 0 { // only a graph replay reads tokens on the device (Chainable)
			return fmt.Errorf("%w: a step run op by op takes every token from the host", ErrBadStep)
		}
	}
	if len(meta.Positions) != T || len(meta.KVSlots) != T {
		return fmt.Errorf("%w: %d tokens, %d positions, %d KV slots", ErrBadStep, T, len(meta.Positions), len(meta.KVSlots))
	}
	pages, nLora := 0, 0
	for _, s := range meta.Seqs {
		pages += len(s.Blocks)
	}
	for _, g := range meta.LoRA {
		if err := b.checkSegment(g, T); err != nil {
			return err
		}
		nLora += g.End - g.Start
	}
	o := metaOffsets{tokens: 0, pos: T, kvSlots: 2 * T, rowSeq: 3 * T, seqInfo: 4 * T}
	o.pages = o.seqInfo + 4*len(meta.Seqs)
	o.loraRows = o.pages + pages
	o.loraSlots = o.loraRows + nLora
	o.logitRows = o.loraSlots + nLora
	o.tiles = (o.logitRows + len(meta.LogitRows) + 3) &^ 3 // int4 aligned
	nTiles, nBig := 0, 0
	for _, g := range meta.LoRA {
		nTiles += tilesOf(g.End-g.Start, sgTileRows)
		nBig += tilesOf(g.End-g.Start, sgBigRows)
	}
	o.decSeqs = o.tiles + 4*nTiles
	nDec := 0
	useDec := b.decOK && !b.force.attnRows
	if useDec {
		for _, s := range meta.Seqs {
			if s.Len == 1 {
				nDec++
			}
		}
	}
	o.preRows = o.decSeqs + 4*nDec // decEntry's four words each
	nPre := T
	if nDec > 0 {
		nPre = T - nDec
	}
	o.rowLora = o.preRows + nPre
	// attn_prefill tiles: PRE_ROWS consecutive rows of a sequence that is
	// not a decode sequence
	nPreTiles := 0
	if b.preOK && !b.force.attnRows {
		for _, s := range meta.Seqs {
			if nDec == 0 || s.Len != 1 {
				nPreTiles += tilesOf(s.Len, preRows)
			}
		}
	}
	o.preTiles = o.rowLora + T
	o.bigTiles = (o.preTiles + 4*nPreTiles + 3) &^ 3 // int4 aligned
	o.end = o.bigTiles + 4*nBig
	if err := b.s.Synchronize(); err != nil { // the pinned staging may still feed a copy
		return err
	}
	if err := b.growMeta(o.end); err != nil {
		return err
	}
	b.decSplit, b.decV = 1, decV4
	if nDec > 0 {
		if err := b.planDecode(nDec); err != nil {
			return err
		}
	}
	if _, err := b.waitLoads(meta, true); err != nil { // the ops run eagerly: wait layer by layer
		return err
	}
	if err := b.startTiming(); err != nil {
		return err
	}
	h := b.metaHost.Int32s()
	for i, t := range meta.Tokens {
		if err := b.checkRow(meta, i); err != nil {
			return err
		}
		h[o.tokens+i] = t
	}
	copy(h[o.pos:], meta.Positions)
	copy(h[o.kvSlots:], meta.KVSlots)
	for i := range T {
		h[o.rowSeq+i] = -1
	}
	p := o.pages
	for si, s := range meta.Seqs {
		if err := b.checkSeq(si, s, T); err != nil {
			return err
		}
		for r := s.Start; r < s.Start+s.Len; r++ {
			h[o.rowSeq+r] = int32(si)
		}
		h[o.seqInfo+4*si] = int32(s.Start)
		h[o.seqInfo+4*si+1] = int32(s.Len)
		h[o.seqInfo+4*si+2] = int32(s.Context)
		h[o.seqInfo+4*si+3] = int32(p - o.pages) // offset into the pages array
		p += copy(h[p:], s.Blocks)
	}
	for i := range T {
		if h[o.rowSeq+i] < 0 {
			return fmt.Errorf("%w: row %d belongs to no sequence", ErrBadStep, i)
		}
	}
	for i := range T {
		h[o.rowLora+i] = -1
	}
	l := 0
	for _, g := range meta.LoRA {
		for r := g.Start; r < g.End; r++ {
			h[o.rowLora+r] = int32(g.Slot)
			h[o.loraRows+l] = int32(r)
			h[o.loraSlots+l] = int32(g.Slot)
			l++
		}
	}
	for i, r := range meta.LogitRows {
		if err := checkLogitRow(r, T); err != nil {
			return err
		}
		h[o.logitRows+i] = r
	}
	if nDec > 0 {
		d, p := o.decSeqs, o.preRows
		for si, s := range meta.Seqs {
			if s.Len == 1 {
				d = decEntry(h, d, o, si)
			} else {
				for r := s.Start; r < s.Start+s.Len; r++ {
					h[p] = int32(r)
					p++
				}
			}
		}
	}
	pt := o.preTiles
	for si, s := range meta.Seqs {
		if nPreTiles == 0 || (nDec > 0 && s.Len == 1) {
			continue
		}
		pt = putTiles(h, pt, s.Start, s.Start+s.Len, preRows, int32(si))
	}
	tl, bl := o.tiles, o.bigTiles
	for _, g := range meta.LoRA {
		tl = putTiles(h, tl, g.Start, g.End, sgTileRows, int32(g.Slot))
		bl = putTiles(h, bl, g.Start, g.End, sgBigRows, int32(g.Slot))
	}
	if err := cuda.CopyHtoD(b.s, b.metaDev.Ptr(), h[:o.end]); err != nil {
		return err
	}
	b.meta, b.off, b.nLora, b.nTiles, b.nBig = meta, o, nLora, nTiles, nBig
	b.metaBase, b.nRows, b.nLogit, b.graphLayout = b.metaDev.Ptr(), T, len(meta.LogitRows), false
	b.nDec, b.nPre, b.nPreTiles, b.part = nDec, nPre, nPreTiles, b.attnPart
	b.stepRank, b.stepTmp, b.stepTmpFloats = b.maxRank, 0, 0
	if b.loraTmp != nil {
		b.stepTmp, b.stepTmpFloats = b.loraTmp.Ptr(), b.tmpFloats()
	}
	return nil
}

// decMaxG is DEC_MAXG in llama.cu: query heads per KV head attn_decode handles.
const decMaxG = 8

// planDecode chooses the KV split of the step's decode sequences as the
// recorded step of the same bucket does (decSplitFor of the bucket; each
// sequence's chunk computed on the device from its context), so eager and
// replayed steps compute the same sums; and sizes the partials' scratch for
// it. The stream is idle (Begin synchronized it).
func (b *Backend) planDecode(nDec int) error {
	n := nDec
	if i := bucketIndex(nDec); graphBuckets[i] >= nDec {
		n = graphBuckets[i]
	}
	split := b.decSplitFor(n)
	b.decSplit, b.decV = split, b.decVariantFor(n)
	if split > 1 {
		need := 4 * nDec * b.cfg.Heads * split * (b.kv.HeadDim + 2)
		if b.attnPart == nil || b.attnPart.Size() < need {
			b.attnPart.Free()
			b.attnPart = nil
			var err error
			if b.attnPart, err = b.ctx.Alloc(max(need, 1<<20)); err != nil {
				return err
			}
		}
	}
	return nil
}

// fail records the first error of the step.
func (b *Backend) fail(err error) {
	if err != nil && b.err == nil {
		b.err = err
	}
}

func (b *Backend) ok() bool { return b.err == nil && b.meta != nil }

func (b *Backend) rows() int { return b.nRows }

func (b *Backend) launch(f *cuda.Function, grid, block cuda.Dim3, args ...any) {
	b.launchOn(b.s, f, grid, block, args...)
}

// launchCluster enqueues f on the compute stream with its blocks in
// clusters of cluster's shape.
func (b *Backend) launchCluster(f *cuda.Function, grid, block, cluster cuda.Dim3, args ...any) {
	if b.err != nil {
		return
	}
	b.fail(f.LaunchCluster(b.s, grid, block, cluster, 0, args...))
	b.g.capture.launched(b.s)
}

// launchOn enqueues f on stream st (the LoRA stream or the compute stream).
func (b *Backend) launchOn(st *cuda.Stream, f *cuda.Function, grid, block cuda.Dim3, args ...any) {
	b.launchShmOn(st, f, grid, block, 0, args...)
}

// launchShmOn is launchOn with shmem bytes of dynamic shared memory.
func (b *Backend) launchShmOn(st *cuda.Stream, f *cuda.Function, grid, block cuda.Dim3, shmem int, args ...any) {
	if b.err != nil {
		return
	}
	b.fail(f.Launch(st, grid, block, shmem, args...))
	b.g.capture.launched(st)
}

func buf(x engine.Buffer) *Buffer {
	if x == nil {
		return nil
	}
	return x.(*Buffer)
}

func ptr(x *Buffer) uint64 {
	if x == nil {
		return 0
	}
	return x.mem.Ptr() + uint64(2*x.off)
}

func (b *Backend) check(cond bool, format string, args ...any) bool {
	if !cond {
		b.fail(fmt.Errorf("gpu: "+format, args...))
	}
	return cond
}

// decEntry writes attn_decode's entry for decode sequence si at h[d:d+4]
// (its row, its context, the offset of its page ids in the pages array, si:
// llama.cu's dec, read in one load) from the sequence's seqInfo words,
// already written, and returns the next entry's offset.
func decEntry(h []int32, d int, o metaOffsets, si int) int {
	s := h[o.seqInfo+4*si : o.seqInfo+4*si+4]
	h[d], h[d+1], h[d+2], h[d+3] = s[0], s[2], s[3], int32(si)
	return d + 4
}
