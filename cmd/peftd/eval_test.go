package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/peftd/peftd/runtime/gpu"
)

// TestEval: peftd eval on the embedded model compares a twin (no
// difference anywhere) and the FP8 emulation (a small one) with the exact
// CPU engine, per adapter, on the held-out text and on generations.
func TestEval(t *testing.T) {
	out, errOut, err := runCLIBoth("eval", "--ref", "device=cpu", "--cand", "device=cpu", "--cand", "device=cpu,weights=fp8,kv-cache=fp8",
		"--prompt", "Once upon a time", "--prompt", "One day", "--max-new", "12", "--batch", "4", "--json")
	if err != nil {
		t.Fatalf("%v\n%s", err, errOut)
	}
	var rep evalReport
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if rep.Reference != "device=cpu,weights=f32,kv-cache=f32" || !strings.Contains(rep.Model, "stories260K") {
		t.Errorf("reference %q, model %q", rep.Reference, rep.Model)
	}
	type key struct{ cand, adapter, stream string }
	rows := map[key]evalRow{}
	for _, r := range rep.Rows {
		rows[key{r.Candidate, r.Adapter, r.Stream}] = r
	}
	twin, fp8 := "device=cpu,weights=f32,kv-cache=f32", "device=cpu,weights=fp8(emulated),kv-cache=fp8(emulated)"
	for _, cand := range []string{twin, fp8} {
		for _, a := range []string{"base", "pirate", "space", "all"} {
			for _, s := range []string{"held-out", "generated"} {
				r, ok := rows[key{cand, a, s}]
				if !ok {
					t.Errorf("no row for %s, %s, %s", cand, a, s)
					continue
				}
				if r.Tokens == 0 || (s == "held-out") != (r.Scored > 0) {
					t.Errorf("%+v: want tokens, and scored tokens on held-out text only", r)
				}
				if cand == twin && (r.MeanKL != 0 || r.Agreement != 1 || r.PPLRef != r.PPLCand) {
					t.Errorf("twin: %+v, want no difference", r)
				}
			}
		}
	}
	if r := rows[key{fp8, "all", "held-out"}]; r.MeanKL <= 0 || r.MeanKL > 0.3 || r.PPLCand <= r.PPLRef*0.95 {
		t.Errorf("fp8 emulation: %+v", r)
	}
	if g := rows[key{twin, "all", "generated"}]; g.Tokens != rows[key{twin, "base", "generated"}].Tokens+rows[key{twin, "pirate", "generated"}].Tokens+rows[key{twin, "space", "generated"}].Tokens || g.Tokens > 3*2*12 {
		t.Errorf("generated rows: %+v", g)
	}

	// The text report says the same in a table.
	out, _, err = runCLIBoth("eval", "--ref", "device=cpu", "--cand", "device=cpu,weights=fp8", "--prompt", "One day", "--max-new", "4")
	if err != nil || !strings.Contains(out, "candidate device=cpu,weights=fp8(emulated),kv-cache=f32") || !strings.Contains(out, "top-1 agree") {
		t.Errorf("table: %v\n%s", err, out)
	}
}

func TestEvalErrors(t *testing.T) {
	dir := t.TempDir()
	empty := filepath.Join(dir, "empty.txt")
	os.WriteFile(empty, []byte("\n\n"), 0o644)
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"no candidate", []string{"--ref", "device=cpu"}, "give at least one --cand"},
		{"unknown key", []string{"--cand", "device=cpu,speed=fast"}, `unknown key "speed"`},
		{"bad device", []string{"--cand", "device=tpu"}, `device "tpu"`},
		{"bad weights", []string{"--ref", "weights=int4", "--cand", "device=cpu"}, `weights "int4"`},
		{"bad precise-accum", []string{"--cand", "device=cpu,precise-accum=maybe"}, `precise-accum "maybe"`},
		{"text for no adapter", []string{"--ref", "device=cpu", "--cand", "device=cpu", "--text", "robot=" + empty}, `no --adapter of that name`},
		{"text without a name", []string{"--ref", "device=cpu", "--cand", "device=cpu", "--text", empty}, "want NAME=FILE"},
		{"empty text", []string{"--ref", "device=cpu", "--cand", "device=cpu", "--text", "base=" + empty}, "no text"},
		{"missing text", []string{"--ref", "device=cpu", "--cand", "device=cpu", "--text", "base=" + filepath.Join(dir, "nope.txt")}, "no such file"},
		{"unknown adapter", []string{"--ref", "device=cpu", "--cand", "device=cpu", "--adapter", "robot"}, `adapter "robot"`},
		{"adapter named base", []string{"--ref", "device=cpu", "--cand", "device=cpu", "--adapter", "base=pirate"}, `the name "base" is taken`},
		{"bad max-new", []string{"--cand", "device=cpu", "--max-new", "0"}, "must be positive"},
		{"fp8 on the auto fallback", []string{"--ref", "device=cpu", "--cand", "weights=fp8", "--max-new", "2", "--prompt", "One"}, "CPU fallback does not apply fp8"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.name == "fp8 on the auto fallback" && gpu.Available() == nil {
				t.Skip("a GPU is here: auto does not fall back")
			}
			_, _, err := runCLIBoth(append([]string{"eval"}, tc.args...)...)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err %v, want one saying %q", err, tc.want)
			}
		})
	}
}

// TestParseEngineSpec reads each key of an engine spec and names the spec
// back the way eval's table prints it.
func TestParseEngineSpec(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want engineSpec
		name string
	}{
		{"device=cuda", engineSpec{Device: "cuda", Weights: "bf16", KVCache: "bf16"}, "device=cuda,weights=bf16,kv-cache=bf16"},
		{"device=cuda,weights=fp8,precise-accum", engineSpec{Device: "cuda", Weights: "fp8", KVCache: "bf16", PreciseAccum: true}, "device=cuda,weights=fp8,kv-cache=bf16,precise-accum"},
		{"device=cuda,weights=fp8,kv-cache=fp8,eager,precise-accum=false", engineSpec{Device: "cuda", Weights: "fp8", KVCache: "fp8", Eager: true}, "device=cuda,weights=fp8,kv-cache=fp8,eager"},
	} {
		got, err := parseEngineSpec(tc.in)
		if err != nil {
			t.Fatalf("%q: %v", tc.in, err)
		}
		if got != tc.want || got.String() != tc.name {
			t.Errorf("%q: got %+v (%s), want %+v (%s)", tc.in, got, got, tc.want, tc.name)
		}
	}
}
