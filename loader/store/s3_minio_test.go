package store_test

import (
	"context"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/notification"

	"github.com/peftd/peftd/internal/s3test"
	"github.com/peftd/peftd/internal/testlog"
	"github.com/peftd/peftd/loader/store"
)

// These tests run a real MinIO server (built by .ci/setup-minio.sh): an
// adapter uploaded by another S3 client must reach Watch within 1 s when
// the bucket notification stream works, and within the poll interval when
// it does not.

// minioStore is an S3 store on srv with the default watch settings (poll
// 5s, resync 1m) unless opts says otherwise.
func minioStore(t *testing.T, srv *s3test.Server, bucket, prefix string, opts store.S3Options) *store.S3 {
	t.Helper()
	opts.Endpoint, opts.Region, opts.Bucket, opts.Prefix, opts.PathStyle = srv.Endpoint, srv.Region, bucket, prefix, true
	opts.AccessKey, opts.SecretKey = srv.AccessKey, srv.Secret
	if opts.Logger == nil {
		opts.Logger = testlog.Logger(t)
	}
	s, err := store.NewS3(opts)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func watch(t *testing.T, s store.Store) <-chan store.Event {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	ch := s.Watch(ctx)
	t.Cleanup(func() {
		cancel()
		for range ch {
		}
	})
	return ch
}

// uploadAndWait uploads adapter id with srv's own client (not the store's)
// and returns how long until Watch reported it.
func uploadAndWait(t *testing.T, srv *s3test.Server, ch <-chan store.Event, bucket, key, id string, within time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	srv.Put(t, bucket, key, []byte(`{"r":8}`), []byte("weights-"+id))
	timeout := time.After(within)
	for {
		select {
		case ev, ok := <-ch:
			if !ok {
				t.Fatal("watch ended")
			}
			if ev.ID == id && ev.Type == store.EventPut {
				return time.Since(start)
			}
		case <-timeout:
			t.Fatalf("upload of %s not seen within %v", id, within)
		}
	}
}

func waitFor(t *testing.T, within time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > within {
			t.Fatalf("%s: not within %v", what, within)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return time.Since(start)
}

// silentListen is a stream that opens and never sends (the MinIO of the
// issue, whose ListenBucketNotification sent nothing at all).
func silentListen(ctx context.Context) <-chan notification.Info {
	ch := make(chan notification.Info)
	go func() { <-ctx.Done(); close(ch) }()
	return ch
}

func TestMinIOUploadSeenThroughEvents(t *testing.T) {
	srv := s3test.StartMinIO(t)
	srv.MakeBucket(t, "events")
	s := minioStore(t, srv, "events", "adapters", store.S3Options{})
	ch := watch(t, s)
	proof := waitFor(t, 20*time.Second, "notification stream proven", func() bool { return store.ListenProven(s) })
	t.Logf("stream proven %v after Watch", proof.Round(time.Millisecond))
	for i, id := range []string{"first", "second", "third"} {
		d := uploadAndWait(t, srv, ch, "events", "adapters/"+id, id, 10*time.Second)
		t.Logf("upload %d seen after %v (events; poll interval 5s)", i+1, d.Round(time.Millisecond))
		if d > time.Second {
			t.Errorf("upload of %s seen after %v, want within 1s", id, d)
		}
	}
	if !store.ListenProven(s) {
		t.Error("stream no longer trusted")
	}
	// The probe objects are gone, and never listed.
	objs, err := s.List(context.Background())
	if err != nil || len(objs) != 3 {
		t.Errorf("List = %d objects, %v; want the 3 adapters", len(objs), err)
	}
	waitFor(t, 5*time.Second, "probe objects deleted", func() bool {
		for oi := range srv.Client.ListObjects(context.Background(), "events", minio.ListObjectsOptions{Prefix: "adapters/" + store.ProbeDir, Recursive: true}) {
			if oi.Err == nil {
				return false
			}
		}
		return true
	})
	// A delete is seen through events too.
	start := time.Now()
	for _, f := range []string{store.ConfigFile, store.WeightsFile} {
		if err := srv.Client.RemoveObject(context.Background(), "events", "adapters/first/"+f, minio.RemoveObjectOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	for ev := range ch {
		if ev.ID == "first" && ev.Type == store.EventDelete {
			break
		}
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("delete seen after %v", d)
	}
}

func TestMinIOSilentStreamPolls(t *testing.T) {
	// MinIO as upstream builds it: its ListenBucketNotification stream
	// sends nothing at all (see .ci/setup-minio.sh).
	srv := s3test.StartMinIO(t, "PEFTD_MINIO_SILENT_LISTEN=1")
	srv.MakeBucket(t, "silent")
	var logs testlog.Buffer
	s := minioStore(t, srv, "silent", "", store.S3Options{Logger: slog.New(slog.NewTextHandler(&logs, nil))}) // poll: 5s
	ch := watch(t, s)
	time.Sleep(500 * time.Millisecond) // the baseline listing
	const poll = 5 * time.Second
	for _, id := range []string{"quiet", "hush"} {
		d := uploadAndWait(t, srv, ch, "silent", id, id, poll+3*time.Second)
		t.Logf("upload %s seen after %v (silent stream; poll interval %v)", id, d.Round(time.Millisecond), poll)
		if d > poll+time.Second {
			t.Errorf("upload seen after %v, want within the poll interval %v", d, poll)
		}
	}
	if store.ListenProven(s) {
		t.Error("a silent stream was trusted")
	}
	out := logs.String()
	if n := strings.Count(out, "bucket notifications not proven"); n != 1 {
		t.Errorf("%d 'not proven' log lines, want 1:\n%s", n, out)
	}
	if !strings.Contains(out, "no event for a probe object") {
		t.Errorf("the log does not say why:\n%s", out)
	}
	// Every probe object is deleted.
	waitFor(t, 5*time.Second, "probe objects deleted", func() bool {
		for oi := range srv.Client.ListObjects(context.Background(), "silent", minio.ListObjectsOptions{Prefix: store.ProbeDir, Recursive: true}) {
			if oi.Err == nil {
				return false
			}
		}
		return true
	})
}

func TestMinIOFallbackWhenStreamDies(t *testing.T) {
	srv := s3test.StartMinIO(t)
	srv.MakeBucket(t, "fallback")
	t.Run("server-restart", func(t *testing.T) {
		// The server goes away: the stream fails, polling resumes; when it is
		// back, the stream is reopened and proven again.
		s := minioStore(t, srv, "fallback", "r", store.S3Options{PollInterval: time.Second})
		store.SetListenTiming(s, 2*time.Second, 25*time.Second, 100*time.Millisecond, time.Second)
		ch := watch(t, s)
		waitFor(t, 20*time.Second, "proven", func() bool { return store.ListenProven(s) })
		srv.Stop()
		d := waitFor(t, 10*time.Second, "back to polling", func() bool { return !store.ListenProven(s) })
		t.Logf("stream loss noticed after %v", d.Round(time.Millisecond))
		if err := srv.Restart(); err != nil {
			t.Fatal(err)
		}
		d = waitFor(t, 25*time.Second, "proven again", func() bool { return store.ListenProven(s) })
		t.Logf("stream proven again %v after the restart", d.Round(time.Millisecond))
		if d := uploadAndWait(t, srv, ch, "fallback", "r/back", "back", 5*time.Second); d > time.Second {
			t.Errorf("upload after the restart seen after %v", d)
		}
	})
	t.Run("cut-stream-comes-back-silent", func(t *testing.T) {
		// A proven stream is cut, and every stream after it is silent:
		// uploads are seen by polling, within the poll interval.
		s := minioStore(t, srv, "fallback", "c", store.S3Options{PollInterval: 2 * time.Second})
		store.SetListenTiming(s, time.Second, 25*time.Second, 100*time.Millisecond, time.Second)
		real := store.RealListen(s)
		// Real streams until the test cuts a proven one (a real stream that
		// fails on its own before, e.g. on a server still starting, is just
		// reopened); silent ones after.
		var mu sync.Mutex
		var cut context.CancelFunc
		cutDone := false
		store.SetListen(s, func(ctx context.Context) <-chan notification.Info {
			mu.Lock()
			defer mu.Unlock()
			if cutDone {
				return silentListen(ctx)
			}
			ctx, cut = context.WithCancel(ctx)
			return real(ctx)
		})
		ch := watch(t, s)
		waitFor(t, 20*time.Second, "proven", func() bool { return store.ListenProven(s) })
		mu.Lock()
		cutDone = true
		cut()
		mu.Unlock()
		waitFor(t, 10*time.Second, "back to polling", func() bool { return !store.ListenProven(s) })
		for _, id := range []string{"p1", "p2"} {
			d := uploadAndWait(t, srv, ch, "fallback", "c/"+id, id, 6*time.Second)
			t.Logf("upload %s seen after %v (polling every 2s after the cut)", id, d.Round(time.Millisecond))
			if d > 3*time.Second {
				t.Errorf("upload seen after %v, want within the poll interval (2s)", d)
			}
		}
		if store.ListenProven(s) {
			t.Error("a silent stream was trusted")
		}
	})
}

func TestMinIOProbeNeverListed(t *testing.T) {
	if err := store.ValidateID(store.ProbeDir); err == nil || !strings.Contains(err.Error(), "starts with") {
		t.Fatalf("ValidateID(%q) = %v; the probe folder must never be an adapter ID", store.ProbeDir, err)
	}
}
