package cuda

import (
	"errors"
	"fmt"
	"sync"
)

// Uploader copies data from the host to device memory through a fixed ring
// of pinned chunks on a stream of its own. Everything it asks of the driver
// runs on the context's second thread: it may be called from any goroutine
// while steps run, pins nothing after NewUploader, and never waits for the
// executor thread (that issues the steps) nor holds it.
type Uploader struct {
	c      *Context
	mu     sync.Mutex // one Upload at a time: they share the ring
	s      cuStream
	chunks []*HostBuffer
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
	u := &Uploader{c: c, evs: make([]cuEvent, chunks), used: make([]bool, chunks)}
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

// ChunkBytes is the size of one pinned chunk.
func (u *Uploader) ChunkBytes() int { return u.chunks[0].Size() }

// Upload copies n bytes to dst: fill writes bytes [off, off+len(b)) of the
// data into b, one chunk at a time, each chunk's copy going out while the
// next is filled. It returns when the last copy is enqueued, with an event
// that completes when all of them have (make a stream wait on it, or
// Wait for it); the data need not outlive the call.
func (u *Uploader) Upload(dst DevicePtr, n int, fill func(b []byte, off int) error) (*Event, error) {
	if n < 0 {
		return nil, fmt.Errorf("%w: upload of %d bytes", ErrInvalidValue, n)
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.s == 0 {
		return nil, ErrClosed
	}
	size := u.ChunkBytes()
	for off := 0; off < n; off += size {
		k := u.next
		u.next = (k + 1) % len(u.chunks)
		if u.used[k] { // the chunk's previous copy must be out of it
			if err := u.c.doAside(func() error { return check("cuEventSynchronize", drv.cuEventSynchronize(u.evs[k])) }); err != nil {
				return nil, err
			}
		}
		h := u.chunks[k]
		m := min(size, n-off)
		if err := fill(h.Bytes()[:m], off); err != nil {
			return nil, err
		}
		if err := u.c.doAside(func() error {
			if err := check("cuMemcpyHtoDAsync", drv.cuMemcpyHtoDAsync(dst+uint64(off), h.p, uint64(m), u.s)); err != nil {
				return err
			}
			return check("cuEventRecord", drv.cuEventRecord(u.evs[k], u.s))
		}); err != nil {
			return nil, err
		}
		u.used[k] = true
	}
	ev := &Event{c: u.c}
	err := u.c.doAside(func() error {
		if err := check("cuEventCreate", drv.cuEventCreate(&ev.e, 2)); err != nil {
			return err
		}
		return check("cuEventRecord", drv.cuEventRecord(ev.e, u.s))
	})
	if err != nil {
		return nil, err
	}
	return ev, nil
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
