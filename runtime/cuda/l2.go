package cuda

import (
	"fmt"
	"math"
)

// L2 persistence (sm_80 and later): part of L2 set aside for lines marked
// persisting, and windows of addresses whose accesses mark them so. A
// buffer written by one kernel and read by the next, while a third streams
// hundreds of megabytes of weights through L2 beside them, stays in L2
// instead of going to DRAM and back.

// AccessWindow is an address range whose accesses by a kernel are marked
// persisting in L2 (CUaccessPolicyWindow): HitRatio of its lines (chosen
// by address, the same lines every launch) persist, the others stream.
// Bytes 0 is no window.
type AccessWindow struct {
	Base     DevicePtr
	Bytes    int
	HitRatio float32
}

// CUaccessProperty values.
const (
	accessStreaming  = 1
	accessPersisting = 2
)

// attr is w as a launch attribute: CUaccessPolicyWindow is {base_ptr,
// num_bytes (size_t), hitRatio (float), hitProp, missProp (enums)}.
func (w AccessWindow) attr() launchAttr {
	a := launchAttr{id: launchAttrAccessPolicyWindow}
	a.value[0], a.value[1] = int32(uint32(w.Base)), int32(uint32(w.Base>>32))
	n := uint64(w.Bytes)
	a.value[2], a.value[3] = int32(uint32(n)), int32(uint32(n>>32))
	a.value[4] = int32(math.Float32bits(w.HitRatio))
	a.value[5], a.value[6] = accessPersisting, accessStreaming
	return a
}

// SetAccessWindow gives every kernel launched on s from now on the access
// policy window w (a zero w: none). Launches with a window go through
// cuLaunchKernelEx; stream capture records it on each kernel node.
func (s *Stream) SetAccessWindow(w AccessWindow) error {
	if w.Bytes < 0 || w.HitRatio < 0 || w.HitRatio > 1 {
		return fmt.Errorf("%w: L2 access window of %d bytes, hit ratio %v", ErrInvalidValue, w.Bytes, w.HitRatio)
	}
	if w.Bytes > 0 {
		if drv.cuLaunchKernelEx == nil || s.c.dev.WindowMax == 0 {
			return fmt.Errorf("%w: L2 access windows (driver %s, %s)", ErrNotSupported, drv.path, s.c.dev.Arch())
		}
		if w.Bytes > s.c.dev.WindowMax {
			return fmt.Errorf("%w: L2 access window of %d bytes (at most %d)", ErrInvalidValue, w.Bytes, s.c.dev.WindowMax)
		}
	}
	s.win = w
	return nil
}

// AccessWindow is the window SetAccessWindow gave s.
func (s *Stream) AccessWindow() AccessWindow { return s.win }

// SetPersistingL2 sets aside n bytes of L2 for persisting lines (at most
// Device.PersistL2Max; 0 gives it all back to normal accesses, which use the
// set-aside too while no persisting line holds it) and, with n 0, returns
// the lines marked persisting to normal.
func (c *Context) SetPersistingL2(n int) error {
	if n < 0 || n > c.dev.PersistL2Max {
		return fmt.Errorf("%w: %d bytes of L2 for persisting lines (at most %d)", ErrInvalidValue, n, c.dev.PersistL2Max)
	}
	if drv.cuCtxSetLimit == nil {
		return fmt.Errorf("%w: cuCtxSetLimit (driver %s)", ErrNotSupported, drv.path)
	}
	return c.Do(func() error {
		if err := check("cuCtxSetLimit", drv.cuCtxSetLimit(limitPersistingL2, uint64(n))); err != nil {
			return err
		}
		if n == 0 && drv.cuCtxResetPersistingL2Cache != nil {
			return check("cuCtxResetPersistingL2Cache", drv.cuCtxResetPersistingL2Cache())
		}
		return nil
	})
}

// PersistingL2 is the bytes of L2 set aside for persisting lines now.
func (c *Context) PersistingL2() (int, error) {
	if drv.cuCtxGetLimit == nil {
		return 0, fmt.Errorf("%w: cuCtxGetLimit (driver %s)", ErrNotSupported, drv.path)
	}
	var v uint64
	err := c.Do(func() error { return check("cuCtxGetLimit", drv.cuCtxGetLimit(&v, limitPersistingL2)) })
	return int(v), err
}

const limitPersistingL2 = 0x06 // CU_LIMIT_PERSISTING_L2_CACHE_SIZE
