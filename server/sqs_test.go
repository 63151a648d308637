package server

import (
	"context"
	"net/url"
	"strings"
	"testing"
)

func TestWithSQSQueue(t *testing.T) {
	const q = "https://sqs.us-east-1.amazonaws.com/123456789012/peftd-events"
	got, err := withSQSQueue("s3://bkt/adapters/?region=us-east-1&notify=sqs", q)
	if err != nil {
		t.Fatal(err)
	}
	u, err := url.Parse(got)
	if err != nil || u.Host != "bkt" || u.Path != "/adapters/" || u.Query().Get("sqs_queue") != q ||
		u.Query().Get("region") != "us-east-1" || u.Query().Get("notify") != "sqs" {
		t.Errorf("withSQSQueue = %q (%v)", got, err)
	}
	// The same queue in the URL and the flag is fine; none leaves the URL alone.
	if _, err := withSQSQueue("s3://bkt/p?sqs_queue="+url.QueryEscape(q), q); err != nil {
		t.Errorf("same queue twice: %v", err)
	}
	if got, err := withSQSQueue("./folder", ""); err != nil || got != "./folder" {
		t.Errorf("no queue: %q %v", got, err)
	}
	for store, msg := range map[string]string{
		"":                               "needs an s3:// store",
		"./adapters":                     "needs an s3:// store",
		"file:///srv/adapters":           "needs an s3:// store",
		"s3://bkt/p?sqs_queue=https://x": "names the SQS queue",
	} {
		if _, err := withSQSQueue(store, q); err == nil || !strings.Contains(err.Error(), msg) {
			t.Errorf("store %q: %v, want %q", store, err, msg)
		}
	}
	// server.New refuses before loading the model.
	if _, err := New(context.Background(), Config{Store: t.TempDir(), SQSQueueURL: q, Device: DeviceCPU}); err == nil ||
		!strings.Contains(err.Error(), "needs an s3:// store") {
		t.Errorf("New with a folder store and a queue: %v", err)
	}
}
