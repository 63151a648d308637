package server_test

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"

	"github.com/peftd/peftd/runtime/lora"
	"github.com/peftd/peftd/server"
)

// versity is a real S3 server (versitygw, posix backend, installed by
// .ci/setup-s3.sh) the test can stop and restart on the same port and data.
type versity struct {
	bin, addr, root string
	access, secret  string
	region          string
	cmd             *exec.Cmd
	exited          chan error
	out             bytes.Buffer
	client          *minio.Client
}

func versityBinary() (string, error) {
	if p := os.Getenv("PEFTD_VERSITYGW"); p != "" {
		return p, nil
	}
	p, err := filepath.Abs(filepath.Join("..", ".cache", "bin", "versitygw"))
	if err != nil {
		return "", err
	}
	if _, err := os.Stat(p); err != nil {
		return "", fmt.Errorf("%s is missing", p)
	}
	return p, nil
}

// startVersity runs versitygw until the test ends; without the binary the
// test fails (skips with PEFTD_SKIP_S3=1).
func startVersity(t *testing.T) *versity {
	t.Helper()
	if os.Getenv("PEFTD_SKIP_S3") == "1" {
		t.Skip("PEFTD_SKIP_S3=1")
	}
	bin, err := versityBinary()
	if err != nil {
		t.Fatalf("S3 tests need versitygw (%v): run .ci/setup-s3.sh, or set PEFTD_SKIP_S3=1 to skip them", err)
	}
	v := &versity{bin: bin, root: t.TempDir(), access: "peftdtest", secret: "peftdtestsecret", region: "us-east-1"}
	var lastErr error
	for range 3 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		v.addr = l.Addr().String()
		l.Close()
		if lastErr = v.start(); lastErr == nil {
			break
		}
	}
	if lastErr != nil {
		t.Fatalf("versitygw did not start: %v", lastErr)
	}
	t.Cleanup(v.stop)
	v.client, err = minio.New(v.addr, &minio.Options{Creds: credentials.NewStaticV4(v.access, v.secret, ""),
		Region: v.region, BucketLookup: minio.BucketLookupPath})
	if err != nil {
		t.Fatal(err)
	}
	// The server's S3 store takes its credentials from the environment.
	t.Setenv("AWS_ACCESS_KEY_ID", v.access)
	t.Setenv("AWS_SECRET_ACCESS_KEY", v.secret)
	t.Setenv("AWS_REGION", v.region)
	return v
}

// start runs versitygw on v.addr over v.root and waits until it listens.
func (v *versity) start() error {
	v.out.Reset()
	v.cmd = exec.Command(v.bin, "--port", v.addr, "--access", v.access, "--secret", v.secret,
		"--region", v.region, "--quiet", "posix", v.root)
	v.cmd.Stdout, v.cmd.Stderr = &v.out, &v.out
	if err := v.cmd.Start(); err != nil {
		return err
	}
	v.exited = make(chan error, 1)
	go func(cmd *exec.Cmd, ch chan error) { ch <- cmd.Wait() }(v.cmd, v.exited)
	for deadline := time.Now().Add(15 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		select {
		case err := <-v.exited:
			v.cmd = nil
			return fmt.Errorf("versitygw exited: %v: %s", err, v.out.String())
		default:
		}
		if c, err := net.DialTimeout("tcp", v.addr, 200*time.Millisecond); err == nil {
			c.Close()
			return nil
		}
	}
	v.stop()
	return fmt.Errorf("versitygw not listening on %s", v.addr)
}

// stop kills the versitygw this test started.
func (v *versity) stop() {
	if v.cmd == nil {
		return
	}
	_ = v.cmd.Process.Kill()
	<-v.exited
	v.cmd = nil
}

func (v *versity) storeURL(bucket string) string {
	return "s3://" + bucket + "/?endpoint=http://" + v.addr + "&path_style=true&notify=poll&poll=200ms"
}

func (v *versity) makeBucket(t *testing.T, name string) {
	t.Helper()
	if err := v.client.MakeBucket(context.Background(), name, minio.MakeBucketOptions{Region: v.region}); err != nil {
		t.Fatal(err)
	}
}

// upload puts a fixture adapter under id with a plain S3 client (weights
// first, then the config, as a deploy tool would).
func (v *versity) upload(t *testing.T, bucket, id, fixtureAdapter string) {
	t.Helper()
	c, w := readAdapter(t, adapterDir(fixtureAdapter))
	for _, o := range []struct {
		name string
		b    []byte
	}{{lora.WeightsFile, w}, {lora.ConfigFile, c}} {
		if _, err := v.client.PutObject(context.Background(), bucket, id+"/"+o.name, bytes.NewReader(o.b), int64(len(o.b)),
			minio.PutObjectOptions{}); err != nil {
			t.Fatal(err)
		}
	}
}

// TestS3DeployReplaceDelete serves from a real S3 server: an adapter uploaded
// with a plain S3 client serves without a restart, a replacement's new
// weights serve new requests, a deletion answers 404.
func TestS3DeployReplaceDelete(t *testing.T) {
	v := startVersity(t)
	v.makeBucket(t, "models")
	_, url := start(t, server.Config{Store: v.storeURL("models"), Slots: 2})

	if _, status := tier(t, url, "prod"); status != 404 {
		t.Fatalf("prod before upload: %d", status)
	}
	t0 := time.Now()
	v.upload(t, "models", "prod", "qv-r8")
	eventually(t, 10*time.Second, "the uploaded adapter to deploy", func() bool { _, s := tier(t, url, "prod"); return s == 200 })
	t.Logf("deployed %v after the upload", time.Since(t0))
	qv := caseFor(t, "qv-r8")
	if status, got, body := generate(t, url, "prod", qv); status != 200 || !slices.Equal(got, qv.Greedy) {
		t.Fatalf("prod (qv-r8): %d %v, want %v: %s", status, got, qv.Greedy, body)
	}
	ver := do(t, "GET", url+"/v1/adapters/prod", nil).json(t)["version"]

	// Replace with other weights (all-r16): new requests get them.
	t0 = time.Now()
	v.upload(t, "models", "prod", "all-r16")
	eventually(t, 10*time.Second, "the replacement", func() bool {
		return do(t, "GET", url+"/v1/adapters/prod", nil).json(t)["version"] != ver
	})
	t.Logf("replaced %v after the upload", time.Since(t0))
	all := caseFor(t, "all-r16")
	if status, got, body := generate(t, url, "prod", all); status != 200 || !slices.Equal(got, all.Greedy) {
		t.Fatalf("prod (all-r16): %d %v, want %v: %s", status, got, all.Greedy, body)
	}

	// Delete: 404.
	t0 = time.Now()
	for _, f := range []string{lora.ConfigFile, lora.WeightsFile} {
		if err := v.client.RemoveObject(context.Background(), "models", "prod/"+f, minio.RemoveObjectOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, 10*time.Second, "the deletion", func() bool { _, s := tier(t, url, "prod"); return s == 404 })
	t.Logf("undeployed %v after the delete", time.Since(t0))
	r := do(t, "POST", url+"/v1/completions", map[string]any{"model": "prod", "prompt": all.Prompt, "max_tokens": 2})
	if r.status != 404 {
		t.Errorf("deleted adapter: %d %s", r.status, r.body)
	}
}

// TestStoreOutage: with the S3 server down a resident adapter keeps serving
// and a cold one (listed, never loaded, not in the disk cache) gets a 503
// naming the store error; once the server is back the cold one serves.
func TestStoreOutage(t *testing.T) {
	v := startVersity(t)
	v.makeBucket(t, "models")
	v.upload(t, "models", "hot", "qv-r8")
	v.upload(t, "models", "cold", "all-r16")
	_, url := start(t, server.Config{Store: v.storeURL("models"), Slots: 2})
	qv, all := caseFor(t, "qv-r8"), caseFor(t, "all-r16")
	if status, got, body := generate(t, url, "hot", qv); status != 200 || !slices.Equal(got, qv.Greedy) {
		t.Fatalf("hot: %d %v: %s", status, got, body)
	}
	if got, _ := tier(t, url, "cold"); got != "store" {
		t.Fatalf("cold is at %q, want store", got)
	}

	v.stop()
	t0 := time.Now()
	if status, got, body := generate(t, url, "hot", qv); status != 200 || !slices.Equal(got, qv.Greedy) {
		t.Errorf("hot during the outage: %d %v, want %v: %s", status, got, qv.Greedy, body)
	}
	t.Logf("hot served during the outage in %v", time.Since(t0))
	t0 = time.Now()
	r := do(t, "POST", url+"/v1/completions", map[string]any{"model": "cold", "prompt": all.Prompt, "max_tokens": len(all.Greedy),
		"temperature": 0, "ignore_eos": true})
	t.Logf("cold during the outage: %v: %d %s", time.Since(t0), r.status, r.body)
	if r.status != 503 {
		t.Fatalf("cold during the outage: %d, want 503: %s", r.status, r.body)
	}
	if msg := r.errMessage(t); !strings.Contains(msg, "store") || !strings.Contains(msg, "connection refused") {
		t.Errorf("503 message %q does not name the store error", msg)
	}

	if err := v.start(); err != nil {
		t.Fatal(err)
	}
	t0 = time.Now()
	if status, got, body := generate(t, url, "cold", all); status != 200 || !slices.Equal(got, all.Greedy) {
		t.Errorf("cold after the outage: %d %v, want %v: %s", status, got, all.Greedy, body)
	}
	t.Logf("cold served %v after the store came back", time.Since(t0))
}
