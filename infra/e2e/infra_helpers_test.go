package e2e

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"

	"github.com/peftd/peftd/runtime/lora"
)

// versity is a real S3 server (versitygw, posix backend, installed by
// .ci/setup-s3.sh into .cache/bin; PEFTD_VERSITYGW overrides the path).
type versity struct {
	addr, access, secret, region string
	cmd                          *exec.Cmd
	exited                       chan error
	out                          syncBuffer
	client                       *minio.Client
}

// startVersity runs versitygw until the test ends; without the binary the
// test fails (skips with PEFTD_SKIP_S3=1). It sets the AWS_* variables the
// servers' S3 stores read.
func startVersity(t *testing.T) *versity {
	t.Helper()
	if os.Getenv("PEFTD_SKIP_S3") == "1" {
		t.Skip("PEFTD_SKIP_S3=1")
	}
	bin := os.Getenv("PEFTD_VERSITYGW")
	if bin == "" {
		bin = filepath.Join(repoRoot(t), ".cache", "bin", "versitygw")
	}
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("this test needs versitygw (%v): run .ci/setup-s3.sh, or set PEFTD_SKIP_S3=1 to skip it", err)
	}
	v := &versity{access: "peftdtest", secret: "peftdtestsecret", region: "us-east-1"}
	root := t.TempDir()
	var err error
	for range 3 {
		v.addr = freePort(t)
		if err = v.start(bin, root); err == nil {
			break
		}
	}
	if err != nil {
		t.Fatalf("versitygw did not start: %v", err)
	}
	t.Cleanup(func() {
		_ = v.cmd.Process.Kill()
		<-v.exited
	})
	v.client, err = minio.New(v.addr, &minio.Options{Creds: credentials.NewStaticV4(v.access, v.secret, ""),
		Region: v.region, BucketLookup: minio.BucketLookupPath})
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("AWS_ACCESS_KEY_ID", v.access)
	t.Setenv("AWS_SECRET_ACCESS_KEY", v.secret)
	t.Setenv("AWS_REGION", v.region)
	return v
}

func (v *versity) start(bin, root string) error {
	v.cmd = exec.Command(bin, "--port", v.addr, "--access", v.access, "--secret", v.secret,
		"--region", v.region, "--quiet", "posix", root)
	v.cmd.Stdout, v.cmd.Stderr = &v.out, &v.out
	if err := v.cmd.Start(); err != nil {
		return err
	}
	exited := make(chan error, 1)
	go func(cmd *exec.Cmd) { exited <- cmd.Wait() }(v.cmd)
	v.exited = exited
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		select {
		case err := <-exited:
			return fmt.Errorf("versitygw exited: %v: %s", err, v.out.String())
		default:
		}
		if c, err := net.DialTimeout("tcp", v.addr, 200*time.Millisecond); err == nil {
			c.Close()
			return nil
		}
	}
	_ = v.cmd.Process.Kill()
	<-exited
	return fmt.Errorf("versitygw not listening on %s: %s", v.addr, v.out.String())
}

// storeURL is the s3:// store URL of bucket, polled every 200ms.
func (v *versity) storeURL(bucket string) string {
	return "s3://" + bucket + "/?endpoint=http://" + v.addr + "&path_style=true&notify=poll&poll=200ms"
}

func (v *versity) makeBucket(t *testing.T, name string) {
	t.Helper()
	if err := v.client.MakeBucket(context.Background(), name, minio.MakeBucketOptions{Region: v.region}); err != nil {
		t.Fatal(err)
	}
}

// upload puts the adapter folder dir under id with a plain S3 client
// (weights first, then the config, as a deploy tool would).
func (v *versity) upload(t *testing.T, bucket, id, dir string) {
	t.Helper()
	for _, f := range []string{lora.WeightsFile, lora.ConfigFile} {
		b, err := os.ReadFile(filepath.Join(dir, f))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := v.client.PutObject(context.Background(), bucket, id+"/"+f, bytes.NewReader(b), int64(len(b)),
			minio.PutObjectOptions{}); err != nil {
			t.Fatal(err)
		}
	}
}

// haproxy runs infra/haproxy/haproxy.cfg as shipped (hashing, bounded load,
// health checks) with only its three servers rewritten to backends and its
// frontends bound to free loopback ports.
type haproxy struct {
	url, stats string
	out        syncBuffer
}

// requireHAProxy returns haproxy's path; without it the test fails (CI
// installs it with .ci/setup-infra.sh) unless PEFTD_SKIP_INFRA=1 skips it.
func requireHAProxy(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("haproxy")
	if err == nil {
		return p
	}
	if os.Getenv("PEFTD_SKIP_INFRA") == "1" {
		t.Skip("haproxy not installed (PEFTD_SKIP_INFRA=1)")
	}
	t.Fatal("haproxy not installed: run `bash .ci/setup-infra.sh` (or set PEFTD_SKIP_INFRA=1 to skip this test)")
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
