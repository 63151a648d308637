package api_test

import (
	"strings"
	"testing"

	"github.com/peftd/peftd/api"
	"github.com/peftd/peftd/loader/store"
)

// TestValidID: the API accepts exactly the IDs the store does (one rule,
// store.ValidateID), including those the two used to disagree on.
func TestValidID(t *testing.T) {
	for _, c := range []struct {
		id string
		ok bool
	}{
		{"pirate", true},
		{"qv-r8", true},
		{"A.b_c-9", true},
		{strings.Repeat("x", 128), true},
		{"", false},
		{strings.Repeat("x", 129), false},
		{".hidden", false}, // the store used to accept these three
		{"_x", false},
		{"-lead", false},
		{"bad..id", false}, // the API used to accept this one
		{"..", false},
		{"a/b", false},
		{"pi rate", false},
	} {
		if got := api.ValidID(c.id); got != c.ok {
			t.Errorf("ValidID(%q) = %v, want %v", c.id, got, c.ok)
		}
		if got := store.ValidateID(c.id) == nil; got != c.ok {
			t.Errorf("store.ValidateID(%q) ok = %v, want %v", c.id, got, c.ok)
		}
	}
}
