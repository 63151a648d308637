package cuda

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"unsafe"
)

// TestInitWithoutDriver runs everywhere: on a machine without libcuda.so.1,
// Init must fail with ErrNoDriver in one line; with a driver it must succeed
// or fail with ErrNoDevice.
func TestInitWithoutDriver(t *testing.T) {
	err := Init()
	if err == nil {
		t.Skipf("a driver is present: %s", DriverPath())
	}
	t.Logf("Init: %v", err)
	if !errors.Is(err, ErrNoDriver) && !errors.Is(err, ErrNoDevice) {
		t.Fatalf("Init error %v wraps neither ErrNoDriver nor ErrNoDevice", err)
	}
	if strings.Contains(err.Error(), "\n") {
		t.Errorf("Init error spans several lines: %q", err)
	}
	if _, err := NewContext(0); err == nil {
		t.Error("NewContext succeeded without a driver")
	}
}

func TestErrorMapping(t *testing.T) {
	for _, c := range []struct {
		code Result
		want error
	}{{ErrorOutOfMemory, ErrOutOfMemory}, {ErrorNoDevice, ErrNoDevice}, {ErrorInsufficientDriver, ErrNoDriver},
		{ErrorIllegalAddress, ErrLaunch}, {ErrorInvalidContext, ErrInvalidContext}, {ErrorNoBinaryForGPU, ErrNoBinary}} {
		err := fmt.Errorf("wrapped: %w", &Error{Op: "cuX", Code: c.code})
		if !errors.Is(err, c.want) {
			t.Errorf("code %d does not match %v", c.code, c.want)
		}
	}
	if errors.Is(&Error{Code: ErrorOutOfMemory}, ErrNoDevice) {
		t.Error("out of memory matches ErrNoDevice")
	}
	if !errors.Is(&BLASError{Code: 3}, ErrOutOfMemory) || !errors.Is(&NVRTCError{Code: 6}, ErrCompile) {
		t.Error("cuBLAS/NVRTC error mapping")
	}
	if s := (&Error{Op: "cuMemAlloc_v2", Code: 2, Name: "CUDA_ERROR_OUT_OF_MEMORY", Msg: "out of memory"}).Error(); s != "cuda: cuMemAlloc_v2: CUDA_ERROR_OUT_OF_MEMORY (out of memory)" {
		t.Errorf("message %q", s)
	}
}

func TestDeviceArch(t *testing.T) {
	for _, c := range []struct {
		maj, min int
		want     string
	}{{9, 0, "sm_90a"}, {8, 0, "sm_80"}, {8, 9, "sm_89"}, {10, 0, "sm_100"}} {
		if got := (Device{Major: c.maj, Minor: c.min}).Arch(); got != c.want {
			t.Errorf("%d.%d: %s, want %s", c.maj, c.min, got, c.want)
		}
	}
}

// TestLaunchConfigLayout: the structs handed to cuLaunchKernelEx have
// cuda.h's layout on 64-bit Linux (CUlaunchConfig: 56 bytes, hStream at
// 32, attrs at 40, numAttrs at 48; CUlaunchAttribute: 72 bytes, the value
// union at 8).
func TestLaunchConfigLayout(t *testing.T) {
	var c launchConfig
	var a launchAttr
	for _, x := range []struct {
		name      string
		got, want uintptr
	}{
		{"sizeof(CUlaunchConfig)", unsafe.Sizeof(c), 56},
		{"offsetof(sharedMemBytes)", unsafe.Offsetof(c.shared), 24},
		{"offsetof(hStream)", unsafe.Offsetof(c.stream), 32},
		{"offsetof(attrs)", unsafe.Offsetof(c.attrs), 40},
		{"offsetof(numAttrs)", unsafe.Offsetof(c.numAttrs), 48},
		{"sizeof(CUlaunchAttribute)", unsafe.Sizeof(a), 72},
		{"offsetof(value)", unsafe.Offsetof(a.value), 8},
	} {
		if x.got != x.want {
			t.Errorf("%s = %d, want %d", x.name, x.got, x.want)
		}
	}
}

// TestMarkChunks: an upload's mark (bytes [0, mark) landed) completes with
// the copy of the chunk that holds its last byte; a mark of 0 needs none.
func TestMarkChunks(t *testing.T) {
	for _, c := range []struct {
		marks []int
		size  int
		want  []int
	}{
		{nil, 16, []int{}},
		{[]int{0, 0, 1}, 16, []int{-1, -1, 0}},
		{[]int{15, 16, 17, 32, 33}, 16, []int{0, 0, 1, 1, 2}},
		{[]int{100}, 1 << 20, []int{0}},
		{[]int{1 << 24, 1<<24 + 2}, 1 << 24, []int{0, 1}},
	} {
		if got := markChunks(c.marks, c.size); !slices.Equal(got, c.want) {
			t.Errorf("markChunks(%v, %d) = %v, want %v", c.marks, c.size, got, c.want)
		}
	}
}

// TestTransferProgress: a Transfer's marks become available in order as
// its chunks are enqueued (Through waits for them); when the upload fails
// part way, the marks already reached keep their events and the others,
// Done and Finished report the failure instead of blocking forever.
func TestTransferProgress(t *testing.T) {
	tr := newTransfer(nil, 4)
	ev0, ev1 := &Event{}, &Event{}
	failed := errors.New("copy failed")
	got := make(chan error, 1)
	go func() { // the second mark waits for the upload to reach it
		ev, err := tr.Through(1)
		if err == nil && ev != ev1 {
			err = fmt.Errorf("mark 1: event %p, want %p", ev, ev1)
		}
		got <- err
	}()
	tr.marks[0], tr.marks[1] = ev0, ev1
	tr.reach(0, 2)
	if err := <-got; err != nil {
		t.Fatal(err)
	}
	if done, err := tr.Finished(); done || err != nil {
		t.Fatalf("before the end: Finished %v, %v", done, err)
	}
	tr.finish(2, failed)
	if ev, err := tr.Through(0); ev != ev0 || err != nil {
		t.Errorf("mark 0 after the failure: %p, %v; want its event", ev, err)
	}
	for i := 2; i < 4; i++ {
		if ev, err := tr.Through(i); ev != nil || !errors.Is(err, failed) {
			t.Errorf("mark %d: %p, %v; want the failure", i, ev, err)
		}
	}
	if _, err := tr.Done(); !errors.Is(err, failed) {
		t.Errorf("Done: %v", err)
	}
	if _, err := tr.Finished(); !errors.Is(err, failed) {
		t.Errorf("Finished: %v", err)
	}
	if err := tr.Wait(); !errors.Is(err, failed) {
		t.Errorf("Wait: %v", err)
	}
}

// TestClusterShape: a cluster's zero dimensions are 1 (WG_CLUSTER's
// clusters {1, S, 0} were refused on the GPU before), and each dimension
// must divide the grid's.
func TestClusterShape(t *testing.T) {
	for _, c := range []struct {
		grid, cluster, want Dim3
		ok                  bool
	}{
		{Dim3{X: 64, Y: 2}, Dim3{X: 1, Y: 2}, Dim3{X: 1, Y: 2, Z: 1}, true},
		{Dim3{X: 8}, Dim3{X: 4}, Dim3{X: 4, Y: 1, Z: 1}, true},
		{Dim3{X: 8, Y: 1, Z: 4}, Dim3{Z: 4}, Dim3{X: 1, Y: 1, Z: 4}, true},
		{Dim3{X: 6}, Dim3{X: 4, Y: 1, Z: 1}, Dim3{}, false},
		{Dim3{X: 64, Y: 3}, Dim3{X: 1, Y: 2}, Dim3{}, false},
		{Dim3{X: 64}, Dim3{X: 1, Y: 2}, Dim3{}, false}, // grid Y 0 is 1
		{Dim3{X: 8}, Dim3{X: -2}, Dim3{}, false},
	} {
		got, err := clusterShape(c.grid, c.cluster)
		if c.ok && (err != nil || got != c.want) {
			t.Errorf("clusterShape(%v, %v) = %v, %v; want %v", c.grid, c.cluster, got, err, c.want)
		}
		if !c.ok && !errors.Is(err, ErrInvalidValue) {
			t.Errorf("clusterShape(%v, %v) = %v, %v; want ErrInvalidValue", c.grid, c.cluster, got, err)
		}
	}
}
