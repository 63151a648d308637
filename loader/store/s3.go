package store

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
	"github.com/minio/minio-go/v7/pkg/notification"
)

// Notify modes: how an S3 store's Watch learns of changes.
const (
	// NotifyAuto uses MinIO's ListenBucketNotification where the server
	// has it, and polls elsewhere; with an SQS queue it uses SQS. Events
	// only ever make deploys faster: the bucket is listed every
	// PollInterval until the stream proves that it delivers (an event
	// arrives, such as that of a probe object written under
	// <prefix>.peftd-probe/), then every ResyncInterval; a stream that
	// fails or falls silent sends it back to PollInterval.
	NotifyAuto = "auto"
	// NotifyListen is MinIO's ListenBucketNotification, as NotifyAuto.
	NotifyListen = "listen"
	// NotifyPoll lists the bucket every PollInterval.
	NotifyPoll = "poll"
	// NotifySQS receives AWS S3 event notifications from an SQS queue.
	NotifySQS = "sqs"
)

// S3Options configure an S3 (AWS or MinIO or any S3 API) store.
type S3Options struct {
	// Endpoint is a URL (http://host:port) or host[:port]; empty means AWS S3.
	Endpoint string
	Region   string
	Bucket   string
	// Prefix is prepended to every key ("adapters/" holds adapters/<id>/...).
	Prefix    string
	PathStyle bool
	// Static credentials; when empty they come from the environment
	// (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_SESSION_TOKEN,
	// MINIO_ROOT_USER/MINIO_ROOT_PASSWORD, ~/.aws/credentials, then IAM).
	AccessKey, SecretKey, SessionToken string
	// Notify is one of the Notify* modes (default NotifyAuto).
	Notify string
	// PollInterval is the polling period (default 5s).
	PollInterval time.Duration
	// ResyncInterval is a full listing while a proven notification stream
	// or SQS delivers notices, to catch lost ones (default 1m).
	ResyncInterval time.Duration
	// SQSQueueURL receives S3 event notifications (NotifySQS).
	SQSQueueURL string
	// SQSEndpoint overrides the SQS endpoint (tests, LocalStack).
	SQSEndpoint string
	Transport   http.RoundTripper
	Logger      *slog.Logger
}

// S3 is a Store on an S3 bucket, through minio-go.
type S3 struct {
	c    *minio.Client
	opts S3Options
	log  *slog.Logger

	sqsOnce sync.Once
	sqs     *sqsWatcher
	sqsErr  error

	// Bucket notifications (NotifyAuto, NotifyListen): listen replaces
	// MinIO's ListenBucketNotification in tests; listenProven is whether
	// the stream has proved that it delivers.
	listen       func(context.Context) <-chan notification.Info
	timing       listenTiming
	listenProven atomic.Bool
}

var _ Store = (*S3)(nil)

// NewS3 makes an S3 store. It does not contact the server.
func NewS3(opts S3Options) (*S3, error) {
	if opts.Bucket == "" {
		return nil, errors.New("store: s3: no bucket")
	}
	host, secure := "s3.amazonaws.com", true
	if opts.Endpoint != "" {
		if strings.Contains(opts.Endpoint, "://") {
			u, err := url.Parse(opts.Endpoint)
			if err != nil {
				return nil, fmt.Errorf("store: s3 endpoint: %w", err)
			}
			switch u.Scheme {
			case "http":
				secure = false
			case "https":
			default:
				return nil, fmt.Errorf("store: s3 endpoint %q: scheme must be http or https", opts.Endpoint)
			}
			if u.Path != "" && u.Path != "/" {
				return nil, fmt.Errorf("store: s3 endpoint %q: must not have a path", opts.Endpoint)
			}
			host = u.Host
		} else {
			host = opts.Endpoint
		}
	}
	if opts.Region == "" {
		opts.Region = firstEnv("AWS_REGION", "AWS_DEFAULT_REGION")
	}
	if opts.Prefix != "" && !strings.HasSuffix(opts.Prefix, "/") {
		opts.Prefix += "/"
	}
	opts.Prefix = strings.TrimPrefix(opts.Prefix, "/")
	if opts.Notify == "" {
		opts.Notify = NotifyAuto
		if opts.SQSQueueURL != "" {
			opts.Notify = NotifySQS
		}
	}
	switch opts.Notify {
	case NotifyAuto, NotifyListen, NotifyPoll:
	case NotifySQS:
		if opts.SQSQueueURL == "" {
			return nil, errors.New("store: s3: notify=sqs needs an SQS queue URL")
		}
	default:
		return nil, fmt.Errorf("store: s3: unknown notify mode %q (auto, listen, poll, sqs)", opts.Notify)
	}
	if opts.PollInterval <= 0 {
		opts.PollInterval = 5 * time.Second
	}
	if opts.ResyncInterval <= 0 {
		opts.ResyncInterval = time.Minute
	}
	var creds *credentials.Credentials
	if opts.AccessKey != "" || opts.SecretKey != "" {
		creds = credentials.NewStaticV4(opts.AccessKey, opts.SecretKey, opts.SessionToken)
	} else {
		creds = credentials.NewChainCredentials([]credentials.Provider{
			&credentials.EnvAWS{}, &credentials.EnvMinio{}, &credentials.FileAWSCredentials{},
			&credentials.IAM{},
		})
	}
	lookup := minio.BucketLookupAuto
	if opts.PathStyle {
		lookup = minio.BucketLookupPath
	}
	// The notification stream's reads are watched through the transport.
	transport := opts.Transport
	if transport == nil {
		t, err := minio.DefaultTransport(secure)
		if err != nil {
			return nil, fmt.Errorf("store: s3: %w", err)
		}
		transport = t
	}
	// Two tries per call, not minio-go's ten (~8 s against a server that
	// refuses connections): the loader backs off and retries itself, and a
	// request must learn of an outage in time.
	c, err := minio.New(host, &minio.Options{Creds: creds, Secure: secure, Region: opts.Region, BucketLookup: lookup,
		Transport: trackingTransport{transport}, MaxRetries: 2})
	if err != nil {
		return nil, fmt.Errorf("store: s3: %w", err)
	}
	opts.Logger = orDefault(opts.Logger)
	return &S3{c: c, opts: opts, log: opts.Logger, timing: defaultListenTiming}, nil
}

func firstEnv(names ...string) string {
	for _, n := range names {
		if v := os.Getenv(n); v != "" {
			return v
		}
	}
	return ""
}

// Client is the underlying minio client (bucket setup in tools and tests).
func (s *S3) Client() *minio.Client { return s.c }

// Bucket is the store's bucket.
func (s *S3) Bucket() string { return s.opts.Bucket }

func (s *S3) key(id, file string) string { return s.opts.Prefix + id + "/" + file }

// idOfKey maps an object key to its adapter id and file name.
func idOfKey(prefix, key string) (id, file string, ok bool) {
	rest, found := strings.CutPrefix(key, prefix)
	if !found {
		return "", "", false
	}
	id, file, found = strings.Cut(rest, "/")
	if !found || (file != ConfigFile && file != WeightsFile) || ValidateID(id) != nil {
		return "", "", false
	}
	return id, file, true
}

func (s *S3) mapErr(id string, err error) error {
	if err == nil {
		return nil
	}
	r := minio.ToErrorResponse(err)
	if r.StatusCode == http.StatusNotFound || r.Code == "NoSuchKey" {
		return fmt.Errorf("%w: %s", ErrNotFound, id)
	}
	return fmt.Errorf("store: s3 %s/%s: %w", s.opts.Bucket, id, err)
}

// List implements Store.
func (s *S3) List(ctx context.Context) ([]Object, error) {
	type pair struct{ cfg, w *minio.ObjectInfo }
	byID := map[string]*pair{}
	var order []string
	for oi := range s.c.ListObjects(ctx, s.opts.Bucket, minio.ListObjectsOptions{Prefix: s.opts.Prefix, Recursive: true}) {
		if oi.Err != nil {
			return nil, fmt.Errorf("store: s3 list %s/%s: %w", s.opts.Bucket, s.opts.Prefix, oi.Err)
		}
		id, file, ok := idOfKey(s.opts.Prefix, oi.Key)
		if !ok {
			continue
		}
		p := byID[id]
		if p == nil {
			p = &pair{}
			byID[id] = p
			order = append(order, id)
		}
		o := oi
		if file == ConfigFile {
			p.cfg = &o
		} else {
			p.w = &o
		}
	}
	out := make([]Object, 0, len(order))
	for _, id := range order {
		p := byID[id]
		if p.cfg == nil || p.w == nil {
			continue
		}
		out = append(out, s3Object(id, *p.cfg, *p.w))
	}
	return out, nil
}

func s3Object(id string, cfg, w minio.ObjectInfo) Object {
	mod := cfg.LastModified
	if w.LastModified.After(mod) {
		mod = w.LastModified
	}
	return Object{ID: id, ETag: CombineETag(cfg.ETag, w.ETag), Size: cfg.Size + w.Size, Modified: mod}
}

// Stat implements Store (two HEAD requests).
func (s *S3) Stat(ctx context.Context, id string) (Object, error) {
	if err := ValidateID(id); err != nil {
		return Object{}, err
	}
	cfg, err := s.c.StatObject(ctx, s.opts.Bucket, s.key(id, ConfigFile), minio.StatObjectOptions{})
	if err != nil {
		return Object{}, s.mapErr(id, err)
	}
	w, err := s.c.StatObject(ctx, s.opts.Bucket, s.key(id, WeightsFile), minio.StatObjectOptions{})
	if err != nil {
		return Object{}, s.mapErr(id, err)
	}
	return s3Object(id, cfg, w), nil
}

func (s *S3) getOne(ctx context.Context, id, file string, max int64, progress func(done, total int64)) ([]byte, minio.ObjectInfo, error) {
	obj, err := s.c.GetObject(ctx, s.opts.Bucket, s.key(id, file), minio.GetObjectOptions{})
	if err != nil {
		return nil, minio.ObjectInfo{}, s.mapErr(id, err)
	}
	defer obj.Close()
	info, err := obj.Stat()
	if err != nil {
		return nil, info, s.mapErr(id, err)
	}
	if max > 0 && info.Size > max {
		return nil, info, fmt.Errorf("%w: %s/%s is %d bytes, limit %d", ErrTooLarge, id, file, info.Size, max)
	}
	buf := make([]byte, 0, max0(info.Size))
	r := io.Reader(obj)
	if max > 0 {
		r = io.LimitReader(obj, max+1)
	}
	for {
		if len(buf) == cap(buf) {
			buf = append(buf, 0)[:len(buf)]
		}
		n, err := r.Read(buf[len(buf):min(cap(buf), len(buf)+4<<20)])
		buf = buf[:len(buf)+n]
		if progress != nil && n > 0 {
			progress(int64(len(buf)), info.Size)
		}
		if max > 0 && int64(len(buf)) > max {
			return nil, info, fmt.Errorf("%w: %s/%s exceeds %d bytes", ErrTooLarge, id, file, max)
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, info, s.mapErr(id, err)
		}
	}
	return buf, info, nil
}

func max0(n int64) int64 {
	if n < 0 {
		return 0
	}
	return n
}

// Get implements Store. The ETag is that of the bytes read.
func (s *S3) Get(ctx context.Context, id string, opts GetOptions) ([]byte, []byte, string, error) {
	if err := ValidateID(id); err != nil {
		return nil, nil, "", err
	}
	cfg, ci, err := s.getOne(ctx, id, ConfigFile, MaxConfigSize, nil)
	if err != nil {
		return nil, nil, "", err
	}
	w, wi, err := s.getOne(ctx, id, WeightsFile, opts.MaxBytes, opts.Progress)
	if err != nil {
		return nil, nil, "", err
	}
	return cfg, w, CombineETag(ci.ETag, wi.ETag), nil
}

// Put implements Store: weights first, so a listing never pairs a new
// config with missing weights.
func (s *S3) Put(ctx context.Context, id string, config, weights []byte) (string, error) {
	if err := ValidateID(id); err != nil {
		return "", err
	}
	wi, err := s.c.PutObject(ctx, s.opts.Bucket, s.key(id, WeightsFile), bytesReader(weights), int64(len(weights)),
		minio.PutObjectOptions{ContentType: "application/octet-stream"})
	if err != nil {
		return "", s.mapErr(id, err)
	}
	ci, err := s.c.PutObject(ctx, s.opts.Bucket, s.key(id, ConfigFile), bytesReader(config), int64(len(config)),
		minio.PutObjectOptions{ContentType: "application/json"})
	if err != nil {
		return "", s.mapErr(id, err)
	}
	return CombineETag(ci.ETag, wi.ETag), nil
}

// Delete implements Store: config first, so the adapter leaves listings at once.
func (s *S3) Delete(ctx context.Context, id string) error {
	if err := ValidateID(id); err != nil {
		return err
	}
	for _, f := range []string{ConfigFile, WeightsFile} {
		if err := s.c.RemoveObject(ctx, s.opts.Bucket, s.key(id, f), minio.RemoveObjectOptions{}); err != nil {
			if err := s.mapErr(id, err); !errors.Is(err, ErrNotFound) {
				return err
			}
		}
	}
	return nil
}

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
// stream has proved that it delivers (an event arrived: a real one, or that
// of a probe object the watch writes under the prefix), and only then every
// resync interval. A proven stream that fails, or stays silent past
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
		minio.PutObjectOptions{ContentType: "text/plain"})
	if err != nil {
		return nil, err
	}
	// Deleting the version written leaves no delete marker in a versioned bucket.
	return func(ctx context.Context) error {
		return s.c.RemoveObject(ctx, s.opts.Bucket, key, minio.RemoveObjectOptions{VersionID: info.VersionID})
	}, nil
}

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

// streamUnsupported: the endpoint has no ListenBucketNotification at all
// (AWS S3, GCS), so reopening the stream is pointless.
func streamUnsupported(err error) bool {
	return minio.ToErrorResponse(err).Code == minio.APINotSupported
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

	send := func(evs ...Event) bool {
		for _, ev := range evs {
			select {
			case ch <- ev:
			case <-ctx.Done():
				return false
			}
		}
		return true
	}
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
			if prev != nil && !send(diff(prev, cur)...) {
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
			case probe == nil || !probe.seen:
				promote("an event arrived")
			}
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
