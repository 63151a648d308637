package loader_test

import (
	"testing"

	"github.com/peftd/peftd/loader"
)

// TestLeaseLoadSource: the lease whose Acquire loaded the adapter says
// where from (the store, the first time); a lease on the adapter already in
// its slot says nothing.
func TestLeaseLoadSource(t *testing.T) {
	e := newEnv(t, 2, loader.Options{})
	l := e.acquire("qv-r8")
	if got := l.LoadSource(); got != "store" {
		t.Errorf("first lease: LoadSource %q, want store", got)
	}
	l2 := e.acquire("qv-r8")
	if got := l2.LoadSource(); got != "" {
		t.Errorf("lease on the resident adapter: LoadSource %q, want none", got)
	}
	l.Release()
	l2.Release()
}
