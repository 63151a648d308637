package infra

import (
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

func TestHAProxyConfig(t *testing.T) {
	cfg := string(readFile(t, "infra/haproxy/haproxy.cfg"))
	for _, want := range []string{
		"balance hash var(txn.adapter)",
		"hash-type consistent",
		"hash-balance-factor 150",
		"option httpchk GET " + HealthPath,
		"req.hdr(" + AdapterHeader + ")",
		"json_query('$.model')",
		`path_reg ^/v1/adapters/[^/]+/invoke$`,
		"path,field(4,/)",
	} {
		if !strings.Contains(cfg, want) {
			t.Errorf("haproxy.cfg lacks %q", want)
		}
	}
	servers := regexp.MustCompile(`(?m)^\s*server\s+\S+\s+(\S+)`).FindAllStringSubmatch(cfg, -1)
	var got []string
	for _, s := range servers {
		got = append(got, s[1])
	}
	if want := "127.0.0.1:8081 127.0.0.1:8082 127.0.0.1:8083"; strings.Join(got, " ") != want {
		t.Errorf("servers = %v, want %s", got, want)
	}
	if !regexp.MustCompile(`(?m)^\s*default-server\s.*\bcheck\b`).MatchString(cfg) {
		t.Error("servers are not health-checked (default-server ... check)")
	}

	hap := requireTool(t, "haproxy -c", "haproxy")
	out, err := exec.Command(hap, "-c", "-f", filepath.Join(repoRoot(t), "infra/haproxy/haproxy.cfg")).CombinedOutput()
	if err != nil {
		t.Fatalf("haproxy -c: %v\n%s", err, out)
	}
	if strings.Contains(strings.ToLower(string(out)), "warning") {
		t.Errorf("haproxy -c warnings:\n%s", out)
	}
}
