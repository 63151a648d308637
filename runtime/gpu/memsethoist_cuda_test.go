//go:build cuda

package gpu

import (
	"slices"
	"testing"

	"github.com/peftd/peftd/kernels"
	"github.com/peftd/peftd/runtime/cuda"
)

// TestMemsetHoist records FP8 products whose cuBLASLt algorithm zeroes a
// workspace counter first (the 8B gate/up shape at 256 rows on the H100
// and H200), each after the activation quantization of ours, hoists the
// memsets (memsethoist.go: moved, then moved and replaced by fill_rows) and
// checks the replay against the products run without a recording, bit for
// bit, and that the memsets it found moved.
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
	mod, _, err := kernels.Load(r.ctx, "llama.cu", kernels.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer mod.Unload()
	fill, err := mod.Function("fill_rows")
	if err != nil {
		t.Fatal(err)
	}
	// mode 1 moves each memset, mode 2 also replaces it by fill_rows
	for mode := 1; mode <= 2; mode++ {
		if mode == 2 && cuda.NodesSupported() != nil {
			t.Logf("mode 2: %v", cuda.NodesSupported())
			continue
		}
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
		count := func() (memsets, nodes int) {
			edges, err := g.Edges()
			if err != nil {
				t.Fatal(err)
			}
			seen := map[cuda.GraphNode]bool{}
			for _, e := range edges {
				for _, x := range []cuda.GraphNode{e.From, e.To} {
					if !seen[x] {
						seen[x] = true
						if ty, err := g.Type(x); err == nil && ty == cuda.NodeMemset {
							memsets++
						}
					}
				}
			}
			return memsets, len(seen)
		}
		before, nodes := count()
		hoisted, err := hoistMemsets(g, calls, mode, fill)
		if err != nil {
			t.Fatal(err)
		}
		after, nodesAfter := count()
		t.Logf("mode %d: %d cuBLASLt calls recorded, %d memset nodes of %d, %d moved; after: %d memsets, %d nodes", mode, len(calls), before, nodes, hoisted, after, nodesAfter)
		if len(calls) != len(xs) {
			t.Errorf("%d cuBLASLt calls noted, want %d", len(calls), len(xs))
		}
		if hoisted != before {
			t.Errorf("mode %d: %d of %d memsets moved: each follows a quantization kernel of ours", mode, hoisted, before)
		}
		if want := map[int]int{1: before, 2: 0}[mode]; after != want || nodesAfter != nodes {
			t.Errorf("mode %d: %d memsets and %d nodes after, want %d and %d", mode, after, nodesAfter, want, nodes)
		}
		e, err := g.Instantiate()
		if err != nil {
			t.Fatal(err)
		}
		for range 3 {
			if err := e.Launch(r.s); err != nil {
				t.Fatal(err)
			}
		}
		r.sync()
		e.Destroy()
		g.Destroy()
		for i := range xs {
			a, b := make([]uint16, T*N), make([]uint16, T*N)
			cuda.CopyDtoH(r.s, a, eager[i].Ptr())
			cuda.CopyDtoH(r.s, b, replay[i].Ptr())
			r.sync()
			if !slices.Equal(a, b) {
				t.Errorf("mode %d, product %d: the replay differs from the eager product", mode, i)
			}
		}
	}
}
