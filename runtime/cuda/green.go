package cuda

import (
	"encoding/binary"
	"errors"
	"fmt"
	"unsafe"
)

// Green contexts: a spatial partition of the device's SMs (CUDA 12.4+).
// Work launched on a stream of a green context runs only on that context's
// SMs. Memory and events are the primary context's; a module's function
// runs in the context that loaded it, a library's kernel in the context of
// its stream (LoadLibrary), which is how a partition's kernels are loaded.

// ErrNoGreenContexts: the driver has no green-context API (CUDA < 12.4), or
// the device cannot be partitioned as asked.
var ErrNoGreenContexts = errors.New("cuda: green contexts (SM partitions) are not available")

// devResource is a CUdevResource: the type at byte 0, 92 bytes the driver
// keeps, then the union whose SM member starts with smCount (byte 96); 144
// bytes in CUDA 12.4 and 13.x. It is only ever passed one at a time (one
// group asked of a split), so a larger buffer is safe against a driver
// whose struct has grown.
type devResource [64]uint64 // 512 bytes, 8-aligned

const (
	devResourceTypeSM  = 1  // CU_DEV_RESOURCE_TYPE_SM
	devResourceSMCount = 96 // byte offset of sm.smCount
	greenCtxDefault    = 1  // CU_GREEN_CTX_DEFAULT_STREAM (required by 12.4, accepted since)
	streamNonBlocking  = 1  // CU_STREAM_NON_BLOCKING (cuGreenCtxStreamCreate requires it)
)

func (r *devResource) bytes() []byte { return unsafe.Slice((*byte)(unsafe.Pointer(r)), len(r)*8) }

// kind is the resource's CUdevResourceType.
func (r *devResource) kind() int32 { return int32(binary.LittleEndian.Uint32(r.bytes()[0:4])) }

// smCount is an SM resource's SM count.
func (r *devResource) smCount() int {
	return int(binary.LittleEndian.Uint32(r.bytes()[devResourceSMCount : devResourceSMCount+4]))
}

// greenDriver holds the green-context symbols (nil where the driver lacks them).
type greenDriver struct {
	getDevResource func(dev int32, r *devResource, kind int32) int32
	splitByCount   func(result *devResource, nbGroups *uint32, input *devResource, remaining *devResource, useFlags uint32, minCount uint32) int32
	generateDesc   func(desc *uintptr, r *devResource, n uint32) int32
	create         func(g *uintptr, desc uintptr, dev int32, flags uint32) int32
	destroy        func(g uintptr) int32
	ctxFromGreen   func(ctx *cuContext, g uintptr) int32
	streamCreate   func(s *cuStream, g uintptr, flags uint32, priority int32) int32 // 12.5+
	streamGetGreen func(s cuStream, g *uintptr) int32
	greenGetRes    func(g uintptr, r *devResource, kind int32) int32
	complete       bool // the calls SplitSMs needs are all there
}

// bindGreen binds the green-context symbols (optional) while the driver loads.
func bindGreen(b *binder, g *greenDriver) {
	b.fn(&g.getDevResource, "cuDeviceGetDevResource")
	b.fn(&g.splitByCount, "cuDevSmResourceSplitByCount")
	b.fn(&g.generateDesc, "cuDevResourceGenerateDesc")
	b.fn(&g.create, "cuGreenCtxCreate")
	b.fn(&g.destroy, "cuGreenCtxDestroy")
	b.fn(&g.ctxFromGreen, "cuCtxFromGreenCtx")
	b.fn(&g.greenGetRes, "cuGreenCtxGetDevResource")
	b.fn(&g.streamCreate, "cuGreenCtxStreamCreate")
	b.fn(&g.streamGetGreen, "cuStreamGetGreenCtx")
	g.complete = g.getDevResource != nil && g.splitByCount != nil && g.generateDesc != nil &&
		g.create != nil && g.destroy != nil && g.ctxFromGreen != nil
}

// GreenContext is a green context: a set of the device's SMs that the
// kernels of its streams run on.
type GreenContext struct {
	c   *Context
	g   uintptr
	ctx cuContext // its CUcontext (cuCtxFromGreenCtx)
	sms int
}

// SMs is how many multiprocessors the context's kernels may use.
func (g *GreenContext) SMs() int { return g.sms }

// SplitSMs partitions the device's SMs in two green contexts: small holds
// at least n SMs (the driver rounds n up to its granularity: 8 SMs on
// Hopper), rest the others. Both use the primary context's memory and
// events. The error wraps ErrNoGreenContexts where the driver or the
// device cannot do it.
func (c *Context) SplitSMs(n int) (small, rest *GreenContext, err error) {
	if n < 1 || n >= c.dev.SMs {
		return nil, nil, fmt.Errorf("%w: %d of %d SMs asked", ErrInvalidValue, n, c.dev.SMs)
	}
	err = c.Do(func() error {
		if !drv.green.complete {
			return fmt.Errorf("%w: driver %s lacks the API", ErrNoGreenContexts, drv.path)
		}
		var all, part, remain devResource
		if err := check("cuDeviceGetDevResource", drv.green.getDevResource(c.handle, &all, devResourceTypeSM)); err != nil {
			return fmt.Errorf("%w: %w", ErrNoGreenContexts, err)
		}
		groups := uint32(1)
		if err := check("cuDevSmResourceSplitByCount", drv.green.splitByCount(&part, &groups, &all, &remain, 0, uint32(n))); err != nil {
			return fmt.Errorf("%w: %d SMs of %d: %w", ErrNoGreenContexts, n, all.smCount(), err)
		}
		if groups != 1 || part.kind() != devResourceTypeSM || remain.kind() != devResourceTypeSM || part.smCount() < n || remain.smCount() < 1 {
			return fmt.Errorf("%w: splitting %d SMs off %d gave %d group(s): %d SMs and %d left", ErrNoGreenContexts, n, all.smCount(), groups, part.smCount(), remain.smCount())
		}
		var err error
		if small, err = c.newGreen(&part); err != nil {
			return err
		}
		if rest, err = c.newGreen(&remain); err != nil {
			small.destroy()
			small = nil
			return err
		}
		return nil
	})
	return small, rest, err
}

// newGreen creates a green context of the SM resource r (on the executor thread).
func (c *Context) newGreen(r *devResource) (*GreenContext, error) {
	var desc uintptr
	if err := check("cuDevResourceGenerateDesc", drv.green.generateDesc(&desc, r, 1)); err != nil {
		return nil, err
	}
	g := &GreenContext{c: c, sms: r.smCount()}
	if err := check("cuGreenCtxCreate", drv.green.create(&g.g, desc, c.handle, greenCtxDefault)); err != nil {
		return nil, err
	}
	if err := check("cuCtxFromGreenCtx", drv.green.ctxFromGreen(&g.ctx, g.g)); err != nil {
		drv.green.destroy(g.g)
		return nil, err
	}
	if drv.green.greenGetRes != nil { // what the context holds, which may differ from what was asked
		var got devResource
		if check("cuGreenCtxGetDevResource", drv.green.greenGetRes(g.g, &got, devResourceTypeSM)) == nil && got.smCount() > 0 {
			g.sms = got.smCount()
		}
	}
	return g, nil
}

// NewStream creates a stream whose kernels run on g's SMs; priority: the
// greatest priority the device allows (as Context.NewPriorityStream).
func (g *GreenContext) NewStream(priority bool) (*Stream, error) {
	s := &Stream{c: g.c}
	err := g.c.Do(func() error {
		var least, greatest int32 // 0: the default priority
		if priority {
			if err := check("cuCtxGetStreamPriorityRange", drv.cuCtxGetStreamPriorities(&least, &greatest)); err != nil {
				return err
			}
		}
		if drv.green.streamCreate != nil {
			return check("cuGreenCtxStreamCreate", drv.green.streamCreate(&s.s, g.g, streamNonBlocking, greatest))
		}
		// 12.4: a stream created while the green context is current belongs to it
		if err := check("cuCtxSetCurrent", drv.cuCtxSetCurrent(g.ctx)); err != nil {
			return err
		}
		err := check("cuStreamCreateWithPriority", drv.cuStreamCreateWithPriority(&s.s, streamNonBlocking, greatest))
		if e := check("cuCtxSetCurrent", drv.cuCtxSetCurrent(g.c.ctx)); err == nil {
			err = e
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	return s, nil
}

// InGreen reports whether s was created in green context g (false where
// the driver cannot tell).
func (s *Stream) InGreen(g *GreenContext) bool {
	var got uintptr
	err := s.c.Do(func() error {
		if drv.green.streamGetGreen == nil {
			return ErrNoGreenContexts
		}
		return check("cuStreamGetGreenCtx", drv.green.streamGetGreen(s.s, &got))
	})
	return err == nil && got == g.g
}

func (g *GreenContext) destroy() error {
	if g == nil || g.g == 0 {
		return nil
	}
	h := g.g
	g.g = 0
	return check("cuGreenCtxDestroy", drv.green.destroy(h))
}

// Destroy releases the green context; its streams must be destroyed first.
func (g *GreenContext) Destroy() error {
	if g == nil || g.g == 0 {
		return nil
	}
	return g.c.Do(g.destroy)
}
