package lora_test

import (
	"encoding/binary"
	"math"
	"slices"
	"testing"
	"unsafe"

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

// TestParseOwnedAliases: ParseOwned keeps the file's bf16 bits in place
// (each A16/B16 points into the weights it was handed, with the values
// Parse copies out), while Parse copies; a file with one float32 pair is
// copied whole (no alias keeps the file alive beside float32 copies).
func TestParseOwnedAliases(t *testing.T) {
	base := adaptertest.Llama8B(t)
	base.Layers = 2
	cfg, weights := adaptertest.Random(t, base, 8, 5)
	inside := func(v []uint16, b []byte) bool {
		if len(v) == 0 {
			return false
		}
		p, lo := uintptr(unsafe.Pointer(&v[0])), uintptr(unsafe.Pointer(&b[0]))
		return p >= lo && p < lo+uintptr(len(b))
	}
	copied, err := lora.Parse("c", cfg, weights, base)
	if err != nil {
		t.Fatal(err)
	}
	owned, err := lora.ParseOwned("o", cfg, weights, base)
	if err != nil {
		t.Fatal(err)
	}
	for l := range base.Layers {
		for m := llama.Module(0); m < llama.NumModules; m++ {
			c, o := copied.Layers[l][m], owned.Layers[l][m]
			if inside(c.A16, weights) || inside(c.B16, weights) {
				t.Fatalf("layer %d %s: Parse aliases the weights", l, m)
			}
			if !inside(o.A16, weights) || !inside(o.B16, weights) {
				t.Fatalf("layer %d %s: ParseOwned copied a bf16 pair", l, m)
			}
			if !slices.Equal(c.A16, o.A16) || !slices.Equal(c.B16, o.B16) || c.Rank != o.Rank || c.Scale != o.Scale {
				t.Fatalf("layer %d %s: ParseOwned and Parse differ", l, m)
			}
		}
	}
	if owned.HostBytes() != copied.HostBytes() || owned.Params != copied.Params {
		t.Errorf("HostBytes %d vs %d, Params %d vs %d", owned.HostBytes(), copied.HostBytes(), owned.Params, copied.Params)
	}

	// One pair in float32: nothing aliases.
	f, err := safetensors.Parse(weights)
	if err != nil {
		t.Fatal(err)
	}
	var ts []safetensors.Tensor
	f32 := "base_model.model." + llama.Down.Path(1) + ".lora_A.weight"
	for _, name := range f.Names() {
		raw, info, err := f.Bytes(name)
		if err != nil {
			t.Fatal(err)
		}
		tn := safetensors.Tensor{Name: name, DType: info.DType, Shape: info.Shape, Data: raw}
		if name == f32 {
			v, _, _ := f.Float32(name)
			b := make([]byte, 4*len(v))
			for i, x := range v {
				binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(x))
			}
			tn.DType, tn.Data = safetensors.F32, b
		}
		ts = append(ts, tn)
	}
	mixed, err := safetensors.Encode(ts, nil)
	if err != nil {
		t.Fatal(err)
	}
	om, err := lora.ParseOwned("m", cfg, mixed, base)
	if err != nil {
		t.Fatal(err)
	}
	if p := om.Layers[0][llama.Q]; inside(p.A16, mixed) || p.A16 == nil {
		t.Error("a file with a float32 pair: bf16 pairs alias it, or were converted")
	}
}
