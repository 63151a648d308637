package store

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/sqs"
	sqstypes "github.com/aws/aws-sdk-go-v2/service/sqs/types"
	"github.com/minio/minio-go/v7/pkg/credentials"
)

// S3Event is one record of an AWS S3 event notification.
type S3Event struct {
	Bucket string
	Key    string // URL-decoded
	Name   string // e.g. "ObjectCreated:Put", "ObjectRemoved:Delete"
}

type s3EventJSON struct {
	Records []struct {
		EventSource string `json:"eventSource"`
		EventName   string `json:"eventName"`
		S3          struct {
			Bucket struct {
				Name string `json:"name"`
			} `json:"bucket"`
			Object struct {
				Key string `json:"key"`
			} `json:"object"`
		} `json:"s3"`
	} `json:"Records"`
	Event string `json:"Event"` // "s3:TestEvent"
	// SNS envelope (S3 -> SNS -> SQS without raw message delivery).
	Type    string `json:"Type"`
	Message string `json:"Message"`
}

// ParseS3EventMessage decodes an SQS message body holding an S3 event
// notification (directly, or inside an SNS envelope). A test event, or a
// message holding no S3 records, yields no records and no error.
func ParseS3EventMessage(body string) ([]S3Event, error) {
	var m s3EventJSON
	if err := json.Unmarshal([]byte(body), &m); err != nil {
		return nil, fmt.Errorf("store: sqs: message is not an S3 event: %w", err)
	}
	if m.Type == "Notification" && m.Message != "" {
		return ParseS3EventMessage(m.Message)
	}
	var out []S3Event
	for _, r := range m.Records {
		if r.EventSource != "" && r.EventSource != "aws:s3" && r.EventSource != "minio:s3" {
			continue
		}
		// S3 encodes keys like an HTML form: spaces as '+', the rest %XX.
		key, err := url.QueryUnescape(r.S3.Object.Key)
		if err != nil {
			return nil, fmt.Errorf("store: sqs: bad object key %q: %w", r.S3.Object.Key, err)
		}
		out = append(out, S3Event{Bucket: r.S3.Bucket.Name, Key: key, Name: strings.TrimPrefix(r.EventName, "s3:")})
	}
	return out, nil
}

// eventsFor maps S3 event records to adapter events of this bucket and prefix.
func eventsFor(bucket, prefix string, recs []S3Event) []Event {
	var out []Event
	for _, r := range recs {
		if r.Bucket != "" && r.Bucket != bucket {
			continue
		}
		id, _, ok := idOfKey(prefix, r.Key)
		if !ok {
			continue
		}
		t := EventPut
		switch {
		case strings.HasPrefix(r.Name, "ObjectRemoved"):
			t = EventDelete
		case strings.HasPrefix(r.Name, "ObjectCreated"), strings.HasPrefix(r.Name, "ObjectRestore"):
		default:
			continue
		}
		out = append(out, Event{Type: t, ID: id})
	}
	return out
}

type sqsWatcher struct {
	c     *sqs.Client
	queue string
}

// minioCreds adapts minio-go's credential chain to the AWS SDK.
type minioCreds struct{ c *credentials.Credentials }

func (m minioCreds) Retrieve(ctx context.Context) (aws.Credentials, error) {
	v, err := m.c.GetWithContext(&credentials.CredContext{})
	if err != nil {
		return aws.Credentials{}, err
	}
	return aws.Credentials{AccessKeyID: v.AccessKeyID, SecretAccessKey: v.SecretAccessKey, SessionToken: v.SessionToken,
		CanExpire: !v.Expiration.IsZero(), Expires: v.Expiration, Source: "minio-go"}, nil
}

func (s *S3) sqsClient() (*sqsWatcher, error) {
	s.sqsOnce.Do(func() {
		region := s.opts.Region
		if region == "" {
			// https://sqs.<region>.amazonaws.com/<account>/<queue>
			if u, err := url.Parse(s.opts.SQSQueueURL); err == nil {
				if p := strings.Split(u.Hostname(), "."); len(p) >= 4 && p[0] == "sqs" {
					region = p[1]
				}
			}
		}
		if region == "" {
			s.sqsErr = errors.New("store: sqs: no region (set region= or AWS_REGION)")
			return
		}
		var creds *credentials.Credentials
		if s.opts.AccessKey != "" {
			creds = credentials.NewStaticV4(s.opts.AccessKey, s.opts.SecretKey, s.opts.SessionToken)
		} else {
			creds = credentials.NewChainCredentials([]credentials.Provider{
				&credentials.EnvAWS{}, &credentials.FileAWSCredentials{}, &credentials.IAM{}})
		}
		o := sqs.Options{Region: region, Credentials: aws.NewCredentialsCache(minioCreds{creds})}
		if s.opts.SQSEndpoint != "" {
			o.BaseEndpoint = aws.String(s.opts.SQSEndpoint)
		}
		s.sqs = &sqsWatcher{c: sqs.New(o), queue: s.opts.SQSQueueURL}
	})
	return s.sqs, s.sqsErr
}

// watchSQS long-polls the queue until ctx ends or it fails repeatedly; it
// returns the last full listing (resyncs run every ResyncInterval).
func (s *S3) watchSQS(ctx context.Context, ch chan<- Event) map[string]string {
	w, err := s.sqsClient()
	if err != nil {
		s.log.Error("store: sqs watcher unavailable, polling instead", "err", err)
		return nil
	}
	objs, err := s.List(ctx)
	if err != nil {
		return nil
	}
	prev := snapshot(objs)
	send := func(evs []Event) bool { return sendEvents(ctx, ch, evs) }
	lastSync, failures := time.Now(), 0
	for ctx.Err() == nil {
		if time.Since(lastSync) >= s.opts.ResyncInterval {
			if objs, err := s.List(ctx); err == nil {
				cur := snapshot(objs)
				if !send(diff(prev, cur)) {
					return prev
				}
				prev, lastSync = cur, time.Now()
			}
		}
		out, err := w.c.ReceiveMessage(ctx, &sqs.ReceiveMessageInput{
			QueueUrl: aws.String(w.queue), MaxNumberOfMessages: 10, WaitTimeSeconds: 20,
		})
		if err != nil {
			if ctx.Err() != nil {
				return prev
			}
			failures++
			s.log.Warn("store: sqs receive failed", "queue", w.queue, "err", err, "failures", failures)
			if failures >= 5 {
				s.log.Error("store: sqs watcher giving up, polling instead", "queue", w.queue)
				return prev
			}
			select {
			case <-ctx.Done():
				return prev
			case <-time.After(time.Duration(failures) * time.Second):
			}
			continue
		}
		failures = 0
		var del []sqstypes.DeleteMessageBatchRequestEntry
		for i, m := range out.Messages {
			recs, err := ParseS3EventMessage(aws.ToString(m.Body))
			if err != nil {
				s.log.Warn("store: sqs: dropping a message that is not an S3 event", "err", err)
			} else if !send(eventsFor(s.opts.Bucket, s.opts.Prefix, recs)) {
				return prev
			}
			del = append(del, sqstypes.DeleteMessageBatchRequestEntry{Id: aws.String(fmt.Sprint(i)), ReceiptHandle: m.ReceiptHandle})
		}
		if len(del) > 0 {
			if _, err := w.c.DeleteMessageBatch(ctx, &sqs.DeleteMessageBatchInput{QueueUrl: aws.String(w.queue), Entries: del}); err != nil {
				s.log.Warn("store: sqs delete failed", "err", err)
			}
		}
	}
	return prev
}
