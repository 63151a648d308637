package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/peftd/peftd/internal/testlog"
)

// haproxy runs infra/haproxy/haproxy.cfg as shipped (hashing, bounded load,
// health checks) with only its three servers rewritten to backends and its
// frontends bound to free loopback ports.
type haproxy struct {
	url, stats string
	out        testlog.Buffer
}

// requireHAProxy returns haproxy's path. Without it the test is skipped,
// naming it (as with PEFTD_SKIP_INFRA=1), except in CI (CI set), where it
// fails: .ci/setup-infra.sh installs it there. infra's requireTool has the
// same rule.
func requireHAProxy(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("haproxy")
	if err == nil {
		return p
	}
	if os.Getenv("PEFTD_SKIP_INFRA") == "1" {
		t.Skip("haproxy not installed (PEFTD_SKIP_INFRA=1)")
	}
	const msg = "haproxy not installed, so the scale-out through HAProxy is not checked " +
		"(Debian package haproxy, >= 2.6: bash .ci/setup-infra.sh installs it as root)"
	if os.Getenv("CI") != "" {
		t.Fatal(msg + "; CI runs every check: install it, or set PEFTD_SKIP_INFRA=1 to skip the infra tool checks")
	}
	t.Skip(msg)
	return ""
}

var serverLine = regexp.MustCompile(`(?m)^(\s*server\s+\S+\s+)127\.0\.0\.1:808[1-3]\b`)

// haproxyConfig is the repository's haproxy.cfg adapted to run here.
func haproxyConfig(t *testing.T, front, stats string, backends []string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(repoRoot(t), "infra", "haproxy", "haproxy.cfg"))
	if err != nil {
		t.Fatal(err)
	}
	cfg := string(b)
	replace := func(old, new string) {
		t.Helper()
		if strings.Count(cfg, old) != 1 {
			t.Fatalf("haproxy.cfg: %q appears %d times, want once", old, strings.Count(cfg, old))
		}
		cfg = strings.Replace(cfg, old, new, 1)
	}
	replace("bind :8080", "bind "+front)
	replace("bind 127.0.0.1:8404", "bind "+stats)
	i := 0
	cfg = serverLine.ReplaceAllStringFunc(cfg, func(m string) string {
		sub := serverLine.FindStringSubmatch(m)
		i++
		return sub[1] + backends[i-1]
	})
	if i != len(backends) {
		t.Fatalf("haproxy.cfg: rewrote %d server lines, want %d", i, len(backends))
	}
	return cfg
}

// startHAProxy runs `haproxy -f cfg -db` in front of backends until the
// test ends and waits until it answers /healthz.
func startHAProxy(t *testing.T, backends []string) *haproxy {
	t.Helper()
	bin := requireHAProxy(t)
	front, stats := freePort(t), freePort(t)
	path := filepath.Join(t.TempDir(), "haproxy.cfg")
	if err := os.WriteFile(path, []byte(haproxyConfig(t, front, stats, backends)), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(bin, "-c", "-f", path).CombinedOutput(); err != nil {
		t.Fatalf("haproxy -c: %v\n%s", err, out)
	}
	h := &haproxy{url: "http://" + front, stats: "http://" + stats}
	cmd := exec.Command(bin, "-f", path, "-db")
	cmd.Stdout, cmd.Stderr = &h.out, &h.out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
		if t.Failed() || os.Getenv("PEFTD_TEST_LOGS") != "" {
			t.Logf("haproxy log:\n%s", h.out.String())
		}
	})
	deadline := time.Now().Add(20 * time.Second)
	for {
		select {
		case err := <-exited:
			t.Fatalf("haproxy exited: %v\n%s", err, h.out.String())
		default:
		}
		if r, err := client.Get(h.url + "/healthz"); err == nil {
			r.Body.Close()
			if r.StatusCode == 200 {
				return h
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("haproxy not answering on %s:\n%s", front, h.out.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}
