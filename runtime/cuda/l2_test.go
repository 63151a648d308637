package cuda

import (
	"encoding/binary"
	"math"
	"testing"
	"unsafe"
)

// TestAccessWindowAttr checks the launch attribute against
// CUaccessPolicyWindow's layout in cuda.h: base_ptr at byte 0 of the value,
// num_bytes (size_t) at 8, hitRatio (float) at 16, hitProp at 20,
// missProp at 24; the value union starts 8 bytes into CUlaunchAttribute.
func TestAccessWindowAttr(t *testing.T) {
	for _, tc := range []struct {
		w    AccessWindow
		base uint64
		n    uint64
	}{
		{AccessWindow{Base: 0x7f12_3456_7000, Bytes: 29 << 20, HitRatio: 0.75}, 0x7f12_3456_7000, 29 << 20},
		{AccessWindow{Base: 0x1_0000_0000, Bytes: 5 << 30, HitRatio: 1}, 0x1_0000_0000, 5 << 30},
	} {
		a := tc.w.attr()
		if unsafe.Sizeof(a) != 72 || unsafe.Offsetof(a.value) != 8 {
			t.Fatalf("launchAttr is %d bytes, value at %d: want 72 and 8", unsafe.Sizeof(a), unsafe.Offsetof(a.value))
		}
		raw := unsafe.Slice((*byte)(unsafe.Pointer(&a.value[0])), 64)
		if a.id != launchAttrAccessPolicyWindow {
			t.Errorf("id %d", a.id)
		}
		if got := binary.LittleEndian.Uint64(raw[0:]); got != tc.base {
			t.Errorf("base_ptr %#x, want %#x", got, tc.base)
		}
		if got := binary.LittleEndian.Uint64(raw[8:]); got != tc.n {
			t.Errorf("num_bytes %d, want %d", got, tc.n)
		}
		if got := math.Float32frombits(binary.LittleEndian.Uint32(raw[16:])); got != tc.w.HitRatio {
			t.Errorf("hitRatio %v, want %v", got, tc.w.HitRatio)
		}
		if hit, miss := binary.LittleEndian.Uint32(raw[20:]), binary.LittleEndian.Uint32(raw[24:]); hit != 2 || miss != 1 {
			t.Errorf("hitProp %d missProp %d, want 2 (persisting) and 1 (streaming)", hit, miss)
		}
	}
}

// TestSetAccessWindowRejects: bad windows fail before any launch sees them.
func TestSetAccessWindowRejects(t *testing.T) {
	s := &Stream{c: &Context{dev: Device{WindowMax: 1 << 20}}}
	for _, w := range []AccessWindow{{Bytes: -1}, {Bytes: 16, HitRatio: -0.5}, {Bytes: 16, HitRatio: 1.5}} {
		if err := s.SetAccessWindow(w); err == nil {
			t.Errorf("SetAccessWindow(%+v): no error", w)
		}
	}
	if err := s.SetAccessWindow(AccessWindow{}); err != nil || s.AccessWindow().Bytes != 0 {
		t.Errorf("clearing the window: %v", err)
	}
}
