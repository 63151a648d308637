// Package lora reads PEFT LoRA adapters (adapter_config.json and
// adapter_model.safetensors) and validates them against a base model.
package lora

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"regexp"
	"strings"

	"github.com/peftd/peftd/runtime/llama"
)

// Errors returned (wrapped) by this package.
var (
	ErrConfig      = errors.New("lora: bad adapter_config.json")
	ErrUnsupported = errors.New("lora: unsupported adapter feature")
	ErrMismatch    = errors.New("lora: adapter does not fit the base model")
	// ErrCorrupt: adapter_model.safetensors is truncated or malformed.
	ErrCorrupt = errors.New("lora: adapter_model.safetensors is truncated or corrupt")
	// ErrWeights: a LoRA weight is NaN or infinite.
	ErrWeights = errors.New("lora: bad adapter weights")
)

// MaxConfigSize bounds adapter_config.json.
const MaxConfigSize = 1 << 20

// Pattern is an ordered string->int map (rank_pattern, alpha_pattern):
// PEFT uses the first key that matches, in file order.
type Pattern struct {
	Keys   []string
	Values []float64
	res    []*regexp.Regexp
}

// UnmarshalJSON keeps the keys in file order.
func (p *Pattern) UnmarshalJSON(b []byte) error {
	*p = Pattern{}
	if string(bytes.TrimSpace(b)) == "null" {
		return nil
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	tok, err := dec.Token()
	if err != nil {
		return err
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return fmt.Errorf("want an object")
	}
	for dec.More() {
		kt, err := dec.Token()
		if err != nil {
			return err
		}
		var v float64
		if err := dec.Decode(&v); err != nil {
			return fmt.Errorf("value of %q: %w", kt, err)
		}
		p.Keys = append(p.Keys, kt.(string))
		p.Values = append(p.Values, v)
	}
	return nil
}

func (p *Pattern) compile(field string) error {
	p.res = make([]*regexp.Regexp, len(p.Keys))
	for i, k := range p.Keys {
		// PEFT: re.match(rf"(.*\.)?({key})$", module_name)
		re, err := regexp.Compile(`^(.*\.)?(` + k + `)$`)
		if err != nil {
			return fail(ErrConfig, "%s key %q is not a regular expression Go supports: %v", field, k, err)
		}
		p.res[i] = re
	}
	return nil
}

// Lookup returns the value for module path, if a key matches.
func (p *Pattern) Lookup(path string) (float64, bool) {
	_, v, ok := p.lookup(path)
	return v, ok
}

// lookup also returns the key that matched.
func (p *Pattern) lookup(path string) (string, float64, bool) {
	for i, re := range p.res {
		if re.MatchString(path) {
			return p.Keys[i], p.Values[i], true
		}
	}
	return "", 0, false
}

// Targets is target_modules: a list of names (suffix match) or one regex.
type Targets struct {
	Names []string
	Regex string
	re    *regexp.Regexp
}

// UnmarshalJSON accepts a list of names or one string (a regex, or "all-linear").
func (t *Targets) UnmarshalJSON(b []byte) error {
	*t = Targets{}
	var s string
	if err := json.Unmarshal(b, &s); err == nil {
		t.Regex = s
		return nil
	}
	var l []string
	if err := json.Unmarshal(b, &l); err != nil {
		return fmt.Errorf("target_modules must be a list of names or a regex string")
	}
	t.Names = l
	return nil
}

// Config is adapter_config.json.
type Config struct {
	PeftType          *string         `json:"peft_type"` // nil: absent (taken as LORA)
	TaskType          string          `json:"task_type"`
	BaseModel         string          `json:"base_model_name_or_path"`
	R                 int             `json:"r"`
	Alpha             float64         `json:"lora_alpha"`
	TargetModules     *Targets        `json:"target_modules"`
	ExcludeModules    *Targets        `json:"exclude_modules"`
	UseRSLoRA         bool            `json:"use_rslora"`
	RankPattern       Pattern         `json:"rank_pattern"`
	AlphaPattern      Pattern         `json:"alpha_pattern"`
	LayersToTransform json.RawMessage `json:"layers_to_transform"`
	LayersPattern     json.RawMessage `json:"layers_pattern"`
	Bias              string          `json:"bias"`
	FanInFanOut       bool            `json:"fan_in_fan_out"`

	layers        map[int]bool // nil: every layer
	layerPatterns []string
}

// unsupported lists fields that change the math; each must be absent, null,
// false, empty or its neutral value, or the adapter is refused.
var unsupported = []struct {
	field   string
	neutral func(json.RawMessage) bool
}{
	{"use_dora", isFalsy},
	{"modules_to_save", isFalsy},
	{"layer_replication", isFalsy},
	{"use_qalora", isFalsy},
	{"lora_bias", isFalsy},
	{"alora_invocation_tokens", isFalsy},
	{"target_parameters", isFalsy},
	{"trainable_token_indices", isFalsy},
	{"use_bdlora", isFalsy},
	{"megatron_config", isFalsy},
	{"arrow_config", isFalsy},
	{"fan_in_fan_out", isFalsy},
}

func isFalsy(v json.RawMessage) bool {
	switch strings.TrimSpace(string(v)) {
	case "", "null", "false", "[]", "{}", `""`, "0":
		return true
	}
	return false
}

// ParseConfig decodes and checks adapter_config.json.
func ParseConfig(b []byte) (*Config, error) {
	if len(b) > MaxConfigSize {
		return nil, fail(ErrConfig, "%d bytes exceeds the %d-byte limit", len(b), MaxConfigSize)
	}
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(b, &raw); err != nil {
		return nil, fail(ErrConfig, "%v", err)
	}
	var c Config
	if err := json.Unmarshal(b, &c); err != nil {
		return nil, fail(ErrConfig, "%v", err)
	}
	if c.PeftType != nil && *c.PeftType != "LORA" {
		return nil, fail(ErrUnsupported, "peft_type %q (only LORA is served)", *c.PeftType)
	}
	if c.TaskType != "" && c.TaskType != "CAUSAL_LM" {
		return nil, fail(ErrUnsupported, "task_type %q (only CAUSAL_LM is served)", c.TaskType)
	}
	for _, u := range unsupported {
		if v, ok := raw[u.field]; ok && !u.neutral(v) {
			return nil, fail(ErrUnsupported, "%s = %s is not supported", u.field, strings.TrimSpace(string(v)))
		}
	}
	if c.Bias != "" && c.Bias != "none" {
		return nil, fail(ErrUnsupported, "bias = %q is not supported (want \"none\")", c.Bias)
	}
	if c.R <= 0 || c.R > 4096 {
		return nil, fail(ErrConfig, "r = %d (want 1..4096)", c.R)
	}
	if c.Alpha == 0 {
		c.Alpha = 8 // PEFT's default lora_alpha
	}
	if c.TargetModules == nil || (c.TargetModules.Regex == "" && len(c.TargetModules.Names) == 0) {
		return nil, fail(ErrConfig, "target_modules is missing or empty")
	}
	for _, t := range []*Targets{c.TargetModules, c.ExcludeModules} {
		if t == nil || t.Regex == "" || t.Regex == "all-linear" {
			continue
		}
		re, err := regexp.Compile(`^(?:` + t.Regex + `)$`)
		if err != nil {
			return nil, fail(ErrConfig, "module regex %q is not a regular expression Go supports: %v", t.Regex, err)
		}
		t.re = re
	}
	if err := c.RankPattern.compile("rank_pattern"); err != nil {
		return nil, err
	}
	for i, v := range c.RankPattern.Values {
		if v != math.Trunc(v) || v < 1 || v > 4096 {
			return nil, fail(ErrConfig, "rank_pattern[%q] = %g (want an integer 1..4096)", c.RankPattern.Keys[i], v)
		}
	}
	if err := c.AlphaPattern.compile("alpha_pattern"); err != nil {
		return nil, err
	}
	if !isFalsy(c.LayersToTransform) {
		var one int
		var many []int
		if err := json.Unmarshal(c.LayersToTransform, &one); err == nil {
			many = []int{one}
		} else if err := json.Unmarshal(c.LayersToTransform, &many); err != nil {
			return nil, fail(ErrConfig, "layers_to_transform must be an int or a list of ints")
		}
		c.layers = map[int]bool{}
		for _, l := range many {
			c.layers[l] = true
		}
	}
	if !isFalsy(c.LayersPattern) {
		var one string
		var many []string
		if err := json.Unmarshal(c.LayersPattern, &one); err == nil {
			many = []string{one}
		} else if err := json.Unmarshal(c.LayersPattern, &many); err != nil {
			return nil, fail(ErrConfig, "layers_pattern must be a string or a list of strings")
		}
		c.layerPatterns = many
	}
	return &c, nil
}

var defaultLayerPatterns = []string{"layers", "h", "blocks", "layer"}

// Targets reports whether PEFT would wrap the module at path (e.g.
// model.layers.3.self_attn.q_proj) with a LoRA layer.
func (c *Config) Targets(path string, layer int) bool {
	if ex := c.ExcludeModules; ex != nil {
		if ex.re != nil && ex.re.MatchString(path) {
			return false
		}
		for _, n := range ex.Names {
			if path == n || strings.HasSuffix(path, "."+n) {
				return false
			}
		}
	}
	t := c.TargetModules
	switch {
	case t.Regex == "all-linear":
		return true // every projection of a decoder layer (never lm_head)
	case t.re != nil:
		return t.re.MatchString(path)
	}
	found := false
	for _, n := range t.Names {
		if path == n || strings.HasSuffix(path, "."+n) {
			found = true
			break
		}
	}
	if !found || c.layers == nil {
		return found
	}
	// layers_to_transform: the index after a layers_pattern component.
	pats := c.layerPatterns
	if pats == nil {
		pats = defaultLayerPatterns
	}
	parts := strings.Split(path, ".")
	for i := 0; i+1 < len(parts); i++ {
		for _, p := range pats {
			if parts[i] == p {
				return c.layers[layer]
			}
		}
	}
	return false
}

// RankAlpha gives the rank and alpha PEFT uses for the module at path.
func (c *Config) RankAlpha(path string) (int, float64) {
	r, _, alpha, _ := c.rankAlpha(path)
	return r, alpha
}

// rankAlpha also names the fields the rank and alpha come from.
func (c *Config) rankAlpha(path string) (r int, rField string, alpha float64, aField string) {
	r, rField, alpha, aField = c.R, "r", c.Alpha, "lora_alpha"
	if k, v, ok := c.RankPattern.lookup(path); ok {
		r, rField = int(v), fmt.Sprintf("rank_pattern[%q]", k)
	}
	if k, v, ok := c.AlphaPattern.lookup(path); ok {
		alpha, aField = v, fmt.Sprintf("alpha_pattern[%q]", k)
	}
	return r, rField, alpha, aField
}

// Scale is the factor PEFT applies to B @ A: alpha/r, or alpha/sqrt(r)
// with use_rslora.
func (c *Config) Scale(alpha float64, r int) float64 {
	if c.UseRSLoRA {
		return alpha / math.Sqrt(float64(r))
	}
	return alpha / float64(r)
}

// Check validates the config against base before any weight is read: the
// target module names, and the rank (1..MaxRank(base)) and scale (finite
// in float32, |scale| <= MaxScale) of every projection it selects.
func (c *Config) Check(base *llama.Config) error {
	if t := c.TargetModules; t.Regex == "" {
		for _, n := range t.Names {
			last := n
			if i := strings.LastIndexByte(n, '.'); i >= 0 {
				last = n[i+1:]
			}
			if _, ok := llama.ModuleByName(last); !ok {
				return fail(ErrMismatch, "unknown target module %q (the base model's linear layers are q_proj k_proj v_proj o_proj gate_proj up_proj down_proj)", n)
			}
		}
	}
	maxR := MaxRank(base)
	formula := "alpha/r"
	if c.UseRSLoRA {
		formula = "alpha/sqrt(r)"
	}
	for l := 0; l < base.Layers; l++ {
		for mod := llama.Module(0); mod < llama.NumModules; mod++ {
			path := mod.Path(l)
			if !c.Targets(path, l) {
				continue
			}
			r, rField, alpha, aField := c.rankAlpha(path)
			if r > maxR {
				return fail(ErrMismatch, "%s = %d for %s is above %d, the largest rank served for this base model (%s)", rField, r, path, maxR, maxRankWhy(base))
			}
			s := float32(c.Scale(alpha, r))
			if math.IsNaN(float64(s)) || math.IsInf(float64(s), 0) || math.Abs(float64(s)) > MaxScale {
				return fail(ErrConfig, "%s %g gives scale %s = %g/%s = %v in float32 for %s (want a finite scale, |scale| <= %g)",
					aField, alpha, formula, alpha, rankTerm(c.UseRSLoRA, r), s, path, float64(MaxScale))
			}
		}
	}
	return nil
}

func rankTerm(rs bool, r int) string {
	if rs {
		return fmt.Sprintf("sqrt(%d)", r)
	}
	return fmt.Sprint(r)
}
