package store

import (
	"fmt"
	"log/slog"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// Open makes a store from a URL:
//
//	/path/to/folder, ./rel, file:///path        a folder (FS)
//	s3://bucket/prefix?endpoint=http://host:9000&region=us-east-1&path_style=true
//	    &notify=auto|listen|poll|sqs&poll=5s&resync=1m&sqs_queue=https://sqs...
//	    &sign_payload=true (S3Options.SignPayload)&fetch_streams=8 (S3Options.FetchStreams)
//
// S3 credentials come from the environment (see S3Options).
func Open(raw string, log *slog.Logger) (Store, error) {
	u, err := ParseURL(raw)
	if err != nil {
		return nil, err
	}
	switch c := u.(type) {
	case FSConfig:
		return NewFS(c.Root, FSOptions{PollInterval: c.PollInterval, Logger: log})
	case S3Options:
		c.Logger = log
		return NewS3(c)
	}
	panic("unreachable")
}

// FSConfig is a parsed folder URL.
type FSConfig struct {
	Root         string
	PollInterval time.Duration
}

// ParseURL parses a store URL into FSConfig or S3Options.
func ParseURL(raw string) (any, error) {
	if raw == "" {
		return nil, fmt.Errorf("store: empty store URL")
	}
	scheme, _, hasScheme := strings.Cut(raw, "://")
	if !hasScheme {
		return FSConfig{Root: raw}, nil
	}
	u, err := url.Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("store: URL %q: %w", raw, err)
	}
	q := u.Query()
	dur := func(k string) (time.Duration, error) {
		v := q.Get(k)
		if v == "" {
			return 0, nil
		}
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 {
			return 0, fmt.Errorf("store: URL %q: %s=%q is not a positive duration", raw, k, v)
		}
		return d, nil
	}
	switch strings.ToLower(scheme) {
	case "file":
		if u.Host != "" && u.Host != "localhost" {
			return nil, fmt.Errorf("store: URL %q: file URLs name a local path (file:///path)", raw)
		}
		if u.Path == "" {
			return nil, fmt.Errorf("store: URL %q: no path", raw)
		}
		p, err := dur("poll")
		if err != nil {
			return nil, err
		}
		return FSConfig{Root: u.Path, PollInterval: p}, nil
	case "s3":
		if u.Host == "" {
			return nil, fmt.Errorf("store: URL %q: no bucket (s3://bucket/prefix)", raw)
		}
		o := S3Options{Bucket: u.Host, Prefix: strings.TrimPrefix(u.Path, "/"), Endpoint: q.Get("endpoint"),
			Region: q.Get("region"), Notify: q.Get("notify"), SQSQueueURL: q.Get("sqs_queue"), SQSEndpoint: q.Get("sqs_endpoint")}
		if v := q.Get("path_style"); v != "" {
			b, err := strconv.ParseBool(v)
			if err != nil {
				return nil, fmt.Errorf("store: URL %q: path_style=%q is not a boolean", raw, v)
			}
			o.PathStyle = b
		}
		if v := q.Get("sign_payload"); v != "" {
			b, err := strconv.ParseBool(v)
			if err != nil {
				return nil, fmt.Errorf("store: URL %q: sign_payload=%q is not a boolean", raw, v)
			}
			o.SignPayload = b
		}
		if v := q.Get("fetch_streams"); v != "" {
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 || n > 64 {
				return nil, fmt.Errorf("store: URL %q: fetch_streams=%q is not a number from 1 to 64", raw, v)
			}
			o.FetchStreams = n
		}
		if o.PollInterval, err = dur("poll"); err != nil {
			return nil, err
		}
		if o.ResyncInterval, err = dur("resync"); err != nil {
			return nil, err
		}
		for k := range q {
			switch k {
			case "endpoint", "region", "path_style", "sign_payload", "fetch_streams", "notify", "poll", "resync", "sqs_queue", "sqs_endpoint":
			default:
				return nil, fmt.Errorf("store: URL %q: unknown parameter %q", raw, k)
			}
		}
		if u.User != nil {
			return nil, fmt.Errorf("store: URL %q: put credentials in the environment, not the URL", raw)
		}
		return o, nil
	}
	return nil, fmt.Errorf("store: URL %q: unknown scheme %q (want a path, file:// or s3://)", raw, scheme)
}
