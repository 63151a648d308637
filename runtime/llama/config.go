// Package llama describes Llama-family checkpoints: config.json,
// generation_config.json, tensor names and shapes, and the weights.
package llama

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
)

// ErrConfig marks an unusable config.json or generation_config.json.
var ErrConfig = errors.New("llama: bad config")

// RopeScaling is config.json's rope_scaling.
type RopeScaling struct {
	Type                 string  `json:"rope_type"`
	LegacyType           string  `json:"type"`
	Factor               float64 `json:"factor"`
	LowFreqFactor        float64 `json:"low_freq_factor"`
	HighFreqFactor       float64 `json:"high_freq_factor"`
	OriginalMaxPositions int     `json:"original_max_position_embeddings"`
}

// Config is the part of config.json the engine needs.
type Config struct {
	Architectures []string     `json:"architectures"`
	ModelType     string       `json:"model_type"`
	VocabSize     int          `json:"vocab_size"`
	Hidden        int          `json:"hidden_size"`
	Intermediate  int          `json:"intermediate_size"`
	Layers        int          `json:"num_hidden_layers"`
	Heads         int          `json:"num_attention_heads"`
	KVHeads       int          `json:"num_key_value_heads"`
	HeadDim       int          `json:"head_dim"`
	MaxPositions  int          `json:"max_position_embeddings"`
	RMSNormEps    float64      `json:"rms_norm_eps"`
	RopeTheta     float64      `json:"rope_theta"`
	RopeScaling   *RopeScaling `json:"rope_scaling"`
	TieEmbeddings bool         `json:"tie_word_embeddings"`
	HiddenAct     string       `json:"hidden_act"`
	AttentionBias bool         `json:"attention_bias"`
	// Sliding-window attention (Mistral, Qwen2): served only where the
	// window is inert (no window, or one at least as long as the context:
	// MaxContext caps the context at it).
	SlidingWindow    *int            `json:"sliding_window"`
	UseSlidingWindow *bool           `json:"use_sliding_window"`
	MoE              int             `json:"num_experts"` // > 0: a mixture of experts (refused)
	Quantization     *Quantization   `json:"quantization_config"`
	MLPBias          bool            `json:"mlp_bias"`
	TorchDType       string          `json:"torch_dtype"`
	BOS              *int            `json:"bos_token_id"`
	EOSRaw           json.RawMessage `json:"eos_token_id"`

	// EOS is eos_token_id as a list (config.json allows an int or a list);
	// generation_config.json's value replaces it when present.
	EOS []int `json:"-"`
	// Name is the model folder's base name.
	Name string `json:"-"`
}

// ParseEOS reads an eos_token_id that may be null, an int or a list of ints.
func ParseEOS(raw json.RawMessage) ([]int, error) {
	if len(raw) == 0 || string(raw) == "null" {
		return nil, nil
	}
	var one int
	if err := json.Unmarshal(raw, &one); err == nil {
		return []int{one}, nil
	}
	var many []int
	if err := json.Unmarshal(raw, &many); err != nil {
		return nil, fmt.Errorf("%w: eos_token_id %s is neither an int nor a list of ints", ErrConfig, raw)
	}
	return many, nil
}

// LoadConfig reads dir/config.json and, if present, dir/generation_config.json.
func LoadConfig(dir string) (*Config, error) {
	b, err := os.ReadFile(filepath.Join(dir, "config.json"))
	if err != nil {
		return nil, fmt.Errorf("llama: model folder %s: %w", dir, err)
	}
	c, err := ParseConfig(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(dir, "config.json"), err)
	}
	c.Name = filepath.Base(filepath.Clean(dir))
	if g, err := os.ReadFile(filepath.Join(dir, "generation_config.json")); err == nil {
		var gen struct {
			EOS json.RawMessage `json:"eos_token_id"`
		}
		if err := json.Unmarshal(g, &gen); err != nil {
			return nil, fmt.Errorf("%w: generation_config.json: %v", ErrConfig, err)
		}
		eos, err := ParseEOS(gen.EOS)
		if err != nil {
			return nil, fmt.Errorf("generation_config.json: %w", err)
		}
		if eos != nil {
			c.EOS = eos
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("llama: %w", err)
	}
	return c, nil
}

// ParseConfig decodes and validates config.json.
func ParseConfig(b []byte) (*Config, error) {
	var c Config
	if err := json.Unmarshal(b, &c); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrConfig, err)
	}
	eos, err := ParseEOS(c.EOSRaw)
	if err != nil {
		return nil, err
	}
	c.EOS = eos
	if c.KVHeads == 0 {
		c.KVHeads = c.Heads
	}
	if c.HeadDim == 0 && c.Heads > 0 {
		c.HeadDim = c.Hidden / c.Heads
	}
	if c.RMSNormEps == 0 {
		c.RMSNormEps = 1e-6
	}
	if c.RopeTheta == 0 {
		c.RopeTheta = 10000
	}
	if c.HiddenAct == "" {
		c.HiddenAct = "silu"
	}
	return &c, c.Validate()
}

// Families the engine runs: Llama's decoder and its close relatives.
const (
	FamilyLlama   = "llama"
	FamilyMistral = "mistral" // Llama's layout
	FamilyQwen2   = "qwen2"   // biases on q, k and v
	FamilyQwen3   = "qwen3"   // RMSNorm of each query and key head (q_norm, k_norm)
)

// Family is the model's family ("llama" when config.json names none).
func (c *Config) Family() string {
	if c.ModelType == "" {
		return FamilyLlama
	}
	return c.ModelType
}

// QKVBias reports biases on the q, k and v projections (Qwen2).
func (c *Config) QKVBias() bool { return c.Family() == FamilyQwen2 }

// QKNorm reports a per-head RMSNorm of queries and keys before RoPE (Qwen3).
func (c *Config) QKNorm() bool { return c.Family() == FamilyQwen3 }

// MaxContext is the longest context the engine may serve: the model's
// max_position_embeddings, or a sliding window in use when shorter (so
// the window never takes effect); 0 when the config gives neither.
func (c *Config) MaxContext() int {
	n := c.MaxPositions
	if w := c.SlidingWindow; w != nil && *w > 0 && (c.UseSlidingWindow == nil || *c.UseSlidingWindow) {
		if n == 0 || *w < n {
			n = *w
		}
	}
	return n
}

// Validate checks that the engine can run this configuration.
func (c *Config) Validate() error {
	switch c.Family() {
	case FamilyLlama, FamilyMistral, FamilyQwen2, FamilyQwen3:
	default:
		return fmt.Errorf("%w: model_type %q is not supported (llama, mistral, qwen2, qwen3)", ErrConfig, c.ModelType)
	}
	if c.Quantization != nil {
		if err := c.Quantization.check(); err != nil {
			return err
		}
	}
	if c.MoE > 0 {
		return fmt.Errorf("%w: num_experts %d: mixture-of-experts models are not supported", ErrConfig, c.MoE)
	}
	for _, f := range []struct {
		name string
		v    int
	}{{"vocab_size", c.VocabSize}, {"hidden_size", c.Hidden}, {"intermediate_size", c.Intermediate},
		{"num_hidden_layers", c.Layers}, {"num_attention_heads", c.Heads}, {"num_key_value_heads", c.KVHeads}, {"head_dim", c.HeadDim}} {
		if f.v <= 0 || f.v > 1<<24 {
			return fmt.Errorf("%w: %s = %d", ErrConfig, f.name, f.v)
		}
	}
	if c.Heads%c.KVHeads != 0 {
		return fmt.Errorf("%w: num_attention_heads %d is not a multiple of num_key_value_heads %d", ErrConfig, c.Heads, c.KVHeads)
	}
	if c.HeadDim%2 != 0 {
		return fmt.Errorf("%w: head_dim %d must be even for RoPE", ErrConfig, c.HeadDim)
	}
	if c.HiddenAct != "silu" {
		return fmt.Errorf("%w: hidden_act %q is not supported (want silu)", ErrConfig, c.HiddenAct)
	}
	if c.AttentionBias {
		// (Qwen2's q/k/v biases are not this flag: they are always there.)
		return fmt.Errorf("%w: attention_bias true is not supported (biases on every attention projection)", ErrConfig)
	}
	if c.MLPBias {
		return fmt.Errorf("%w: mlp_bias true is not supported", ErrConfig)
	}
	if s := c.RopeScaling; s != nil {
		t := s.Type
		if t == "" {
			t = s.LegacyType
		}
		switch t {
		case "", "default":
		case "linear":
			if s.Factor <= 0 {
				return fmt.Errorf("%w: rope_scaling linear needs factor > 0", ErrConfig)
			}
		case "llama3":
			if s.Factor <= 0 || s.LowFreqFactor <= 0 || s.HighFreqFactor <= s.LowFreqFactor || s.OriginalMaxPositions <= 0 {
				return fmt.Errorf("%w: rope_scaling llama3 needs factor, low_freq_factor < high_freq_factor and original_max_position_embeddings", ErrConfig)
			}
		default:
			return fmt.Errorf("%w: rope_scaling type %q is not supported (none, linear, llama3)", ErrConfig, t)
		}
	}
	return nil
}

// InvFreq returns RoPE inverse frequencies (head_dim/2 values) including the
// configured scaling, computed as transformers does (float64, then rounded).
func (c *Config) InvFreq() []float32 {
	half := c.HeadDim / 2
	out := make([]float32, half)
	for i := 0; i < half; i++ {
		// transformers: 1 / base^(arange(0, dim, 2)/dim), computed in float32.
		exp := float32(2*i) / float32(c.HeadDim)
		inv := 1 / float32(math.Pow(c.RopeTheta, float64(exp)))
		out[i] = inv
	}
	s := c.RopeScaling
	if s == nil {
		return out
	}
	t := s.Type
	if t == "" {
		t = s.LegacyType
	}
	switch t {
	case "linear":
		for i := range out {
			out[i] = out[i] / float32(s.Factor)
		}
	case "llama3":
		lowWavelen := float64(s.OriginalMaxPositions) / s.LowFreqFactor
		highWavelen := float64(s.OriginalMaxPositions) / s.HighFreqFactor
		for i, f := range out {
			wavelen := 2 * math.Pi / float64(f)
			switch {
			case wavelen < highWavelen:
				// unchanged
			case wavelen > lowWavelen:
				out[i] = f / float32(s.Factor)
			default:
				smooth := (float64(s.OriginalMaxPositions)/wavelen - s.LowFreqFactor) / (s.HighFreqFactor - s.LowFreqFactor)
				out[i] = float32((1-smooth)*float64(f)/s.Factor + smooth*float64(f))
			}
		}
	}
	return out
}
