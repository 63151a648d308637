//go:build cuda

package cuda

import (
	"errors"
	"fmt"
	"slices"
	"testing"
)

// smProbe records the SM each block ran on and keeps it busy a while, so a
// grid of many blocks spreads over every SM it may use.
const smProbe = `
extern "C" __global__ void sm_probe(unsigned* smid, long long spin) {
    unsigned id;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
    if (threadIdx.x == 0) smid[blockIdx.x] = id;
    const long long t0 = clock64();
    while (clock64() - t0 < spin) {}
}
`

// TestGPUGreenPartition splits the SMs in two green contexts and checks,
// with a library's kernel (LoadLibrary) that records %smid, that
// each context's stream runs on as many distinct SMs as it holds and no
// more, that the two sets are disjoint when both run at once, and that a
// graph captured across the two streams (fork and join by events, as the
// LoRA stream does) keeps each kernel in its partition when replayed. It
// logs what the driver gave, for docs/PERFORMANCE.md.
func TestGPUGreenPartition(t *testing.T) {
	c := ctx(t)
	if c.Device().Major < 9 {
		t.Skip("partitions are planned for Hopper (8 SMs a unit)")
	}
	small, rest, err := c.SplitSMs(16)
	if errors.Is(err, ErrNoGreenContexts) {
		t.Skip(err)
	}
	if err != nil {
		t.Fatal(err)
	}
	defer small.Destroy()
	defer rest.Destroy()
	t.Logf("device %d SMs -> green contexts of %d and %d SMs", c.Device().SMs, small.SMs(), rest.SMs())
	if small.SMs() < 16 || small.SMs()+rest.SMs() > c.Device().SMs {
		t.Fatalf("split gave %d + %d SMs of %d", small.SMs(), rest.SMs(), c.Device().SMs)
	}
	f := testKernel(t, c, smProbe, "sm_probe", true) // a library's kernel: it runs in the stream's context
	fm := testKernel(t, c, smProbe, "sm_probe")      // a module's function: the primary context's
	ss, err := small.NewStream(true)
	if err != nil {
		t.Fatal(err)
	}
	defer ss.Destroy()
	rs, err := rest.NewStream(false)
	if err != nil {
		t.Fatal(err)
	}
	defer rs.Destroy()
	ps, err := c.NewStream()
	if err != nil {
		t.Fatal(err)
	}
	defer ps.Destroy()
	t.Logf("streams in their green contexts (cuStreamGetGreenCtx): small %v, rest %v, primary in rest %v", ss.InGreen(small), rs.InGreen(rest), ps.InGreen(rest))
	blocks := 8 * c.Device().SMs
	bufs := make([]*DeviceBuffer, 2)
	for i := range bufs {
		if bufs[i], err = c.Alloc(4 * blocks); err != nil {
			t.Fatal(err)
		}
		defer bufs[i].Free()
	}
	const spin = 20000 // cycles: ~10 µs a block
	probe := func(s *Stream, buf *DeviceBuffer) error {
		return f.Launch(s, Dim3{X: blocks}, Dim3{X: 32}, 0, buf.Ptr(), int64(spin))
	}
	sms := func(s *Stream, buf *DeviceBuffer) []uint32 {
		ids := make([]uint32, blocks)
		if err := CopyDtoH(s, ids, buf.Ptr()); err != nil {
			t.Fatal(err)
		}
		if err := s.Synchronize(); err != nil {
			t.Fatal(err)
		}
		slices.Sort(ids)
		return slices.Compact(ids)
	}
	check := func(what string, got []uint32, want int) {
		t.Helper()
		if len(got) > want || len(got) < want*3/4 {
			t.Errorf("%s: blocks ran on %d distinct SMs, want %d", what, len(got), want)
		} else {
			t.Logf("%s: %d distinct SMs (of %d)", what, len(got), want)
		}
	}
	// a module's function on a green stream: logged (it decides whether
	// partition.go needs the libraries), not checked
	if err := fm.Launch(ss, Dim3{X: blocks}, Dim3{X: 32}, 0, bufs[0].Ptr(), int64(spin)); err != nil {
		t.Logf("a module's function on the small context's stream: %v", err)
		if err := ss.Synchronize(); err != nil {
			t.Logf("and the stream after it: %v", err)
		}
	} else {
		t.Logf("a module's function on the small context's stream ran on %d distinct SMs (of %d there)", len(sms(ss, bufs[0])), small.SMs())
	}
	// one at a time
	for _, k := range []struct {
		name string
		s    *Stream
		want int
	}{{"primary", ps, c.Device().SMs}, {"small", ss, small.SMs()}, {"rest", rs, rest.SMs()}} {
		if err := probe(k.s, bufs[0]); err != nil {
			t.Fatalf("%s: %v", k.name, err)
		}
		check(k.name, sms(k.s, bufs[0]), k.want)
	}
	// both at once, and as a graph captured on rest forking to small
	disjoint := func(what string, a, b []uint32) {
		t.Helper()
		for _, x := range a {
			if _, ok := slices.BinarySearch(b, x); ok {
				t.Errorf("%s: SM %d ran blocks of both partitions", what, x)
				return
			}
		}
	}
	if err := probe(ss, bufs[0]); err != nil {
		t.Fatal(err)
	}
	if err := probe(rs, bufs[1]); err != nil {
		t.Fatal(err)
	}
	a, b := sms(ss, bufs[0]), sms(rs, bufs[1])
	check("small, beside rest", a, small.SMs())
	check("rest, beside small", b, rest.SMs())
	disjoint("concurrent", a, b)
	fork, err := c.NewEvent(false)
	if err != nil {
		t.Fatal(err)
	}
	defer fork.Destroy()
	join, err := c.NewEvent(false)
	if err != nil {
		t.Fatal(err)
	}
	defer join.Destroy()
	// events of the primary context recorded on and waited for by green
	// streams, as the backend's fork, join, timing and chaining events are
	if err := fork.Record(rs); err != nil {
		t.Fatalf("a primary context's event recorded on a green stream: %v", err)
	}
	if err := ss.Wait(fork); err != nil {
		t.Fatalf("a green stream waiting for a primary context's event: %v", err)
	}
	if err := ss.Synchronize(); err != nil {
		t.Fatal(err)
	}
	if err := rs.BeginCapture(); err != nil {
		t.Fatal(err)
	}
	capture := func() error {
		if err := fork.Record(rs); err != nil {
			return err
		}
		if err := ss.Wait(fork); err != nil {
			return err
		}
		if err := probe(ss, bufs[0]); err != nil {
			return fmt.Errorf("small in capture: %w", err)
		}
		if err := probe(rs, bufs[1]); err != nil {
			return fmt.Errorf("rest in capture: %w", err)
		}
		if err := join.Record(ss); err != nil {
			return err
		}
		return rs.Wait(join)
	}
	cerr := capture()
	g, err := rs.EndCapture()
	if cerr != nil || err != nil {
		t.Fatalf("capture: %v / %v", cerr, err)
	}
	defer g.Destroy()
	ge, err := g.Instantiate()
	if err != nil {
		t.Fatal(err)
	}
	defer ge.Destroy()
	for _, on := range []*Stream{rs, ps} { // replayed on the partition's stream, then on the primary one
		if err := ge.Launch(on); err != nil {
			t.Fatal(err)
		}
		if err := on.Synchronize(); err != nil {
			t.Fatal(err)
		}
		a, b := sms(rs, bufs[0]), sms(rs, bufs[1])
		if on == ps { // where the nodes run then is the driver's choice: logged, not checked
			t.Logf("graph replayed on the primary stream: small's kernel on %d SMs, rest's on %d", len(a), len(b))
			continue
		}
		check("graph: small", a, small.SMs())
		check("graph: rest", b, rest.SMs())
		disjoint("graph", a, b)
	}
}
