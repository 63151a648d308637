package llama

import (
	"errors"
	"fmt"
	"slices"

	"github.com/peftd/peftd/runtime/safetensors"
)

// ErrShape marks a tensor whose name or shape does not fit the config.
var ErrShape = errors.New("llama: tensor shape mismatch")

// Module is one of the seven linear projections of a decoder layer.
type Module int

// The projections, in a fixed order used for arrays indexed by Module.
const (
	Q Module = iota
	K
	V
	O
	Gate
	Up
	Down
	NumModules
)

// FusedGroups are the projections that read the same input, each group in
// the order its outputs sit side by side in the fused projection (q|k|v,
// gate|up): the model's LoRA ops (one per group) and the buffers sized for
// a group's output follow it.
var FusedGroups = [...][]Module{{Q, K, V}, {O}, {Gate, Up}, {Down}}

var moduleNames = [NumModules]string{"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

func (m Module) String() string {
	if m < 0 || m >= NumModules {
		return fmt.Sprintf("Module(%d)", int(m))
	}
	return moduleNames[m]
}

// Parent is the submodule holding m: self_attn or mlp.
func (m Module) Parent() string {
	if m <= O {
		return "self_attn"
	}
	return "mlp"
}

// ModuleByName maps "q_proj" ... "down_proj" to a Module.
func ModuleByName(s string) (Module, bool) {
	for i, n := range moduleNames {
		if n == s {
			return Module(i), true
		}
	}
	return 0, false
}

// Path is the module's path in the Hugging Face model, e.g. model.layers.3.self_attn.q_proj.
func (m Module) Path(layer int) string {
	return fmt.Sprintf("model.layers.%d.%s.%s", layer, m.Parent(), m)
}

// Dims gives (in, out) features of a projection.
func (c *Config) Dims(m Module) (in, out int) {
	q, kv := c.Heads*c.HeadDim, c.KVHeads*c.HeadDim
	switch m {
	case Q:
		return c.Hidden, q
	case K, V:
		return c.Hidden, kv
	case O:
		return q, c.Hidden
	case Gate, Up:
		return c.Hidden, c.Intermediate
	case Down:
		return c.Intermediate, c.Hidden
	}
	panic("llama: bad module")
}

// TensorSpec is one expected checkpoint tensor.
type TensorSpec struct {
	Name  string
	Shape []int
}

// Names of the non-layer tensors.
const (
	EmbedName = "model.embed_tokens.weight"
	NormName  = "model.norm.weight"
	HeadName  = "lm_head.weight"
)

// LayerNormNames returns the input and post-attention RMSNorm weight names.
func LayerNormNames(layer int) (input, post string) {
	p := fmt.Sprintf("model.layers.%d.", layer)
	return p + "input_layernorm.weight", p + "post_attention_layernorm.weight"
}

// Expected lists every tensor the checkpoint must hold, with its shape.
func (c *Config) Expected() []TensorSpec {
	specs := []TensorSpec{{EmbedName, []int{c.VocabSize, c.Hidden}}, {NormName, []int{c.Hidden}}}
	if !c.TieEmbeddings {
		specs = append(specs, TensorSpec{HeadName, []int{c.VocabSize, c.Hidden}})
	}
	for l := 0; l < c.Layers; l++ {
		in, post := LayerNormNames(l)
		specs = append(specs, TensorSpec{in, []int{c.Hidden}}, TensorSpec{post, []int{c.Hidden}})
		for m := Module(0); m < NumModules; m++ {
			i, o := c.Dims(m)
			specs = append(specs, TensorSpec{m.Path(l) + ".weight", []int{o, i}})
			if c.QKVBias() && (m == Q || m == K || m == V) {
				specs = append(specs, TensorSpec{m.Path(l) + ".bias", []int{o}})
			}
		}
		if c.QKNorm() {
			q, k := QKNormNames(l)
			specs = append(specs, TensorSpec{q, []int{c.HeadDim}}, TensorSpec{k, []int{c.HeadDim}})
		}
	}
	return specs
}

// QKNormNames returns the per-head query and key RMSNorm weight names (Qwen3).
func QKNormNames(layer int) (q, k string) {
	p := fmt.Sprintf("model.layers.%d.self_attn.", layer)
	return p + "q_norm.weight", p + "k_norm.weight"
}

// Tensors is where weights come from (a safetensors.Set).
type Tensors interface {
	Info(name string) (safetensors.Info, bool)
	Bytes(name string) ([]byte, safetensors.Info, error)
	Float32(name string) ([]float32, safetensors.Info, error)
}

// CheckTensors verifies every expected tensor is present with the right shape
// and a floating-point dtype.
func (c *Config) CheckTensors(ts Tensors) error {
	for _, s := range c.Expected() {
		info, ok := ts.Info(s.Name)
		if !ok {
			return fmt.Errorf("%w: checkpoint lacks %s (shape %v)", ErrShape, s.Name, s.Shape)
		}
		if !slices.Equal(info.Shape, s.Shape) {
			return fmt.Errorf("%w: %s has shape %v, config.json implies %v", ErrShape, s.Name, info.Shape, s.Shape)
		}
		switch info.DType {
		case safetensors.F32, safetensors.BF16, safetensors.F16:
		case safetensors.F8E4:
			if !isProjection(s.Name) {
				return fmt.Errorf("%w: %s has dtype F8_E4M3 (FP8 is read for the projection weights only)", safetensors.ErrDType, s.Name)
			}
			if err := c.checkFP8(ts, s.Name, info.Shape); err != nil {
				return err
			}
		default:
			return fmt.Errorf("%w: %s has dtype %s (want F32, BF16 or F16; F8_E4M3 for projections)", safetensors.ErrDType, s.Name, info.DType)
		}
	}
	return nil
}

// Model is an opened checkpoint: its config and its tensors.
type Model struct {
	Dir     string
	Config  *Config
	Tensors *safetensors.Set
}

// Open reads the config and maps the weights of the model in dir, checking
// every tensor's name and shape.
func Open(dir string) (*Model, error) {
	c, err := LoadConfig(dir)
	if err != nil {
		return nil, err
	}
	set, err := safetensors.OpenDir(dir)
	if err != nil {
		return nil, err
	}
	if err := c.CheckTensors(set); err != nil {
		set.Close()
		return nil, fmt.Errorf("model %s: %w", dir, err)
	}
	return &Model{Dir: dir, Config: c, Tensors: set}, nil
}

// HeadName is the name of the output projection (the embedding when tied).
func (c *Config) HeadTensor() string {
	if c.TieEmbeddings {
		return EmbedName
	}
	return HeadName
}

// Close unmaps the weights.
func (m *Model) Close() error { return m.Tensors.Close() }
