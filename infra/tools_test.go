package infra

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// repoRoot is the repository root (infra's parent).
func repoRoot(t testing.TB) string {
	t.Helper()
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		t.Fatal("no caller")
	}
	return filepath.Dir(filepath.Dir(file))
}

func readFile(t testing.TB, rel string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(repoRoot(t), rel))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// toolSource says where each validator comes from.
var toolSource = map[string]string{
	"haproxy":        "Debian package haproxy, >= 2.6 (bash .ci/setup-infra.sh installs it as root)",
	"docker-compose": "Debian package docker-compose, or Docker's compose plugin (bash .ci/setup-infra.sh installs the former as root)",
	"cfn-lint":       "PyPI package cfn-lint (pip install cfn-lint; Debian has no package, and .ci/setup-infra.sh does not install it)",
}

// requireTool returns the path of the first of names found on PATH. When none
// is, the test is skipped with a message naming what is missing and where it
// comes from, or with PEFTD_SKIP_INFRA=1; in CI (CI set, as .ci/run runs)
// it fails instead, so that CI never passes without running the check.
func requireTool(t *testing.T, why string, names ...string) string {
	t.Helper()
	for _, n := range names {
		if p, err := exec.LookPath(n); err == nil {
			return p
		}
	}
	if os.Getenv("PEFTD_SKIP_INFRA") == "1" {
		t.Skipf("%v not installed (PEFTD_SKIP_INFRA=1): %s not checked", names, why)
	}
	var from []string
	for _, n := range names {
		if s, ok := toolSource[n]; ok {
			from = append(from, n+": "+s)
		}
	}
	msg := fmt.Sprintf("%s not installed, so %s is not checked", strings.Join(names, " or "), why)
	if len(from) > 0 {
		msg += " (" + strings.Join(from, "; ") + ")"
	}
	if os.Getenv("CI") != "" {
		t.Fatalf("%s; CI runs every check: install it, or set PEFTD_SKIP_INFRA=1 to skip the infra tool checks", msg)
	}
	t.Skip(msg)
	return ""
}

// TestRequireToolSkips: off CI, a missing validator skips its test (naming
// it) rather than failing it.
func TestRequireToolSkips(t *testing.T) {
	t.Setenv("CI", "")
	t.Setenv("PEFTD_SKIP_INFRA", "")
	var skipped, returned bool
	t.Run("missing", func(t *testing.T) {
		defer func() { skipped = t.Skipped() }()
		requireTool(t, "nothing", "peftd-no-such-validator")
		returned = true
	})
	if !skipped || returned {
		t.Errorf("skipped %v, returned %v: want a skip", skipped, returned)
	}
	if p := requireTool(t, "sh", "peftd-no-such-validator", "sh"); p == "" {
		t.Error("sh not found")
	}
}
