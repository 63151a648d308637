package gpu

import (
	"sync"
	"time"
	"weak"

	"github.com/peftd/peftd/runtime/lora"
)

// Adapter images kept in pinned host memory. An adapter's first upload
// fills its slot image chunk by chunk into the uploader's kept blocks
// (cuda.Uploader.StartBlocks) instead of its ring, and the blocks keep the
// image afterwards. When the same adapter comes back to the device (it was
// evicted from its slot but stayed in host memory), its image goes out by
// DMA alone, near the link's speed: on the H200 a 336 MB image lands in
// 7.85 ms this way (43 GB/s of the link's 54) against 48.5 ms through the
// ring, whose host fill (8 GB/s) is the bottleneck; issue 12's host ->
// first token went from 14.7 to 8.9 ms (docs/PERFORMANCE.md v0.18).
//
// An image is keyed by the *lora.Adapter it was made from, held weakly:
// the loader's host tier owns the adapter, and once it drops it (host TTL,
// budget) the image is dead and its blocks free. A new version of an
// adapter is a new *lora.Adapter, so it never matches an old image.
//
// Blocks are taken from dead images first, then from the least recently
// uploaded image on a device slot (it is wanted again only after its slot
// is emptied and the adapter asked for once more), then from the least
// recently uploaded one on no slot (the next request for its adapter
// wants it): with fewer kept images than slots (the default's five), the
// images kept are those of the adapters most recently sent off the device.
// An image being filled, or read by an upload that has not yet enqueued
// its copies, is never taken; copies already enqueued from a block are
// waited for before it is filled again (the uploader does).

// DefaultPinnedImageBytes is the pinned host memory kept for adapter images
// when Options.PinnedImageBytes is 0: five rank-32 images at 8B shapes (176
// MiB each in 16 MiB blocks), pinned in ~0.4-0.6 s on the H200 (1.8-2.8
// GB/s), on a goroutine (StartPinning) beside the graph recordings.
const DefaultPinnedImageBytes = 1 << 30

// PinnedBytes is the pinned host memory Options.PinnedImageBytes = opt
// asks for: DefaultPinnedImageBytes for 0, none for a negative value.
func PinnedBytes(opt int64) int64 {
	switch {
	case opt == 0:
		return DefaultPinnedImageBytes
	case opt < 0:
		return 0
	}
	return opt
}

// PinnedStats reports the image cache's counters (Blocks 0 when it has none).
func (b *Backend) PinnedStats() PinnedStats {
	s := b.pins.snapshot()
	s.Ring = b.ringUploads.Load()
	return s
}

// StartPinning starts pinning the blocks for adapter images on a goroutine,
// a block at a time (0.7-1.2 s for 2 GiB on the H200); uploads until then
// use the blocks pinned so far, or the ring. Pinning holds up the driver:
// on the H200, begun at Init it slowed the weight upload (start -> ready
// +0.7 s), and begun after ready it slowed the first steps 2-4x (15-36 ms
// against 5.3) and an adapter's first upload (304 ms). The server starts
// it when the graph recordings begin and is ready once it ends
// (server.warmEngine). Later calls do nothing.
func (b *Backend) StartPinning() {
	if b.pinDone == nil {
		return // not initialized
	}
	b.pinOnce.Do(func() {
		b.pinStarted.Store(true)
		go b.pinBlocks(b.pinN)
	})
}

// waitPinning waits until the pinning StartPinning began has ended (at
// once when none began): timings taken meanwhile are not the card's (the
// FP8 tuning's first products timed 4.9 ms instead of 15 µs while 1 GiB
// was pinned beside them, PERFORMANCE v0.66).
func (b *Backend) waitPinning() {
	if b.pinStarted.Load() {
		<-b.pinDone
	}
}

// PinnedDone closes once the blocks for adapter images are pinned
// (StartPinning), or pinning stopped (Close, or the host refused more:
// PinnedStats.PinErr).
func (b *Backend) PinnedDone() <-chan struct{} {
	if b.pinDone == nil { // not initialized: nothing is being pinned
		c := make(chan struct{})
		close(c)
		return c
	}
	return b.pinDone
}

// pinBlocks pins n kept blocks one at a time and hands each to the image
// cache as it is pinned. It stops early when the backend closes or the
// host refuses more (a smaller cache, not a failure: PinErr says why).
func (b *Backend) pinBlocks(n int) {
	defer close(b.pinDone)
	t0 := time.Now()
	for i := 0; i < n && !b.pinStop.Load(); i++ {
		if _, err := b.up.AddBlocks(1); err != nil {
			b.pins.pinned(0, time.Since(t0), err)
			return
		}
		b.pins.pinned(1, time.Since(t0), nil)
	}
}

// pinnedImage is one adapter's image in kept blocks.
type pinnedImage struct {
	key     weak.Pointer[lora.Adapter]
	bytes   int
	blocks  []int
	used    uint64 // clock at its last upload
	slots   int    // device slots whose image came from it
	reading int    // uploads from it still enqueuing copies: not to be refilled
	filling bool   // its first upload is filling the blocks: not usable yet
}

// imageCache assigns kept blocks to adapter images.
type imageCache struct {
	mu     sync.Mutex
	free   []int
	images []*pinnedImage
	clock  uint64
	stats  PinnedStats
}

// PinnedStats counts the image cache's work (Backend.PinnedStats).
type PinnedStats struct {
	Blocks, BlockBytes int           // kept blocks pinned so far and their size
	Pinned             time.Duration // how long pinning them took
	PinErr             error         // why pinning stopped short (the host refused more)
	Hits               int64         // uploads by DMA alone from a kept image
	Fills              int64         // uploads that filled kept blocks (the image kept after)
	Ring               int64         // uploads through the staging ring: no kept blocks, or no room (image larger than the cache, or every block busy)
	Evictions          int64         // images dropped to make room (dead ones not counted)
}

// Bytes is the pinned host memory of the kept blocks.
func (s PinnedStats) Bytes() int64 { return int64(s.Blocks) * int64(s.BlockBytes) }

func newImageCache(blocks, blockBytes int) *imageCache {
	c := &imageCache{stats: PinnedStats{Blocks: blocks, BlockBytes: blockBytes}}
	for i := range blocks {
		c.free = append(c.free, i)
	}
	return c
}

// pinned adds n newly pinned blocks (after Blocks) to the free ones.
func (c *imageCache) pinned(n int, took time.Duration, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for range n {
		c.free = append(c.free, c.stats.Blocks)
		c.stats.Blocks++
	}
	c.stats.Pinned, c.stats.PinErr = took, err
}

// hit returns a's image when the cache holds it whole, as its upload
// source (marked used).
func (c *imageCache) hit(a *lora.Adapter, bytes int) *pinnedImage {
	if c == nil {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, im := range c.images {
		if !im.filling && im.bytes == bytes && im.key.Value() == a {
			c.clock++
			im.used = c.clock
			im.reading++
			c.stats.Hits++
			return im
		}
	}
	return nil
}

// reserve returns blocks for a new image of a (filling until filled), or
// nil when they cannot be had: the upload then goes through the ring.
func (c *imageCache) reserve(a *lora.Adapter, bytes, blockBytes int) *pinnedImage {
	if c == nil {
		return nil
	}
	need := (bytes + blockBytes - 1) / blockBytes
	c.mu.Lock()
	defer c.mu.Unlock()
	if need > c.stats.Blocks {
		return nil
	}
	for _, im := range c.images {
		if im.filling && im.key.Value() == a {
			return nil // filled by another upload right now
		}
	}
	c.dropDead()
	for len(c.free) < need {
		v := c.victim()
		if v < 0 {
			return nil
		}
		c.drop(v)
		c.stats.Evictions++
	}
	im := &pinnedImage{key: weak.Make(a), bytes: bytes, blocks: append([]int(nil), c.free[len(c.free)-need:]...), filling: true}
	c.free = c.free[:len(c.free)-need]
	c.clock++
	im.used = c.clock
	c.images = append(c.images, im)
	return im
}

// filled ends im's first upload: with ok the image is usable, else its
// blocks are free again.
func (c *imageCache) filled(im *pinnedImage, ok bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if ok {
		im.filling = false
		c.stats.Fills++
		return
	}
	for i, x := range c.images {
		if x == im {
			c.drop(i)
			return
		}
	}
}

// read ends an upload from im (hit) once its copies are enqueued.
func (c *imageCache) read(im *pinnedImage) {
	c.mu.Lock()
	im.reading--
	c.mu.Unlock()
}

// onSlot counts im on (d = 1) or off (d = -1) a device slot.
func (c *imageCache) onSlot(im *pinnedImage, d int) {
	if c == nil || im == nil {
		return
	}
	c.mu.Lock()
	im.slots += d
	c.mu.Unlock()
}

// dropDead frees the blocks of images whose adapter is gone.
func (c *imageCache) dropDead() {
	for i := 0; i < len(c.images); {
		if im := c.images[i]; !im.busy() && im.key.Value() == nil {
			c.drop(i)
			continue
		}
		i++
	}
}

// victim is the index of the image to drop next, or -1.
func (c *imageCache) victim() int {
	best := -1
	for i, im := range c.images {
		if im.busy() {
			continue
		}
		if best < 0 {
			best = i
			continue
		}
		b := c.images[best]
		if (im.slots == 0) != (b.slots == 0) {
			if im.slots > 0 {
				best = i
			}
			continue
		}
		if im.used < b.used {
			best = i
		}
	}
	return best
}

// busy: being filled or read by an upload that has not enqueued its
// copies yet (a refill now could overwrite what it is about to copy).
func (im *pinnedImage) busy() bool { return im.filling || im.reading > 0 }

// drop removes image i and frees its blocks (mu held).
func (c *imageCache) drop(i int) {
	c.free = append(c.free, c.images[i].blocks...)
	c.images = append(c.images[:i], c.images[i+1:]...)
}

// snapshot returns the counters.
func (c *imageCache) snapshot() PinnedStats {
	if c == nil {
		return PinnedStats{}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.stats
}
