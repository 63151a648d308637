package kernels

import (
	"strings"
	"testing"
)

func TestSourceAndKey(t *testing.T) {
	src, err := Source(Llama)
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"embed", "add_rmsnorm", "rmsnorm_rows", "rope_store", "attention", "attn_decode_d32", "attn_decode_d64", "attn_decode_d128", "attn_decode_d256", "silu_mul", "lora_shrink", "lora_expand"} {
		if !strings.Contains(src, "extern \"C\" __global__ void "+k+"(") && !strings.Contains(src, ") "+k+"(") {
			t.Errorf("kernel %s missing from %s", k, Llama)
		}
	}
	a := Key(Llama, src, []string{"-arch=sm_90a"}, "sm_90a", 13, 0)
	if a != Key(Llama, src, []string{"-arch=sm_90a"}, "sm_90a", 13, 0) {
		t.Error("key not stable")
	}
	for _, b := range []string{Key(Llama, src+" ", []string{"-arch=sm_90a"}, "sm_90a", 13, 0),
		Key(Llama, src, []string{"-arch=sm_90a", "-G"}, "sm_90a", 13, 0),
		Key(Llama, src, []string{"-arch=sm_90a"}, "sm_90a", 13, 1)} {
		if a == b {
			t.Error("key ignores a change")
		}
	}
	if !strings.HasPrefix(a, "llama-") || !strings.HasSuffix(a, "-sm_90a-nvrtc13.0.cubin") {
		t.Errorf("key %s", a)
	}
}

// TestSourceIncludes: the local header is in place of its #include line,
// once, without its #pragma once; CUDA's own includes stay for NVRTC.
func TestSourceIncludes(t *testing.T) {
	raw, err := sources.ReadFile("common.cuh")
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{Llama, Sgmv, FP8} {
		src, err := Source(name)
		if err != nil {
			t.Fatal(err)
		}
		for line := range strings.Lines(src) {
			if _, ok := localInclude(line); ok || strings.TrimSpace(line) == "#pragma once" {
				t.Errorf("%s: %q is left", name, line)
			}
		}
		if n := strings.Count(src, "__device__ __forceinline__ void pdl_entry()"); n != 1 {
			t.Errorf("%s: pdl_entry defined %d times, want 1", name, n)
		}
		if !strings.Contains(src, "#include <cuda_bf16.h>") {
			t.Errorf("%s: CUDA's include is gone", name)
		}
		body := strings.Replace(string(raw), "#pragma once\n", "", 1)
		if !strings.Contains(src, body) {
			t.Errorf("%s: common.cuh is not in place", name)
		}
	}
	for _, c := range []struct {
		line, want string
		ok         bool
	}{{`#include "common.cuh"`, "common.cuh", true}, {`  #include  "a.h" // x`, "a.h", true}, {"#include <cuda_bf16.h>", "", false},
		{`#include "broken`, "", false}, {"// #include \"x\"", "", false}} {
		got, ok := localInclude(c.line)
		if got != c.want || ok != c.ok {
			t.Errorf("localInclude(%q) = %q, %v; want %q, %v", c.line, got, ok, c.want, c.ok)
		}
	}
}

// TestDefined: DefinesEnv's -D options name macros, with or without a
// value; anything else, or a longer name, does not.
func TestDefined(t *testing.T) {
	t.Setenv(DefinesEnv, "-DPEFTD_A -DPEFTD_B=2 -I/x PEFTD_C -DPEFTD_DD")
	for _, c := range []struct {
		name string
		want bool
	}{{"PEFTD_A", true}, {"PEFTD_B", true}, {"PEFTD_C", false}, {"PEFTD_D", false}, {"PEFTD_DD", true}, {"PEFTD", false}} {
		if got := Defined(c.name); got != c.want {
			t.Errorf("Defined(%q) = %v, want %v", c.name, got, c.want)
		}
	}
	t.Setenv(DefinesEnv, "")
	if Defined("PEFTD_A") {
		t.Error("defined with the variable empty")
	}
}

// TestDefinedInt: DefinesEnv's -Dname=value gives value where it is an
// integer; no value, another or a longer name, or text gives the default.
func TestDefinedInt(t *testing.T) {
	t.Setenv(DefinesEnv, "-DWG_KA=2 -DWG_PER_SM -DWG_X=abc -DWG_YY=5 -I/x -DWG_NEG=-3")
	for _, c := range []struct {
		name      string
		def, want int
	}{{"WG_KA", 1, 2}, {"WG_PER_SM", 2, 2}, {"WG_X", 7, 7}, {"WG_Y", 4, 4}, {"WG_YY", 4, 5}, {"WG_NEG", 1, -3}, {"WG", 9, 9}} {
		if got := DefinedInt(c.name, c.def); got != c.want {
			t.Errorf("DefinedInt(%q, %d) = %d, want %d", c.name, c.def, got, c.want)
		}
	}
}

// TestModulesFor: what `peftd kernels` builds for each target: every
// source from its oldest compute capability, and the wgmma builds (the
// forward module's with gemm_ws, the FP8 module's) only for sm_90a (the
// one target runtime/gpu loads them on).
func TestModulesFor(t *testing.T) {
	for _, c := range []struct {
		arch string
		cc   int
		want []string
	}{
		{"sm_80", 80, []string{"llama.cu", "sgmv.cu"}},
		{"sm_89", 89, []string{"llama.cu", "sgmv.cu", "fp8.cu"}},
		{"sm_90a", 90, []string{"llama.cu", "llama.cu -DPEFTD_WS", "sgmv.cu", "fp8.cu", "fp8.cu -DPEFTD_WG"}},
		{"sm_100a", 100, []string{"llama.cu", "sgmv.cu", "fp8.cu"}},
	} {
		var got []string
		for _, m := range Modules {
			if m.For(c.arch, c.cc) {
				got = append(got, m.Label())
			}
		}
		if strings.Join(got, ",") != strings.Join(c.want, ",") {
			t.Errorf("%s: %q, want %q", c.arch, got, c.want)
		}
	}
}
