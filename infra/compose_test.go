package infra

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"
)

const composeFile = "infra/docker/compose.yaml"

func TestComposeFile(t *testing.T) {
	var c struct {
		Services map[string]struct {
			Image       string                       `json:"image"`
			Build       map[string]any               `json:"build"`
			Command     any                          `json:"command"`
			Environment map[string]string            `json:"environment"`
			Ports       []string                     `json:"ports"`
			Profiles    []string                     `json:"profiles"`
			DependsOn   map[string]map[string]string `json:"depends_on"`
			Healthcheck *struct {
				Test []string `json:"test"`
			} `json:"healthcheck"`
			Deploy  map[string]any `json:"deploy"`
			Secrets []string       `json:"secrets"`
		} `json:"services"`
	}
	// sigs.k8s.io/yaml resolves the x-peftd anchor and the <<: merge keys.
	if err := yaml.Unmarshal(readFile(t, composeFile), &c); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"minio", "minio-init", "peftd", "peftd-cpu"} {
		if _, ok := c.Services[name]; !ok {
			t.Fatalf("service %q missing", name)
		}
	}
	minio, initc, peftd := c.Services["minio"], c.Services["minio-init"], c.Services["peftd"]
	if !contains(minio.Ports, "9000:9000") {
		t.Errorf("minio ports = %v, want 9000:9000", minio.Ports)
	}
	if minio.Healthcheck == nil || len(minio.Healthcheck.Test) == 0 {
		t.Error("minio has no healthcheck (peftd waits on service_healthy)")
	}
	script := strings.Join(asStrings(initc.Command), "\n")
	for _, want := range []string{"mc mb --ignore-existing local/adapters", "mc event add"} {
		if !strings.Contains(script, want) {
			t.Errorf("minio-init command lacks %q", want)
		}
	}
	if initc.DependsOn["minio"]["condition"] != "service_healthy" {
		t.Errorf("minio-init depends_on = %v", initc.DependsOn)
	}
	for _, name := range []string{"peftd", "peftd-cpu"} {
		s := c.Services[name]
		if s.DependsOn["minio-init"]["condition"] != "service_completed_successfully" {
			t.Errorf("%s does not wait for the bucket: depends_on = %v", name, s.DependsOn)
		}
		if s.Healthcheck == nil || !strings.Contains(strings.Join(s.Healthcheck.Test, " "), "http://127.0.0.1:8080"+HealthPath) {
			t.Errorf("%s healthcheck does not probe %s", name, HealthPath)
		}
		args := strings.Join(asStrings(s.Command), " ")
		if !strings.Contains(args, "--store s3://adapters/?endpoint=http://minio:9000&path_style=true") {
			t.Errorf("%s command = %q, want the MinIO store URL", name, args)
		}
		if !strings.HasPrefix(s.Environment["AWS_ACCESS_KEY_ID"], "${MINIO_ROOT_USER") ||
			!strings.HasPrefix(s.Environment["AWS_SECRET_ACCESS_KEY"], "${MINIO_ROOT_PASSWORD") {
			t.Errorf("%s credentials not taken from the environment: %v", name, s.Environment)
		}
		if s.Environment["PEFTD_API_KEYS"] != "/run/secrets/peftd-api-keys" || !slices.Contains(s.Secrets, "peftd-api-keys") {
			t.Errorf("%s: API keys file not wired (peftd refuses :8080 without keys)", name)
		}
		if s.Build["dockerfile"] != "infra/docker/Dockerfile" {
			t.Errorf("%s build = %v", name, s.Build)
		}
	}
	if !contains(peftd.Ports, "8080:8080") {
		t.Errorf("peftd ports = %v", peftd.Ports)
	}
	if !strings.Contains(toJSON(t, peftd.Deploy), `"driver":"nvidia"`) {
		t.Errorf("peftd reserves no NVIDIA GPU: %v", peftd.Deploy)
	}
	if got := c.Services["peftd-cpu"]; got.Environment["PEFTD_DEVICE"] != "cpu" || !contains(got.Profiles, "cpu") {
		t.Errorf("peftd-cpu = %+v", got)
	}
}

// TestComposeConfig runs the real validator: `docker compose config` (v2
// plugin) or `docker-compose config` (Debian's docker-compose package).
func TestComposeConfig(t *testing.T) {
	var cmd *exec.Cmd
	if exec.Command("docker", "compose", "version").Run() == nil {
		cmd = exec.Command("docker", "compose", "-f", composeFile, "--profile", "cpu", "config", "--quiet")
	} else {
		dc := requireTool(t, "compose file validation", "docker-compose")
		cmd = exec.Command(dc, "-f", composeFile, "--profile", "cpu", "config", "--quiet")
	}
	cmd.Dir = repoRoot(t)
	// Don't let a developer's .env or shell change what is validated.
	cmd.Env = append(os.Environ(), "COMPOSE_PROJECT_NAME=peftd-ci")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(cmd.Args, " "), err, out)
	}
	if _, err := os.Stat(filepath.Join(repoRoot(t), "infra/docker/Dockerfile")); err != nil {
		t.Fatal(err)
	}
}

func TestDockerfile(t *testing.T) {
	df := string(readFile(t, "infra/docker/Dockerfile"))
	for _, want := range []string{
		"FROM golang:${GO_VERSION} AS build",
		"ARG GO_VERSION=1.26",
		"FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04",
		"ARG CUDA_VERSION=13.0.",
		"cuda-nvrtc-dev-",
		"USER 10001:10001",
		"EXPOSE 8080",
		"HEALTHCHECK",
		"http://127.0.0.1:8080" + HealthPath,
		`ENTRYPOINT ["/usr/local/bin/peftd", "serve"]`,
	} {
		if !strings.Contains(df, want) {
			t.Errorf("Dockerfile lacks %q", want)
		}
	}
}

func contains(s []string, v string) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

func asStrings(v any) []string {
	switch v := v.(type) {
	case string:
		return []string{v}
	case []any:
		var out []string
		for _, x := range v {
			if s, ok := x.(string); ok {
				out = append(out, s)
			}
		}
		return out
	}
	return nil
}

func toJSON(t testing.TB, v any) string {
	b, err := yaml.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	j, err := yaml.YAMLToJSON(b)
	if err != nil {
		t.Fatal(err)
	}
	return string(j)
}
