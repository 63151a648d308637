package store_test

import (
	"bytes"
	"context"
	"io"
	"math/rand/v2"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/peftd/peftd/internal/s3test"
	"github.com/peftd/peftd/loader/store"
)

// flipTransport flips one byte in the middle of the body of the PUTs of
// weights while on is set: corruption in transit.
type flipTransport struct{ on atomic.Bool }

func (f *flipTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	if f.on.Load() && r.Method == http.MethodPut && r.Body != nil && strings.Contains(r.URL.Path, store.WeightsFile) {
		r.Body = &flipReader{r: r.Body, at: r.ContentLength / 2}
	}
	return http.DefaultTransport.RoundTrip(r)
}

type flipReader struct {
	r     io.ReadCloser
	n, at int64
}

func (f *flipReader) Read(p []byte) (int, error) {
	k, err := f.r.Read(p)
	if f.n <= f.at && f.at < f.n+int64(k) {
		p[f.at-f.n] ^= 0x10
	}
	f.n += int64(k)
	return k, err
}

func (f *flipReader) Close() error { return f.r.Close() }

// TestS3PutIntegrity: over plain HTTP, weights large enough for a multipart
// upload arrive byte for byte, unsigned with a CRC32C trailer (the default)
// or signed (sign_payload); a byte flipped in transit fails the Put either
// way, and the adapter is not listed.
func TestS3PutIntegrity(t *testing.T) {
	srv := s3test.Start(t)
	srv.MakeBucket(t, "bkt")
	w := make([]byte, 40<<20+123)
	rng := rand.New(rand.NewPCG(5, 6))
	for i := range w {
		w[i] = byte(rng.Uint32())
	}
	ctx := context.Background()
	for _, sign := range []bool{false, true} {
		tr := &flipTransport{}
		s, err := store.NewS3(store.S3Options{Endpoint: srv.Endpoint, Region: srv.Region, Bucket: "bkt", PathStyle: true,
			AccessKey: srv.AccessKey, SecretKey: srv.Secret, Notify: store.NotifyPoll, SignPayload: sign, Transport: tr})
		if err != nil {
			t.Fatal(err)
		}
		id := map[bool]string{false: "unsigned", true: "signed"}[sign]
		etag, err := s.Put(ctx, id, []byte(`{"r":8}`), w)
		if err != nil {
			t.Fatalf("%s: %v", id, err)
		}
		cfg, got, getTag, err := s.Get(ctx, id, store.GetOptions{})
		if err != nil || !bytes.Equal(got, w) || string(cfg) != `{"r":8}` || getTag != etag {
			t.Fatalf("%s: Get: %v, weights equal %v, config %q, etag %s (put %s)", id, err, bytes.Equal(got, w), cfg, getTag, etag)
		}
		tr.on.Store(true)
		if _, err := s.Put(ctx, id+"-flipped", []byte(`{"r":8}`), w); err == nil {
			t.Errorf("%s: a byte flipped in transit was stored", id)
		} else {
			t.Logf("%s, a byte flipped: %v", id, err)
		}
		list, err := s.List(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, o := range list {
			if o.ID == id+"-flipped" {
				t.Errorf("%s: the corrupt upload is listed", id)
			}
		}
	}
}
