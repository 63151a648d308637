package s3test

import (
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// MinIOBinary finds the MinIO server: $PEFTD_MINIO, else
// <repo>/.cache/bin/minio (built by .ci/setup-minio.sh).
func MinIOBinary() (string, error) { return cachedBinary("PEFTD_MINIO", "minio") }

// StartMinIO runs a MinIO server (one drive in a temp folder, credentials
// through MINIO_ROOT_USER/MINIO_ROOT_PASSWORD) on a free loopback port
// until the test ends; Stop and Restart work as for versitygw; env adds to
// the server's environment (PEFTD_MINIO_SILENT_LISTEN=1: a notification
// stream that sends nothing, as upstream's; see .ci/setup-minio.sh). Without the
// binary the test is skipped, naming .ci/setup-minio.sh (a build of several
// minutes), except in CI (CI set), where it fails; PEFTD_SKIP_S3=1 skips.
func StartMinIO(t testing.TB, env ...string) *Server {
	t.Helper()
	if os.Getenv("PEFTD_SKIP_S3") == "1" {
		t.Skip("PEFTD_SKIP_S3=1")
	}
	bin, err := MinIOBinary()
	if err != nil {
		msg := fmt.Sprintf("MinIO tests need the MinIO server (%v): run .ci/setup-minio.sh (builds it from its Go module, ~5-8 minutes), or set PEFTD_SKIP_S3=1", err)
		if os.Getenv("CI") != "" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	tmp := t.TempDir()
	data, certs := filepath.Join(tmp, "data"), filepath.Join(tmp, "certs")
	s := &Server{bin: bin, root: data, AccessKey: uniqueKey("peftdminio"), Secret: uniqueKey("peftdminiosecret"), Region: "us-east-1",
		name: "minio", args: func(s *Server) []string {
			return []string{"server", "--address", s.Addr, "--certs-dir", certs, "--quiet", data}
		}}
	s.env = []string{"MINIO_ROOT_USER=" + s.AccessKey, "MINIO_ROOT_PASSWORD=" + s.Secret, "MINIO_REGION=" + s.Region,
		"MINIO_BROWSER=off", "MINIO_UPDATE=off", "MINIO_CI_CD=on"}
	s.env = append(s.env, env...)
	hc := &http.Client{Timeout: time.Second}
	s.ready = func(s *Server) bool {
		resp, err := hc.Get("http://" + s.Addr + "/minio/health/ready")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	}
	s.start(t)
	return s
}
