package store

import (
	"io"
	"net/http"
	"sync/atomic"
	"time"
)

// streamTracker sees the bytes of one notification stream (events and
// MinIO's pings, which minio-go does not pass on) through the transport.
type streamTracker struct {
	last      atomic.Int64 // UnixNano of the last bytes read; 0: none yet
	conns     atomic.Int32
	reconnect chan struct{} // minio-go reopened the stream (events may be lost)
}

type streamTrackerKey struct{}

func (t *streamTracker) lastRead() time.Time {
	if n := t.last.Load(); n != 0 {
		return time.Unix(0, n)
	}
	return time.Time{}
}

// trackingTransport wraps the S3 client's transport: a response to a
// request whose context holds a streamTracker reports its reads there.
type trackingTransport struct{ base http.RoundTripper }

func (t trackingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	resp, err := t.base.RoundTrip(r)
	if err != nil || resp.StatusCode != http.StatusOK {
		return resp, err
	}
	if tr, ok := r.Context().Value(streamTrackerKey{}).(*streamTracker); ok {
		if tr.conns.Add(1) > 1 {
			select {
			case tr.reconnect <- struct{}{}:
			default:
			}
		}
		resp.Body = &trackedBody{ReadCloser: resp.Body, t: tr}
	}
	return resp, nil
}

type trackedBody struct {
	io.ReadCloser
	t *streamTracker
}

func (b *trackedBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if n > 0 {
		b.t.last.Store(time.Now().UnixNano())
	}
	return n, err
}
