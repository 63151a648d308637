package store

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/notification"
)

// Watch implements Store; see the Notify modes.
func (s *S3) Watch(ctx context.Context) <-chan Event {
	ch := make(chan Event, 64)
	go func() {
		defer close(ch)
		switch s.opts.Notify {
		case NotifySQS:
			prev := s.watchSQS(ctx, ch)
			if ctx.Err() == nil {
				pollLoop(ctx, s.opts.PollInterval, s.List, ch, prev, s.log)
			}
		case NotifyAuto, NotifyListen:
			s.listenWatch().run(ctx, ch)
		default:
			pollLoop(ctx, s.opts.PollInterval, s.List, ch, nil, s.log)
		}
	}()
	return ch
}

func snapshot(objs []Object) map[string]string {
	m := make(map[string]string, len(objs))
	for _, o := range objs {
		m[o.ID] = o.ETag
	}
	return m
}

// ProbeDir is the folder, under the store's prefix, of the probe objects an
// S3 store writes to check that bucket notifications arrive. Its name is
// never a valid adapter ID, so listings and events skip it.
const ProbeDir = ".peftd-probe"

// listenTiming tunes how a notification stream is trusted (tests shorten it).
type listenTiming struct {
	// probeWait: a probe object's event must arrive this soon after the
	// round's first PUT.
	probeWait time.Duration
	// probeAgain: more probe objects of the same round, this long after its
	// first PUT, in case that one was written before the server had
	// subscribed the stream (MinIO sends nothing, not even headers, that
	// would tell when it has).
	probeAgain []time.Duration
	// keepAlive: a proven stream that has sent nothing (no event, no ping)
	// for this long is probed again.
	keepAlive time.Duration
	// retryMin, retryMax: a failed or silent stream is reopened (and
	// probed) after retryMin, doubling up to retryMax.
	retryMin, retryMax time.Duration
}

var defaultListenTiming = listenTiming{probeWait: 3 * time.Second,
	probeAgain: []time.Duration{200 * time.Millisecond, time.Second},
	keepAlive:  25 * time.Second, retryMin: time.Second, retryMax: time.Minute}

// listenWatch is Watch over MinIO bucket notifications. Events only ever
// make deploys faster: the bucket is listed every poll interval until the
// stream has proved that it delivers (the event of a probe object the watch
// writes under the prefix when it opens the stream; any event, when no
// probe round is in flight), and only then every resync interval. A proven stream that fails, or stays silent past
// keepAlive and then drops a probe, sends the watch back to polling (with a
// listing at once), and the stream is reopened and probed again.
type listenWatch struct {
	prefix string
	list   func(context.Context) ([]Object, error)
	listen func(context.Context) <-chan notification.Info
	// putProbe writes the object key; remove deletes exactly what it wrote.
	putProbe     func(ctx context.Context, key string) (remove func(context.Context) error, err error)
	poll, resync time.Duration
	timing       listenTiming
	log          *slog.Logger
	proven       *atomic.Bool // mirrors the mode, for tests
}

func (s *S3) listenWatch() *listenWatch {
	listen := s.listen
	if listen == nil {
		listen = func(ctx context.Context) <-chan notification.Info {
			return s.c.ListenBucketNotification(ctx, s.opts.Bucket, s.opts.Prefix, "",
				[]string{"s3:ObjectCreated:*", "s3:ObjectRemoved:*"})
		}
	}
	return &listenWatch{prefix: s.opts.Prefix, list: s.List, listen: listen, putProbe: s.putProbe,
		poll: s.opts.PollInterval, resync: s.opts.ResyncInterval, timing: s.timing,
		log: s.log.With("bucket", s.opts.Bucket, "prefix", s.opts.Prefix), proven: &s.listenProven}
}

const probeBody = "peftd writes and deletes this object to check that bucket notifications arrive; safe to delete\n"

func (s *S3) putProbe(ctx context.Context, key string) (func(context.Context) error, error) {
	info, err := s.c.PutObject(ctx, s.opts.Bucket, key, bytesReader([]byte(probeBody)), int64(len(probeBody)),
		s.putOptions("text/plain"))
	if err != nil {
		return nil, err
	}
	// Deleting the version written leaves no delete marker in a versioned bucket.
	return func(ctx context.Context) error {
		return s.c.RemoveObject(ctx, s.opts.Bucket, key, minio.RemoveObjectOptions{VersionID: info.VersionID})
	}, nil
}

type listResult struct {
	objs    []Object
	err     error
	started time.Time
}

type probeResult struct {
	key    string
	remove func(context.Context) error
	err    error
}

// listenProbe is one round of probe objects: any one's event proves the stream.
type listenProbe struct {
	keys     map[string]bool // written, or being written, in this round
	written  []probeResult   // to delete when the round ends
	seen     bool
	first    time.Time // the first PUT returned (zero: not yet)
	deadline time.Time
	again    int // probeAgain entries used
}

// streamUnsupported: the endpoint has no ListenBucketNotification at all,
// so reopening the stream is pointless. AWS S3 and GCS refuse the request
// (NotImplemented). S3 servers that ignore its query (versitygw) answer it
// as a ListObjects: an XML document where lines of JSON were asked for.
// Reopening such a stream each retry also wrote and deleted a probe object
// each time, and versitygw removes the folders a delete empties, which
// failed uploads made at that moment ("Existing Object is a directory").
func streamUnsupported(err error) bool {
	if minio.ToErrorResponse(err).Code == minio.APINotSupported {
		return true
	}
	var syn *json.SyntaxError
	return errors.As(err, &syn) && strings.HasPrefix(syn.Error(), "invalid character '<'")
}

func (w *listenWatch) run(ctx context.Context, ch chan<- Event) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	tm := w.timing
	now := time.Now()
	var (
		prev              map[string]string
		proven, announced bool

		nextList = now
		lastList time.Time
		listing  bool
		listRes  = make(chan listResult, 1)

		infos       <-chan notification.Info
		closeStream = func() {}
		tracker     *streamTracker
		openAt      = now
		never       bool // the endpoint cannot listen
		retryWait   = tm.retryMin
		lastEvent   time.Time

		probe     *listenProbe
		nextProbe time.Time
		probeRes  = make(chan probeResult)
	)
	defer func() { closeStream() }()
	w.proven.Store(false)
	defer w.proven.Store(false)

	send := func(evs ...Event) bool { return sendEvents(ctx, ch, evs) }
	period := func() time.Duration {
		if proven {
			return w.resync
		}
		return w.poll
	}
	// Probe objects are deleted in the background; one that could not be
	// (the server went away) is tried again after the next probe's PUT.
	var leftMu sync.Mutex
	var leftover []probeResult
	removeProbe := func(key string, remove func(context.Context) error) {
		if remove == nil {
			return
		}
		go func() {
			rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
			defer cancel()
			if err := remove(rctx); err != nil {
				leftMu.Lock()
				defer leftMu.Unlock()
				if len(leftover) < 16 {
					leftover = append(leftover, probeResult{key: key, remove: remove})
					w.log.Debug("store: s3: could not delete a notification probe object; will retry", "key", key, "err", err)
					return
				}
				w.log.Warn("store: s3: could not delete a notification probe object (listings skip it; safe to delete)", "key", key, "err", err)
			}
		}()
	}
	retryLeftovers := func() {
		leftMu.Lock()
		old := leftover
		leftover = nil
		leftMu.Unlock()
		if len(old) == 0 {
			return
		}
		go func() {
			for _, l := range old {
				rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
				if err := l.remove(rctx); err != nil {
					w.log.Warn("store: s3: could not delete a notification probe object (listings skip it; safe to delete)", "key", l.key, "err", err)
				}
				cancel()
			}
		}()
	}
	promote := func(proof string) {
		retryWait = tm.retryMin
		if proven {
			return
		}
		proven, announced = true, true
		w.proven.Store(true)
		w.log.Info("store: s3: bucket notifications arrive; listing only every resync interval", "proof", proof, "resync", w.resync)
		if !lastList.IsZero() {
			nextList = lastList.Add(w.resync)
		}
	}
	demote := func(reason string, err error) {
		switch {
		case proven:
			proven = false
			w.proven.Store(false)
			w.log.Warn("store: s3: bucket notifications lost; listing every poll interval", "reason", reason, "err", err, "poll", w.poll)
			nextList = time.Now() // catch up on what the stream missed
		case !announced:
			announced = true
			w.log.Info("store: s3: bucket notifications not proven; listing every poll interval", "reason", reason, "err", err, "poll", w.poll)
		default:
			w.log.Debug("store: s3: bucket notifications still not proven", "reason", reason, "err", err)
		}
	}
	// endProbe deletes the round's objects (those still being written are
	// deleted when their PUT returns).
	endProbe := func() {
		for _, r := range probe.written {
			removeProbe(r.key, r.remove)
		}
		probe = nil
	}
	putProbe := func() {
		var b [8]byte
		_, _ = rand.Read(b[:])
		key := w.prefix + ProbeDir + "/" + hex.EncodeToString(b[:])
		probe.keys[key] = true
		go func() {
			pctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			defer cancel()
			remove, err := w.putProbe(pctx, key)
			select {
			case probeRes <- probeResult{key, remove, err}:
			case <-ctx.Done():
				removeProbe(key, remove)
			}
		}()
	}
	// fail closes the stream, falls back to polling and schedules a reopen.
	fail := func(reason string, err error) {
		closeStream()
		closeStream, infos, tracker = func() {}, nil, nil
		if probe != nil {
			endProbe()
		}
		demote(reason, err)
		if err != nil && streamUnsupported(err) {
			never = true
			w.log.Info("store: s3: the endpoint serves no bucket notification stream; not asking again, listing every poll interval", "err", err, "poll", w.poll)
			return
		}
		openAt = time.Now().Add(retryWait)
		retryWait = min(2*retryWait, tm.retryMax)
	}
	finishProbe := func(ok bool) {
		endProbe()
		if ok {
			promote("a probe object's event")
			return
		}
		fail(fmt.Sprintf("the stream delivered no event for a probe object within %v", tm.probeWait), nil)
	}

	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		now := time.Now()
		if !listing && !now.Before(nextList) {
			listing = true
			go func(started time.Time) {
				objs, err := w.list(ctx)
				listRes <- listResult{objs, err, started}
			}(now)
		}
		if infos == nil && !never && !now.Before(openAt) {
			sctx, c := context.WithCancel(ctx)
			tracker = &streamTracker{reconnect: make(chan struct{}, 1)}
			infos, closeStream = w.listen(context.WithValue(sctx, streamTrackerKey{}, tracker)), c
			nextProbe = now
		}
		if infos != nil && probe == nil {
			if proven {
				heard := lastEvent
				if t := tracker.lastRead(); t.After(heard) {
					heard = t
				}
				nextProbe = heard.Add(tm.keepAlive)
			}
			if !now.Before(nextProbe) {
				probe = &listenProbe{keys: map[string]bool{}}
				putProbe()
			}
		}
		if probe != nil && !probe.first.IsZero() && !probe.seen {
			if !now.Before(probe.deadline) {
				finishProbe(false)
				continue
			}
			if probe.again < len(tm.probeAgain) && !now.Before(probe.first.Add(tm.probeAgain[probe.again])) {
				probe.again++
				putProbe()
			}
		}

		wake := now.Add(time.Hour)
		if !listing {
			wake = nextList
		}
		if infos == nil && !never && openAt.Before(wake) {
			wake = openAt
		}
		if infos != nil && probe == nil && nextProbe.Before(wake) {
			wake = nextProbe
		}
		if probe != nil && !probe.first.IsZero() && !probe.seen {
			if probe.deadline.Before(wake) {
				wake = probe.deadline
			}
			if probe.again < len(tm.probeAgain) {
				if t := probe.first.Add(tm.probeAgain[probe.again]); t.Before(wake) {
					wake = t
				}
			}
		}
		timer.Reset(max(time.Until(wake), time.Millisecond))
		var reconnect <-chan struct{}
		if tracker != nil {
			reconnect = tracker.reconnect
		}

		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		case <-reconnect:
			// minio-go reopened the stream by itself: list now for what
			// the gap may have lost.
			if !listing {
				nextList = time.Now()
			}
		case r := <-listRes:
			listing = false
			if r.err != nil {
				if ctx.Err() != nil {
					return
				}
				w.log.Warn("store: watch: list failed", "err", r.err)
				nextList = time.Now().Add(w.poll)
				continue
			}
			cur := snapshot(r.objs)
			evs := []Event{{Type: EventSync}} // the first listing: the baseline
			if prev != nil {
				evs = diff(prev, cur)
			}
			if !send(evs...) {
				return
			}
			prev, lastList = cur, r.started
			nextList = lastList.Add(period())
		case r := <-probeRes:
			if probe == nil || !probe.keys[r.key] { // its round is over
				removeProbe(r.key, r.remove)
				continue
			}
			if r.err != nil {
				if ctx.Err() != nil {
					return
				}
				endProbe()
				nextProbe = time.Now().Add(tm.retryMax)
				demote("cannot write a probe object under the prefix (events are still used, but do not replace polling)", r.err)
				continue
			}
			probe.written = append(probe.written, r)
			if probe.first.IsZero() {
				probe.first = time.Now()
				probe.deadline = probe.first.Add(tm.probeWait)
				retryLeftovers()
			}
			if probe.seen {
				finishProbe(true)
			}
		case info, ok := <-infos:
			if !ok {
				fail("the notification stream ended", nil)
				continue
			}
			if info.Err != nil {
				if ctx.Err() != nil {
					return
				}
				fail("the notification stream failed", info.Err)
				continue
			}
			if len(info.Records) == 0 {
				continue
			}
			lastEvent = time.Now()
			var evs []Event
			for _, r := range info.Records {
				key, err := url.QueryUnescape(r.S3.Object.Key)
				if err != nil {
					key = r.S3.Object.Key
				}
				if probe != nil && probe.keys[key] {
					probe.seen = true
					continue
				}
				id, _, ok := idOfKey(w.prefix, key)
				if !ok {
					continue
				}
				t := EventPut
				if strings.Contains(r.EventName, "ObjectRemoved") {
					t = EventDelete
				}
				evs = append(evs, Event{Type: t, ID: id})
			}
			if !send(evs...) {
				return
			}
			switch {
			case probe != nil && probe.seen && !probe.first.IsZero():
				finishProbe(true)
			case probe == nil:
				promote("an event arrived")
			}
			// With a probe round in flight only its own object's event
			// proves the stream: another may be one the server queued
			// before it went away and back (a leftover probe's delete
			// promoted a stream 23 ms after a MinIO restart, under CI's
			// load, and the upload after it was seen neither by the stream
			// nor, listing only every resync interval, by polling).
		}
	}
}

func diff(prev, cur map[string]string) []Event {
	var evs []Event
	for id, e := range cur {
		if pe, ok := prev[id]; !ok || pe != e {
			evs = append(evs, Event{Type: EventPut, ID: id})
		}
	}
	for id := range prev {
		if _, ok := cur[id]; !ok {
			evs = append(evs, Event{Type: EventDelete, ID: id})
		}
	}
	return evs
}
