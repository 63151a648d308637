package engine

import "fmt"

// Sequence is one sequence's KV cache state.
type Sequence struct {
	blocks []int32
	n      int
	ahead  int // tokens of the launched step not yet waited for (Flight)
}

// Len is the number of tokens in the sequence's cache.
func (s *Sequence) Len() int { return s.n }

// Next is the sequence's length once the step in flight (Launch) ends
// well: Len, plus its tokens in that step.
func (s *Sequence) Next() int { return s.n + s.ahead }

// Release returns a sequence's KV pages to the pool; the sequence is empty after.
func (e *Engine) Release(s *Sequence) {
	for _, b := range s.blocks {
		e.Unref(b)
	}
	s.blocks, s.n, s.ahead = nil, 0, 0
}

// Reserve gives s pages for n tokens in all (those in its cache and those
// the coming steps append); pages it holds stay. With too few free pages
// it fails with ErrKVFull and allocates nothing. The scheduler reserves
// every input's pages before it issues a step, so a step it issues never
// fails for want of pages.
func (e *Engine) Reserve(s *Sequence, n int) error {
	need := e.BlocksFor(n) - len(s.blocks)
	if need <= 0 {
		return nil
	}
	if need > len(e.freeBlocks) {
		return fmt.Errorf("%w: need %d pages, %d free", ErrKVFull, need, len(e.freeBlocks))
	}
	for range need {
		b := e.freeBlocks[len(e.freeBlocks)-1]
		e.freeBlocks = e.freeBlocks[:len(e.freeBlocks)-1]
		e.refs[b] = 1
		s.blocks = append(s.blocks, b)
	}
	return nil
}

// Attach starts an empty sequence on pages that already hold the KV of its
// first n tokens (a cached prefix: full pages, so the sequence's own tokens
// go to pages of its own); each page gains a holder.
func (e *Engine) Attach(s *Sequence, blocks []int32, n int) error {
	if s.n != 0 || len(s.blocks) != 0 {
		return fmt.Errorf("%w: attach to a sequence that holds tokens", ErrBadInput)
	}
	if n != len(blocks)*e.opts.BlockSize {
		return fmt.Errorf("%w: attach %d tokens to %d pages of %d", ErrBadInput, n, len(blocks), e.opts.BlockSize)
	}
	for _, b := range blocks {
		if b < 0 || int(b) >= len(e.refs) || e.refs[b] <= 0 {
			return fmt.Errorf("%w: attach page %d that nobody holds", ErrBadInput, b)
		}
	}
	for _, b := range blocks {
		e.refs[b]++
	}
	s.blocks, s.n = append([]int32(nil), blocks...), n
	return nil
}

// Blocks is the sequence's page table (not to be modified).
func (s *Sequence) Blocks() []int32 { return s.blocks }

// Retain adds a holder to a page a sequence holds (the prefix cache keeps
// it past the sequence); Unref drops one.
func (e *Engine) Retain(b int32) { e.refs[b]++ }

// Unref drops a holder of page b; the page is free when none is left.
func (e *Engine) Unref(b int32) {
	e.refs[b]--
	if e.refs[b] == 0 {
		e.freeBlocks = append(e.freeBlocks, b)
	}
}
