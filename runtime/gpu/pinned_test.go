package gpu

import (
	"runtime"
	"slices"
	"testing"

	"github.com/peftd/peftd/runtime/lora"
)

const testBlock = 100

func mustReserve(t *testing.T, c *imageCache, a *lora.Adapter, bytes int) *pinnedImage {
	t.Helper()
	im := c.reserve(a, bytes, testBlock)
	if im == nil {
		t.Fatalf("reserve(%s, %d) found no room", a.Name, bytes)
	}
	return im
}

func TestImageCacheHitAfterFill(t *testing.T) {
	c := newImageCache(4, testBlock)
	a := &lora.Adapter{Name: "a"}
	if c.hit(a, 250) != nil {
		t.Fatal("hit on an empty cache")
	}
	im := mustReserve(t, c, a, 250)
	if len(im.blocks) != 3 {
		t.Fatalf("250 bytes in blocks of %d: %d blocks, want 3", testBlock, len(im.blocks))
	}
	if c.hit(a, 250) != nil {
		t.Fatal("hit on an image still being filled")
	}
	if c.reserve(a, 250, testBlock) != nil {
		t.Fatal("a second reservation for an adapter being filled")
	}
	c.filled(im, true)
	if c.hit(a, 251) != nil {
		t.Fatal("hit for another size (another layout)")
	}
	if c.hit(&lora.Adapter{Name: "a"}, 250) != nil {
		t.Fatal("hit for another adapter of the same name (a new version)")
	}
	got := c.hit(a, 250)
	if got != im {
		t.Fatal("no hit after the fill")
	}
	c.read(got)
	s := c.snapshot()
	if s.Hits != 1 || s.Fills != 1 || s.Blocks != 4 || s.BlockBytes != testBlock {
		t.Fatalf("stats %+v, want 1 hit, 1 fill, 4 blocks", s)
	}
	runtime.KeepAlive(a)
}

func TestImageCacheFailedFillFreesBlocks(t *testing.T) {
	c := newImageCache(2, testBlock)
	a, b := &lora.Adapter{Name: "a"}, &lora.Adapter{Name: "b"}
	im := mustReserve(t, c, a, 200)
	c.filled(im, false)
	if c.hit(a, 200) != nil {
		t.Fatal("hit on a failed fill")
	}
	mustReserve(t, c, b, 200) // both blocks free again
	runtime.KeepAlive(a)
}

func TestImageCacheVictims(t *testing.T) {
	c := newImageCache(3, testBlock)
	ads := []*lora.Adapter{{Name: "a"}, {Name: "b"}, {Name: "c"}, {Name: "d"}, {Name: "e"}}
	ims := make([]*pinnedImage, len(ads))
	for i := range 3 {
		ims[i] = mustReserve(t, c, ads[i], testBlock)
		c.filled(ims[i], true)
	}
	// c is the newest, but it is on a device slot (wanted only once it
	// leaves the device): it goes before a and b, which are on none
	c.onSlot(ims[2], 1)
	ims[3] = mustReserve(t, c, ads[3], testBlock)
	if c.hit(ads[2], testBlock) != nil {
		t.Fatal("c kept: the image on a slot should have gone first")
	}
	// then the least recently uploaded image on no slot: a
	c.filled(ims[3], true)
	mustReserve(t, c, ads[4], testBlock)
	if c.hit(ads[0], testBlock) != nil {
		t.Fatal("a kept: the oldest image on no slot should have gone")
	}
	got := c.hit(ads[1], testBlock)
	if got == nil {
		t.Fatal("b dropped")
	}
	// b is being read (a hit not yet enqueued), d was just used and e is
	// being filled: b and e cannot go, d can
	if c.hit(ads[3], testBlock) == nil {
		t.Fatal("d dropped")
	}
	c.read(ims[3])
	ims[0] = mustReserve(t, c, ads[0], testBlock)
	if c.hit(ads[3], testBlock) != nil {
		t.Fatal("d kept while b was being read")
	}
	// every image busy now (b read, e and a filled): no room
	if c.reserve(ads[2], testBlock, testBlock) != nil {
		t.Fatal("a block taken from an image being read or filled")
	}
	c.read(got)
	if s := c.snapshot(); s.Evictions != 3 {
		t.Fatalf("evictions %d, want 3", s.Evictions)
	}
	// too big for the whole cache: through the ring
	if c.reserve(ads[1], 4*testBlock, testBlock) != nil {
		t.Fatal("an image larger than the cache reserved")
	}
	runtime.KeepAlive(ads)
}

func TestImageCacheDeadAdapterFreesBlocks(t *testing.T) {
	c := newImageCache(2, testBlock)
	func() {
		a := &lora.Adapter{Name: "gone"}
		im := mustReserve(t, c, a, 2*testBlock)
		c.filled(im, true)
		runtime.KeepAlive(a)
	}()
	runtime.GC() // the host tier dropped the adapter: its weak key is nil
	b := &lora.Adapter{Name: "b"}
	im := mustReserve(t, c, b, 2*testBlock)
	slices.Sort(im.blocks)
	if !slices.Equal(im.blocks, []int{0, 1}) {
		t.Fatalf("blocks %v, want the dead image's [0 1]", im.blocks)
	}
	if s := c.snapshot(); s.Evictions != 0 {
		t.Fatalf("a dead image counted as an eviction: %+v", s)
	}
	runtime.KeepAlive(b)
}

func TestImageCacheNil(t *testing.T) {
	var c *imageCache // no pinned blocks: every upload through the ring
	a := &lora.Adapter{}
	if c.hit(a, 1) != nil || c.reserve(a, 1, testBlock) != nil {
		t.Fatal("a nil cache gave an image")
	}
	c.onSlot(nil, 1)
	if s := c.snapshot(); s != (PinnedStats{}) {
		t.Fatalf("stats %+v", s)
	}
}

func TestImageCacheGrowsAsBlocksArePinned(t *testing.T) {
	c := newImageCache(0, testBlock) // Init's: blocks come from pinBlocks
	a := &lora.Adapter{Name: "a"}
	if c.reserve(a, testBlock, testBlock) != nil {
		t.Fatal("reserved with no block pinned yet")
	}
	c.pinned(1, 0, nil)
	c.pinned(1, 0, nil)
	im := mustReserve(t, c, a, 2*testBlock)
	slices.Sort(im.blocks)
	if !slices.Equal(im.blocks, []int{0, 1}) {
		t.Fatalf("blocks %v, want [0 1]", im.blocks)
	}
	if s := c.snapshot(); s.Blocks != 2 {
		t.Fatalf("stats %+v, want 2 blocks", s)
	}
	runtime.KeepAlive(a)
}
