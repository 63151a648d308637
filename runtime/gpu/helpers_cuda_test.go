//go:build cuda

package gpu

import (
	"math/rand/v2"
	"os"
	"strconv"
	"testing"
	"time"
	"unsafe"

	fx "github.com/peftd/peftd/internal/fixture"
	"github.com/peftd/peftd/runtime/cuda"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/sample"
)

// testSeed is the seed of a test's random data: PEFTD_TEST_SEED where set
// (to repeat a run), else a fresh one. It is logged, so that a failure on
// random data names the seed that repeats it.
func testSeed(t testing.TB) uint64 {
	t.Helper()
	seed := rand.Uint64()
	if v := os.Getenv("PEFTD_TEST_SEED"); v != "" {
		var err error
		if seed, err = strconv.ParseUint(v, 10, 64); err != nil {
			t.Fatalf("PEFTD_TEST_SEED=%q: %v", v, err)
		}
	}
	t.Logf("random data from seed %d (PEFTD_TEST_SEED repeats it)", seed)
	return seed
}

// fixtureErrors runs the fixture's cases co-batched and teacher-forced on
// e (adapters at slots) and returns the worst case-level relative error
// and the greedy choices matched of those checked (V: the vocabulary).
func fixtureErrors(t *testing.T, e *engine.Engine, slots map[string]int, cases []refCase, V int) (worst float64, match, total int) {
	t.Helper()
	agg := make([]fx.ErrAcc, len(cases))
	fx.Run(t, e, slots, cases, func(r fx.Row) {
		agg[r.Case].Add(r.Got, r.Ref)
		if r.Check {
			total++
			if sample.Argmax(r.Got[len(r.Got)-V:]) == r.Want {
				match++
			}
		}
	})
	for i := range cases {
		worst = max(worst, agg[i].Rel())
	}
	return worst, match, total
}

func copyHtoD(b *Backend, x *Buffer, h []uint16) error {
	if err := cuda.CopyHtoD(b.s, x.mem.Ptr(), h); err != nil {
		return err
	}
	x.isF32 = false
	b.gen++ // the FP8 path must not re-use a quantized copy of x
	return b.s.Synchronize()
}

// swapUploader replaces b's uploader with one of ring chunks of chunk bytes
// and kept blocks of that size for adapter images (none: every upload goes
// through the ring).
func swapUploader(t *testing.T, b *Backend, ring, chunk, kept int) {
	t.Helper()
	b.StartPinning()
	<-b.PinnedDone() // pinning into the old uploader ended
	if err := b.up.Close(); err != nil {
		t.Fatal(err)
	}
	var err error
	if b.up, err = b.ctx.NewUploader(ring, chunk); err != nil {
		t.Fatal(err)
	}
	b.pins = nil
	if kept > 0 {
		if n, err := b.up.AddBlocks(kept); err != nil || n != kept {
			t.Fatalf("AddBlocks(%d): %d, %v", kept, n, err)
		}
		b.pins = newImageCache(kept, chunk)
	}
}

// waitFills waits until b's image cache has counted n filled images (the
// count follows the upload's end on a goroutine of its own).
func waitFills(t *testing.T, b *Backend, n int64) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); b.PinnedStats().Fills < n; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("image cache stats %+v: want %d fills", b.PinnedStats(), n)
		}
	}
}

// l2Flusher returns a function that enqueues l2_flush over 256 MB on b.s
// (failing t if it cannot), so that a timed replay after it reads its
// operands from DRAM, as a step's kernels do.
func l2Flusher(t *testing.T, b *Backend) func() {
	t.Helper()
	flush, err := b.ctx.Alloc(256 << 20)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { flush.Free() })
	if err := b.s.Memset32(flush.Ptr(), 0x12345678, flush.Size()/4); err != nil {
		t.Fatal(err)
	}
	fn, err := b.mod.Function("l2_flush")
	if err != nil {
		t.Fatal(err)
	}
	return func() {
		if err := fn.Launch(b.s, cuda.Dim3{X: 4 * b.Device().SMs}, cuda.Dim3{X: 512}, 0, flush.Ptr(), int64(flush.Size()/16), flush.Ptr()); err != nil {
			t.Fatal(err)
		}
	}
}

// replayUs records record() on b.s as one CUDA graph and returns the
// median device microseconds of reps replays, each after flush (a fresh
// L2), following warm untimed ones.
func replayUs(t *testing.T, b *Backend, flush func(), warm, reps int, record func()) float64 {
	t.Helper()
	if err := b.s.BeginCapture(); err != nil {
		t.Fatal(err)
	}
	record()
	g, err := b.s.EndCapture()
	if err != nil {
		t.Fatal(err)
	}
	if b.err != nil {
		t.Fatal(b.err)
	}
	defer g.Destroy()
	ge, err := g.Instantiate()
	if err != nil {
		t.Fatal(err)
	}
	defer ge.Destroy()
	evs := make([]*cuda.Event, 2*reps)
	for i := range evs {
		if evs[i], err = b.ctx.NewEvent(true); err != nil {
			t.Fatal(err)
		}
		defer evs[i].Destroy()
	}
	for i := 0; i < warm; i++ {
		if err := ge.Launch(b.s); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < reps; i++ {
		flush()
		evs[2*i].Record(b.s)
		if err := ge.Launch(b.s); err != nil {
			t.Fatal(err)
		}
		evs[2*i+1].Record(b.s)
	}
	if err := b.s.Synchronize(); err != nil {
		t.Fatal(err)
	}
	ms := make([]float32, reps)
	for i := range ms {
		if ms[i], err = evs[2*i+1].Since(evs[2*i]); err != nil {
			t.Fatal(err)
		}
	}
	return median(ms) * 1e3
}

// groupShrink enqueues the step's shrink of group mods over x on b.s (as
// loraSlices plans it for layer 0) and returns its plan.
func groupShrink(b *Backend, x *Buffer, mods []llama.Module) sgShrinkPlan {
	_, ms, inF, _ := b.groupSlices(mods)
	base, stride := b.tableRows(0)
	sp := b.shrinkPlan(b.s, inF, len(mods))
	b.launchShrink(b.s, sp, x, base, stride, ms, inF, len(mods))
	return sp
}

// devAlloc allocates n bytes of device memory, freed when t ends.
func devAlloc(t *testing.T, b *Backend, n int) cuda.DevicePtr {
	t.Helper()
	buf, err := b.ctx.Alloc(n)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { buf.Free() })
	return buf.Ptr()
}

// devUpload copies host into new device memory of its size (devAlloc's).
func devUpload[T any](t *testing.T, b *Backend, host []T) cuda.DevicePtr {
	t.Helper()
	var z T
	p := devAlloc(t, b, len(host)*int(unsafe.Sizeof(z)))
	if err := cuda.CopyHtoD(b.s, p, host); err != nil {
		t.Fatal(err)
	}
	return p
}
