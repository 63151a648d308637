package scheduler

import (
	"container/list"
	"crypto/sha256"
	"encoding/binary"

	"github.com/peftd/peftd/runtime/engine"
)

// prefixKey names a full KV page by everything that determined its
// contents: the adapter and its version, and every token up to the page's
// end (a hash chain: the key of the page before, then this page's tokens).
// A replaced adapter has a new version, so its old pages can never match.
type prefixKey [sha256.Size]byte

func prefixRoot(adapter, version string) prefixKey {
	h := sha256.New()
	h.Write([]byte("peftd prefix v1\x00"))
	h.Write([]byte(adapter))
	h.Write([]byte{0})
	h.Write([]byte(version))
	var k prefixKey
	h.Sum(k[:0])
	return k
}

func (k prefixKey) next(tokens []int32) prefixKey {
	h := sha256.New()
	h.Write(k[:])
	var b [4]byte
	for _, t := range tokens {
		binary.LittleEndian.PutUint32(b[:], uint32(t))
		h.Write(b[:])
	}
	var out prefixKey
	h.Sum(out[:0])
	return out
}

// cachedPage is a full KV page kept for reuse; the cache holds one
// reference to it (engine.Retain).
type cachedPage struct {
	key   prefixKey
	block int32
	elem  *list.Element // in lru while only the cache holds the page
	users int           // sequences attached to it (besides its writer)
}

// prefixCache maps page keys to KV pages (engine goroutine only). Pages
// only the cache holds are evictable, least recently used first.
type prefixCache struct {
	e     *engine.Engine
	pages map[prefixKey]*cachedPage
	byBlk map[int32]*cachedPage
	lru   *list.List // of *cachedPage, front = most recently used
}

func newPrefixCache(e *engine.Engine) *prefixCache {
	return &prefixCache{e: e, pages: map[prefixKey]*cachedPage{}, byBlk: map[int32]*cachedPage{}, lru: list.New()}
}

// evictable is the number of pages the cache alone holds.
func (c *prefixCache) evictable() int { return c.lru.Len() }

// evict frees up to n cache-only pages, least recently used first, and
// returns how many it freed.
func (c *prefixCache) evict(n int) int {
	freed := 0
	for freed < n {
		el := c.lru.Back()
		if el == nil {
			break
		}
		p := el.Value.(*cachedPage)
		c.lru.Remove(el)
		delete(c.pages, p.key)
		delete(c.byBlk, p.block)
		c.e.Unref(p.block)
		freed++
	}
	return freed
}

// match returns the pages holding the longest cached prefix of tokens, in
// whole pages, at most limit tokens long, and the key of its last page
// (root when none matched).
func (c *prefixCache) match(root prefixKey, tokens []int32, bs, limit int) ([]int32, prefixKey) {
	var blocks []int32
	last := root
	for end := bs; end <= limit && end <= len(tokens); end += bs {
		k := last.next(tokens[end-bs : end])
		p := c.pages[k]
		if p == nil {
			break
		}
		blocks, last = append(blocks, p.block), k
	}
	return blocks, last
}

// use marks pages as held by one more sequence (out of the evictable set).
func (c *prefixCache) use(blocks []int32) {
	for _, b := range blocks {
		p := c.byBlk[b]
		if p.elem != nil {
			c.lru.Remove(p.elem)
			p.elem = nil
		}
		p.users++
	}
}

// done is called when a sequence holding pages lets them go (Release
// follows): pages only the cache then holds become evictable, most
// recently used first.
func (c *prefixCache) done(blocks []int32) {
	for _, b := range blocks {
		p := c.byBlk[b]
		if p == nil {
			continue
		}
		p.users--
		if p.users == 0 {
			p.elem = c.lru.PushFront(p)
		}
	}
}

// add keeps a full page a sequence wrote under key (if no page has that
// key yet); the writer counts as a user until it is done.
func (c *prefixCache) add(key prefixKey, block int32) bool {
	if c.pages[key] != nil || c.byBlk[block] != nil {
		return false
	}
	p := &cachedPage{key: key, block: block, users: 1}
	c.pages[key], c.byBlk[block] = p, p
	c.e.Retain(block)
	return true
}
