package store

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
)

// Notify modes: how an S3 store's Watch learns of changes.
const (
	// NotifyAuto listens (MinIO ListenBucketNotification) where the server
	// supports it and falls back to polling; with an SQS queue it uses SQS.
	NotifyAuto = "auto"
	// NotifyListen is MinIO's ListenBucketNotification (falls back to polling on error).
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
	// ResyncInterval is a full listing while listening or receiving SQS
	// notices, to catch lost ones (default 1m).
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
	// Two tries per call, not minio-go's ten (~8 s against a server that
	// refuses connections): the loader backs off and retries itself, and a
	// request must learn of an outage in time.
	c, err := minio.New(host, &minio.Options{Creds: creds, Secure: secure, Region: opts.Region, BucketLookup: lookup,
		Transport: opts.Transport, MaxRetries: 2})
	if err != nil {
		return nil, fmt.Errorf("store: s3: %w", err)
	}
	opts.Logger = orDefault(opts.Logger)
	return &S3{c: c, opts: opts, log: opts.Logger}, nil
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
		var prev map[string]string
		switch s.opts.Notify {
		case NotifySQS:
			prev = s.watchSQS(ctx, ch)
		case NotifyAuto, NotifyListen:
			prev = s.watchListen(ctx, ch)
		}
		if ctx.Err() != nil {
			return
		}
		pollLoop(ctx, s.opts.PollInterval, s.List, ch, prev, s.log)
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

// watchListen forwards MinIO bucket notifications until they fail, with a
// full resync listing every ResyncInterval; it returns the last listing so
// polling can take over without losing changes.
func (s *S3) watchListen(ctx context.Context, ch chan<- Event) map[string]string {
	objs, err := s.List(ctx)
	if err != nil {
		return nil
	}
	lctx, cancel := context.WithCancel(ctx)
	defer cancel()
	infos := s.c.ListenBucketNotification(lctx, s.opts.Bucket, s.opts.Prefix, "",
		[]string{"s3:ObjectCreated:*", "s3:ObjectRemoved:*"})
	var mu sync.Mutex
	prev := snapshot(objs)
	// Resync: a poll loop at the slow period shares prev.
	resyncDone := make(chan struct{})
	go func() {
		defer close(resyncDone)
		t := time.NewTicker(s.opts.ResyncInterval)
		defer t.Stop()
		for {
			select {
			case <-lctx.Done():
				return
			case <-t.C:
			}
			objs, err := s.List(lctx)
			if err != nil {
				continue
			}
			cur := snapshot(objs)
			mu.Lock()
			evs := diff(prev, cur)
			prev = cur
			mu.Unlock()
			for _, ev := range evs {
				select {
				case ch <- ev:
				case <-lctx.Done():
					return
				}
			}
		}
	}()
	defer func() { cancel(); <-resyncDone }()
	for info := range infos {
		if info.Err != nil {
			s.log.Info("store: s3: bucket notifications unavailable, polling instead", "bucket", s.opts.Bucket, "err", info.Err, "interval", s.opts.PollInterval)
			break
		}
		for _, r := range info.Records {
			key, err := url.QueryUnescape(r.S3.Object.Key)
			if err != nil {
				key = r.S3.Object.Key
			}
			id, _, ok := idOfKey(s.opts.Prefix, key)
			if !ok {
				continue
			}
			t := EventPut
			if strings.Contains(r.EventName, "ObjectRemoved") {
				t = EventDelete
			}
			select {
			case ch <- Event{Type: t, ID: id}:
			case <-ctx.Done():
				return nil
			}
		}
	}
	mu.Lock()
	defer mu.Unlock()
	return prev
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
