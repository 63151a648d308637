package main

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/peftd/peftd/internal/apitest"
	"github.com/peftd/peftd/internal/fixture"
	"github.com/peftd/peftd/internal/testlog"
	"github.com/peftd/peftd/server"
)

// TestDeployAndInvoke drives a real server with the CLI: deploy a folder as
// a new adapter ID, invoke it plainly and streamed, and see the server's
// errors come back as the CLI's.
func TestDeployAndInvoke(t *testing.T) {
	srv, err := server.New(context.Background(), server.Config{Device: server.DeviceCPU, Store: t.TempDir(), CacheDir: "-",
		Slots: 2, Logger: testlog.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	url := apitest.Serve(t, "", srv, 20*time.Second)
	cli := func(args ...string) (string, error) {
		return runCLI(t, append(args[:1:1], append([]string{"--url", url}, args[1:]...)...)...)
	}
	const space = ", a girl named Mia wanted to go to space. She built a rocket in her yard."
	out, err := cli("deploy", "--id", "space2", "../../models/adapters/space")
	if err != nil || !strings.Contains(out, `"space2"`) {
		t.Fatalf("deploy: %q %v", out, err)
	}
	out, err = cli("invoke", "--adapter", "space2", "--prompt", "Once upon a time", "--max-tokens", "80")
	if err != nil || strings.TrimSpace(out) != space {
		t.Errorf("invoke: %q %v", out, err)
	}
	out, err = cli("invoke", "--adapter", "space2", "--prompt-ids", "1,403,407,261,378", "--max-tokens", "80", "--stream")
	if err != nil || strings.TrimSpace(out) != space {
		t.Errorf("invoke --stream: %q %v", out, err)
	}
	out, err = cli("invoke", "--adapter", "space2", "--prompt", "Once", "--max-tokens", "3", "--json")
	if err != nil || !strings.Contains(out, `"token_ids":[`) {
		t.Errorf("invoke --json: %q %v", out, err)
	}
	for _, tc := range []struct {
		args []string
		msg  string
	}{
		{[]string{"deploy", "--id", "bad", fixture.Dir() + "/adapters/qv-r8"}, "HTTP 400"},
		{[]string{"deploy", "--id", "bad", t.TempDir()}, "adapter_config.json"},
		{[]string{"invoke", "--adapter", "nope", "--prompt", "x"}, "HTTP 404"},
		{[]string{"invoke", "--adapter", "space2"}, "exactly one of --prompt"},
		{[]string{"invoke", "--prompt", "x"}, "--adapter is required"},
	} {
		if _, err := cli(tc.args...); err == nil || !strings.Contains(err.Error(), tc.msg) {
			t.Errorf("%v: %v, want it to mention %q", tc.args, err, tc.msg)
		}
	}
}
