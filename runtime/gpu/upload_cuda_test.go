//go:build cuda

package gpu

import (
	"encoding/binary"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/peftd/peftd/runtime/cuda"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/safetensors"
)

// TestUploadRoundTrip uploads tensors larger than a staging buffer (so
// pieces alternate between the two) in bf16, f16 and f32, plus tiny ones in
// between, and reads every one back: the device holds exactly what the
// serial host conversion gives, in order, once the compute stream reads it.
func TestUploadRoundTrip(t *testing.T) {
	b, err := New(Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	rng := rand.New(rand.NewPCG(3, 4))
	type tensor struct {
		dt safetensors.DType
		n  int
	}
	per := uploadStage / 2
	cases := []tensor{{safetensors.BF16, 2*per + 12345}, {safetensors.F32, 7}, {safetensors.F16, per + 1},
		{safetensors.F32, per + 999}, {safetensors.BF16, 1}, {safetensors.BF16, 3 * per}}
	var ws []*weight
	var want [][]uint16
	for _, c := range cases {
		raw := make([]byte, c.n*c.dt.Size())
		for i := 0; i < c.n; i++ {
			v := float32(rng.NormFloat64())
			switch c.dt {
			case safetensors.BF16:
				binary.LittleEndian.PutUint16(raw[2*i:], safetensors.Float32ToBF16(v))
			case safetensors.F16:
				binary.LittleEndian.PutUint16(raw[2*i:], float32ToHalf(v))
			case safetensors.F32:
				binary.LittleEndian.PutUint32(raw[4*i:], math.Float32bits(v))
			}
		}
		ref := make([]uint16, c.n)
		if err := encodeBF16(ref, raw, c.dt); err != nil {
			t.Fatal(err)
		}
		w, err := b.Upload("t", c.dt, []int{c.n}, raw)
		if err != nil {
			t.Fatal(err)
		}
		clear(raw) // Upload must not read it after returning
		ws, want = append(ws, w.(*weight)), append(want, ref)
	}
	for i, w := range ws {
		got := make([]uint16, w.cols)
		if err := cuda.CopyDtoH(b.s, got, w.mem.Ptr()); err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(got, want[i]) {
			k := 0
			for k < len(got) && got[k] == want[i][k] {
				k++
			}
			t.Errorf("tensor %d (%s, %d values): first difference at value %d", i, cases[i].dt, cases[i].n, k)
		}
	}
	// the same data in parts (UploadParts: stacked projections), the parts
	// crossing staging pieces at odd places
	for i, c := range cases {
		raw := make([]byte, c.n*c.dt.Size())
		ref := want[i]
		for j, v := range ref { // bf16 values: exact in every dtype
			f := math.Float32frombits(uint32(v) << 16)
			switch c.dt {
			case safetensors.BF16:
				binary.LittleEndian.PutUint16(raw[2*j:], v)
			case safetensors.F16:
				binary.LittleEndian.PutUint16(raw[2*j:], float32ToHalf(f))
			case safetensors.F32:
				binary.LittleEndian.PutUint32(raw[4*j:], math.Float32bits(f))
			}
		}
		cut1, cut2 := c.n/3, c.n/3+(c.n-c.n/3)/2+1
		cut2 = min(cut2, c.n)
		sz := c.dt.Size()
		parts := [][]byte{raw[:cut1*sz], raw[cut1*sz : cut2*sz], raw[cut2*sz:]}
		w, err := b.UploadParts("t", c.dt, []int{c.n}, parts)
		if err != nil {
			t.Fatal(err)
		}
		enc := make([]uint16, c.n)
		if err := encodeBF16(enc, raw, c.dt); err != nil {
			t.Fatal(err)
		}
		clear(raw)
		got := make([]uint16, c.n)
		if err := cuda.CopyDtoH(b.s, got, w.(*weight).mem.Ptr()); err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(got, enc) {
			t.Errorf("tensor %d in 3 parts (%s, %d values): the device copy differs", i, c.dt, c.n)
		}
	}
	if _, err := b.UploadParts("t", safetensors.BF16, []int{4}, [][]byte{make([]byte, 3), make([]byte, 5)}); err == nil {
		t.Error("UploadParts took a part that splits a value")
	}
	if err := b.freeStaging(); err != nil {
		t.Fatal(err)
	}
}

// TestStageBytesRoundTrip: stageBytes moves bytes as they are, pieces of
// 1 to 3 staging buffers and tiny ones between (odd lengths included), and
// never reads raw after it returns.
func TestStageBytesRoundTrip(t *testing.T) {
	b, err := New(Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	rng := rand.New(rand.NewPCG(5, 6))
	sizes := []int{2*uploadStage + 12345, 7, uploadStage, 1, uploadStage + 1}
	var bufs []*cuda.DeviceBuffer
	var want [][]byte
	for _, n := range sizes {
		raw := make([]byte, n)
		for i := range raw {
			raw[i] = byte(rng.Uint32())
		}
		d, err := b.ctx.Alloc(n)
		if err != nil {
			t.Fatal(err)
		}
		defer d.Free()
		if err := b.stageBytes(d.Ptr(), raw); err != nil {
			t.Fatal(err)
		}
		bufs, want = append(bufs, d), append(want, slices.Clone(raw))
		clear(raw)
	}
	for i, d := range bufs {
		got := make([]byte, sizes[i])
		if err := cuda.CopyDtoH(b.s, got, d.Ptr()); err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(got, want[i]) {
			t.Errorf("%d bytes: the device copy differs", sizes[i])
		}
	}
	if err := b.freeStaging(); err != nil {
		t.Fatal(err)
	}
}

// float32ToHalf rounds to the nearest f16 (normal range: the test's values).
func float32ToHalf(f float32) uint16 {
	b := math.Float32bits(f)
	sign := uint16(b>>16) & 0x8000
	exp := int((b>>23)&0xff) - 127 + 15
	man := b & 0x7fffff
	if exp <= 0 {
		return sign
	}
	h := uint32(exp)<<10 | man>>13
	if man&0x1fff > 0x1000 || (man&0x1fff == 0x1000 && h&1 == 1) {
		h++
	}
	return sign | uint16(h)
}

// TestLoadBench times engine.New (every weight converted, staged and
// copied) on the random 8B checkpoint of PEFTD_MODEL_8B, from the page
// cache (the file is read once before timing), and checks the embedding
// table (1 GB, many staging pieces) on the device against the file.
func TestLoadBench(t *testing.T) {
	dir := os.Getenv("PEFTD_MODEL_8B")
	if dir == "" || os.Getenv("PEFTD_LOAD_BENCH") == "" {
		t.Skip("PEFTD_MODEL_8B and PEFTD_LOAD_BENCH=1 are not both set")
	}
	m, err := llama.Open(filepath.Join(dir, "base"))
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	var total int64
	for _, n := range m.Tensors.Names() {
		raw, _, err := m.Tensors.Bytes(n)
		if err != nil {
			t.Fatal(err)
		}
		total += int64(len(raw))
		var s byte
		for i := 0; i < len(raw); i += 4096 { // into the page cache and mapped
			s += raw[i]
		}
		_ = s
	}
	for round := range 2 {
		gb, err := New(Options{})
		if err != nil {
			t.Fatal(err)
		}
		t0 := time.Now()
		e, err := engine.New(m, gb, engine.Options{MaxTokens: 256, BlockSize: 16, KVBlocks: 64})
		if err != nil {
			gb.Close()
			t.Fatal(err)
		}
		if err := gb.s.Synchronize(); err != nil {
			t.Fatal(err)
		}
		d := time.Since(t0)
		bench("load 8B round %d: %.1f GB of weights in %.2f s (%.1f GB/s): engine.New, bf16 staged uploads", round, float64(total)/1e9, d.Seconds(), float64(total)/1e9/d.Seconds())
		if round == 0 {
			raw, info, err := m.Tensors.Bytes(llama.EmbedName)
			if err != nil {
				t.Fatal(err)
			}
			n := len(raw) / info.DType.Size()
			ref := make([]uint16, n)
			if err := encodeBF16(ref, raw, info.DType); err != nil {
				t.Fatal(err)
			}
			var w *weight
			for _, x := range gb.weights {
				if x.rows*x.cols == n && x.rows == info.Shape[0] {
					w = x
					break
				}
			}
			if w == nil {
				t.Fatal("no device weight of the embedding's shape")
			}
			got := make([]uint16, n)
			if err := cuda.CopyDtoH(gb.s, got, w.mem.Ptr()); err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got, ref) {
				t.Error("the embedding table on the device differs from the file")
			}
		}
		e.Close()
		gb.Close()
	}
}
