package store_test

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/sqs"
	sqstypes "github.com/aws/aws-sdk-go-v2/service/sqs/types"
	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
	"github.com/minio/minio-go/v7/pkg/notification"

	"github.com/peftd/peftd/internal/s3test"
	"github.com/peftd/peftd/internal/testlog"
	"github.com/peftd/peftd/loader/store"
)

// TestSQSWithMoto runs the SQS consumer against a real SQS-protocol server
// (moto_server), whose S3 sends its event notifications to the queue: an
// adapter uploaded by another client reaches Watch through S3 -> SQS, with
// listing every hour; messages that are not S3 events are logged and
// deleted.
func TestSQSWithMoto(t *testing.T) {
	m := s3test.StartMoto(t)
	ctx := context.Background()
	q := sqs.New(sqs.Options{Region: m.Region, BaseEndpoint: aws.String(m.Endpoint),
		Credentials: aws.CredentialsProviderFunc(func(context.Context) (aws.Credentials, error) {
			return aws.Credentials{AccessKeyID: m.AccessKey, SecretAccessKey: m.Secret}, nil
		})})
	qo, err := q.CreateQueue(ctx, &sqs.CreateQueueInput{QueueName: aws.String("peftd-events")})
	if err != nil {
		t.Fatalf("CreateQueue: %v", err)
	}
	queueURL := aws.ToString(qo.QueueUrl)

	s3c, err := minio.New(m.Addr, &minio.Options{Creds: credentials.NewStaticV4(m.AccessKey, m.Secret, ""),
		Region: m.Region, BucketLookup: minio.BucketLookupPath})
	if err != nil {
		t.Fatal(err)
	}
	const bucket = "models"
	if err := s3c.MakeBucket(ctx, bucket, minio.MakeBucketOptions{Region: m.Region}); err != nil {
		t.Fatalf("MakeBucket: %v", err)
	}
	qc := notification.NewConfig(notification.NewArn("aws", "sqs", m.Region, m.Account, "peftd-events"))
	qc.AddEvents(notification.ObjectCreatedAll, notification.ObjectRemovedAll)
	qc.AddFilterPrefix("adapters/")
	var cfg notification.Configuration
	cfg.AddQueue(qc)
	if err := s3c.SetBucketNotification(ctx, bucket, cfg); err != nil {
		t.Fatalf("SetBucketNotification: %v", err)
	}

	var logs testlog.Buffer
	s, err := store.NewS3(store.S3Options{Endpoint: m.Endpoint, Region: m.Region, Bucket: bucket, Prefix: "adapters",
		PathStyle: true, AccessKey: m.AccessKey, SecretKey: m.Secret, SQSQueueURL: queueURL, SQSEndpoint: m.Endpoint,
		PollInterval: time.Hour, ResyncInterval: time.Hour, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	wctx, cancel := context.WithCancel(ctx)
	ch := s.Watch(wctx)
	defer func() {
		cancel()
		for range ch {
		}
	}()
	time.Sleep(300 * time.Millisecond) // the baseline listing, the first receive

	next := func(want store.Event, within time.Duration) time.Duration {
		t.Helper()
		start := time.Now()
		timeout := time.After(within)
		for {
			select {
			case ev := <-ch:
				if ev == want {
					return time.Since(start)
				}
			case <-timeout:
				t.Fatalf("no %v event for %s within %v; logs:\n%s", want.Type, want.ID, within, logs.String())
			}
		}
	}
	put := func(key string, b []byte) {
		t.Helper()
		if _, err := s3c.PutObject(ctx, bucket, key, bytes.NewReader(b), int64(len(b)), minio.PutObjectOptions{}); err != nil {
			t.Fatal(err)
		}
	}

	// Another client uploads an adapter (weights, then config): S3 -> SQS -> Watch.
	start := time.Now()
	put("adapters/via-sqs/"+store.WeightsFile, []byte("w"))
	put("adapters/via-sqs/"+store.ConfigFile, []byte(`{"r":8}`))
	next(store.Event{Type: store.EventPut, ID: "via-sqs"}, 10*time.Second)
	t.Logf("upload seen through SQS after %v (listing every hour)", time.Since(start).Round(time.Millisecond))

	// Messages that are not S3 events are logged and deleted; an S3 event
	// inside an SNS envelope, sent after them, is still delivered.
	inner, _ := json.Marshal(map[string]any{"Records": []any{map[string]any{
		"eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
		"s3": map[string]any{"bucket": map[string]any{"name": bucket}, "object": map[string]any{"key": "adapters/via-sns/" + store.ConfigFile}},
	}}})
	sns, _ := json.Marshal(map[string]string{"Type": "Notification", "Message": string(inner)})
	for _, body := range []string{"not json at all", `{"Records":[{"eventSource":"aws:s3","s3":{"object":{"key":"%zz"}}}]}`, string(sns)} {
		if _, err := q.SendMessage(ctx, &sqs.SendMessageInput{QueueUrl: aws.String(queueURL), MessageBody: aws.String(body)}); err != nil {
			t.Fatal(err)
		}
	}
	next(store.Event{Type: store.EventPut, ID: "via-sns"}, 10*time.Second)
	deadline := time.Now().Add(10 * time.Second)
	for {
		if n := strings.Count(logs.String(), "dropping a message that is not an S3 event"); n >= 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("malformed messages not logged; logs:\n%s", logs.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	for {
		a, err := q.GetQueueAttributes(ctx, &sqs.GetQueueAttributesInput{QueueUrl: aws.String(queueURL),
			AttributeNames: []sqstypes.QueueAttributeName{sqstypes.QueueAttributeNameApproximateNumberOfMessages,
				sqstypes.QueueAttributeNameApproximateNumberOfMessagesNotVisible}})
		if err != nil {
			t.Fatal(err)
		}
		if a.Attributes["ApproximateNumberOfMessages"] == "0" && a.Attributes["ApproximateNumberOfMessagesNotVisible"] == "0" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("messages left in the queue: %v", a.Attributes)
		}
		time.Sleep(20 * time.Millisecond)
	}

	// A delete reaches Watch the same way.
	if err := s3c.RemoveObject(ctx, bucket, "adapters/via-sqs/"+store.ConfigFile, minio.RemoveObjectOptions{}); err != nil {
		t.Fatal(err)
	}
	next(store.Event{Type: store.EventDelete, ID: "via-sqs"}, 10*time.Second)
	if strings.Contains(logs.String(), "sqs receive failed") {
		t.Errorf("receive failures:\n%s", logs.String())
	}
}
