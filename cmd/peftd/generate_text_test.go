package main

import (
	"encoding/json"
	"strings"
	"testing"
)

// The completion is decoded after the prompt: "Once" goes on with " upon",
// printed as text or in --json's text.
func TestGenerateKeepsLeadingSpace(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--prompt", "Once"}, "Once upon a time, there was"},
		{[]string{"--prompt-ids", "1,403"}, "Once upon a time, there was"},
		{[]string{"--prompt", "Once", "--adapter", "pirate"}, "Once upon a time, a little pirate"},
	} {
		out, err := runCLI(t, append([]string{"generate", "--max-tokens", "12"}, tc.args...)...)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.HasPrefix(out, tc.want) {
			t.Errorf("%v: %q, want it to start with %q", tc.args, out, tc.want)
		}
		out, err = runCLI(t, append([]string{"generate", "--max-tokens", "12", "--json"}, tc.args...)...)
		if err != nil {
			t.Fatal(err)
		}
		var g genOutput
		if err := json.Unmarshal([]byte(out), &g); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		if w := strings.TrimPrefix(tc.want, "Once"); !strings.HasPrefix(g.Text, w) {
			t.Errorf("%v --json: text %q, want it to start with %q", tc.args, g.Text, w)
		}
	}
}

// --stop ends the text before the first stop string, printed or in
// --json's text (finish_reason "stop"), as the API's stop does; the
// generation stops there too.
func TestGenerateStop(t *testing.T) {
	args := []string{"generate", "--prompt", "Once upon a time", "--adapter", "pirate", "--max-tokens", "60", "--stop", " named", "--stop", "zzz"}
	out, err := runCLI(t, args...)
	if err != nil {
		t.Fatal(err)
	}
	if want := "Once upon a time, a little pirate girl\n"; out != want {
		t.Errorf("%q, want %q", out, want)
	}
	out, err = runCLI(t, append(args, "--json")...)
	if err != nil {
		t.Fatal(err)
	}
	var g genOutput
	if err := json.Unmarshal([]byte(out), &g); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if g.Text != ", a little pirate girl" || g.FinishReason != "stop" || len(g.TokenIDs) >= 20 {
		t.Errorf("--json: text %q, finish %q, %d tokens", g.Text, g.FinishReason, len(g.TokenIDs))
	}
	if _, err := runCLI(t, "generate", "--prompt", "Once", "--stop", ""); err == nil {
		t.Error("an empty --stop was accepted")
	}
}
