package gpu

import (
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/lora"
	"github.com/peftd/peftd/runtime/safetensors"
)

// TestFillImageChunks: the slot image an adapter is streamed as, written a
// chunk at a time (any chunk size, any split of a chunk over goroutines),
// is the whole image: each A and B in bf16 at its offset (float32 pairs
// rounded, bf16 pairs copied), zeros between and after, whatever the
// previous chunk left in the buffer.
func TestFillImageChunks(t *testing.T) {
	cfg := &llama.Config{VocabSize: 64, Hidden: 48, Intermediate: 80, Layers: 3, Heads: 4, KVHeads: 2, HeadDim: 12,
		RMSNormEps: 1e-5, RopeTheta: 10000, MaxPositions: 256, HiddenAct: "silu"}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(7, 8))
	a := &lora.Adapter{Name: "x", Layers: make([][llama.NumModules]*lora.Pair, cfg.Layers)}
	for l := range a.Layers {
		for m := range llama.NumModules {
			if (l+int(m))%3 == 1 { // some projections absent
				continue
			}
			rank := 1 + rng.IntN(9)
			in, out := cfg.Dims(m)
			p := &lora.Pair{Rank: rank, Scale: 2, A: make([]float32, rank*in), B: make([]float32, out*rank)}
			for i := range p.A {
				p.A[i] = rng.Float32()*2 - 1
			}
			for i := range p.B {
				p.B[i] = rng.Float32()*2 - 1
			}
			if (l+int(m))%2 == 0 { // held as bf16 bits, as a bf16 file gives them
				p.A16, p.B16 = make([]uint16, len(p.A)), make([]uint16, len(p.B))
				f32ToBF16(p.A16, p.A)
				f32ToBF16(p.B16, p.B)
				p.A, p.B = nil, nil
			}
			a.Layers[l][m] = p
		}
	}
	b := &Backend{cfg: cfg}
	img, err := b.slotLayout(a)
	if err != nil {
		t.Fatal(err)
	}
	total, ents := img.total, img.ents
	want := make([]uint16, total)
	bf16Pairs := 0
	for _, e := range ents {
		p := a.Layers[e.layer][e.module]
		if p.A16 != nil {
			bf16Pairs++
		}
		fa, fb := p.Float32()
		for i, v := range fa {
			want[e.aOff+i] = safetensors.Float32ToBF16(v)
		}
		for i, v := range fb {
			want[e.bOff+i] = safetensors.Float32ToBF16(v)
		}
	}
	if bf16Pairs == 0 || bf16Pairs == len(ents) {
		t.Fatalf("%d of %d pairs in bf16: want both forms", bf16Pairs, len(ents))
	}
	for _, chunk := range []int{1, 7, 128, 1000, 4096, total} {
		got := make([]uint16, total)
		buf := make([]uint16, chunk)
		for off := 0; off < total; off += chunk {
			n := min(chunk, total-off)
			for i := range buf {
				buf[i] = 0xffff // what a previous chunk left
			}
			for s := 0; s < n; { // in uneven parts, as the goroutines take them
				e := min(n, s+1+rng.IntN(n))
				fillImage(buf[s:e], off+s, a, ents, total)
				s = e
			}
			copy(got[off:], buf[:n])
		}
		if !slices.Equal(got, want) {
			for i := range got {
				if got[i] != want[i] {
					t.Fatalf("chunk %d: element %d of %d is %#x, want %#x", chunk, i, total, got[i], want[i])
				}
			}
		}
	}
}
