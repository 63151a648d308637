package lora

import (
	"errors"
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"

	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/safetensors"
)

// Error is a validation failure that says what is wrong once. errors.Is
// matches its Kind (ErrConfig, ErrUnsupported, ErrMismatch, ErrCorrupt or
// ErrWeights) and its cause, if any.
type Error struct {
	Kind error
	// Detail is what is wrong, without the kind's lead ("r = 0 (want
	// 1..4096)" for "bad adapter_config.json: r = 0 (want 1..4096)").
	Detail string
	// Err is the cause another package reported (a safetensors error), or nil.
	Err  error
	lead string
}

func (e *Error) Error() string { return e.lead + ": " + e.Detail }

// Unwrap gives the kind and the cause.
func (e *Error) Unwrap() []error {
	if e.Err != nil {
		return []error{e.Kind, e.Err}
	}
	return []error{e.Kind}
}

// fail makes an *Error of kind; its message starts with the kind's lead
// (the sentinel's text without "lora: ").
func fail(kind error, format string, args ...any) *Error {
	return &Error{Kind: kind, Detail: fmt.Sprintf(format, args...), lead: strings.TrimPrefix(kind.Error(), "lora: ")}
}

// weightsErr reports an error of the safetensors package about the weights
// file as an *Error saying what is wrong with adapter_model.safetensors;
// other errors (I/O) are returned as they are.
func weightsErr(err error) error {
	var fe *safetensors.FormatError
	switch {
	case errors.As(err, &fe):
		lead := WeightsFile + " is corrupt"
		if fe.Truncated {
			lead = WeightsFile + " is truncated"
		}
		return &Error{Kind: ErrCorrupt, Detail: fe.Detail, Err: err, lead: lead}
	case errors.Is(err, safetensors.ErrDType):
		e := fail(ErrUnsupported, "%s (want F32, F16 or BF16)", strings.TrimPrefix(err.Error(), safetensors.ErrDType.Error()+": "))
		e.Err = err
		return e
	}
	return err
}

// Limits of what is served.
const (
	// MaxRankCap is the largest LoRA rank served on any base model (vLLM's
	// largest --max-lora-rank is 512 as well).
	MaxRankCap = 512
	// MaxScale bounds |scale| (alpha/r, or alpha/sqrt(r) with use_rslora).
	// PEFT's usual scales are 0.5 to 64; past 1e4 the update swamps the
	// base weights and float32 activations overflow.
	MaxScale = 1e4
)

// MaxRank is the largest rank accepted for adapters of base: MaxRankCap, or
// hidden_size when smaller (every projection reads or writes the hidden
// state, so a larger rank adds nothing).
func MaxRank(base *llama.Config) int {
	if base.Hidden > 0 && base.Hidden < MaxRankCap {
		return base.Hidden
	}
	return MaxRankCap
}

func maxRankWhy(base *llama.Config) string {
	return fmt.Sprintf("the smaller of %d and hidden_size %d", MaxRankCap, base.Hidden)
}

// MaxHeaderBytes bounds the JSON header of an adapter_model.safetensors for
// base: 512 bytes for each of its possible tensors (lora_A and lora_B of
// every projection of every layer) plus 64 KiB for __metadata__.
func MaxHeaderBytes(base *llama.Config) int64 {
	return 64<<10 + 512*2*int64(llama.NumModules)*int64(max(base.Layers, 0))
}

// MaxWeightsBytes is the largest adapter_model.safetensors an adapter for
// base can be: lora_A and lora_B of every projection of every layer at
// MaxRank(base) in F32 (the widest dtype served), plus the header length
// and MaxHeaderBytes.
func MaxWeightsBytes(base *llama.Config) int64 {
	r := int64(MaxRank(base))
	var perLayer int64
	for m := llama.Module(0); m < llama.NumModules; m++ {
		in, out := base.Dims(m)
		perLayer += r * int64(in+out) * 4
	}
	return int64(max(base.Layers, 0))*perLayer + 8 + MaxHeaderBytes(base)
}

// ReadWeightsHeader reads the header of an adapter_model.safetensors from r
// and checks it against base (CheckHeader) before any tensor data is read:
// a file that cannot be an adapter for base is refused after at most
// 8+MaxHeaderBytes(base) bytes. prefix is what was read; f.DataSize() bytes
// of tensor data follow.
func ReadWeightsHeader(r io.Reader, base *llama.Config) (f *safetensors.File, prefix []byte, err error) {
	f, prefix, err = safetensors.ReadHeader(r, MaxHeaderBytes(base))
	if err != nil {
		return nil, nil, weightsErr(err)
	}
	if err := CheckHeader(f, base); err != nil {
		return nil, nil, err
	}
	return f, prefix, nil
}

// CheckHeader checks the tensors a safetensors header describes against
// base, without the config: LoRA weight names of decoder-layer projections,
// one lora_A and one lora_B each, F32, F16 or BF16, shapes [r, in] and
// [out, r] with r in 1..MaxRank(base), and a data section holding nothing
// else.
func CheckHeader(f *safetensors.File, base *llama.Config) error {
	_, err := checkTensors(f, base)
	return err
}

// tensorPair is the lora_A and lora_B of one projection.
type tensorPair struct {
	path  string // model.layers.3.self_attn.q_proj
	layer int
	mod   llama.Module
	a, b  string
	rank  int
}

var floatDTypes = map[safetensors.DType]bool{safetensors.F32: true, safetensors.F16: true, safetensors.BF16: true}

func checkTensors(f *safetensors.File, base *llama.Config) ([]tensorPair, error) {
	type ab struct{ a, b string }
	found := map[string]*ab{}
	var bytes int64
	for _, k := range f.Names() {
		m := keyRE.FindStringSubmatch(k)
		if m == nil {
			return nil, fail(ErrUnsupported, "tensor %q is not a LoRA weight (modules_to_save, embeddings and biases are not supported)", k)
		}
		p := found[m[1]]
		if p == nil {
			p = &ab{}
			found[m[1]] = p
		}
		slot := &p.a
		if m[2] == "B" {
			slot = &p.b
		}
		if *slot != "" {
			return nil, fail(ErrUnsupported, "%s holds two lora_%s tensors for %s (%q and %q): save one adapter per folder", WeightsFile, m[2], m[1], *slot, k)
		}
		*slot = k
		info, _ := f.Info(k)
		bytes += info.End - info.Begin
	}
	if len(found) == 0 {
		return nil, fail(ErrMismatch, "%s holds no LoRA weights", WeightsFile)
	}
	if gap := f.DataSize() - bytes; gap != 0 {
		return nil, &Error{Kind: ErrCorrupt, lead: WeightsFile + " is corrupt",
			Detail: fmt.Sprintf("its data section has %d bytes that belong to no tensor", gap)}
	}
	paths := make([]string, 0, len(found))
	for p := range found {
		paths = append(paths, p)
	}
	sort.Strings(paths)
	maxR := MaxRank(base)
	out := make([]tensorPair, 0, len(paths))
	for _, path := range paths {
		keys := found[path]
		m := layerRE.FindStringSubmatch(path)
		if m == nil {
			return nil, fail(ErrMismatch, "module %q is not a projection of a Llama decoder layer", path)
		}
		layer, err := strconv.Atoi(m[1])
		if err != nil {
			return nil, fail(ErrMismatch, "module %q: layer %s", path, m[1])
		}
		mod, ok := llama.ModuleByName(m[3])
		if !ok || mod.Parent() != m[2] {
			return nil, fail(ErrMismatch, "unknown target module %q in %q (want one of q_proj k_proj v_proj o_proj gate_proj up_proj down_proj)", m[3], path)
		}
		if layer >= base.Layers {
			return nil, fail(ErrMismatch, "%q is in layer %d, the base model has %d layers", path, layer, base.Layers)
		}
		if keys.a == "" || keys.b == "" {
			return nil, fail(ErrMismatch, "%q has only one of lora_A and lora_B", path)
		}
		ai, _ := f.Info(keys.a)
		bi, _ := f.Info(keys.b)
		for _, t := range []safetensors.Info{ai, bi} {
			if !floatDTypes[t.DType] {
				e := fail(ErrUnsupported, "%s has dtype %s (want F32, F16 or BF16)", t.Name, t.DType)
				e.Err = safetensors.ErrDType
				return nil, e
			}
		}
		if len(ai.Shape) != 2 || len(bi.Shape) != 2 {
			return nil, fail(ErrMismatch, "%s shape %v and %s shape %v must be 2-D", keys.a, ai.Shape, keys.b, bi.Shape)
		}
		in, outF := base.Dims(mod)
		r := ai.Shape[0]
		if ai.Shape[1] != in {
			return nil, fail(ErrMismatch, "%s has shape %v, the base model's %s needs [r, %d]", keys.a, ai.Shape, path, in)
		}
		if r < 1 || r > maxR {
			return nil, fail(ErrMismatch, "%s has rank %d (want 1..%d, the largest rank served for this base model: %s)", keys.a, r, maxR, maxRankWhy(base))
		}
		if bi.Shape[0] != outF || bi.Shape[1] != r {
			return nil, fail(ErrMismatch, "%s has shape %v, want [%d, %d] (out features of %s, rank of lora_A)", keys.b, bi.Shape, outF, r, path)
		}
		out = append(out, tensorPair{path: path, layer: layer, mod: mod, a: keys.a, b: keys.b, rank: r})
	}
	return out, nil
}
