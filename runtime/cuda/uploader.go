package cuda

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
)

// Uploader copies data from the host to device memory through a fixed ring
// of pinned chunks on a stream of its own. Everything it asks of the driver
// runs on the context's second thread: it may be called from any goroutine
// while steps run, pins nothing after NewUploader (and AddBlocks), and never
// waits for the executor thread (that issues the steps) nor holds it.
//
// Besides the ring it may keep blocks (AddBlocks): pinned chunks whose
// contents outlive an upload, so that data copied once into them (a cache
// of adapter images, runtime/gpu) goes to the device again by DMA alone,
// with no host copy (StartBlocks with no fill).
type Uploader struct {
	c      *Context
	mu     sync.Mutex // one Upload at a time: they share the ring
	s      cuStream
	chunks []*HostBuffer // the ring, chunks[:ring], then the kept blocks
	ring   int
	evs    []cuEvent // evs[i]: the last copy out of chunks[i]
	used   []bool    // evs[i] was recorded
	next   int
}

// NewUploader pins chunks buffers of chunkBytes each (on the second thread)
// and creates the uploader's stream.
func (c *Context) NewUploader(chunks, chunkBytes int) (*Uploader, error) {
	if chunks < 2 || chunkBytes <= 0 {
		return nil, fmt.Errorf("%w: uploader of %d chunks of %d bytes", ErrInvalidValue, chunks, chunkBytes)
	}
	u := &Uploader{c: c, ring: chunks, evs: make([]cuEvent, chunks), used: make([]bool, chunks)}
	err := c.doAside(func() error {
		if err := check("cuStreamCreate", drv.cuStreamCreate(&u.s, 0)); err != nil {
			return err
		}
		for i := range u.evs {
			if err := check("cuEventCreate", drv.cuEventCreate(&u.evs[i], 2)); err != nil { // no timing
				return err
			}
		}
		return nil
	})
	for err == nil && len(u.chunks) < chunks {
		var h *HostBuffer
		if h, err = c.AllocHostAside(chunkBytes); err == nil {
			u.chunks = append(u.chunks, h)
		}
	}
	if err != nil {
		return nil, errors.Join(err, u.Close())
	}
	return u, nil
}

// ChunkBytes is the size of one pinned chunk (ring chunk or kept block).
func (u *Uploader) ChunkBytes() int { return u.chunks[0].Size() }

// AddBlocks pins n more chunks, kept for StartBlocks, and returns how many
// it pinned (fewer than n only with an error: the host ran out of memory
// that can be pinned, say). Call it before steps run: pinning can hold up
// the driver.
func (u *Uploader) AddBlocks(n int) (int, error) {
	size := u.ChunkBytes()
	added := 0
	for added < n {
		h, err := u.c.AllocHostAside(size)
		if err != nil {
			return added, err
		}
		var ev cuEvent
		if err := u.c.doAside(func() error { return check("cuEventCreate", drv.cuEventCreate(&ev, 2)) }); err != nil {
			return added, errors.Join(err, h.Free())
		}
		u.mu.Lock()
		if u.s == 0 { // closed meanwhile
			u.mu.Unlock()
			return added, errors.Join(ErrClosed, h.Free(), u.c.doAside(func() error { return check("cuEventDestroy_v2", drv.cuEventDestroy(ev)) }))
		}
		u.chunks, u.evs, u.used = append(u.chunks, h), append(u.evs, ev), append(u.used, false)
		u.mu.Unlock()
		added++
	}
	return added, nil
}

// Blocks is the number of kept blocks (AddBlocks).
func (u *Uploader) Blocks() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return len(u.chunks) - u.ring
}

// Transfer is an upload: its copies are enqueued one chunk at a time (on
// a goroutine of its own after Start), and its events complete as its bytes
// land on the device, in order.
type Transfer struct {
	u     *Uploader
	marks []*Event        // marks[i]: bytes [0, mark i) (nil: nothing to wait for)
	ready []chan struct{} // ready[i] closes once marks[i] is recorded, or the upload failed
	// failed[i]: the upload failed before mark i (set before ready[i]
	// closes; a mark reached before a failure, or at 0, stays usable)
	failed   []bool
	done     *Event        // every byte
	end      chan struct{} // closes once every copy is enqueued, or the upload failed
	err      error         // why it failed; set before the channels close
	own      []*Event      // the distinct events, done among them
	canceled atomic.Bool   // Cancel was called: the next chunk is not filled
}

// newTransfer is a transfer of the given number of marks, none reached.
func newTransfer(u *Uploader, marks int) *Transfer {
	t := &Transfer{u: u, marks: make([]*Event, marks), ready: make([]chan struct{}, marks), failed: make([]bool, marks), end: make(chan struct{})}
	for i := range t.ready {
		t.ready[i] = make(chan struct{})
	}
	return t
}

// reach closes the ready channels of marks [from, to) (their events are set).
func (t *Transfer) reach(from, to int) {
	for i := from; i < to; i++ {
		close(t.ready[i])
	}
}

// finish ends the transfer: with err, the marks not yet reached close too
// (reached says how many were).
func (t *Transfer) finish(reached int, err error) {
	t.err = err
	if err != nil {
		for i := reached; i < len(t.ready); i++ {
			t.failed[i] = true
		}
		t.reach(reached, len(t.ready))
	}
	close(t.end)
}

// Through is the event after which the bytes before the i-th mark given
// to Upload or Start have landed, waiting (on the host) until the upload
// has enqueued them; nil when there is nothing to wait for (the mark was
// 0). It fails when the upload failed before the mark.
func (t *Transfer) Through(i int) (*Event, error) {
	<-t.ready[i]
	if t.failed[i] {
		return nil, t.err
	}
	return t.marks[i], nil
}

// Done is the event after which every byte has landed, waiting until the
// upload has enqueued them all; or why the upload failed.
func (t *Transfer) Done() (*Event, error) {
	<-t.end
	return t.done, t.err
}

// Finished reports, without waiting, whether every byte has landed; or why
// the upload failed.
func (t *Transfer) Finished() (bool, error) {
	select {
	case <-t.end:
	default:
		return false, nil
	}
	if t.err != nil {
		return false, t.err
	}
	return t.done.Done()
}

// Wait blocks until every byte has landed (on the second thread); after a
// failure it returns the error (the copies enqueued were out by then).
func (t *Transfer) Wait() error {
	ev, err := t.Done()
	if err != nil {
		return err
	}
	return t.u.Wait(ev)
}

// Cancel asks the upload to stop before its next chunk: an upload canceled
// before it ends fails with ErrCanceled (the copies already enqueued go
// out first). For an image nobody will read: its slot is being emptied, or
// the backend closed.
func (t *Transfer) Cancel() { t.canceled.Store(true) }

// Quiesce blocks until no copy of the transfer is in flight: every byte
// has landed, or the upload failed (its copies were out by then). Unlike
// Wait it does not report the upload's own failure, only a failure to
// wait: it is what freeing or reusing the destination needs.
func (t *Transfer) Quiesce() error {
	<-t.end
	if t.err != nil {
		return nil
	}
	return t.u.Wait(t.done)
}

// Destroy frees the transfer's events once it has ended (waits enqueued on
// them stay valid).
func (t *Transfer) Destroy() error {
	<-t.end
	var errs []error
	for _, e := range t.own {
		errs = append(errs, e.Destroy())
	}
	t.own, t.marks, t.done = nil, nil, nil
	return errors.Join(errs...)
}

// Upload copies n bytes to dst: fill writes bytes [off, off+len(b)) of the
// data into b, one chunk at a time, each chunk's copy going out while the
// next is filled. It returns when the last copy is enqueued, with a
// Transfer whose events complete as the bytes land: Done for all of them
// (make a stream wait on it, or Wait for it), Through(i) for the bytes
// before marks[i] (ascending offsets; a stream that needs only a prefix of
// the data can start on it early). The data need not outlive the call.
func (u *Uploader) Upload(dst DevicePtr, n int, fill func(b []byte, off int) error, marks ...int) (*Transfer, error) {
	if err := checkMarks(n, marks); err != nil {
		return nil, err
	}
	t := newTransfer(u, len(marks))
	u.run(t, dst, n, nil, fill, marks)
	if t.err != nil {
		return nil, errors.Join(t.err, t.Destroy())
	}
	return t, nil
}

// Start is Upload on a goroutine of its own: it returns at once, and the
// Transfer's Through(i) waits until the bytes before marks[i] are enqueued,
// so that a stream can start on the first bytes while the rest are still
// being filled. fill and the data must stay valid until Done returns.
func (u *Uploader) Start(dst DevicePtr, n int, fill func(b []byte, off int) error, marks ...int) (*Transfer, error) {
	if err := checkMarks(n, marks); err != nil {
		return nil, err
	}
	t := newTransfer(u, len(marks))
	go u.run(t, dst, n, nil, fill, marks)
	return t, nil
}

// StartBlocks is Start through kept blocks instead of the ring: chunk i of
// the data (ChunkBytes each) goes through block blocks[i], where it stays
// after the upload. With fill nil the blocks already hold the data (an
// earlier StartBlocks filled them) and only the copies go out: the upload
// runs at the link's speed. The caller owns the choice of blocks: no two
// uploads may fill the same block unless the first's data is no longer
// wanted (the fill then waits for the block's copies in flight).
func (u *Uploader) StartBlocks(dst DevicePtr, n int, blocks []int, fill func(b []byte, off int) error, marks ...int) (*Transfer, error) {
	if err := checkMarks(n, marks); err != nil {
		return nil, err
	}
	size := u.ChunkBytes()
	if want := (n + size - 1) / size; len(blocks) != want {
		return nil, fmt.Errorf("%w: upload of %d bytes through %d blocks, want %d of %d bytes", ErrInvalidValue, n, len(blocks), want, size)
	}
	have := u.Blocks()
	for _, k := range blocks {
		if k < 0 || k >= have {
			return nil, fmt.Errorf("%w: block %d of %d kept", ErrInvalidValue, k, have)
		}
	}
	t := newTransfer(u, len(marks))
	go u.run(t, dst, n, blocks, fill, marks)
	return t, nil
}

func checkMarks(n int, marks []int) error {
	if n < 0 {
		return fmt.Errorf("%w: upload of %d bytes", ErrInvalidValue, n)
	}
	for i, m := range marks {
		if m < 0 || m > n || (i > 0 && m < marks[i-1]) {
			return fmt.Errorf("%w: upload mark %d at %d of %d bytes (marks must ascend within the data)", ErrInvalidValue, i, m, n)
		}
	}
	return nil
}

// run enqueues t's copies and ends t: through the ring when blocks is nil,
// else chunk i through kept block blocks[i] (filled unless fill is nil).
func (u *Uploader) run(t *Transfer, dst DevicePtr, n int, blocks []int, fill func(b []byte, off int) error, marks []int) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.s == 0 || len(u.chunks) == 0 { // closed (Start may run after Close)
		t.finish(0, ErrClosed)
		return
	}
	size := u.ChunkBytes()
	at := markChunks(marks, size)
	mi := 0
	for mi < len(marks) && at[mi] < 0 {
		mi++ // nothing to wait for
	}
	t.reach(0, mi)
	// newEvent records a fresh event on the stream (second thread).
	newEvent := func() (*Event, error) {
		ev := &Event{c: u.c}
		if err := check("cuEventCreate", drv.cuEventCreate(&ev.e, 2)); err != nil {
			return nil, err
		}
		t.own = append(t.own, ev)
		return ev, check("cuEventRecord", drv.cuEventRecord(ev.e, u.s))
	}
	fail := func(err error) {
		// copies already enqueued may read the ring and record the events:
		// let them finish first
		serr := u.c.doAside(func() error { return check("cuStreamSynchronize", drv.cuStreamSynchronize(u.s)) })
		t.finish(mi, errors.Join(err, serr))
	}
	for off := 0; off < n; off += size {
		if t.canceled.Load() {
			fail(ErrCanceled)
			return
		}
		var k int
		if blocks == nil {
			k = u.next
			u.next = (k + 1) % u.ring
		} else {
			k = u.ring + blocks[off/size]
		}
		if u.used[k] && fill != nil { // the chunk's previous copy must be out of it
			if err := u.c.doAside(func() error { return check("cuEventSynchronize", drv.cuEventSynchronize(u.evs[k])) }); err != nil {
				fail(err)
				return
			}
		}
		h := u.chunks[k]
		m := min(size, n-off)
		if fill != nil {
			if err := fill(h.Bytes()[:m], off); err != nil {
				fail(err)
				return
			}
		}
		from := mi
		if err := u.c.doAside(func() error {
			if err := check("cuMemcpyHtoDAsync", drv.cuMemcpyHtoDAsync(dst+uint64(off), h.p, uint64(m), u.s)); err != nil {
				return err
			}
			u.used[k] = true
			if err := check("cuEventRecord", drv.cuEventRecord(u.evs[k], u.s)); err != nil {
				return err
			}
			// the marks this chunk completes share one event
			var ev *Event
			for ; mi < len(marks) && at[mi] == off/size; mi++ {
				if ev == nil {
					var err error
					if ev, err = newEvent(); err != nil {
						return err
					}
				}
				t.marks[mi] = ev
			}
			return nil
		}); err != nil {
			// marks whose event was set before the failure stay usable
			t.reach(from, mi)
			fail(err)
			return
		}
		t.reach(from, mi)
	}
	err := u.c.doAside(func() error {
		var err error
		t.done, err = newEvent()
		return err
	})
	if err != nil {
		fail(err)
		return
	}
	t.finish(mi, nil)
}

// markChunks is, for each mark (a byte offset), the index of the chunk of
// size bytes whose copy completes the bytes before it: -1 for a mark of 0.
func markChunks(marks []int, size int) []int {
	at := make([]int, len(marks))
	for i, m := range marks {
		at[i] = (m+size-1)/size - 1
	}
	return at
}

// After makes the uploader's later copies wait for ev: device work that
// must come before them (its stream recorded ev).
func (u *Uploader) After(ev *Event) error {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.s == 0 {
		return ErrClosed
	}
	return u.c.doAside(func() error { return check("cuStreamWaitEvent", drv.cuStreamWaitEvent(u.s, ev.e, 0)) })
}

// Wait blocks until ev (from Upload) has completed, on the second thread.
func (u *Uploader) Wait(ev *Event) error {
	return u.c.doAside(func() error { return check("cuEventSynchronize", drv.cuEventSynchronize(ev.e)) })
}

// Close waits for the copies in flight and frees the ring and the stream.
func (u *Uploader) Close() error {
	if u == nil {
		return nil
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	var errs []error
	if u.s != 0 {
		s := u.s
		u.s = 0
		errs = append(errs, u.c.doAside(func() error {
			e1 := check("cuStreamSynchronize", drv.cuStreamSynchronize(s))
			e2 := check("cuStreamDestroy_v2", drv.cuStreamDestroy(s))
			return errors.Join(e1, e2)
		}))
	}
	for i, e := range u.evs {
		if e != 0 {
			u.evs[i] = 0
			errs = append(errs, u.c.doAside(func() error { return check("cuEventDestroy_v2", drv.cuEventDestroy(e)) }))
		}
	}
	for _, h := range u.chunks {
		errs = append(errs, h.Free())
	}
	u.chunks = nil
	return errors.Join(errs...)
}
