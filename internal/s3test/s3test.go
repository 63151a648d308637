// Package s3test runs a real S3 server (versitygw in posix mode, installed
// by .ci/setup-s3.sh; or MinIO, single drive, built by .ci/setup-minio.sh)
// on a loopback port for tests, which can stop it and start it again on the
// same address and data.
package s3test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"

	"github.com/peftd/peftd/internal/adaptertest"
	"github.com/peftd/peftd/internal/testlog"
	"github.com/peftd/peftd/runtime/lora"
)

// Server is a running versitygw or MinIO.
type Server struct {
	Addr              string // 127.0.0.1:port
	Endpoint          string // http://127.0.0.1:port
	AccessKey, Secret string
	Region            string
	Client            *minio.Client

	bin, root string
	name      string                   // "versitygw" or "minio"
	args      func(s *Server) []string // the server's command line
	env       []string
	ready     func(s *Server) bool // serving requests (nil: listening)
	cmd       *exec.Cmd
	exited    chan error
	out       testlog.Buffer
}

// Binary finds versitygw: $PEFTD_VERSITYGW, else <repo>/.cache/bin/versitygw.
func Binary() (string, error) { return cachedBinary("PEFTD_VERSITYGW", "versitygw") }

// cachedBinary finds a test server's binary: the path in the environment
// variable env, else <repo>/.cache/bin/<name> (built by .ci/setup-*.sh),
// <repo> being the first folder above the test's with a go.mod.
func cachedBinary(env, name string) (string, error) {
	if p := os.Getenv(env); p != "" {
		if _, err := os.Stat(p); err != nil {
			return "", fmt.Errorf("%s: %w", env, err)
		}
		return p, nil
	}
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			p := filepath.Join(dir, ".cache", "bin", name)
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
	s := &Server{bin: bin, root: t.TempDir(), AccessKey: uniqueKey("peftdtest"), Secret: uniqueKey("peftdtestsecret"), Region: "us-east-1",
		name: "versitygw", args: func(s *Server) []string {
			return []string{"--port", s.Addr, "--access", s.AccessKey, "--secret", s.Secret,
				"--region", s.Region, "--quiet", "posix", s.root}
		}}
	s.start(t)
	return s
}

// start runs the server on a free port until the test ends, and makes Client.
func (s *Server) start(t testing.TB) {
	t.Helper()
	var err, lastErr error
	for range 3 {
		if s.Addr, err = freeAddr(); err != nil {
			t.Fatal(err)
		}
		if lastErr = s.Restart(); lastErr == nil {
			break
		}
	}
	if lastErr != nil {
		t.Fatalf("%s did not start: %v", s.name, lastErr)
	}
	t.Cleanup(s.Stop)
	s.Endpoint = "http://" + s.Addr
	if s.Client, err = s.newClient(); err != nil {
		t.Fatal(err)
	}
}

// Restart runs the server (again, after Stop) on s.Addr over the same data
// folder and waits until it listens.
func (s *Server) Restart() error {
	if s.cmd != nil {
		return fmt.Errorf("%s is already running on %s", s.name, s.Addr)
	}
	s.out.Reset()
	cmd := exec.Command(s.bin, s.args(s)...)
	if s.env != nil {
		cmd.Env = append(os.Environ(), s.env...)
	}
	cmd.Stdout, cmd.Stderr = &s.out, &s.out
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %v", s.name, err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	s.cmd, s.exited = cmd, exited
	const within = 20 * time.Second
	for deadline := time.Now().Add(within); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		select {
		case err := <-exited:
			s.cmd = nil
			return fmt.Errorf("%s exited: %v; output:\n%s", s.name, err, s.out.String())
		default:
		}
		// ready, and ours: another test's server may have taken the port
		// between freeAddr and this one's bind (go test runs packages in
		// parallel); it answers the probes, but not to this one's keys, and
		// this one exits (a new port is tried)
		if s.ready != nil {
			if s.ready(s) && s.owns() {
				return nil
			}
		} else if c, err := net.DialTimeout("tcp", s.Addr, 200*time.Millisecond); err == nil {
			c.Close()
			if s.owns() {
				return nil
			}
		}
	}
	s.Stop()
	return fmt.Errorf("%s not serving on %s after %v; output:\n%s", s.name, s.Addr, within, s.out.String())
}

// owns reports whether the server on s.Addr takes this server's keys (each
// Server has its own: uniqueKey).
func (s *Server) owns() bool {
	c, err := s.newClient()
	if err != nil {
		return false
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_, err = c.ListBuckets(ctx)
	return err == nil
}

// newClient is an S3 client of the server on s.Addr with this server's keys.
func (s *Server) newClient() (*minio.Client, error) {
	return minio.New(s.Addr, &minio.Options{Creds: credentials.NewStaticV4(s.AccessKey, s.Secret, ""),
		Region: s.Region, BucketLookup: minio.BucketLookupPath})
}

// uniqueKey is prefix and 16 random hex digits: a test server's own keys.
func uniqueKey(prefix string) string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return prefix + hex.EncodeToString(b)
}

// Stop kills the server (a no-op when it is not running); Restart brings it
// back on the same address and data.
func (s *Server) Stop() {
	if s.cmd == nil {
		return
	}
	_ = s.cmd.Process.Kill()
	<-s.exited
	s.cmd = nil
}

// StoreURL is the s3:// store URL of bucket on this server (path style),
// with each of query ("key=value") appended.
func (s *Server) StoreURL(bucket string, query ...string) string {
	u := "s3://" + bucket + "/?endpoint=" + s.Endpoint + "&path_style=true"
	if len(query) > 0 {
		u += "&" + strings.Join(query, "&")
	}
	return u
}

// SetCredentialsEnv sets the AWS_* variables an S3 store reads its
// credentials and region from, until the test ends.
func (s *Server) SetCredentialsEnv(t testing.TB) {
	t.Helper()
	t.Setenv("AWS_ACCESS_KEY_ID", s.AccessKey)
	t.Setenv("AWS_SECRET_ACCESS_KEY", s.Secret)
	t.Setenv("AWS_REGION", s.Region)
}

// MakeBucket creates a bucket.
func (s *Server) MakeBucket(t testing.TB, name string) {
	t.Helper()
	if err := s.Client.MakeBucket(context.Background(), name, minio.MakeBucketOptions{Region: s.Region}); err != nil {
		t.Fatalf("make bucket %s: %v", name, err)
	}
}

// Upload puts the adapter folder dir's two files under key/ with a plain S3
// client (weights first, then the config, as a deploy tool would).
func (s *Server) Upload(t testing.TB, bucket, key, dir string) {
	t.Helper()
	cfg, weights := adaptertest.Read(t, dir)
	s.Put(t, bucket, key, cfg, weights)
}

// Put uploads an adapter's config and weights under key/ (weights first).
// A PUT versitygw answers with ExistingObjectIsDirectory is tried again
// (up to putTries times): its posix backend creates the object's parent
// folders after writing it and reports any failure there so, and a
// watching store's probe object deleted under the same prefix at that
// moment removes the folders it emptied (store/s3watch.go's ProbeDir): a
// race in the server, not a refusal of the key (TestS3DeployReplaceDelete
// failed so twice in ~10 CI runs).
func (s *Server) Put(t testing.TB, bucket, key string, cfg, weights []byte) {
	t.Helper()
	for _, o := range []struct {
		name string
		b    []byte
	}{{lora.WeightsFile, weights}, {lora.ConfigFile, cfg}} {
		var err error
		for try := 0; try < putTries; try++ {
			if try > 0 {
				time.Sleep(20 * time.Millisecond)
			}
			if _, err = s.Client.PutObject(context.Background(), bucket, key+"/"+o.name, bytes.NewReader(o.b), int64(len(o.b)),
				minio.PutObjectOptions{}); err == nil || minio.ToErrorResponse(err).Code != "ExistingObjectIsDirectory" {
				break
			}
		}
		if err != nil {
			t.Fatal(err)
		}
	}
}

// putTries is how many times Put sends a PUT versitygw's folder race
// refused.
const putTries = 5

func freeAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}
