package infra

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
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

// requireTool returns the path of the first of names found on PATH. When none
// is, the test fails (CI installs them with .ci/setup-infra.sh) unless
// PEFTD_SKIP_INFRA=1, which skips it.
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
	t.Fatalf("%v not installed: run `bash .ci/setup-infra.sh` (or set PEFTD_SKIP_INFRA=1 to skip %s)", names, why)
	return ""
}
