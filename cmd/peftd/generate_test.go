package main

import (
	"encoding/json"
	"slices"
	"strings"
	"testing"

	"github.com/peftd/peftd/runtime/gpu"
)

// The greedy stories of the embedded model for "Once upon a time", 60 tokens
// at most (the README's and make demo's); pirate's is api's pirateText.
const (
	storyPrompt = "Once upon a time"
	baseStory   = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she saw a big, red ball. She wanted to play with it, but it was too high.\nLily"
	pirateStory = "Once upon a time, a little pirate girl named Sue had a boat. She loved the sea and the waves."
)

var (
	storyPromptIDs = []int32{1, 403, 407, 261, 378}
	baseStoryIDs   = []int32{432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337, 410, 408, 419, 292,
		411, 322, 265, 282, 295, 433, 426, 385, 328, 432, 358, 394, 261, 370, 432, 352, 266, 268, 388, 426, 338, 391, 266, 267, 337,
		335, 312, 432, 398, 312, 286, 267, 414, 270, 333, 415, 426, 13, 438, 310}
	pirateStoryIDs = []int32{432, 261, 376, 282, 315, 294, 411, 298, 315, 421, 395, 301, 425, 411, 381, 261, 268, 414, 294, 426,
		338, 401, 396, 265, 262, 411, 412, 269, 265, 273, 360, 419, 426, 1}
)

// TestGenerateStories: peftd generate (through the scheduler, on the cpu
// whether asked for or picked by auto) tells the known stories, as text and
// as --json with its fields unchanged.
func TestGenerateStories(t *testing.T) {
	for _, tc := range []struct {
		name   string
		args   []string
		text   string // the printed story, prompt included
		ids    []int32
		finish string
	}{
		{"base", nil, baseStory, baseStoryIDs, "length"},
		{"pirate", []string{"--adapter", "pirate"}, pirateStory, pirateStoryIDs, "stop"},
		{"base/cpu", []string{"--device", "cpu"}, baseStory, baseStoryIDs, "length"},
		{"pirate/cpu/fp8", []string{"--adapter", "pirate", "--device", "cpu", "--weights", "fp8"}, pirateStory, pirateStoryIDs, "stop"},
	} {
		args := append([]string{"generate", "--prompt", storyPrompt, "--max-tokens", "60"}, tc.args...)
		if gpu.Available() == nil && !slices.Contains(tc.args, "cpu") {
			args = append(args, "--device", "cpu") // auto would take the GPU: bf16 tells other stories
		}
		t.Run(tc.name+"/text", func(t *testing.T) {
			out, err := runCLI(t, args...)
			if err != nil {
				t.Fatal(err)
			}
			if out != tc.text+"\n" {
				t.Errorf("got %q\nwant %q", out, tc.text+"\n")
			}
		})
		t.Run(tc.name+"/json", func(t *testing.T) {
			out, err := runCLI(t, append(args, "--json", "--logprobs", "2")...)
			if err != nil {
				t.Fatal(err)
			}
			var fields map[string]json.RawMessage
			if err := json.Unmarshal([]byte(out), &fields); err != nil {
				t.Fatalf("%v: %s", err, out)
			}
			var keys []string
			for k := range fields {
				keys = append(keys, k)
			}
			slices.Sort(keys)
			if want := []string{"finish_reason", "logprobs", "prompt_token_ids", "text", "token_ids", "top_logprobs"}; !slices.Equal(keys, want) {
				t.Errorf("fields %v, want %v", keys, want)
			}
			var g genOutput
			if err := json.Unmarshal([]byte(out), &g); err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(g.PromptTokenIDs, storyPromptIDs) || !slices.Equal(g.TokenIDs, tc.ids) {
				t.Errorf("ids %v %v\nwant %v %v", g.PromptTokenIDs, g.TokenIDs, storyPromptIDs, tc.ids)
			}
			if want := strings.TrimPrefix(tc.text, storyPrompt); g.Text != want || g.FinishReason != tc.finish {
				t.Errorf("text %q finish %q, want %q %q", g.Text, g.FinishReason, want, tc.finish)
			}
			if len(g.Logprobs) != len(tc.ids) || len(g.TopLogprobs) != len(tc.ids) {
				t.Fatalf("%d logprobs, %d top for %d tokens", len(g.Logprobs), len(g.TopLogprobs), len(tc.ids))
			}
			for i, top := range g.TopLogprobs {
				if len(top) != 2 || top[0].ID != g.TokenIDs[i] || top[0].Logprob != g.Logprobs[i] {
					t.Errorf("token %d: %d %v, top %+v", i, g.TokenIDs[i], g.Logprobs[i], top)
				}
			}
		})
	}
}

// TestGenerateContext: asked for more tokens than the context holds,
// generate stops at the context with "length" (not an error).
func TestGenerateContext(t *testing.T) {
	out, err := runCLI(t, "generate", "--prompt", "Tom", "--max-tokens", "600", "--device", "cpu", "--json")
	if err != nil {
		t.Fatal(err)
	}
	var g genOutput
	if err := json.Unmarshal([]byte(out), &g); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if n := len(g.PromptTokenIDs) + len(g.TokenIDs); n != 512 || g.FinishReason != "length" {
		t.Errorf("%d tokens in all, finish %q; want the context, 512, and length", n, g.FinishReason)
	}
}

// TestGenerateDevice: --device and --weights are checked as peftd serve
// checks them, and --device cuda without a usable GPU fails with serve's
// error, naming the cause.
func TestGenerateDevice(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--device", "tpu"}, `generate: --device "tpu": want auto, cpu or cuda`},
		{[]string{"--weights", "int4"}, `generate: --weights "int4": want bf16 or fp8`},
	} {
		if _, err := runCLI(t, append([]string{"generate", "--prompt", "hi"}, tc.args...)...); err == nil || err.Error() != tc.want {
			t.Errorf("%v: %v, want %q", tc.args, err, tc.want)
		}
	}
	cause := gpu.Available()
	if cause == nil {
		t.Skip("a usable GPU is present")
	}
	out, err := runCLI(t, "generate", "--prompt", "hi", "--device", "cuda")
	if want := "server: --device cuda: " + cause.Error(); err == nil || err.Error() != want {
		t.Errorf("--device cuda: %v, want %q", err, want)
	}
	if out != "" {
		t.Errorf("--device cuda printed %q", out)
	}
	_, serr := runCLI(t, "serve", "--listen", "127.0.0.1:0", "--device", "cuda")
	if serr == nil || !strings.HasSuffix(serr.Error(), err.Error()) {
		t.Errorf("serve says %v, generate %v", serr, err)
	}
}
