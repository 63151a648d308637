package store_test

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"net/http"
	"sync"
	"testing"

	"github.com/peftd/peftd/internal/s3test"
	"github.com/peftd/peftd/loader/store"
)

// onRange runs fn once, before the first ranged GET goes out.
type onRange struct {
	once sync.Once
	fn   func()
}

func (o *onRange) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.Method == http.MethodGet && r.Header.Get("Range") != "" && o.fn != nil {
		o.once.Do(o.fn)
	}
	return http.DefaultTransport.RoundTrip(r)
}

// TestS3RangedGet: weights of 50 MB download as parallel byte ranges and
// arrive byte for byte, with progress counting up to the size; one stream
// gives the same; the size bound still refuses; and weights replaced while
// their ranges download are read again whole, so Get returns one version
// (the new one) with its ETag, never a mix.
func TestS3RangedGet(t *testing.T) {
	srv := s3test.Start(t)
	srv.MakeBucket(t, "bkt")
	rng := rand.New(rand.NewPCG(7, 8))
	random := func(n int) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		return b
	}
	hook := &onRange{}
	open := func(streams int, tr http.RoundTripper) store.Store {
		s, err := store.NewS3(store.S3Options{Endpoint: srv.Endpoint, Region: srv.Region, Bucket: "bkt", PathStyle: true,
			AccessKey: srv.AccessKey, SecretKey: srv.Secret, Notify: store.NotifyPoll, FetchStreams: streams, Transport: tr})
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	ctx := context.Background()
	w := random(50<<20 + 777)
	cfg := []byte(`{"r":8}`)
	plain := open(1, nil)
	etag, err := plain.Put(ctx, "a", cfg, w)
	if err != nil {
		t.Fatal(err)
	}
	for _, streams := range []int{8, 1} {
		var last int64
		monotone := true
		c, got, tag, err := open(streams, hook).Get(ctx, "a", store.GetOptions{Progress: func(done, total int64) {
			monotone = monotone && done > last && total == int64(len(w))
			last = done
		}})
		if err != nil || !bytes.Equal(got, w) || !bytes.Equal(c, cfg) || tag != etag {
			t.Fatalf("%d streams: %v, weights equal %v, etag %s (put %s)", streams, err, bytes.Equal(got, w), tag, etag)
		}
		if !monotone || last != int64(len(w)) {
			t.Errorf("%d streams: progress monotone %v, ended at %d of %d", streams, monotone, last, len(w))
		}
	}
	if _, _, _, err := open(8, nil).Get(ctx, "a", store.GetOptions{MaxBytes: int64(len(w)) - 1}); !errors.Is(err, store.ErrTooLarge) {
		t.Errorf("a bound below the size: %v, want ErrTooLarge", err)
	}
	// Replaced just before the first range is asked for.
	w2 := random(40<<20 + 5)
	var etag2 string
	hook.fn = func() {
		var err error
		if etag2, err = plain.Put(ctx, "a", cfg, w2); err != nil {
			t.Error(err)
		}
	}
	_, got, tag, err := open(8, hook).Get(ctx, "a", store.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, w2) || tag != etag2 {
		t.Errorf("replaced during the download: got the new weights %v (old %v), etag %s, want %s", bytes.Equal(got, w2), bytes.Equal(got, w), tag, etag2)
	}
}
