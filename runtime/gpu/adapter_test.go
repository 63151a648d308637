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

// TestLayerMarks: the upload mark of layer l (a step's layer-l LoRA ops
// wait for the bytes before it) covers every A and B of layers 0..l and
// none of a later layer's; marks ascend; layers without entries repeat the
// mark before them (0 before the first entry: nothing to wait for).
func TestLayerMarks(t *testing.T) {
	cfg := &llama.Config{VocabSize: 64, Hidden: 48, Intermediate: 80, Layers: 6, Heads: 4, KVHeads: 2, HeadDim: 12,
		RMSNormEps: 1e-5, RopeTheta: 10000, MaxPositions: 256, HiddenAct: "silu"}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	a := &lora.Adapter{Name: "x", Layers: make([][llama.NumModules]*lora.Pair, cfg.Layers)}
	for _, l := range []int{1, 2, 4} { // layers 0, 3 and 5 have no entries
		for m := range llama.NumModules {
			if (l+int(m))%2 == 0 {
				continue
			}
			rank := 3 + l
			in, out := cfg.Dims(m)
			a.Layers[l][m] = &lora.Pair{Rank: rank, Scale: 1, A16: make([]uint16, rank*in), B16: make([]uint16, out*rank)}
		}
	}
	img, err := (&Backend{cfg: cfg}).slotLayout(a)
	if err != nil {
		t.Fatal(err)
	}
	marks := img.layerMarks(cfg.Layers)
	if marks[0] != 0 {
		t.Errorf("layer 0 has no entries: mark %d, want 0", marks[0])
	}
	for l := 1; l < len(marks); l++ {
		if marks[l] < marks[l-1] {
			t.Errorf("marks descend at layer %d: %v", l, marks)
		}
	}
	if marks[cfg.Layers-1] > 2*img.total {
		t.Errorf("last mark %d beyond the image (%d bytes)", marks[cfg.Layers-1], 2*img.total)
	}
	for _, e := range img.ents {
		_, nb := a.Layers[e.layer][e.module].Len()
		for l := range marks {
			if l >= e.layer && marks[l] < 2*(e.bOff+nb) {
				t.Errorf("layer %d mark %d does not cover layer %d's %v (ends at byte %d)", l, marks[l], e.layer, llama.Module(e.module), 2*(e.bOff+nb))
			}
			if l < e.layer && marks[l] > 2*e.aOff {
				t.Errorf("layer %d mark %d reaches into layer %d's %v (starts at byte %d)", l, marks[l], e.layer, llama.Module(e.module), 2*e.aOff)
			}
		}
	}
	if marks[3] != marks[2] || marks[5] != marks[4] {
		t.Errorf("layers without entries should repeat the mark before: %v", marks)
	}
}
