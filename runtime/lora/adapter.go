package lora

import (
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"regexp"

	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/safetensors"
)

// File names of a PEFT adapter folder.
const (
	ConfigFile  = "adapter_config.json"
	WeightsFile = "adapter_model.safetensors"
)

// Pair is the LoRA update of one projection: delta = Scale * B @ A.
type Pair struct {
	Rank  int
	Scale float32
	A     []float32 // [Rank, in], row-major
	B     []float32 // [out, Rank], row-major
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
	f, err := safetensors.Parse(weights)
	if err != nil {
		return nil, weightsErr(err)
	}
	return Build(name, configJSON, f, base)
}

var keyRE = regexp.MustCompile(`^base_model\.model\.(.+)\.lora_([AB])(?:\.[A-Za-z0-9_-]+)?\.weight$`)
var layerRE = regexp.MustCompile(`^model\.layers\.(\d{1,9})\.(self_attn|mlp)\.([a-z_]+)$`)

// Build validates the config and tensors against base and copies the
// weights out as float32.
func Build(name string, configJSON []byte, f *safetensors.File, base *llama.Config) (*Adapter, error) {
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
	a := &Adapter{Name: name, Config: c, Layers: make([][llama.NumModules]*Pair, base.Layers)}
	for _, p := range pairs {
		if !c.Targets(p.path, p.layer) {
			return nil, fail(ErrMismatch, "%s has weights for %q, which target_modules does not select", WeightsFile, p.path)
		}
		wantR, alpha := c.RankAlpha(p.path)
		if p.rank != wantR {
			return nil, fail(ErrMismatch, "%s has rank %d, adapter_config.json says %d", p.a, p.rank, wantR)
		}
		av, err := finite(f, p.a)
		if err != nil {
			return nil, err
		}
		bv, err := finite(f, p.b)
		if err != nil {
			return nil, err
		}
		a.Layers[p.layer][p.mod] = &Pair{Rank: p.rank, Scale: float32(c.Scale(alpha, p.rank)), A: av, B: bv}
		a.Params += int64(len(av) + len(bv))
	}
	// Every targeted projection must have weights, or PEFT would have saved them.
	for l := 0; l < base.Layers; l++ {
		for mod := llama.Module(0); mod < llama.NumModules; mod++ {
			if c.Targets(mod.Path(l), l) && a.Layers[l][mod] == nil {
				return nil, fail(ErrMismatch, "target_modules selects %s but %s has no weights for it", mod.Path(l), WeightsFile)
			}
		}
	}
	return a, nil
}

// finite converts the named tensor to float32, refusing NaN and infinities.
func finite(f *safetensors.File, name string) ([]float32, error) {
	v, _, err := f.Float32(name)
	if err != nil {
		return nil, weightsErr(err)
	}
	for i, x := range v {
		if math.IsNaN(float64(x)) || math.IsInf(float64(x), 0) {
			return nil, fail(ErrWeights, "%s holds %v at element %d (LoRA weights must be finite)", name, x, i)
		}
	}
	return v, nil
}
