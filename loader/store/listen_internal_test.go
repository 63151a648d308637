package store

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/notification"
	"github.com/peftd/peftd/internal/testlog"
)

// fakeBucket is a bucket with a notification stream, for the mode logic
// of listenWatch without a server.
type fakeBucket struct {
	mu      sync.Mutex
	objs    map[string]string // id -> etag
	lists   int
	listens int
	stream  chan notification.Info // the open stream, nil if none
	echo    bool                   // the stream delivers probe events
	probes  int                    // probe PUTs
	removed int                    // probe DELETEs
	denied  bool                   // probe PUTs are refused
	listErr error
	// deafFor: a new stream drops what happens this soon after it was
	// opened (the server has not subscribed it yet).
	deafFor   time.Duration
	deafUntil time.Time
}

func newFakeBucket() *fakeBucket { return &fakeBucket{objs: map[string]string{}, echo: true} }

func (f *fakeBucket) list(ctx context.Context) ([]Object, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.lists++
	if f.listErr != nil {
		return nil, f.listErr
	}
	var out []Object
	for id, e := range f.objs {
		out = append(out, Object{ID: id, ETag: e})
	}
	return out, nil
}

func (f *fakeBucket) listen(ctx context.Context) <-chan notification.Info {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.listens++
	ch := make(chan notification.Info, 64)
	f.stream = ch
	f.deafUntil = time.Now().Add(f.deafFor)
	go func() {
		<-ctx.Done()
		f.mu.Lock()
		defer f.mu.Unlock()
		if f.stream == ch {
			f.stream = nil
		}
		close(ch)
	}()
	return ch
}

// pushLocked sends on the open stream, if any (f.mu held).
func (f *fakeBucket) pushLocked(info notification.Info) {
	if f.stream != nil && time.Now().After(f.deafUntil) {
		select {
		case f.stream <- info:
		default:
		}
	}
}

func (f *fakeBucket) push(info notification.Info) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.pushLocked(info)
}

func record(name, key string) notification.Info {
	var e notification.Event
	e.EventName, e.S3.Object.Key = name, key
	return notification.Info{Records: []notification.Event{e}}
}

// upload changes an adapter; with events, the stream says so.
func (f *fakeBucket) upload(id, etag string, events bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.objs[id] = etag
	if events {
		f.pushLocked(record("s3:ObjectCreated:Put", "p/"+id+"/"+ConfigFile))
	}
}

func (f *fakeBucket) putProbe(ctx context.Context, key string) (func(context.Context) error, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.probes++
	if f.denied {
		return nil, errors.New("Access Denied")
	}
	if f.echo {
		f.pushLocked(record("s3:ObjectCreated:Put", key))
	}
	return func(context.Context) error {
		f.mu.Lock()
		defer f.mu.Unlock()
		f.removed++
		return nil
	}, nil
}

func (f *fakeBucket) get(fn func(f *fakeBucket) int) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return fn(f)
}

func (f *fakeBucket) set(fn func(f *fakeBucket)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fn(f)
}

type watchRun struct {
	f      *fakeBucket
	proven *atomic.Bool
	ch     chan Event
	logs   *testlog.Buffer
}

func startWatch(t *testing.T, f *fakeBucket, poll, resync time.Duration, tm listenTiming) *watchRun {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	r := &watchRun{f: f, proven: new(atomic.Bool), ch: make(chan Event, 64), logs: &testlog.Buffer{}}
	w := &listenWatch{prefix: "p/", list: f.list, listen: f.listen, putProbe: f.putProbe, poll: poll, resync: resync,
		timing: tm, log: slog.New(slog.NewTextHandler(r.logs, nil)), proven: r.proven}
	done := make(chan struct{})
	go func() { defer close(done); defer close(r.ch); w.run(ctx, r.ch) }()
	t.Cleanup(func() { cancel(); <-done })
	return r
}

func eventually(t *testing.T, within time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > within {
			t.Fatalf("%s: not after %v", what, within)
		}
		time.Sleep(2 * time.Millisecond)
	}
	return time.Since(start)
}

// waitEvent waits for a put of id and says how long it took.
func (r *watchRun) waitEvent(t *testing.T, id string, within time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	timeout := time.After(within)
	for {
		select {
		case ev := <-r.ch:
			if ev.ID == id && ev.Type == EventPut {
				return time.Since(start)
			}
		case <-timeout:
			t.Fatalf("no put event for %s within %v", id, within)
		}
	}
}

var fastTiming = listenTiming{probeWait: 100 * time.Millisecond, keepAlive: 300 * time.Millisecond,
	retryMin: 20 * time.Millisecond, retryMax: 200 * time.Millisecond}

func TestListenWatchProbeProvesStream(t *testing.T) {
	f := newFakeBucket()
	r := startWatch(t, f, 50*time.Millisecond, time.Hour, fastTiming)
	eventually(t, 5*time.Second, "proven by the probe", r.proven.Load)
	eventually(t, 5*time.Second, "probe removed", func() bool { return f.get(func(f *fakeBucket) int { return f.removed }) >= 1 })
	// Proven: no listing at the poll interval any more (resync is an hour).
	lists := f.get(func(f *fakeBucket) int { return f.lists })
	f.upload("a", "e1", true)
	if d := r.waitEvent(t, "a", 5*time.Second); d > time.Second {
		t.Errorf("event took %v", d)
	}
	time.Sleep(250 * time.Millisecond)
	if n := f.get(func(f *fakeBucket) int { return f.lists }); n != lists {
		t.Errorf("listed %d times while the stream was proven", n-lists)
	}
	if !strings.Contains(r.logs.String(), "bucket notifications arrive") {
		t.Errorf("no log of the mode change:\n%s", r.logs)
	}
}

func TestListenWatchProbeAgainForLateSubscription(t *testing.T) {
	f := newFakeBucket()
	f.deafFor = 150 * time.Millisecond // the first probe is written before the stream listens
	tm := fastTiming
	tm.probeWait = 2 * time.Second
	tm.probeAgain = []time.Duration{100 * time.Millisecond, 300 * time.Millisecond}
	r := startWatch(t, f, 50*time.Millisecond, time.Hour, tm)
	d := eventually(t, 5*time.Second, "proven", r.proven.Load)
	if d >= tm.probeWait {
		t.Errorf("proven after %v: the round's later probes should have proved it", d)
	}
	if n := f.get(func(f *fakeBucket) int { return f.listens }); n != 1 {
		t.Errorf("%d streams opened, want 1", n)
	}
	if strings.Contains(r.logs.String(), "not proven") {
		t.Errorf("logged a failure:\n%s", r.logs)
	}
	eventually(t, 5*time.Second, "all probes removed", func() bool {
		return f.get(func(f *fakeBucket) int { return f.probes - f.removed }) == 0
	})
}

func TestListenWatchSilentStreamPolls(t *testing.T) {
	f := newFakeBucket()
	f.echo = false // the stream opens, but never delivers (the MinIO of the issue)
	r := startWatch(t, f, 50*time.Millisecond, time.Hour, fastTiming)
	eventually(t, 5*time.Second, "baseline listing", func() bool { return f.get(func(f *fakeBucket) int { return f.lists }) >= 1 })
	f.upload("a", "e1", false)
	if d := r.waitEvent(t, "a", 5*time.Second); d > time.Second {
		t.Errorf("poll took %v", d)
	}
	// The silent stream is reopened and probed again, with backoff; it is
	// never trusted, and the change of mode is logged once.
	eventually(t, 5*time.Second, "stream reopened", func() bool { return f.get(func(f *fakeBucket) int { return f.listens }) >= 3 })
	if r.proven.Load() {
		t.Fatal("a silent stream was trusted")
	}
	eventually(t, 5*time.Second, "probes removed", func() bool {
		return f.get(func(f *fakeBucket) int { return f.removed }) >= 2
	})
	if n := strings.Count(r.logs.String(), "not proven"); n != 1 {
		t.Errorf("%d 'not proven' lines, want 1:\n%s", n, r.logs)
	}
	// A stream that starts delivering is trusted from its next probe.
	f.set(func(f *fakeBucket) { f.echo = true })
	eventually(t, 5*time.Second, "proven once the stream delivers", r.proven.Load)
}

func TestListenWatchFallbackOnStreamError(t *testing.T) {
	f := newFakeBucket()
	r := startWatch(t, f, 50*time.Millisecond, time.Hour, fastTiming)
	eventually(t, 5*time.Second, "proven", r.proven.Load)
	// The stream breaks and stays unable to deliver; a change made meanwhile
	// (without an event) is found by polling, within the poll interval.
	f.set(func(f *fakeBucket) { f.echo = false })
	f.push(notification.Info{Err: errors.New("connection reset")})
	eventually(t, 5*time.Second, "back to polling", func() bool { return !r.proven.Load() })
	f.upload("b", "e1", false)
	if d := r.waitEvent(t, "b", 5*time.Second); d > time.Second {
		t.Errorf("poll after the fallback took %v", d)
	}
	if !strings.Contains(r.logs.String(), "bucket notifications lost") {
		t.Errorf("no log of the fallback:\n%s", r.logs)
	}
	f.set(func(f *fakeBucket) { f.echo = true })
	eventually(t, 5*time.Second, "proven again", r.proven.Load)
}

func TestListenWatchSilentDeathOfProvenStream(t *testing.T) {
	f := newFakeBucket()
	r := startWatch(t, f, 50*time.Millisecond, time.Hour, fastTiming)
	eventually(t, 5*time.Second, "proven", r.proven.Load)
	// The stream goes silent without an error (a half-open connection):
	// past keepAlive, a probe goes unanswered and polling resumes.
	f.set(func(f *fakeBucket) { f.echo = false })
	d := eventually(t, 5*time.Second, "back to polling", func() bool { return !r.proven.Load() })
	if max := fastTiming.keepAlive + fastTiming.probeWait + 2*time.Second; d > max {
		t.Errorf("silence noticed after %v, want under %v", d, max)
	}
	f.upload("c", "e1", false)
	r.waitEvent(t, "c", 5*time.Second)
}

func TestListenWatchPings(t *testing.T) {
	f := newFakeBucket()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var trackers sync.Map
	listen := func(ctx context.Context) <-chan notification.Info {
		if tr, ok := ctx.Value(streamTrackerKey{}).(*streamTracker); ok {
			go func() { // MinIO's pings, every 50ms
				for ctx.Err() == nil {
					tr.last.Store(time.Now().UnixNano())
					time.Sleep(50 * time.Millisecond)
				}
			}()
			trackers.Store(tr, true)
		}
		return f.listen(ctx)
	}
	proven := new(atomic.Bool)
	w := &listenWatch{prefix: "p/", list: f.list, listen: listen, putProbe: f.putProbe, poll: 50 * time.Millisecond,
		resync: time.Hour, timing: fastTiming, log: slog.New(slog.DiscardHandler), proven: proven}
	ch := make(chan Event, 64)
	done := make(chan struct{})
	go func() { defer close(done); w.run(ctx, ch) }()
	defer func() { cancel(); <-done }()
	eventually(t, 5*time.Second, "proven", proven.Load)
	probes := f.get(func(f *fakeBucket) int { return f.probes })
	// Several keepAlive periods with pings but no events: no more probes.
	time.Sleep(4 * fastTiming.keepAlive)
	if n := f.get(func(f *fakeBucket) int { return f.probes }); n != probes {
		t.Errorf("%d probes while pings arrived", n-probes)
	}
	if !proven.Load() {
		t.Error("a pinging proven stream was dropped")
	}
}

func TestListenWatchProbeDenied(t *testing.T) {
	f := newFakeBucket()
	f.denied = true // read-only credentials: the stream cannot be proven by a probe
	r := startWatch(t, f, 50*time.Millisecond, time.Hour, fastTiming)
	eventually(t, 5*time.Second, "probe tried", func() bool { return f.get(func(f *fakeBucket) int { return f.probes }) >= 1 })
	time.Sleep(200 * time.Millisecond)
	if r.proven.Load() {
		t.Fatal("proven without any event")
	}
	before := f.get(func(f *fakeBucket) int { return f.lists })
	time.Sleep(300 * time.Millisecond)
	if n := f.get(func(f *fakeBucket) int { return f.lists }) - before; n < 2 {
		t.Errorf("%d listings in 300ms at a 50ms poll interval", n)
	}
	if !strings.Contains(r.logs.String(), "cannot write a probe object") {
		t.Errorf("no log of the refused probe:\n%s", r.logs)
	}
	// Events still make deploys faster, and a real one proves the stream.
	f.upload("d", "e1", true)
	if d := r.waitEvent(t, "d", 5*time.Second); d > time.Second {
		t.Errorf("event took %v", d)
	}
	eventually(t, time.Second, "proven by a real event", r.proven.Load)
}

// xmlAnswerErr is the error minio-go's stream reports when the server
// answers ListenBucketNotification with an XML document (versitygw takes the
// request for a ListObjects).
func xmlAnswerErr() error {
	var info notification.Info
	return json.Unmarshal([]byte(`<?xml version="1.0" encoding="UTF-8"?><ListBucketResult>`), &info)
}

func TestStreamUnsupported(t *testing.T) {
	var jsonErr notification.Info
	truncated := json.Unmarshal([]byte(`{"Records":[`), &jsonErr)
	garbled := json.Unmarshal([]byte(`{"Records":x}`), &jsonErr)
	for _, c := range []struct {
		name string
		err  error
		want bool
	}{
		{"NotImplemented (AWS S3, GCS)", minio.ErrorResponse{StatusCode: 501, Code: minio.APINotSupported}, true},
		{"an XML answer (versitygw)", xmlAnswerErr(), true},
		{"an XML answer, wrapped", fmt.Errorf("stream: %w", xmlAnswerErr()), true},
		{"a truncated JSON line", truncated, false},
		{"a garbled JSON line", garbled, false},
		{"access denied", minio.ErrorResponse{StatusCode: 403, Code: "AccessDenied"}, false},
		{"a dropped connection", errors.New("unexpected EOF"), false},
	} {
		t.Run(c.name, func(t *testing.T) {
			if got := streamUnsupported(c.err); got != c.want {
				t.Errorf("streamUnsupported(%v) = %v, want %v", c.err, got, c.want)
			}
		})
	}
}

func TestListenWatchUnsupportedEndpoint(t *testing.T) {
	for _, c := range []struct {
		name string
		err  error
	}{
		{"NotImplemented", minio.ErrorResponse{StatusCode: 501, Code: minio.APINotSupported, Message: "AWS"}},
		{"XML answer", xmlAnswerErr()},
	} {
		t.Run(c.name, func(t *testing.T) { testListenWatchUnsupported(t, c.err) })
	}
}

func testListenWatchUnsupported(t *testing.T, answer error) {
	f := newFakeBucket()
	listen := func(ctx context.Context) <-chan notification.Info {
		f.set(func(f *fakeBucket) { f.listens++ })
		ch := make(chan notification.Info, 1)
		ch <- notification.Info{Err: answer}
		close(ch)
		return ch
	}
	proven := new(atomic.Bool)
	ctx, cancel := context.WithCancel(context.Background())
	w := &listenWatch{prefix: "p/", list: f.list, listen: listen, putProbe: f.putProbe, poll: 20 * time.Millisecond,
		resync: time.Hour, timing: fastTiming, log: slog.New(slog.DiscardHandler), proven: proven}
	ch := make(chan Event, 64)
	done := make(chan struct{})
	go func() { defer close(done); w.run(ctx, ch) }()
	defer func() { cancel(); <-done }()
	eventually(t, 5*time.Second, "polling", func() bool { return f.get(func(f *fakeBucket) int { return f.lists }) >= 5 })
	if n := f.get(func(f *fakeBucket) int { return f.listens }); n != 1 {
		t.Errorf("listened %d times on an endpoint without notifications", n)
	}
}

func TestListenWatchListErrorsRetry(t *testing.T) {
	f := newFakeBucket()
	f.listErr = errors.New("server down")
	f.echo = false
	r := startWatch(t, f, 30*time.Millisecond, time.Hour, fastTiming)
	eventually(t, 5*time.Second, "retried listing", func() bool { return f.get(func(f *fakeBucket) int { return f.lists }) >= 3 })
	var n int
	f.set(func(f *fakeBucket) { f.listErr = nil; f.objs["e"] = "1"; n = f.lists })
	// The first good listing is the baseline; a later change is reported.
	eventually(t, 5*time.Second, "baseline", func() bool { return f.get(func(f *fakeBucket) int { return f.lists }) >= n+2 })
	f.upload("e", "2", false)
	r.waitEvent(t, "e", 5*time.Second)
}
