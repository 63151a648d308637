package store_test

import (
	"context"
	"testing"
	"time"

	"github.com/peftd/peftd/internal/s3test"
	"github.com/peftd/peftd/loader/store"
)

func newS3(t *testing.T, srv *s3test.Server, bucket, prefix, notify string) *store.S3 {
	t.Helper()
	s, err := store.NewS3(store.S3Options{Endpoint: srv.Endpoint, Region: srv.Region, Bucket: bucket, Prefix: prefix,
		PathStyle: true, AccessKey: srv.AccessKey, SecretKey: srv.Secret, Notify: notify, PollInterval: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestS3Store(t *testing.T) {
	srv := s3test.Start(t)
	srv.MakeBucket(t, "adapters")
	for _, c := range []struct{ name, prefix, notify string }{
		{"poll-prefix", "team/a", store.NotifyPoll},
		{"auto-root", "", store.NotifyAuto}, // versitygw has no ListenBucketNotification: falls back to polling
	} {
		t.Run(c.name, func(t *testing.T) {
			s := newS3(t, srv, "adapters", c.prefix, c.notify)
			storeContract(t, s)
			if err := s.Delete(context.Background(), "a-1"); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestS3EnvCredentialsAndURL(t *testing.T) {
	srv := s3test.Start(t)
	srv.MakeBucket(t, "bkt")
	t.Setenv("AWS_ACCESS_KEY_ID", srv.AccessKey)
	t.Setenv("AWS_SECRET_ACCESS_KEY", srv.Secret)
	s, err := store.Open("s3://bkt/p?endpoint="+srv.Endpoint+"&region=us-east-1&path_style=true&notify=poll", nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	etag, err := s.Put(ctx, "x", []byte("{}"), []byte("w"))
	if err != nil {
		t.Fatal(err)
	}
	o, err := s.Stat(ctx, "x")
	if err != nil || o.ETag != etag {
		t.Fatalf("Stat = %+v, %v (put %s)", o, err, etag)
	}
	// The objects sit at <prefix>/<id>/<file>.
	if _, err := srv.Client.StatObject(ctx, "bkt", "p/x/adapter_config.json", minioStatOpts()); err != nil {
		t.Errorf("object key layout: %v", err)
	}
}
