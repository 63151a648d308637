// Package s3test runs a real S3 server (versitygw in posix mode, installed
// by .ci/setup-s3.sh) on a loopback port for tests.
package s3test

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
)

// Server is a running versitygw.
type Server struct {
	Endpoint          string // http://127.0.0.1:port
	AccessKey, Secret string
	Region            string
	Client            *minio.Client
}

// Binary finds versitygw: $PEFTD_VERSITYGW, else <repo>/.cache/bin/versitygw.
func Binary() (string, error) {
	if p := os.Getenv("PEFTD_VERSITYGW"); p != "" {
		return p, nil
	}
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			p := filepath.Join(dir, ".cache", "bin", "versitygw")
			if _, err := os.Stat(p); err != nil {
				return "", fmt.Errorf("%s is missing", p)
			}
			return p, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("no go.mod above the test's folder")
		}
		dir = parent
	}
}

// Start runs versitygw with a temp posix backend until the test ends. When
// the binary is missing the test fails (skips with PEFTD_SKIP_S3=1).
func Start(t testing.TB) *Server {
	t.Helper()
	if os.Getenv("PEFTD_SKIP_S3") == "1" {
		t.Skip("PEFTD_SKIP_S3=1")
	}
	bin, err := Binary()
	if err != nil {
		t.Fatalf("S3 tests need versitygw (%v): run .ci/setup-s3.sh, or set PEFTD_SKIP_S3=1 to skip them", err)
	}
	root := t.TempDir()
	s := &Server{AccessKey: "peftdtest", Secret: "peftdtestsecret", Region: "us-east-1"}
	var lastErr error
	for attempt := 0; attempt < 3; attempt++ {
		port, err := freePort()
		if err != nil {
			t.Fatal(err)
		}
		addr := fmt.Sprintf("127.0.0.1:%d", port)
		var out bytes.Buffer
		cmd := exec.Command(bin, "--port", addr, "--access", s.AccessKey, "--secret", s.Secret,
			"--region", s.Region, "--quiet", "posix", root)
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatalf("start versitygw: %v", err)
		}
		exited := make(chan error, 1)
		go func() { exited <- cmd.Wait() }()
		if lastErr = waitListening(addr, exited, 15*time.Second); lastErr != nil {
			_ = cmd.Process.Kill()
			<-exited
			lastErr = fmt.Errorf("%v; output:\n%s", lastErr, out.String())
			continue
		}
		var once sync.Once
		t.Cleanup(func() {
			once.Do(func() {
				_ = cmd.Process.Kill()
				<-exited
			})
		})
		s.Endpoint = "http://" + addr
		s.Client, err = minio.New(addr, &minio.Options{Creds: credentials.NewStaticV4(s.AccessKey, s.Secret, ""),
			Region: s.Region, BucketLookup: minio.BucketLookupPath})
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	t.Fatalf("versitygw did not start: %v", lastErr)
	return nil
}

// MakeBucket creates a bucket.
func (s *Server) MakeBucket(t testing.TB, name string) {
	t.Helper()
	if err := s.Client.MakeBucket(context.Background(), name, minio.MakeBucketOptions{Region: s.Region}); err != nil {
		t.Fatalf("make bucket %s: %v", name, err)
	}
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func waitListening(addr string, exited <-chan error, within time.Duration) error {
	deadline := time.Now().Add(within)
	for time.Now().Before(deadline) {
		select {
		case err := <-exited:
			return fmt.Errorf("versitygw exited: %v", err)
		default:
		}
		if c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond); err == nil {
			c.Close()
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("versitygw not listening on %s after %v", addr, within)
}
