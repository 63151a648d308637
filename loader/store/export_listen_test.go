package store

import (
	"context"
	"time"

	"github.com/minio/minio-go/v7/pkg/notification"
)

// SetListen replaces MinIO's ListenBucketNotification under an S3 store's
// Watch (a silent or cut stream, in tests); call it before Watch.
func SetListen(s *S3, f func(ctx context.Context) <-chan notification.Info) { s.listen = f }

// RealListen is the S3 store's own ListenBucketNotification stream.
func RealListen(s *S3) func(ctx context.Context) <-chan notification.Info {
	return (&S3{c: s.c, opts: s.opts, log: s.log}).listenWatch().listen
}

// SetListenTiming shortens how a notification stream is trusted; call it
// before Watch.
func SetListenTiming(s *S3, probeWait, keepAlive, retryMin, retryMax time.Duration) {
	s.timing = listenTiming{probeWait: probeWait, keepAlive: keepAlive, retryMin: retryMin, retryMax: retryMax}
}

// ListenProven says whether the store's Watch trusts its notification stream.
func ListenProven(s *S3) bool { return s.listenProven.Load() }
