package server_test

import (
	"bytes"
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/peftd/peftd/internal/s3test"
	"github.com/peftd/peftd/internal/testlog"
	"github.com/peftd/peftd/runtime/lora"
	"github.com/peftd/peftd/server"
)

// startVersity runs a real S3 server (versitygw) until the test ends, with
// the AWS_* variables the server's S3 store reads its credentials from set.
func startVersity(t *testing.T) *s3test.Server {
	t.Helper()
	v := s3test.Start(t)
	v.SetCredentialsEnv(t)
	return v
}

// storeURL is bucket's store URL, polled every 200ms.
func storeURL(v *s3test.Server, bucket string) string {
	return v.StoreURL(bucket, "notify=poll", "poll=200ms")
}

// TestS3DeployReplaceDelete serves from a real S3 server: an adapter uploaded
// with a plain S3 client serves without a restart, a replacement's new
// weights serve new requests, a deletion answers 404.
func TestS3DeployReplaceDelete(t *testing.T) {
	v := startVersity(t)
	v.MakeBucket(t, "models")
	_, url := start(t, server.Config{Store: storeURL(v, "models"), Slots: 2})

	if _, status := tier(t, url, "prod"); status != 404 {
		t.Fatalf("prod before upload: %d", status)
	}
	t0 := time.Now()
	v.Upload(t, "models", "prod", adapterDir("qv-r8"))
	eventually(t, 10*time.Second, "the uploaded adapter to deploy", func() bool { _, s := tier(t, url, "prod"); return s == 200 })
	t.Logf("deployed %v after the upload", time.Since(t0))
	qv := caseFor(t, "qv-r8")
	if status, got, body := generate(t, url, "prod", qv); status != 200 || !slices.Equal(got, qv.Greedy) {
		t.Fatalf("prod (qv-r8): %d %v, want %v: %s", status, got, qv.Greedy, body)
	}
	ver := do(t, "GET", url+"/v1/adapters/prod", nil).JSON(t)["version"]

	// Replace with other weights (all-r16): new requests get them.
	t0 = time.Now()
	v.Upload(t, "models", "prod", adapterDir("all-r16"))
	eventually(t, 10*time.Second, "the replacement", func() bool {
		return do(t, "GET", url+"/v1/adapters/prod", nil).JSON(t)["version"] != ver
	})
	t.Logf("replaced %v after the upload", time.Since(t0))
	all := caseFor(t, "all-r16")
	if status, got, body := generate(t, url, "prod", all); status != 200 || !slices.Equal(got, all.Greedy) {
		t.Fatalf("prod (all-r16): %d %v, want %v: %s", status, got, all.Greedy, body)
	}

	// Delete: 404.
	t0 = time.Now()
	for _, f := range []string{lora.ConfigFile, lora.WeightsFile} {
		if err := v.Client.RemoveObject(context.Background(), "models", "prod/"+f, minio.RemoveObjectOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, 10*time.Second, "the deletion", func() bool { _, s := tier(t, url, "prod"); return s == 404 })
	t.Logf("undeployed %v after the delete", time.Since(t0))
	r := do(t, "POST", url+"/v1/completions", map[string]any{"model": "prod", "prompt": all.Prompt, "max_tokens": 2})
	if r.Status != 404 {
		t.Errorf("deleted adapter: %d %s", r.Status, r.Body)
	}
}

// TestStoreOutage: with the S3 server down a resident adapter keeps serving
// and a cold one (listed, never loaded, not in the disk cache) gets a 503
// naming the store error; once the server is back the cold one serves.
func TestStoreOutage(t *testing.T) {
	v := startVersity(t)
	v.MakeBucket(t, "models")
	v.Upload(t, "models", "hot", adapterDir("qv-r8"))
	v.Upload(t, "models", "cold", adapterDir("all-r16"))
	_, url := start(t, server.Config{Store: storeURL(v, "models"), Slots: 2})
	qv, all := caseFor(t, "qv-r8"), caseFor(t, "all-r16")
	if status, got, body := generate(t, url, "hot", qv); status != 200 || !slices.Equal(got, qv.Greedy) {
		t.Fatalf("hot: %d %v: %s", status, got, body)
	}
	if got, _ := tier(t, url, "cold"); got != "store" {
		t.Fatalf("cold is at %q, want store", got)
	}

	v.Stop()
	t0 := time.Now()
	if status, got, body := generate(t, url, "hot", qv); status != 200 || !slices.Equal(got, qv.Greedy) {
		t.Errorf("hot during the outage: %d %v, want %v: %s", status, got, qv.Greedy, body)
	}
	t.Logf("hot served during the outage in %v", time.Since(t0))
	t0 = time.Now()
	r := do(t, "POST", url+"/v1/completions", map[string]any{"model": "cold", "prompt": all.Prompt, "max_tokens": len(all.Greedy),
		"temperature": 0, "ignore_eos": true})
	t.Logf("cold during the outage: %v: %d %s", time.Since(t0), r.Status, r.Body)
	if r.Status != 503 {
		t.Fatalf("cold during the outage: %d, want 503: %s", r.Status, r.Body)
	}
	if msg := r.ErrMessage(t); !strings.Contains(msg, "store") || !strings.Contains(msg, "connection refused") {
		t.Errorf("503 message %q does not name the store error", msg)
	}

	if err := v.Restart(); err != nil {
		t.Fatal(err)
	}
	t0 = time.Now()
	if status, got, body := generate(t, url, "cold", all); status != 200 || !slices.Equal(got, all.Greedy) {
		t.Errorf("cold after the outage: %d %v, want %v: %s", status, got, all.Greedy, body)
	}
	t.Logf("cold served %v after the store came back", time.Since(t0))
}

// TestModelFromS3 starts a server whose base model is an s3:// URL: it is
// mirrored to the cache with progress and serves exactly.
func TestModelFromS3(t *testing.T) {
	v := startVersity(t)
	v.MakeBucket(t, "base")
	t.Setenv("PEFTD_CACHE", t.TempDir())
	for _, f := range []string{"config.json", "model.safetensors"} {
		b, err := os.ReadFile(filepath.Join(baseDir(), f))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := v.Client.PutObject(context.Background(), "base", "tiny/"+f, bytes.NewReader(b), int64(len(b)), minio.PutObjectOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	var logs testlog.Buffer
	model := strings.Replace(v.StoreURL("base"), "s3://base/", "s3://base/tiny", 1)
	_, url := start(t, server.Config{Model: model, Store: t.TempDir(), Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	c := caseFor(t, "")
	if status, got, body := generate(t, url, "tiny", c); status != 200 || !slices.Equal(got, c.Greedy) {
		t.Fatalf("base from S3: %d %v, want %v: %s", status, got, c.Greedy, body)
	}
	for _, want := range []string{`msg="downloading model" file=model.safetensors`, `msg="model fetched"`} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("logs lack %q:\n%s", want, logs.String())
		}
	}
}
