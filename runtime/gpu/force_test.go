package gpu

import "testing"

// TestForcedOn: a kernelForce switch overrides the default both ways and
// leaves it alone at 0.
func TestForcedOn(t *testing.T) {
	for _, c := range []struct {
		f         int
		def, want bool
	}{{0, false, false}, {0, true, true}, {1, false, true}, {1, true, true}, {-1, false, false}, {-1, true, false}, {2, false, true}} {
		if got := forcedOn(c.f, c.def); got != c.want {
			t.Errorf("forcedOn(%d, %v) = %v, want %v", c.f, c.def, got, c.want)
		}
	}
}
