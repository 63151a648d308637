//go:build cuda

package gpu

import (
	"slices"
	"testing"

	"github.com/peftd/peftd/runtime/cuda"
)

// TestMemsetHoist records FP8 products whose cuBLASLt algorithm zeroes a
// workspace counter first (the 8B gate/up shape at 256 rows on the H100
// and H200), each after the activation quantization of ours, hoists the
// memsets (memsethoist.go) and checks the replay against the products run
// without a recording, bit for bit, and that the memsets it found moved.
// Two products back to back: the second's memset must wait for the first
// product (same workspace), which its quantization kernel ends after.
func TestMemsetHoist(t *testing.T) {
	if err := cuda.EdgesSupported(); err != nil {
		t.Skip(err)
	}
	r := newFP8Rig(t)
	const T, N, K = 256, 28672, 4096
	w, err := r.f.upload(r.bf16Rand(N*K, 0.02), N, K)
	if err != nil {
		t.Fatal(err)
	}
	xs := []*cuda.DeviceBuffer{r.up(r.bf16Rand(T*K, 1)), r.up(r.bf16Rand(T*K, 1))}
	eager := []*cuda.DeviceBuffer{r.alloc(2 * T * N), r.alloc(2 * T * N)}
	replay := []*cuda.DeviceBuffer{r.alloc(2 * T * N), r.alloc(2 * T * N)}
	run := func(outs []*cuda.DeviceBuffer) {
		for i, x := range xs {
			r.f.invalidate()
			if err := r.f.linear(outs[i].Ptr(), x.Ptr(), T, w, uint64(10+i)); err != nil {
				t.Fatal(err)
			}
		}
	}
	run(eager) // also makes the plans and buffers a capture may not allocate
	r.sync()
	for _, b := range replay {
		r.s.Memset8(b.Ptr(), 0xFF, 2*T*N) // NaN poison: every element must be written
	}
	r.sync()
	if err := r.s.BeginCapture(); err != nil {
		t.Fatal(err)
	}
	r.mm.TrackCaptures(true)
	run(replay)
	g, err := r.s.EndCapture()
	calls := r.mm.TrackCaptures(false)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Destroy()
	memsets := func() int {
		edges, err := g.Edges()
		if err != nil {
			t.Fatal(err)
		}
		seen := map[cuda.GraphNode]bool{}
		n := 0
		for _, e := range edges {
			for _, x := range []cuda.GraphNode{e.From, e.To} {
				if !seen[x] {
					seen[x] = true
					if ty, err := g.Type(x); err == nil && ty == cuda.NodeMemset {
						n++
					}
				}
			}
		}
		return n
	}
	before := memsets()
	hoisted, err := hoistMemsets(g, calls)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d cuBLASLt calls recorded, %d memset nodes, %d hoisted", len(calls), before, hoisted)
	if len(calls) != len(xs) {
		t.Errorf("%d cuBLASLt calls noted, want %d", len(calls), len(xs))
	}
	if hoisted != before {
		t.Errorf("%d of %d memsets hoisted: each follows a quantization kernel of ours", hoisted, before)
	}
	if memsets() != before {
		t.Errorf("the hoist changed the number of memset nodes")
	}
	e, err := g.Instantiate()
	if err != nil {
		t.Fatal(err)
	}
	defer e.Destroy()
	for range 3 {
		if err := e.Launch(r.s); err != nil {
			t.Fatal(err)
		}
	}
	r.sync()
	for i := range xs {
		a, b := make([]uint16, T*N), make([]uint16, T*N)
		cuda.CopyDtoH(r.s, a, eager[i].Ptr())
		cuda.CopyDtoH(r.s, b, replay[i].Ptr())
		r.sync()
		if !slices.Equal(a, b) {
			t.Errorf("product %d: the replay with hoisted memsets differs from the eager product", i)
		}
	}
}
