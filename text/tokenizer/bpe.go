package tokenizer

import (
	"errors"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"unicode/utf8"
)

type mergeInfo struct {
	rank int32
	id   int32
}

type bpe struct {
	vocab        map[string]int32
	merges       map[uint64]mergeInfo
	unk          int32 // -1: none
	fuseUnk      bool
	byteFallback bool
	ignoreMerges bool
	prefix       string // continuing_subword_prefix
	suffix       string // end_of_word_suffix
	byteIDs      [256]int32
}

func pairKey(a, b int32) uint64 { return uint64(uint32(a))<<32 | uint64(uint32(b)) }

func newBPE(rm *rawModel) (*bpe, error) {
	m := &rm.rest
	if m.Type != "BPE" && !(m.Type == "" && rm.merges != nil) {
		return nil, fmt.Errorf("unsupported model type %q (only BPE)", m.Type)
	}
	if m.Dropout != nil && *m.Dropout != 0 {
		return nil, fmt.Errorf("BPE dropout %v is not supported", *m.Dropout)
	}
	b := &bpe{unk: -1, fuseUnk: m.FuseUnk, byteFallback: m.ByteFallback, ignoreMerges: m.IgnoreMerges}
	// Copy the vocabulary keys into one arena so the document can be freed.
	total := 0
	for _, k := range rm.vocabK {
		total += len(k)
	}
	var ab strings.Builder
	ab.Grow(total)
	for _, k := range rm.vocabK {
		ab.WriteString(k)
	}
	arena := ab.String()
	b.vocab = make(map[string]int32, len(rm.vocabK))
	off := 0
	for i, k := range rm.vocabK {
		b.vocab[arena[off:off+len(k)]] = rm.vocabV[i]
		off += len(k)
	}
	if m.ContinuingSubwordPrefix != nil {
		b.prefix = *m.ContinuingSubwordPrefix
	}
	if m.EndOfWordSuffix != nil {
		b.suffix = *m.EndOfWordSuffix
	}
	if m.UnkToken != nil {
		id, ok := b.vocab[*m.UnkToken]
		if !ok {
			return nil, fmt.Errorf("unk_token %q not in vocabulary", *m.UnkToken)
		}
		b.unk = id
	}
	for i := range b.byteIDs {
		id, ok := b.vocab[fmt.Sprintf("<0x%02X>", i)]
		if !ok {
			id = -1
		}
		b.byteIDs[i] = id
	}
	// Resolve merge token ids in parallel (read-only vocab lookups), then fill the map.
	keys := make([]uint64, len(rm.merges))
	ids := make([]int32, len(rm.merges))
	workers := min(runtime.GOMAXPROCS(0), max(1, len(rm.merges)/16384), 16)
	errs := make([]error, workers)
	var wg sync.WaitGroup
	for w := range workers {
		lo, hi := w*len(rm.merges)/workers, (w+1)*len(rm.merges)/workers
		wg.Go(func() { errs[w] = b.resolveMerges(rm.merges, lo, hi, keys, ids) })
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	b.merges = make(map[uint64]mergeInfo, len(rm.merges))
	for i, k := range keys {
		b.merges[k] = mergeInfo{rank: int32(i), id: ids[i]}
	}
	return b, nil
}

func (b *bpe) resolveMerges(merges [][2]string, lo, hi int, keys []uint64, ids []int32) error {
	var buf []byte
	for i := lo; i < hi; i++ {
		p := merges[i]
		a, ok := b.vocab[p[0]]
		if !ok {
			return fmt.Errorf("merge %d: token %q not in vocabulary", i, p[0])
		}
		c, ok := b.vocab[p[1]]
		if !ok {
			return fmt.Errorf("merge %d: token %q not in vocabulary", i, p[1])
		}
		if len(b.prefix) > len(p[1]) {
			return fmt.Errorf("merge %d: token %q shorter than continuing_subword_prefix", i, p[1])
		}
		buf = append(append(buf[:0], p[0]...), p[1][len(b.prefix):]...)
		id, ok := b.vocab[string(buf)]
		if !ok {
			return fmt.Errorf("merge %d: merged token %q not in vocabulary", i, buf)
		}
		keys[i], ids[i] = pairKey(a, c), id
	}
	return nil
}

type symbol struct {
	id         int32
	prev, next int32
	dead       bool
}

type mergeItem struct {
	rank, pos, id int32
}

func (a mergeItem) less(b mergeItem) bool {
	if a.rank != b.rank {
		return a.rank < b.rank
	}
	return a.pos < b.pos
}

func heapPush(h []mergeItem, it mergeItem) []mergeItem {
	h = append(h, it)
	i := len(h) - 1
	for i > 0 {
		p := (i - 1) / 2
		if !h[i].less(h[p]) {
			break
		}
		h[i], h[p] = h[p], h[i]
		i = p
	}
	return h
}

func heapPop(h []mergeItem) (mergeItem, []mergeItem) {
	top := h[0]
	n := len(h) - 1
	h[0] = h[n]
	h = h[:n]
	i := 0
	for {
		l := 2*i + 1
		if l >= n {
			break
		}
		m := l
		if r := l + 1; r < n && h[r].less(h[l]) {
			m = r
		}
		if !h[m].less(h[i]) {
			break
		}
		h[i], h[m] = h[m], h[i]
		i = m
	}
	return top, h
}

// tokenize runs the BPE model on one pre-tokenized word w (in model space, i.e.
// already byte-level mapped when applicable) and appends the ids to out. It
// mirrors tokenizers' BPE::tokenize / merge_word / Word::merge_all. Characters
// that cannot be represented (no vocab entry, no byte fallback, no unk token;
// an error in Hugging Face) are dropped.
func (b *bpe) tokenize(w []byte, out []int32, sc *scratch) []int32 {
	if len(w) == 0 {
		return out
	}
	if b.ignoreMerges {
		if id, ok := b.vocab[string(w)]; ok {
			return append(out, id)
		}
	}
	syms := sc.syms[:0]
	add := func(id int32) {
		n := int32(len(syms))
		syms = append(syms, symbol{id: id, prev: n - 1, next: n + 1})
	}
	unkPending := false
	for i := 0; i < len(w); {
		_, size := utf8.DecodeRune(w[i:])
		piece := w[i : i+size]
		isFirst, isLast := i == 0, i+size == len(w)
		i += size
		var id int32
		var ok bool
		var s string
		if (b.prefix != "" && !isFirst) || (b.suffix != "" && isLast) {
			s = string(piece)
			if !isFirst {
				s = b.prefix + s
			}
			if isLast {
				s += b.suffix
			}
			id, ok = b.vocab[s]
		} else {
			id, ok = b.vocab[string(piece)]
		}
		if ok {
			if unkPending {
				add(b.unk)
				unkPending = false
			}
			add(id)
			continue
		}
		if b.byteFallback {
			bs := piece
			if s != "" {
				bs = []byte(s)
			}
			all := true
			for _, c := range bs {
				if b.byteIDs[c] < 0 {
					all = false
					break
				}
			}
			if all {
				for _, c := range bs {
					add(b.byteIDs[c])
				}
				continue
			}
		}
		if b.unk < 0 {
			continue // errNoUnk in Hugging Face
		}
		if unkPending && b.fuseUnk {
			continue
		}
		if unkPending {
			add(b.unk)
		}
		unkPending = true
	}
	if unkPending {
		add(b.unk)
	}
	if len(syms) > 0 {
		syms[len(syms)-1].next = -1
	}

	// merge_all: repeatedly merge the adjacent pair with the lowest rank
	// (leftmost on ties).
	h := sc.heap[:0]
	for i := 0; i+1 < len(syms); i++ {
		if m, ok := b.merges[pairKey(syms[i].id, syms[i+1].id)]; ok {
			h = heapPush(h, mergeItem{rank: m.rank, pos: int32(i), id: m.id})
		}
	}
	for len(h) > 0 {
		var top mergeItem
		top, h = heapPop(h)
		s := &syms[top.pos]
		if s.dead || s.next < 0 {
			continue
		}
		nx := s.next
		right := syms[nx]
		m, ok := b.merges[pairKey(s.id, right.id)]
		if !ok || m.id != top.id {
			continue // stale entry
		}
		s.id = top.id
		s.next = right.next
		syms[nx].dead = true
		if right.next >= 0 {
			syms[right.next].prev = top.pos
		}
		if s.prev >= 0 {
			if m, ok := b.merges[pairKey(syms[s.prev].id, s.id)]; ok {
				h = heapPush(h, mergeItem{rank: m.rank, pos: s.prev, id: m.id})
			}
		}
		if s.next >= 0 {
			if m, ok := b.merges[pairKey(s.id, syms[s.next].id)]; ok {
				h = heapPush(h, mergeItem{rank: m.rank, pos: top.pos, id: m.id})
			}
		}
	}
	for i := range syms {
		if !syms[i].dead {
			out = append(out, syms[i].id)
		}
	}
	sc.syms, sc.heap = syms, h
	return out
}
