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
	// SignPayload signs upload bodies over plain HTTP with SigV4's
	// streaming signature (SHA-256 and an HMAC of every 64 KiB chunk, on
	// both ends) instead of sending them unsigned with a CRC32C trailing
	// checksum that the server verifies (aws-chunked trailers, which AWS,
	// MinIO and versitygw accept; set this for a server that does not).
	// Unsigned bodies are not authenticated: over plain HTTP neither are
	// the downloads, which the loader reads unsigned either way. Over HTTPS
	// TLS protects bodies and neither applies (minio-go never signs them).
	SignPayload bool
	// FetchStreams is how many byte ranges of an object of 32 MiB or more
	// download at once (default 8; 1: one stream). One S3 connection
	// carries ~100 MB/s on AWS; an adapter's weights are hundreds of MB.
	FetchStreams int
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
		Transport: trackingTransport{transport}, MaxRetries: 2, TrailingHeaders: !secure && !opts.SignPayload})
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
	// open starts the download and checks the size bound.
	open := func() (*minio.Object, minio.ObjectInfo, error) {
		obj, err := s.c.GetObject(ctx, s.opts.Bucket, s.key(id, file), minio.GetObjectOptions{})
		if err != nil {
			return nil, minio.ObjectInfo{}, s.mapErr(id, err)
		}
		info, err := obj.Stat()
		if err == nil && max > 0 && info.Size > max {
			err = fmt.Errorf("%w: %s/%s is %d bytes, limit %d", ErrTooLarge, id, file, info.Size, max)
		} else if err != nil {
			err = s.mapErr(id, err)
		}
		if err != nil {
			obj.Close()
			return nil, info, err
		}
		return obj, info, nil
	}
	obj, info, err := open()
	if err != nil {
		return nil, info, err
	}
	defer func() {
		if obj != nil {
			obj.Close()
		}
	}()
	if streams := s.fetchStreams(); streams > 1 && info.Size >= 2*rangePart {
		obj.Close()
		buf, err := s.getRanges(ctx, s.key(id, file), info, streams, progress)
		if err == nil {
			return buf, info, nil
		}
		if !errPreconditionFailed(err) {
			return nil, info, s.mapErr(id, err)
		}
		// Replaced while it downloaded: read the new version in one stream.
		if obj, info, err = open(); err != nil {
			return nil, info, err
		}
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

// rangePart is the smallest byte range getRanges asks for.
const rangePart = 16 << 20

func (s *S3) fetchStreams() int {
	if s.opts.FetchStreams <= 0 {
		return 8
	}
	return s.opts.FetchStreams
}

// getRanges reads the object at key (info: its size and ETag) as up to
// streams byte ranges at once, each asked for only if the ETag still
// matches, so the parts are of one version (else a PreconditionFailed
// error). progress sees the bytes read so far, in order.
func (s *S3) getRanges(ctx context.Context, key string, info minio.ObjectInfo, streams int, progress func(done, total int64)) ([]byte, error) {
	size := info.Size
	parts := int(min(int64(streams), size/rangePart))
	buf := make([]byte, size)
	var mu sync.Mutex
	var done int64
	read := func(start, end int64) error { // [start, end)
		opts := minio.GetObjectOptions{}
		if err := opts.SetRange(start, end-1); err != nil {
			return err
		}
		if err := opts.SetMatchETag(info.ETag); err != nil {
			return err
		}
		obj, err := s.c.GetObject(ctx, s.opts.Bucket, key, opts)
		if err != nil {
			return err
		}
		defer obj.Close()
		for off := start; off < end; {
			n, err := obj.Read(buf[off:min(end, off+4<<20)])
			off += int64(n)
			if n > 0 && progress != nil {
				mu.Lock()
				done += int64(n)
				progress(done, size)
				mu.Unlock()
			}
			if err == io.EOF && off < end {
				return fmt.Errorf("%s: range [%d, %d) ended at %d: %w", key, start, end, off, io.ErrUnexpectedEOF)
			}
			if err != nil && err != io.EOF {
				return err
			}
			if err == io.EOF {
				break
			}
		}
		return nil
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	errs := make([]error, parts)
	var wg sync.WaitGroup
	for p := range parts {
		start, end := size*int64(p)/int64(parts), size*int64(p+1)/int64(parts)
		wg.Add(1)
		go func() {
			defer wg.Done()
			if errs[p] = read(start, end); errs[p] != nil {
				cancel()
			}
		}()
	}
	wg.Wait()
	for _, err := range errs { // a PreconditionFailed first: the others may be its cancellations
		if errPreconditionFailed(err) {
			return nil, err
		}
	}
	for _, err := range errs {
		if err != nil {
			return nil, err
		}
	}
	return buf, nil
}

// errPreconditionFailed: the object no longer has the ETag asked for.
func errPreconditionFailed(err error) bool {
	if err == nil {
		return false
	}
	r := minio.ToErrorResponse(err)
	return r.StatusCode == http.StatusPreconditionFailed || r.Code == "PreconditionFailed"
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

// putOptions are an upload's options: unsigned bodies unless SignPayload
// (see S3Options.SignPayload): 168 MB of weights into versitygw on a
// 2-core VM, 268 MB/s signed, 472 MB/s unsigned with the CRC32C trailer
// (BenchmarkPutOptions).
func (s *S3) putOptions(contentType string) minio.PutObjectOptions {
	return minio.PutObjectOptions{ContentType: contentType, DisableContentSha256: !s.opts.SignPayload}
}

// Put implements Store: weights first, so a listing never pairs a new
// config with missing weights.
func (s *S3) Put(ctx context.Context, id string, config, weights []byte) (string, error) {
	if err := ValidateID(id); err != nil {
		return "", err
	}
	wi, err := s.c.PutObject(ctx, s.opts.Bucket, s.key(id, WeightsFile), bytesReader(weights), int64(len(weights)),
		s.putOptions("application/octet-stream"))
	if err != nil {
		return "", s.mapErr(id, err)
	}
	ci, err := s.c.PutObject(ctx, s.opts.Bucket, s.key(id, ConfigFile), bytesReader(config), int64(len(config)),
		s.putOptions("application/json"))
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
