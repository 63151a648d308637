package cuda

import (
	"fmt"
	"unsafe"
)

// Device and pinned host memory.

// DeviceBuffer is device memory.
type DeviceBuffer struct {
	c    *Context
	ptr  DevicePtr
	size int
}

// Alloc allocates n bytes of device memory (errors.Is(err, ErrOutOfMemory) when it does not fit).
func (c *Context) Alloc(n int) (*DeviceBuffer, error) { return c.alloc(n, c.Do) }

// AllocAside allocates device memory on the context's second thread (safe
// from any goroutine while steps run); the buffer frees like any other.
func (c *Context) AllocAside(n int) (*DeviceBuffer, error) { return c.alloc(n, c.doAside) }

// alloc allocates n bytes of device memory on the thread do runs on.
func (c *Context) alloc(n int, do func(func() error) error) (*DeviceBuffer, error) {
	if n <= 0 {
		return nil, fmt.Errorf("%w: allocation of %d bytes", ErrInvalidValue, n)
	}
	b := &DeviceBuffer{c: c, size: n}
	err := do(func() error {
		if err := check("cuMemAlloc_v2", drv.cuMemAlloc(&b.ptr, uint64(n))); err != nil {
			return fmt.Errorf("%w (%d bytes)", err, n)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return b, nil
}

// Ptr is the buffer's device address.
func (b *DeviceBuffer) Ptr() DevicePtr {
	if b == nil {
		return 0
	}
	return b.ptr
}

// Size is the buffer's size in bytes.
func (b *DeviceBuffer) Size() int { return b.size }

// Free releases the buffer; freeing twice is a no-op.
func (b *DeviceBuffer) Free() error {
	if b == nil || b.ptr == 0 {
		return nil
	}
	p := b.ptr
	b.ptr = 0
	return b.c.Do(func() error { return check("cuMemFree_v2", drv.cuMemFree(p)) })
}

// HostBuffer is page-locked host memory, for truly asynchronous copies.
type HostBuffer struct {
	c     *Context
	p     unsafe.Pointer
	size  int
	aside bool // allocated (and freed) on the aux thread
}

// doAside runs fn on a second OS thread where the context is current, so that
// slow driver calls (pinning hundreds of MB) do not hold up the executor
// thread that issues the running steps.
func (c *Context) doAside(fn func() error) error {
	if c.closed {
		return ErrClosed
	}
	c.auxMu.Lock()
	if c.aux == nil {
		ex, err := NewExecutor(func() error { return check("cuCtxSetCurrent", drv.cuCtxSetCurrent(c.ctx)) })
		if err != nil {
			c.auxMu.Unlock()
			return err
		}
		c.aux = ex
	}
	ex := c.aux
	c.auxMu.Unlock()
	return ex.Do(fn)
}

// AllocHostAside allocates n bytes of pinned host memory on the context's
// second thread (safe to call from any goroutine while steps run); its Free
// runs there too.
func (c *Context) AllocHostAside(n int) (*HostBuffer, error) { return c.allocHost(n, true) }

// AllocHost allocates n bytes of pinned host memory.
func (c *Context) AllocHost(n int) (*HostBuffer, error) { return c.allocHost(n, false) }

// allocHost pins n bytes, on the second thread when aside (and its Free runs there too).
func (c *Context) allocHost(n int, aside bool) (*HostBuffer, error) {
	if n <= 0 {
		return nil, fmt.Errorf("%w: host allocation of %d bytes", ErrInvalidValue, n)
	}
	h := &HostBuffer{c: c, size: n, aside: aside}
	do := c.Do
	if aside {
		do = c.doAside
	}
	if err := do(func() error { return check("cuMemAllocHost_v2", drv.cuMemAllocHost(&h.p, uint64(n))) }); err != nil {
		return nil, err
	}
	return h, nil
}

// Size is the buffer's size in bytes.
func (h *HostBuffer) Size() int { return h.size }

// Bytes views the pinned memory.
func (h *HostBuffer) Bytes() []byte { return unsafe.Slice((*byte)(h.p), h.size) }

// Int32s views the pinned memory as int32 values.
func (h *HostBuffer) Int32s() []int32 { return unsafe.Slice((*int32)(h.p), h.size/4) }

// Float32s views the pinned memory as float32 values.
func (h *HostBuffer) Float32s() []float32 { return unsafe.Slice((*float32)(h.p), h.size/4) }

// Uint16s views the pinned memory as uint16 values (bf16 or f16 data).
func (h *HostBuffer) Uint16s() []uint16 { return unsafe.Slice((*uint16)(h.p), h.size/2) }

// Free releases the pinned memory.
func (h *HostBuffer) Free() error {
	if h == nil || h.p == nil {
		return nil
	}
	p := h.p
	h.p = nil
	if h.aside {
		return h.c.doAside(func() error { return check("cuMemFreeHost", drv.cuMemFreeHost(p)) })
	}
	return h.c.Do(func() error { return check("cuMemFreeHost", drv.cuMemFreeHost(p)) })
}
