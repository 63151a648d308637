package server_test

import (
	"errors"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/server"
)

// failingBackend fails every step while broken is set (a device with a
// sticky error, say).
type failingBackend struct {
	engine.Backend
	broken *atomic.Bool
}

func (b failingBackend) Execute(meta *engine.StepMeta, prog engine.Program) error {
	if b.broken.Load() {
		return errors.New("device lost")
	}
	return b.Backend.Execute(meta, prog)
}

// TestReadyzFollowsTheEngine: /readyz answers 200 while steps succeed, 503
// naming the step's error once steps fail in a row (a replica a load
// balancer should stop sending to), and 200 again after a step succeeds.
// /healthz stays 200 throughout: the process is alive.
func TestReadyzFollowsTheEngine(t *testing.T) {
	var broken atomic.Bool
	_, url := start(t, server.Config{Store: fixtureStore(t),
		WrapBackend: func(b engine.Backend) engine.Backend { return failingBackend{Backend: b, broken: &broken} }})
	invoke := func() reply {
		return do(t, "POST", url+"/v1/completions", map[string]any{"model": "base", "prompt": []int{1, 2, 3}, "max_tokens": 1})
	}
	if r := invoke(); r.Status != 200 {
		t.Fatalf("a good request: %d %s", r.Status, r.Body)
	}
	if r := do(t, "GET", url+"/readyz", nil); r.Status != 200 {
		t.Fatalf("readyz while steps succeed: %d %s", r.Status, r.Body)
	}
	broken.Store(true)
	failing := false
	for i := 0; i < 10 && !failing; i++ {
		if r := invoke(); r.Status < 500 {
			t.Fatalf("a request on a failing device: %d %s", r.Status, r.Body)
		}
		failing = do(t, "GET", url+"/readyz", nil).Status != 200
	}
	if !failing {
		t.Fatal("readyz stayed 200 after 10 failed steps in a row")
	}
	r := do(t, "GET", url+"/readyz", nil)
	if r.Status != 503 || !strings.Contains(string(r.Body), "device lost") {
		t.Errorf("readyz on a failing engine: %d %s; want 503 naming the step's error", r.Status, r.Body)
	}
	if r := do(t, "GET", url+"/healthz", nil); r.Status != 200 {
		t.Errorf("healthz on a failing engine: %d %s; want 200 (the process is alive)", r.Status, r.Body)
	}
	broken.Store(false)
	if r := invoke(); r.Status != 200 {
		t.Fatalf("a good request again: %d %s", r.Status, r.Body)
	}
	if r := do(t, "GET", url+"/readyz", nil); r.Status != 200 {
		t.Errorf("readyz after a good step: %d %s", r.Status, r.Body)
	}
}
