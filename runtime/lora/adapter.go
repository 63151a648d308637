package lora

import (
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"

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
			return nil, fmt.Errorf("%w: %s holds adapter_model.bin (pickle); save it with safe_serialization=True", ErrUnsupported, dir)
		}
	}
	f, err := safetensors.Open(wpath)
	if err != nil {
		return nil, fmt.Errorf("lora: adapter %s: %w", dir, err)
	}
	defer f.Close()
	a, err := Build(filepath.Base(filepath.Clean(dir)), cb, f, base)
	if err != nil {
		return nil, fmt.Errorf("adapter %s: %w", dir, err)
	}
	return a, nil
}

// Parse builds an adapter from the bytes of its two files.
func Parse(name string, configJSON, weights []byte, base *llama.Config) (*Adapter, error) {
	f, err := safetensors.Parse(weights)
	if err != nil {
		return nil, fmt.Errorf("lora: %s: %w", WeightsFile, err)
	}
	return Build(name, configJSON, f, base)
}

var keyRE = regexp.MustCompile(`^base_model\.model\.(.+)\.lora_([AB])(?:\.[A-Za-z0-9_-]+)?\.weight$`)
var layerRE = regexp.MustCompile(`^model\.layers\.(\d+)\.(self_attn|mlp)\.([a-z_]+)$`)

// Build validates the config and tensors against base and copies the
// weights out as float32.
func Build(name string, configJSON []byte, f *safetensors.File, base *llama.Config) (*Adapter, error) {
	c, err := ParseConfig(configJSON)
	if err != nil {
		return nil, err
	}
	if t := c.TargetModules; t.Regex == "" {
		for _, n := range t.Names {
			last := n
			if i := strings.LastIndexByte(n, '.'); i >= 0 {
				last = n[i+1:]
			}
			if _, ok := llama.ModuleByName(last); !ok {
				return nil, fmt.Errorf("%w: unknown target module %q (the base model's linear layers are q_proj k_proj v_proj o_proj gate_proj up_proj down_proj)", ErrMismatch, n)
			}
		}
	}
	type ab struct{ a, b string }
	found := map[string]*ab{}
	for _, k := range f.Names() {
		m := keyRE.FindStringSubmatch(k)
		if m == nil {
			return nil, fmt.Errorf("%w: tensor %q is not a LoRA weight (modules_to_save, embeddings and biases are not supported)", ErrUnsupported, k)
		}
		p := found[m[1]]
		if p == nil {
			p = &ab{}
			found[m[1]] = p
		}
		if m[2] == "A" {
			p.a = k
		} else {
			p.b = k
		}
	}
	if len(found) == 0 {
		return nil, fmt.Errorf("%w: %s holds no LoRA weights", ErrMismatch, WeightsFile)
	}
	a := &Adapter{Name: name, Config: c, Layers: make([][llama.NumModules]*Pair, base.Layers)}
	paths := make([]string, 0, len(found))
	for p := range found {
		paths = append(paths, p)
	}
	sort.Strings(paths)
	for _, path := range paths {
		keys := found[path]
		m := layerRE.FindStringSubmatch(path)
		if m == nil {
			return nil, fmt.Errorf("%w: module %q is not a projection of a Llama decoder layer", ErrMismatch, path)
		}
		layer, _ := strconv.Atoi(m[1])
		mod, ok := llama.ModuleByName(m[3])
		if !ok || mod.Parent() != m[2] {
			return nil, fmt.Errorf("%w: unknown target module %q in %q (want one of q_proj k_proj v_proj o_proj gate_proj up_proj down_proj)", ErrMismatch, m[3], path)
		}
		if layer >= base.Layers {
			return nil, fmt.Errorf("%w: %q is in layer %d, the base model has %d layers", ErrMismatch, path, layer, base.Layers)
		}
		if keys.a == "" || keys.b == "" {
			return nil, fmt.Errorf("%w: %q has only one of lora_A and lora_B", ErrMismatch, path)
		}
		if !c.Targets(path, layer) {
			return nil, fmt.Errorf("%w: %s has weights for %q, which target_modules does not select", ErrMismatch, WeightsFile, path)
		}
		in, out := base.Dims(mod)
		ai, _ := f.Info(keys.a)
		bi, _ := f.Info(keys.b)
		if len(ai.Shape) != 2 || len(bi.Shape) != 2 {
			return nil, fmt.Errorf("%w: %s shape %v and %s shape %v must be 2-D", ErrMismatch, keys.a, ai.Shape, keys.b, bi.Shape)
		}
		r := ai.Shape[0]
		if ai.Shape[1] != in {
			return nil, fmt.Errorf("%w: %s has shape %v, the base model's %s needs [r, %d]", ErrMismatch, keys.a, ai.Shape, path, in)
		}
		if bi.Shape[0] != out || bi.Shape[1] != r {
			return nil, fmt.Errorf("%w: %s has shape %v, want [%d, %d] (out features of %s, rank of lora_A)", ErrMismatch, keys.b, bi.Shape, out, r, path)
		}
		wantR, alpha := c.RankAlpha(path)
		if r != wantR {
			return nil, fmt.Errorf("%w: %s has rank %d, adapter_config.json says %d", ErrMismatch, keys.a, r, wantR)
		}
		av, _, err := f.Float32(keys.a)
		if err != nil {
			return nil, err
		}
		bv, _, err := f.Float32(keys.b)
		if err != nil {
			return nil, err
		}
		for _, v := range [][]float32{av, bv} {
			for _, x := range v {
				if math.IsNaN(float64(x)) || math.IsInf(float64(x), 0) {
					return nil, fmt.Errorf("%w: %s holds NaN or Inf", ErrMismatch, path)
				}
			}
		}
		scale := alpha / float64(r)
		if c.UseRSLoRA {
			scale = alpha / math.Sqrt(float64(r))
		}
		a.Layers[layer][mod] = &Pair{Rank: r, Scale: float32(scale), A: av, B: bv}
		a.Params += int64(len(av) + len(bv))
	}
	// Every targeted projection must have weights, or PEFT would have saved them.
	for l := 0; l < base.Layers; l++ {
		for mod := llama.Module(0); mod < llama.NumModules; mod++ {
			if c.Targets(mod.Path(l), l) && a.Layers[l][mod] == nil {
				return nil, fmt.Errorf("%w: target_modules selects %s but %s has no weights for it", ErrMismatch, mod.Path(l), WeightsFile)
			}
		}
	}
	return a, nil
}
