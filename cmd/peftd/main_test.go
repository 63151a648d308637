package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "peftd-cli-test")
	if err != nil {
		panic(err)
	}
	os.Setenv("PEFTD_CACHE", dir)
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func runCLI(t *testing.T, args ...string) (string, error) {
	t.Helper()
	var out, errb bytes.Buffer
	err := run(context.Background(), args, &out, &errb)
	return out.String(), err
}

func TestGenerateJSON(t *testing.T) {
	out, err := runCLI(t, "generate", "--prompt", "Once upon a time", "--max-tokens", "40", "--json", "--logprobs", "3")
	if err != nil {
		t.Fatal(err)
	}
	var g genOutput
	if err := json.Unmarshal([]byte(out), &g); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	var exp struct {
		Prompt []int32 `json:"prompt_token_ids"`
		Gen    []int32 `json:"generated_token_ids"`
		Text   string  `json:"generated_text"`
	}
	b, _ := os.ReadFile("../../models/stories260K/expected.json")
	json.Unmarshal(b, &exp)
	if !slices.Equal(g.PromptTokenIDs, exp.Prompt) || !slices.Equal(g.TokenIDs, exp.Gen) || g.Text != exp.Text {
		t.Errorf("got %v %v %q\nwant %v %v %q", g.PromptTokenIDs, g.TokenIDs, g.Text, exp.Prompt, exp.Gen, exp.Text)
	}
	if g.FinishReason != "length" || len(g.Logprobs) != 40 || len(g.TopLogprobs) != 40 || len(g.TopLogprobs[0]) != 3 {
		t.Errorf("finish %q, %d logprobs, %d top", g.FinishReason, len(g.Logprobs), len(g.TopLogprobs))
	}
	if g.TopLogprobs[0][0].ID != g.TokenIDs[0] || g.TopLogprobs[0][0].Logprob != g.Logprobs[0] || g.Logprobs[0] > 0 {
		t.Errorf("greedy token is not the top alternative: %+v vs %v", g.TopLogprobs[0], g.Logprobs[0])
	}
}

func TestGenerateAdapterText(t *testing.T) {
	for _, tc := range []struct{ adapter, want string }{
		{"pirate", "Once upon a time, a little pirate girl named Sue had a boat. She loved the sea and the waves.\n"},
		{"space", "Once upon a time, a girl named Mia wanted to go to space. She built a rocket in her yard.\n"},
	} {
		out, err := runCLI(t, "generate", "--prompt", "Once upon a time", "--adapter", tc.adapter, "--max-tokens", "60")
		if err != nil {
			t.Fatal(err)
		}
		if out != tc.want {
			t.Errorf("%s: %q, want %q", tc.adapter, out, tc.want)
		}
	}
}

func TestGenerateSeeded(t *testing.T) {
	args := []string{"generate", "--prompt-ids", "1,403,407", "--max-tokens", "20", "--temperature", "1", "--top-p", "0.9", "--top-k", "50", "--seed", "42", "--json"}
	a, err := runCLI(t, args...)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := runCLI(t, args...)
	if a != b {
		t.Errorf("same seed, different output:\n%s\n%s", a, b)
	}
}

func TestTokenize(t *testing.T) {
	out, err := runCLI(t, "tokenize", "--text", "Once upon a time", "--add-special-tokens", "--json")
	if err != nil || strings.TrimSpace(out) != `{"ids":[1,403,407,261,378]}` {
		t.Errorf("encode: %q %v", out, err)
	}
	out, err = runCLI(t, "tokenize", "--text", "Once upon a time", "--json")
	if err != nil || strings.TrimSpace(out) != `{"ids":[403,407,261,378]}` {
		t.Errorf("encode without BOS: %q %v", out, err)
	}
	out, err = runCLI(t, "tokenize", "--ids", "403,407,261,378", "--json")
	if err != nil || strings.TrimSpace(out) != `{"text":"Once upon a time"}` {
		t.Errorf("decode: %q %v", out, err)
	}
	// A folder holding only tokenizer files is enough.
	dir := t.TempDir()
	for _, f := range []string{"tokenizer.json", "tokenizer_config.json"} {
		b, _ := os.ReadFile(filepath.Join("../../models/stories260K", f))
		os.WriteFile(filepath.Join(dir, f), b, 0o644)
	}
	if out, err = runCLI(t, "tokenize", "--model", dir, "--text", "time"); err != nil || strings.TrimSpace(out) != "378" {
		t.Errorf("tokenizer-only folder: %q %v", out, err)
	}
}

func TestBadInputs(t *testing.T) {
	fixture := "../../testdata/tiny-llama-lora"
	copyDir := func(src string) string {
		dst := t.TempDir()
		if err := os.CopyFS(dst, os.DirFS(src)); err != nil {
			t.Fatal(err)
		}
		return dst
	}
	truncated := copyDir(fixture + "/base")
	os.Chmod(filepath.Join(truncated, "model.safetensors"), 0o644)
	b, _ := os.ReadFile(filepath.Join(truncated, "model.safetensors"))
	os.WriteFile(filepath.Join(truncated, "model.safetensors"), b[:len(b)/2], 0o644)

	wrongShape := copyDir(fixture + "/base")
	cb, _ := os.ReadFile(filepath.Join(wrongShape, "config.json"))
	os.Chmod(filepath.Join(wrongShape, "config.json"), 0o644)
	os.WriteFile(filepath.Join(wrongShape, "config.json"), bytes.Replace(cb, []byte(`"intermediate_size": 352`), []byte(`"intermediate_size": 350`), 1), 0o644)

	unknownTarget := copyDir(fixture + "/adapters/qv-r8")
	ab, _ := os.ReadFile(filepath.Join(unknownTarget, "adapter_config.json"))
	os.Chmod(filepath.Join(unknownTarget, "adapter_config.json"), 0o644)
	os.WriteFile(filepath.Join(unknownTarget, "adapter_config.json"), bytes.Replace(ab, []byte(`"q_proj"`), []byte(`"wq"`), 1), 0o644)

	for _, tc := range []struct {
		name string
		args []string
		msg  string
	}{
		{"no prompt", []string{"generate"}, "exactly one of --prompt"},
		{"missing model", []string{"generate", "--model", "/nonexistent", "--prompt-ids", "1"}, "no such file"},
		{"truncated model", []string{"generate", "--model", truncated, "--prompt-ids", "1"}, "truncated"},
		{"model shape", []string{"generate", "--model", wrongShape, "--prompt-ids", "1"}, "mlp.gate_proj.weight has shape [352 128], config.json implies [350 128]"},
		{"adapter of another model", []string{"generate", "--adapter", fixture + "/adapters/qv-r8", "--prompt", "hi"}, "lora_A.weight has shape [8 128], the base model's model.layers.0.self_attn.q_proj needs [r, 64]"},
		{"unknown target", []string{"generate", "--model", fixture + "/base", "--adapter", unknownTarget, "--prompt-ids", "1"}, `unknown target module "wq"`},
		{"missing adapter", []string{"generate", "--adapter", "nope", "--prompt", "hi"}, "no such folder"},
		{"token out of vocab", []string{"generate", "--prompt-ids", "1,9999"}, "outside the vocabulary"},
		{"text without tokenizer", []string{"generate", "--model", fixture + "/base", "--prompt", "hi"}, "no tokenizer.json"},
		{"bad temperature", []string{"generate", "--prompt", "hi", "--temperature", "-1"}, "temperature"},
		{"bad ids", []string{"tokenize", "--ids", "1,x"}, `bad token id "x"`},
		{"unknown command", []string{"frobnicate"}, "unknown command"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := runCLI(t, tc.args...)
			if err == nil || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("err = %v, want it to mention %q", err, tc.msg)
			}
		})
	}
}

// TestGeneratePenalties: the penalty flags reach the sampler (a +100 bias
// makes its token every pick; a frequency penalty changes greedy text that
// repeats itself) and bad values are refused naming the flag or the field.
func TestGeneratePenalties(t *testing.T) {
	gen := func(extra ...string) (genOutput, error) {
		out, err := runCLI(t, append([]string{"generate", "--prompt", "Once upon a time", "--max-tokens", "40", "--json"}, extra...)...)
		var g genOutput
		if err == nil {
			if jerr := json.Unmarshal([]byte(out), &g); jerr != nil {
				t.Fatalf("%v: %s", jerr, out)
			}
		}
		return g, err
	}
	g, err := gen("--logit-bias", "100:100")
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range g.TokenIDs {
		if id != 100 {
			t.Fatalf("--logit-bias 100:100: tokens %v, want all 100", g.TokenIDs)
		}
	}
	plain, err := gen()
	if err != nil {
		t.Fatal(err)
	}
	pen, err := gen("--frequency-penalty", "2", "--presence-penalty", "1", "--repetition-penalty", "1.5")
	if err != nil {
		t.Fatal(err)
	}
	if slices.Equal(plain.TokenIDs, pen.TokenIDs) {
		t.Errorf("penalties changed nothing: %v", pen.TokenIDs)
	}
	for _, bad := range [][]string{{"--logit-bias", "x:1"}, {"--logit-bias", "5"}, {"--logit-bias", "5:200"}, {"--presence-penalty", "3"},
		{"--repetition-penalty", "0"}, {"--logit-bias", "999999:1"}} {
		if _, err := gen(bad...); err == nil {
			t.Errorf("%v accepted", bad)
		}
	}
}
