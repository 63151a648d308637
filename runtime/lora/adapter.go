package lora

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"regexp"
	"unsafe"

	"github.com/peftd/peftd/internal/parallel"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/safetensors"
)

// File names of a PEFT adapter folder.
const (
	ConfigFile  = "adapter_config.json"
	WeightsFile = "adapter_model.safetensors"
)

// Pair is the LoRA update of one projection: delta = Scale * B @ A.
//
// Its weights are held in one of two forms: float32 (A and B), or, when the
// adapter's file stored both in bf16, those bf16 bits (A16 and B16, exact
// and half the memory; A and B are nil then). The GPU backend uploads bf16
// as it is; Float32 gives float32 either way.
type Pair struct {
	Rank  int
	Scale float32
	A     []float32 // [Rank, in], row-major
	B     []float32 // [out, Rank], row-major
	A16   []uint16  // A as bf16 bits, instead of A
	B16   []uint16  // B as bf16 bits, instead of B
}

// Len is the number of values in A and in B, whichever form holds them.
func (p *Pair) Len() (a, b int) {
	if p.A == nil && p.B == nil {
		return len(p.A16), len(p.B16)
	}
	return len(p.A), len(p.B)
}

// Float32 is A and B as float32: the pair's own slices, or float32 copies
// of its bf16 values.
func (p *Pair) Float32() (a, b []float32) {
	if p.A != nil || p.B != nil {
		return p.A, p.B
	}
	return widen(p.A16), widen(p.B16)
}

func widen(v []uint16) []float32 {
	out := make([]float32, len(v))
	for i, h := range v {
		out[i] = math.Float32frombits(uint32(h) << 16)
	}
	return out
}

// Float32 is the adapter with every pair in float32: a itself when they
// all are, else a copy whose bf16 pairs are widened (for backends that
// compute in float32).
func (a *Adapter) Float32() *Adapter {
	out := *a
	out.Layers = make([][llama.NumModules]*Pair, len(a.Layers))
	copied := false
	for l, lay := range a.Layers {
		for m, p := range lay {
			if p != nil && p.A == nil && p.B == nil {
				ap, bp := p.Float32()
				p = &Pair{Rank: p.Rank, Scale: p.Scale, A: ap, B: bp}
				copied = true
			}
			out.Layers[l][m] = p
		}
	}
	if !copied {
		return a
	}
	return &out
}

// HostBytes is the memory its weights take (4 bytes a float32 value, 2 a
// bf16 one).
func (a *Adapter) HostBytes() int64 {
	var n int64
	for _, l := range a.Layers {
		for _, p := range l {
			if p != nil {
				n += int64(4*(len(p.A)+len(p.B)) + 2*(len(p.A16)+len(p.B16)))
			}
		}
	}
	return n
}

// Adapter is a validated LoRA adapter for one base model.
type Adapter struct {
	Name   string
	Config *Config
	// Layers[l][m] is nil where the adapter leaves the projection alone.
	Layers [][llama.NumModules]*Pair
	// Params is the number of LoRA weights (A and B).
	Params int64
}

// MaxRank is the largest rank over every projection.
func (a *Adapter) MaxRank() int {
	r := 0
	for _, l := range a.Layers {
		for _, p := range l {
			if p != nil && p.Rank > r {
				r = p.Rank
			}
		}
	}
	return r
}

// Modules lists the projections the adapter touches in any layer.
func (a *Adapter) Modules() []llama.Module {
	var seen [llama.NumModules]bool
	for _, l := range a.Layers {
		for m, p := range l {
			if p != nil {
				seen[m] = true
			}
		}
	}
	var out []llama.Module
	for m, s := range seen {
		if s {
			out = append(out, llama.Module(m))
		}
	}
	return out
}

// Load reads the adapter in dir and validates it against base.
func Load(dir string, base *llama.Config) (*Adapter, error) {
	cb, err := os.ReadFile(filepath.Join(dir, ConfigFile))
	if err != nil {
		return nil, fmt.Errorf("lora: adapter %s: %w", dir, err)
	}
	wpath := filepath.Join(dir, WeightsFile)
	if _, err := os.Stat(wpath); errors.Is(err, os.ErrNotExist) {
		if _, e2 := os.Stat(filepath.Join(dir, "adapter_model.bin")); e2 == nil {
			return nil, fail(ErrUnsupported, "%s holds adapter_model.bin (pickle); save it with safe_serialization=True", dir)
		}
	}
	f, err := safetensors.Open(wpath)
	if err != nil {
		if werr := weightsErr(err); werr != err {
			return nil, fmt.Errorf("adapter %s: %w", dir, werr)
		}
		return nil, fmt.Errorf("lora: adapter %s: %w", dir, err)
	}
	defer f.Close()
	a, err := Build(filepath.Base(filepath.Clean(dir)), cb, f, base)
	if err != nil {
		return nil, fmt.Errorf("adapter %s: %w", dir, err)
	}
	return a, nil
}

// Parse builds an adapter from the bytes of its two files. Its errors are
// *Error (but for a nil base).
func Parse(name string, configJSON, weights []byte, base *llama.Config) (*Adapter, error) {
	c, err := Check(name, configJSON, weights, base)
	if err != nil {
		return nil, err
	}
	return c.Adapter(), nil
}

// ParseOwned is Parse for a caller that hands weights over: nothing else
// may write them afterwards. When every pair is bf16 the adapter's A16 and
// B16 alias weights instead of copying them (a cold load skips a copy of
// the whole file and the page faults of a new buffer of its size).
func ParseOwned(name string, configJSON, weights []byte, base *llama.Config) (*Adapter, error) {
	c, err := Check(name, configJSON, weights, base)
	if err != nil {
		return nil, err
	}
	return c.adapter(true), nil
}

// Check validates an adapter from the bytes of its two files as Parse does,
// refusing what Parse refuses with the same errors, without converting its
// weights: the returned Checked converts them, and aliases weights until
// then.
func Check(name string, configJSON, weights []byte, base *llama.Config) (*Checked, error) {
	f, err := safetensors.Parse(weights)
	if err != nil {
		return nil, weightsErr(err)
	}
	return check(name, configJSON, f, base)
}

var keyRE = regexp.MustCompile(`^base_model\.model\.(.+)\.lora_([AB])(?:\.[A-Za-z0-9_-]+)?\.weight$`)
var layerRE = regexp.MustCompile(`^model\.layers\.(\d{1,9})\.(self_attn|mlp)\.([a-z_]+)$`)

// Build validates the config and tensors against base and copies the
// weights out as float32.
func Build(name string, configJSON []byte, f *safetensors.File, base *llama.Config) (*Adapter, error) {
	c, err := check(name, configJSON, f, base)
	if err != nil {
		return nil, err
	}
	return c.Adapter(), nil
}

// Checked is an adapter validated against its base model whose weights are
// still the safetensors file's: Adapter copies them out as float32.
type Checked struct {
	name   string
	cfg    *Config
	f      *safetensors.File
	pairs  []checkedPair
	layers int
}

type checkedPair struct {
	tensorPair
	scale float32
}

// check validates the config, the tensors' names, shapes and dtypes against
// base and every weight's value (finite), reading the weights in place.
func check(name string, configJSON []byte, f *safetensors.File, base *llama.Config) (*Checked, error) {
	c, err := ParseConfig(configJSON)
	if err != nil {
		return nil, err
	}
	if err := c.Check(base); err != nil {
		return nil, err
	}
	pairs, err := checkTensors(f, base)
	if err != nil {
		return nil, err
	}
	ck := &Checked{name: name, cfg: c, f: f, pairs: make([]checkedPair, 0, len(pairs)), layers: base.Layers}
	have := make([][llama.NumModules]bool, base.Layers)
	for _, p := range pairs {
		if !c.Targets(p.path, p.layer) {
			return nil, fail(ErrMismatch, "%s has weights for %q, which target_modules does not select", WeightsFile, p.path)
		}
		wantR, alpha := c.RankAlpha(p.path)
		if p.rank != wantR {
			return nil, fail(ErrMismatch, "%s has rank %d, adapter_config.json says %d", p.a, p.rank, wantR)
		}
		ck.pairs = append(ck.pairs, checkedPair{tensorPair: p, scale: float32(c.Scale(alpha, p.rank))})
		have[p.layer][p.mod] = true
	}
	// Every value, on several goroutines (a cold adapter's load waits on
	// it); the first pair in file order that fails is the one reported.
	if err := parallel.Ranges(len(ck.pairs), 1, func(lo, hi int) error {
		for _, p := range ck.pairs[lo:hi] {
			if err := finite(f, p.a); err != nil {
				return err
			}
			if err := finite(f, p.b); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		return nil, err
	}
	// Every targeted projection must have weights, or PEFT would have saved them.
	for l := 0; l < base.Layers; l++ {
		for mod := llama.Module(0); mod < llama.NumModules; mod++ {
			if c.Targets(mod.Path(l), l) && !have[l][mod] {
				return nil, fail(ErrMismatch, "target_modules selects %s but %s has no weights for it", mod.Path(l), WeightsFile)
			}
		}
	}
	return ck, nil
}

// Adapter copies the checked weights out, on several goroutines (a cold
// adapter's load waits on it): a pair whose two tensors are bf16 keeps
// their bf16 bits (A16, B16: a copy, no conversion, half the memory of
// float32), any other is converted to float32. It cannot fail: every
// tensor's dtype, shape and values were checked.
func (ck *Checked) Adapter() *Adapter { return ck.adapter(false) }

// adapter copies the weights out, or with own aliases the bf16 bits of the
// weights when every pair is bf16 (ParseOwned).
func (ck *Checked) adapter(own bool) *Adapter {
	a := &Adapter{Name: ck.name, Config: ck.cfg, Layers: make([][llama.NumModules]*Pair, ck.layers)}
	alias := own && nativeLittle
	for _, p := range ck.pairs {
		if !alias {
			break
		}
		for _, name := range []string{p.a, p.b} {
			if b, info, err := ck.f.Bytes(name); err != nil || info.DType != safetensors.BF16 || uintptr(unsafe.Pointer(unsafe.SliceData(b)))%2 != 0 {
				alias = false
			}
		}
	}
	pairs := make([]*Pair, len(ck.pairs))
	parallel.Ranges(len(ck.pairs), 1, func(lo, hi int) error {
		for i, p := range ck.pairs[lo:hi] {
			pr := &Pair{Rank: p.rank, Scale: p.scale}
			if alias {
				pr.A16, pr.B16 = bf16Alias(ck.f, p.a), bf16Alias(ck.f, p.b)
				pairs[lo+i] = pr
				continue
			}
			if a16, ok := bf16s(ck.f, p.a); ok {
				if b16, ok := bf16s(ck.f, p.b); ok {
					pr.A16, pr.B16 = a16, b16
				}
			}
			if pr.A16 == nil {
				pr.A, pr.B = float32s(ck.f, p.a), float32s(ck.f, p.b)
			}
			pairs[lo+i] = pr
		}
		return nil
	})
	for i, p := range ck.pairs {
		a.Layers[p.layer][p.mod] = pairs[i]
		na, nb := pairs[i].Len()
		a.Params += int64(na + nb)
	}
	return a
}

// bf16s copies a checked BF16 tensor's bits out (ok false for another dtype).
func bf16s(f *safetensors.File, name string) ([]uint16, bool) {
	b, info, err := f.Bytes(name)
	if err != nil || info.DType != safetensors.BF16 {
		return nil, false
	}
	out := make([]uint16, len(b)/2)
	if nativeLittle {
		copy(unsafe.Slice((*byte)(unsafe.Pointer(unsafe.SliceData(out))), len(b)), b)
		return out, true
	}
	for i := range out {
		out[i] = binary.LittleEndian.Uint16(b[2*i:])
	}
	return out, true
}

// bf16Alias is a checked BF16 tensor's bits in place (2-byte aligned, on a
// little-endian machine: adapter checked both).
func bf16Alias(f *safetensors.File, name string) []uint16 {
	b, _, _ := f.Bytes(name)
	if len(b) == 0 {
		return []uint16{}
	}
	return unsafe.Slice((*uint16)(unsafe.Pointer(unsafe.SliceData(b))), len(b)/2)
}

// nativeLittle: this machine stores a uint16's low byte first, as the
// safetensors format does.
var nativeLittle = func() bool { x := uint16(1); return *(*byte)(unsafe.Pointer(&x)) == 1 }()

// float32s converts a checked tensor to float32.
func float32s(f *safetensors.File, name string) []float32 {
	v, _, err := f.Float32(name)
	if err != nil { // checked: a float dtype of the size its shape says
		panic(fmt.Sprintf("lora: checked tensor %s: %v", name, err))
	}
	return v
}

// finite refuses a tensor holding NaN or an infinity (LoRA weights must be
// finite), reading its raw F32, F16 or BF16 data in place: a value is not
// finite when its exponent bits are all set.
func finite(f *safetensors.File, name string) error {
	b, info, err := f.Bytes(name)
	if err != nil {
		return weightsErr(err)
	}
	var size int
	var exp uint64 // the exponent bits of each value in a 64-bit word
	switch info.DType {
	case safetensors.F32:
		size, exp = 4, 0x7f800000_7f800000
	case safetensors.F16:
		size, exp = 2, 0x7c00_7c00_7c00_7c00
	case safetensors.BF16:
		size, exp = 2, 0x7f80_7f80_7f80_7f80
	default:
		e := fail(ErrUnsupported, "%s has dtype %s (want F32, F16 or BF16)", name, info.DType)
		e.Err = safetensors.ErrDType
		return e
	}
	i := nonFinite(b, size, exp)
	if i < 0 {
		return nil
	}
	k := i / size
	var x [1]float32
	_ = safetensors.DecodeFloat32(x[:], b[i:i+size], info.DType)
	return fail(ErrWeights, "%s holds %v at element %d (LoRA weights must be finite)", name, x[0], k)
}

// nonFinite is the byte offset of the first value of b (little-endian, size
// 2 or 4 bytes each) whose exponent bits, exp in each lane of a 64-bit word,
// are all set; -1 if none. Eight bytes at a time: a lane's masked exponent
// plus its lowest bit carries into the lane's sign bit exactly when the
// exponent is all ones.
func nonFinite(b []byte, size int, exp uint64) int {
	low := exp & -exp // the lowest exponent bit of the first lane
	lanes, signs := low|low<<32, uint64(0x80000000_80000000)
	if size == 2 {
		lanes, signs = low|low<<16|low<<32|low<<48, 0x8000_8000_8000_8000
	}
	i := 0
	for ; i+8 <= len(b); i += 8 {
		if ((binary.LittleEndian.Uint64(b[i:])&exp)+lanes)&signs != 0 {
			break
		}
	}
	e := exp & (1<<(8*size) - 1)
	for ; i+size <= len(b); i += size {
		v := uint64(binary.LittleEndian.Uint16(b[i:]))
		if size == 4 {
			v = uint64(binary.LittleEndian.Uint32(b[i:]))
		}
		if v&e == e {
			return i
		}
	}
	return -1
}
