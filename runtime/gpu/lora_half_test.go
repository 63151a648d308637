package gpu

import (
	"testing"

	"github.com/peftd/peftd/runtime/llama"
)

// TestOutHalf: the o and down groups' updates are bf16 (outHalf) with the
// tensor-core expand only, at every row count where outHalfOn
// (outHalfAuto, PEFTD_LORA_OUT_HALF) says so with FP8 weights or
// kernelForce.outHalf 1 with either, -1 never; never for other groups or
// with the v2 kernels forced.
func TestOutHalf(t *testing.T) {
	o, down := []llama.Module{llama.O}, []llama.Module{llama.Down}
	gu := []llama.Module{llama.Gate, llama.Up}
	qkv := []llama.Module{llama.Q, llama.K, llama.V}
	for _, c := range []struct {
		name      string
		mods      []llama.Module
		tc, rows  int
		on        bool // outHalfOn (PEFTD_LORA_OUT_HALF)
		force     int
		v2, wants bool
		bf16      bool // bf16 weights (no fp8State)
	}{
		{"o, 240 rows", o, 1, 240, true, 0, false, true, false},
		{"down, 17 rows", down, 2, 17, true, 0, false, true, false},
		{"down, 16 rows (add_rmsnorm_h for add_rmsnorm_cl)", down, 1, 16, true, 0, false, true, false},
		{"o, 1 row", o, 1, 1, true, 0, false, true, false},
		{"turned off", o, 1, 240, false, 0, false, false, false},
		{"forced on, 8 rows", down, 1, 8, false, 1, false, true, false},
		{"forced off", down, 1, 240, true, -1, false, false, false},
		{"CUDA-core expand", o, 0, 240, true, 1, false, false, false},
		{"v2 kernels", o, 1, 240, true, 1, true, false, false},
		{"gate/up (guHalf's)", gu, 1, 240, true, 1, false, false, false},
		{"q/k/v", qkv, 1, 240, true, 1, false, false, false},
		{"bf16 weights: off by default", o, 1, 240, true, 0, false, false, true},
		{"bf16 weights, forced on", down, 1, 16, false, 1, false, true, true},
	} {
		b := &Backend{nRows: c.rows, outHalfOn: c.on}
		if !c.bf16 {
			b.f8 = &fp8State{}
		}
		b.force.outHalf, b.force.loraV2 = c.force, c.v2
		if got := b.halfUpdate(c.mods, c.tc); got != c.wants {
			t.Errorf("%s: outHalf = %v, want %v", c.name, got, c.wants)
		}
	}
}

// TestQKVHalf: the q/k/v group's update is bf16 (qkvHalf) with the
// tensor-core expand only, where PEFTD_LORA_QKV_HALF turned it on or
// kernelForce.qkvHalf is 1; never for other groups or with the v2 kernels
// forced.
func TestQKVHalf(t *testing.T) {
	qkv := []llama.Module{llama.Q, llama.K, llama.V}
	for _, c := range []struct {
		name      string
		mods      []llama.Module
		tc        int
		on        bool // qkvHalfOn (PEFTD_LORA_QKV_HALF)
		force     int
		v2, wants bool
	}{
		{"on", qkv, 1, true, 0, false, true},
		{"rank-64 class", qkv, 2, true, 0, false, true},
		{"off by default", qkv, 1, false, 0, false, false},
		{"forced on", qkv, 1, false, 1, false, true},
		{"forced off", qkv, 1, true, -1, false, false},
		{"CUDA-core expand", qkv, 0, true, 1, false, false},
		{"v2 kernels", qkv, 1, true, 1, true, false},
		{"o (outHalf's)", []llama.Module{llama.O}, 1, true, 1, false, false},
		{"q and k alone", []llama.Module{llama.Q, llama.K}, 1, true, 1, false, false},
	} {
		b := &Backend{nRows: 240, qkvHalfOn: c.on}
		b.force.qkvHalf, b.force.loraV2 = c.force, c.v2
		if got := b.halfUpdate(c.mods, c.tc); got != c.wants {
			t.Errorf("%s: qkvHalf = %v, want %v", c.name, got, c.wants)
		}
	}
}

// TestKnobDefaults: the engine-wide on/off switches (envOnOff)
// PEFTD_LORA_OUT_HALF, PEFTD_LORA_QKV_HALF, PEFTD_LORA_GU_HALF and
// PEFTD_FP8_WS16 turn outHalf's, qkvHalf's, guHalf's and the 16-row ws
// kernels' defaults on or off; unset or anything else keeps the Auto
// constants.
func TestKnobDefaults(t *testing.T) {
	for _, knob := range []struct {
		env  string
		auto bool
		get  func() bool
	}{{"PEFTD_LORA_OUT_HALF", outHalfAuto, outHalfDefault}, {"PEFTD_LORA_QKV_HALF", qkvHalfAuto, qkvHalfDefault},
		{"PEFTD_LORA_GU_HALF", guHalfAuto, guHalfDefault}, {"PEFTD_FP8_WS16", ws16Auto, ws16Default}} {
		for _, tc := range []struct {
			env  string
			want bool
		}{{"", knob.auto}, {"on", true}, {"1", true}, {"off", false}, {"0", false}, {"bogus", knob.auto}} {
			t.Setenv(knob.env, tc.env)
			if got := knob.get(); got != tc.want {
				t.Errorf("%s=%q: %v, want %v", knob.env, tc.env, got, tc.want)
			}
		}
	}
}
