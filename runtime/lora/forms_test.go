package lora_test

import (
	"encoding/binary"
	"math"
	"slices"
	"testing"

	"github.com/peftd/peftd/internal/adaptertest"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/lora"
	"github.com/peftd/peftd/runtime/safetensors"
)

// TestBF16PairsKeepTheirBits: an adapter whose file stores bf16 keeps the
// file's bits (A16, B16: half the memory of float32, no conversion), and
// Float32 gives exactly the values the float32 form held before; a float32
// file stays float32; Params and HostBytes count what is held.
func TestBF16PairsKeepTheirBits(t *testing.T) {
	base := adaptertest.Llama8B(t)
	base.Layers = 2 // a small one
	cfg, weights := adaptertest.Random(t, base, 8, 3)
	a, err := lora.Parse("bf", cfg, weights, base)
	if err != nil {
		t.Fatal(err)
	}
	f, err := safetensors.Parse(weights)
	if err != nil {
		t.Fatal(err)
	}
	var params int64
	for l := range base.Layers {
		for m := llama.Module(0); m < llama.NumModules; m++ {
			p := a.Layers[l][m]
			if p == nil || p.A != nil || p.B != nil || p.A16 == nil || p.B16 == nil {
				t.Fatalf("layer %d %s: want a bf16 pair, got %+v", l, m, p)
			}
			name := "base_model.model." + m.Path(l)
			for _, c := range []struct {
				suffix string
				bits   []uint16
			}{{".lora_A.weight", p.A16}, {".lora_B.weight", p.B16}} {
				raw, _, err := f.Bytes(name + c.suffix)
				if err != nil {
					t.Fatal(err)
				}
				for i, h := range c.bits {
					if h != binary.LittleEndian.Uint16(raw[2*i:]) {
						t.Fatalf("%s%s: element %d is %#x, the file has %#x", name, c.suffix, i, h, binary.LittleEndian.Uint16(raw[2*i:]))
					}
				}
				want, _, err := f.Float32(name + c.suffix)
				if err != nil {
					t.Fatal(err)
				}
				fa, fb := p.Float32()
				got := fa
				if c.suffix == ".lora_B.weight" {
					got = fb
				}
				if !slices.EqualFunc(got, want, func(x, y float32) bool { return math.Float32bits(x) == math.Float32bits(y) }) {
					t.Fatalf("%s%s: Float32 differs from the file's float32 values", name, c.suffix)
				}
			}
			na, nb := p.Len()
			params += int64(na + nb)
		}
	}
	if a.Params != params || a.HostBytes() != 2*params {
		t.Errorf("Params %d, HostBytes %d; want %d and %d", a.Params, a.HostBytes(), params, 2*params)
	}
	w := a.Float32()
	if w == a || w.HostBytes() != 4*params || w.Layers[1][llama.Down].A16 != nil || w.Layers[1][llama.Down].A == nil {
		t.Errorf("Float32: a float32 copy wanted (HostBytes %d)", w.HostBytes())
	}
	if w.Float32() != w {
		t.Error("Float32 of a float32 adapter is not the adapter itself")
	}

	// A float32 file stays float32.
	var ts []safetensors.Tensor
	for _, name := range f.Names() {
		v, info, err := f.Float32(name)
		if err != nil {
			t.Fatal(err)
		}
		b := make([]byte, 4*len(v))
		for i, x := range v {
			binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(x))
		}
		ts = append(ts, safetensors.Tensor{Name: name, DType: safetensors.F32, Shape: info.Shape, Data: b})
	}
	w32, err := safetensors.Encode(ts, nil)
	if err != nil {
		t.Fatal(err)
	}
	a32, err := lora.Parse("f32", cfg, w32, base)
	if err != nil {
		t.Fatal(err)
	}
	p := a32.Layers[0][llama.Q]
	if p.A == nil || p.A16 != nil || a32.HostBytes() != 4*params || a32.Params != params {
		t.Errorf("float32 file: A %v A16 %v, HostBytes %d, Params %d", p.A != nil, p.A16 != nil, a32.HostBytes(), a32.Params)
	}
}
