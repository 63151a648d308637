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
		"FROM golang:${GO_VERSION} AS go",
		"ARG GO_VERSION=1.26",
		"FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04",
		"ARG CUDA_VERSION=13.0.",
		"cuda-nvrtc-dev-",
		"peftd kernels --arch", // compiled at build time: a replica compiles nothing at start
		"PEFTD_KERNEL_DIRS=/opt/peftd/kernels",
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

// dockerStage is one FROM ... [AS name] of a Dockerfile and its instructions
// (continuation lines joined, comments dropped).
type dockerStage struct {
	from, name string
	instrs     []string
}

func dockerStages(df string) []dockerStage {
	var stages []dockerStage
	var cur string
	flush := func() {
		line := strings.Join(strings.Fields(cur), " ")
		cur = ""
		if line == "" {
			return
		}
		if f := strings.Fields(line); strings.EqualFold(f[0], "FROM") {
			st := dockerStage{from: f[1]}
			if len(f) == 4 && strings.EqualFold(f[2], "AS") {
				st.name = f[3]
			}
			stages = append(stages, st)
		} else if len(stages) > 0 {
			stages[len(stages)-1].instrs = append(stages[len(stages)-1].instrs, line)
		}
	}
	for _, l := range strings.Split(df, "\n") {
		if strings.HasPrefix(strings.TrimSpace(l), "#") {
			continue
		}
		if c, ok := strings.CutSuffix(l, "\\"); ok {
			cur += c + " "
			continue
		}
		cur += l
		flush()
	}
	flush()
	return stages
}

// TestDockerfileCgo: the binary is built with cgo (go-nvml: GPU metrics and
// the KV cache sized from free device memory), with a C compiler, on the
// runtime image's Ubuntu (so that it needs no newer glibc than it runs on),
// and the image runs as a non-root user.
func TestDockerfileCgo(t *testing.T) {
	stages := dockerStages(string(readFile(t, "infra/docker/Dockerfile")))
	if len(stages) < 2 {
		t.Fatalf("%d stages", len(stages))
	}
	var build *dockerStage
	for i := range stages {
		if stages[i].name == "build" {
			build = &stages[i]
		}
	}
	runtime := stages[len(stages)-1]
	if build == nil {
		t.Fatal("no stage named build")
	}
	var cgo, gcc bool
	for _, in := range build.instrs {
		if strings.HasPrefix(in, "RUN ") && strings.Contains(in, " go build ") {
			cgo = strings.Contains(in, "CGO_ENABLED=1 ")
		}
		if strings.HasPrefix(in, "RUN ") && strings.Contains(in, "apt-get install") && strings.Contains(in, " gcc ") {
			gcc = true
		}
	}
	if !cgo {
		t.Errorf("the build stage's go build does not set CGO_ENABLED=1: %q", build.instrs)
	}
	if !gcc {
		t.Errorf("the build stage installs no gcc (cgo needs it): %q", build.instrs)
	}
	for _, st := range stages {
		for _, in := range st.instrs {
			if strings.Contains(in, "CGO_ENABLED=0") {
				t.Errorf("stage %s: %q", st.from, in)
			}
		}
	}
	// glibc: the build stage is the runtime image's Ubuntu release.
	ubuntu := func(from string) string {
		if i := strings.LastIndex(from, "ubuntu"); i >= 0 {
			return strings.TrimPrefix(strings.TrimPrefix(from[i+len("ubuntu"):], ":"), "-")
		}
		return ""
	}
	if b, r := ubuntu(build.from), ubuntu(runtime.from); b == "" || b != r {
		t.Errorf("build stage FROM %s, runtime FROM %s: want the same Ubuntu release (glibc)", build.from, runtime.from)
	}
	if !strings.HasPrefix(runtime.from, "nvidia/cuda:") || !strings.Contains(runtime.from, "-runtime-") {
		t.Errorf("runtime stage FROM %s: want an nvidia/cuda runtime image", runtime.from)
	}
	// Non-root: the runtime stage's last USER is a non-zero uid.
	user := ""
	for _, in := range runtime.instrs {
		if u, ok := strings.CutPrefix(in, "USER "); ok {
			user = u
		}
	}
	if uid, _, _ := strings.Cut(user, ":"); uid == "" || uid == "0" || uid == "root" {
		t.Errorf("runtime stage runs as %q: want a non-root user", user)
	}
	if !slices.ContainsFunc(runtime.instrs, func(in string) bool { return strings.HasPrefix(in, "COPY --from=build /out/peftd ") }) {
		t.Errorf("runtime stage does not copy the build stage's binary: %q", runtime.instrs)
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
