package store_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/peftd/peftd/loader/store"
)

// TestValidateID is the adapter ID rule, the one every layer (API, loader,
// stores) applies: 1 to 128 of [A-Za-z0-9._-], starting with a letter or
// digit, no "..". Every refusal wraps ErrBadID, says what is wrong and
// states the rule.
func TestValidateID(t *testing.T) {
	cases := []struct {
		id   string
		ok   bool
		want string // in the error
	}{
		{"qv-r8", true, ""},
		{"A.b_c-9", true, ""},
		{"7b", true, ""},
		{"a", true, ""},
		{"v1.2", true, ""},
		{"trailing.", true, ""},
		{"trailing-_", true, ""},
		{strings.Repeat("x", 128), true, ""},
		{"", false, "empty"},
		{".", false, "path element"},
		{"..", false, "path element"},
		{strings.Repeat("x", 129), false, "at most 128"},
		{"a/b", false, "path separator"},
		{"../etc", false, "path separator"},
		{`a\b`, false, "path separator"},
		{"a b", false, "' '"},
		{"naïve", false, "non-ASCII"},
		{"a\x00", false, "offset 1"},
		// Accepted by the stores before the rule was one for every layer:
		// the error says how to serve them again.
		{".hidden", false, `starts with '.'`},
		{"_x", false, `starts with '_'`},
		{"-lead", false, `starts with '-'`},
		{"bad..id", false, `has ".." at offset 3`},
		{"a...", false, `has ".." at offset 1`},
	}
	for _, c := range cases {
		err := store.ValidateID(c.id)
		if c.ok != (err == nil) {
			t.Errorf("ValidateID(%q) = %v, want ok=%v", c.id, err, c.ok)
			continue
		}
		if err == nil {
			continue
		}
		if !errors.Is(err, store.ErrBadID) || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), store.IDRule) {
			t.Errorf("ValidateID(%q) = %v, want ErrBadID naming %q and the rule", c.id, err, c.want)
		}
		legacy := strings.Contains(c.want, "starts with") || strings.Contains(c.want, `".."`)
		if legacy != strings.Contains(err.Error(), "rename") {
			t.Errorf("ValidateID(%q) = %v: want a rename hint only for IDs the stores used to accept", c.id, err)
		}
	}
}

func TestParseURL(t *testing.T) {
	cases := []struct {
		raw  string
		want any
		err  string
	}{
		{"/srv/adapters", store.FSConfig{Root: "/srv/adapters"}, ""},
		{"rel/dir", store.FSConfig{Root: "rel/dir"}, ""},
		{"file:///srv/a?poll=250ms", store.FSConfig{Root: "/srv/a", PollInterval: 250 * time.Millisecond}, ""},
		{"s3://bucket", store.S3Options{Bucket: "bucket"}, ""},
		{"s3://bucket/pre/fix?endpoint=http://127.0.0.1:9000&region=eu-west-1&path_style=true&notify=poll&poll=2s",
			store.S3Options{Bucket: "bucket", Prefix: "pre/fix", Endpoint: "http://127.0.0.1:9000", Region: "eu-west-1",
				PathStyle: true, Notify: "poll", PollInterval: 2 * time.Second}, ""},
		{"s3://b/p?notify=sqs&sqs_queue=https://sqs.us-east-1.amazonaws.com/1/q",
			store.S3Options{Bucket: "b", Prefix: "p", Notify: "sqs", SQSQueueURL: "https://sqs.us-east-1.amazonaws.com/1/q"}, ""},
		{"", nil, "empty"},
		{"s3:///prefix", nil, "no bucket"},
		{"s3://b?sign_payload=true", store.S3Options{Bucket: "b", SignPayload: true}, ""},
		{"s3://b?fetch_streams=4", store.S3Options{Bucket: "b", FetchStreams: 4}, ""},
		{"s3://b?fetch_streams=0", nil, "from 1 to 64"},
		{"s3://b?fetch_streams=many", nil, "from 1 to 64"},
		{"s3://b?path_style=maybe", nil, "not a boolean"},
		{"s3://b?sign_payload=yes", nil, "not a boolean"},
		{"s3://b?poll=-1s", nil, "positive duration"},
		{"s3://b?colour=red", nil, "unknown parameter"},
		{"s3://key:secret@b", nil, "environment"},
		{"gs://b", nil, "unknown scheme"},
		{"file://host/x", nil, "local path"},
	}
	for _, c := range cases {
		got, err := store.ParseURL(c.raw)
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Errorf("ParseURL(%q) = %v, %v; want error with %q", c.raw, got, err, c.err)
			}
			continue
		}
		if err != nil {
			t.Errorf("ParseURL(%q): %v", c.raw, err)
			continue
		}
		if fmt.Sprintf("%+v", got) != fmt.Sprintf("%+v", c.want) {
			t.Errorf("ParseURL(%q) =\n %+v\nwant\n %+v", c.raw, got, c.want)
		}
	}
}

func TestParseS3EventMessage(t *testing.T) {
	direct := `{"Records":[
	 {"eventVersion":"2.1","eventSource":"aws:s3","awsRegion":"us-east-1","eventName":"ObjectCreated:Put",
	  "s3":{"bucket":{"name":"bkt"},"object":{"key":"adapters/my-lora/adapter_model.safetensors","size":10,"eTag":"abc"}}},
	 {"eventSource":"aws:s3","eventName":"ObjectRemoved:Delete",
	  "s3":{"bucket":{"name":"bkt"},"object":{"key":"adapters/old%2Bone/adapter_config.json"}}},
	 {"eventSource":"aws:s3","eventName":"ObjectCreated:CompleteMultipartUpload",
	  "s3":{"bucket":{"name":"bkt"},"object":{"key":"adapters/with+space/adapter_config.json"}}},
	 {"eventSource":"aws:s3","eventName":"ObjectCreated:Put",
	  "s3":{"bucket":{"name":"bkt"},"object":{"key":"adapters/x/README.md"}}},
	 {"eventSource":"aws:s3","eventName":"ObjectCreated:Put",
	  "s3":{"bucket":{"name":"other"},"object":{"key":"adapters/y/adapter_config.json"}}},
	 {"eventSource":"aws:s3","eventName":"ObjectCreated:Put",
	  "s3":{"bucket":{"name":"bkt"},"object":{"key":"elsewhere/z/adapter_config.json"}}}
	]}`
	sns, _ := jsonString(direct)
	cases := []struct {
		name string
		body string
		recs int
		err  bool
	}{
		{"direct", direct, 6, false},
		{"sns-envelope", `{"Type":"Notification","MessageId":"1","TopicArn":"arn:aws:sns:x","Message":` + sns + `}`, 6, false},
		{"test-event", `{"Service":"Amazon S3","Event":"s3:TestEvent","Time":"2024-01-01T00:00:00Z","Bucket":"bkt"}`, 0, false},
		{"not-json", `hello`, 0, true},
		{"bad-escape", `{"Records":[{"eventSource":"aws:s3","eventName":"ObjectCreated:Put","s3":{"bucket":{"name":"bkt"},"object":{"key":"a%zz"}}}]}`, 0, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			recs, err := store.ParseS3EventMessage(c.body)
			if (err != nil) != c.err {
				t.Fatalf("err = %v, want error %v", err, c.err)
			}
			if len(recs) != c.recs {
				t.Fatalf("%d records, want %d: %+v", len(recs), c.recs, recs)
			}
			if c.name == "direct" || c.name == "sns-envelope" {
				if recs[0].Key != "adapters/my-lora/adapter_model.safetensors" || recs[0].Name != "ObjectCreated:Put" || recs[0].Bucket != "bkt" {
					t.Errorf("record 0 = %+v", recs[0])
				}
				if recs[1].Key != "adapters/old+one/adapter_config.json" || recs[2].Key != "adapters/with space/adapter_config.json" {
					t.Errorf("key decoding: %q %q", recs[1].Key, recs[2].Key)
				}
				evs := store.EventsFor("bkt", "adapters/", recs)
				// old+one and "with space" are not valid ids; README, other bucket and prefix are ignored.
				want := []store.Event{{Type: store.EventPut, ID: "my-lora"}}
				if fmt.Sprint(evs) != fmt.Sprint(want) {
					t.Errorf("events = %v, want %v", evs, want)
				}
			}
		})
	}
	recs, _ := store.ParseS3EventMessage(`{"Records":[{"eventSource":"aws:s3","eventName":"ObjectRemoved:DeleteMarkerCreated","s3":{"bucket":{"name":"b"},"object":{"key":"p/id-1/adapter_config.json"}}}]}`)
	if evs := store.EventsFor("b", "p/", recs); len(evs) != 1 || evs[0] != (store.Event{Type: store.EventDelete, ID: "id-1"}) {
		t.Errorf("delete marker events = %v", evs)
	}
}

func jsonString(s string) (string, error) {
	var b strings.Builder
	b.WriteByte('"')
	for _, r := range s {
		switch r {
		case '"', '\\':
			b.WriteByte('\\')
			b.WriteRune(r)
		case '\n':
			b.WriteString(`\n`)
		case '\t':
			b.WriteString(`\t`)
		default:
			b.WriteRune(r)
		}
	}
	b.WriteByte('"')
	return b.String(), nil
}

// storeContract exercises any Store: put, list, stat, get (bound and
// progress), replace, delete and a watch that sees all three.
func storeContract(t *testing.T, s store.Store) {
	ctx := context.Background()
	watchCtx, stopWatch := context.WithCancel(ctx)
	defer stopWatch()
	events := s.Watch(watchCtx)
	time.Sleep(100 * time.Millisecond) // let the watcher take its baseline

	cfg := []byte(`{"r":8}`)
	w := bytes.Repeat([]byte{7}, 10000)
	e1, err := s.Put(ctx, "a-1", cfg, w)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Put(ctx, "b.2", []byte(`{}`), []byte("w")); err != nil {
		t.Fatal(err)
	}
	objs, err := s.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	sort.Slice(objs, func(i, j int) bool { return objs[i].ID < objs[j].ID })
	if len(objs) != 2 || objs[0].ID != "a-1" || objs[0].ETag != e1 || objs[0].Size != int64(len(cfg)+len(w)) || objs[0].Modified.IsZero() {
		t.Fatalf("List = %+v (put etag %s)", objs, e1)
	}
	if o, err := s.Stat(ctx, "a-1"); err != nil || o.ETag != e1 {
		t.Fatalf("Stat = %+v, %v", o, err)
	}
	var last, total int64
	gc, gw, ge, err := s.Get(ctx, "a-1", store.GetOptions{MaxBytes: 10000, Progress: func(d, tot int64) { last, total = d, tot }})
	if err != nil || !bytes.Equal(gc, cfg) || !bytes.Equal(gw, w) || ge != e1 {
		t.Fatalf("Get: etag %s err %v", ge, err)
	}
	if last != 10000 || total != 10000 {
		t.Errorf("progress ended at %d/%d", last, total)
	}
	if _, _, _, err := s.Get(ctx, "a-1", store.GetOptions{MaxBytes: 9999}); !errors.Is(err, store.ErrTooLarge) {
		t.Errorf("Get over the bound: %v", err)
	}
	for _, id := range []string{"missing", "a-"} {
		if _, _, _, err := s.Get(ctx, id, store.GetOptions{}); !errors.Is(err, store.ErrNotFound) {
			t.Errorf("Get(%s): %v, want ErrNotFound", id, err)
		}
		if _, err := s.Stat(ctx, id); !errors.Is(err, store.ErrNotFound) {
			t.Errorf("Stat(%s): %v, want ErrNotFound", id, err)
		}
	}
	for _, id := range []string{"../x", "", "a/b"} {
		if _, err := s.Put(ctx, id, cfg, w); !errors.Is(err, store.ErrBadID) {
			t.Errorf("Put(%q): %v", id, err)
		}
		if _, _, _, err := s.Get(ctx, id, store.GetOptions{}); !errors.Is(err, store.ErrBadID) {
			t.Errorf("Get(%q): %v", id, err)
		}
	}
	// A polling watch reports what differs between scans, so wait for the
	// creations before changing things again.
	waitFor := func(want map[string]store.EventType) {
		t.Helper()
		saw := map[string]store.EventType{}
		deadline := time.After(20 * time.Second)
		for {
			done := true
			for id, ty := range want {
				done = done && saw[id] == ty
			}
			if done {
				return
			}
			select {
			case ev, ok := <-events:
				if !ok {
					t.Fatal("watch closed early")
				}
				saw[ev.ID] = ev.Type
			case <-deadline:
				t.Fatalf("watch saw %v, want %v", saw, want)
			}
		}
	}
	waitFor(map[string]store.EventType{"a-1": store.EventPut, "b.2": store.EventPut})
	e2, err := s.Put(ctx, "a-1", []byte(`{"r":16}`), w)
	if err != nil || e2 == e1 {
		t.Fatalf("replace: etag %s (old %s), %v", e2, e1, err)
	}
	if err := s.Delete(ctx, "b.2"); err != nil {
		t.Fatal(err)
	}
	if err := s.Delete(ctx, "b.2"); err != nil {
		t.Errorf("second delete: %v", err)
	}
	waitFor(map[string]store.EventType{"a-1": store.EventPut, "b.2": store.EventDelete})
	stopWatch()
	for range events { // closes after ctx ends
	}
	if objs, _ := s.List(ctx); len(objs) != 1 || objs[0].ETag != e2 {
		t.Errorf("List after replace+delete = %+v", objs)
	}
}

func TestFSStore(t *testing.T) {
	root := t.TempDir()
	s, err := store.NewFS(root, store.FSOptions{PollInterval: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	storeContract(t, s)
	// Temporaries, stray files and incomplete folders are not adapters.
	os.MkdirAll(filepath.Join(root, "incomplete"), 0o755)
	os.WriteFile(filepath.Join(root, "incomplete", store.ConfigFile), []byte("{}"), 0o644)
	os.WriteFile(filepath.Join(root, "stray.txt"), nil, 0o644)
	os.MkdirAll(filepath.Join(root, ".peftd-tmp-x-1"), 0o755)
	objs, err := s.List(context.Background())
	if err != nil || len(objs) != 1 || objs[0].ID != "a-1" {
		t.Errorf("List = %+v, %v", objs, err)
	}
	// A folder dropped in by hand (not through Put) is an adapter too.
	os.MkdirAll(filepath.Join(root, "manual"), 0o755)
	os.WriteFile(filepath.Join(root, "manual", store.WeightsFile), []byte("w"), 0o644)
	os.WriteFile(filepath.Join(root, "manual", store.ConfigFile), []byte("{}"), 0o644)
	if _, err := s.Stat(context.Background(), "manual"); err != nil {
		t.Error(err)
	}
	// A symbolic link to an adapter folder elsewhere is listed; one to a
	// file, or a dangling one, is not.
	elsewhere := filepath.Join(t.TempDir(), "linked")
	if err := errors.Join(os.MkdirAll(elsewhere, 0o755),
		os.WriteFile(filepath.Join(elsewhere, store.WeightsFile), []byte("w"), 0o644),
		os.WriteFile(filepath.Join(elsewhere, store.ConfigFile), []byte("{}"), 0o644)); err != nil {
		t.Fatal(err)
	}
	for name, target := range map[string]string{"linked": elsewhere, "to-file": filepath.Join(root, "stray.txt"), "dangling": filepath.Join(root, "gone")} {
		if err := os.Symlink(target, filepath.Join(root, name)); err != nil {
			t.Fatal(err)
		}
	}
	objs, err = s.List(context.Background())
	ids := []string{}
	for _, o := range objs {
		ids = append(ids, o.ID)
	}
	slices.Sort(ids)
	if err != nil || !slices.Equal(ids, []string{"a-1", "linked", "manual"}) {
		t.Errorf("List with links = %v, %v; want a-1, linked, manual", ids, err)
	}
}

// TestFSListFolderGoneMidway: the folder vanishing between List's read of
// it and of its adapters' files (renamed, unmounted) makes List fail with
// the folder unavailable, not return the adapters it still read (none): a
// watch would report them deleted and a loader would forget them. An
// adapter folder vanishing alone is still left out of a listing that
// succeeds.
func TestFSListFolderGoneMidway(t *testing.T) {
	root := filepath.Join(t.TempDir(), "store")
	s, err := store.NewFS(root, store.FSOptions{PollInterval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for _, id := range []string{"a-1", "b-2"} {
		if _, err := s.Put(ctx, id, []byte("{}"), []byte("w")); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() { store.SetListedHook(nil) })
	cases := []struct {
		name    string
		hook    func(root string) error
		restore func(root string) error
		want    []string // nil: List fails
	}{
		{"folder renamed", func(r string) error { return os.Rename(r, r+".away") }, func(r string) error { return os.Rename(r+".away", r) }, nil},
		{"one adapter removed", func(r string) error { return os.Rename(filepath.Join(r, "b-2"), filepath.Join(r, "..", "b-2.away")) },
			func(r string) error { return os.Rename(filepath.Join(r, "..", "b-2.away"), filepath.Join(r, "b-2")) }, []string{"a-1"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var herr error
			store.SetListedHook(func(r string) { herr = c.hook(r) })
			objs, err := s.List(ctx)
			store.SetListedHook(nil)
			if herr != nil {
				t.Fatal(herr)
			}
			if rerr := c.restore(root); rerr != nil {
				t.Fatal(rerr)
			}
			if c.want == nil {
				if err == nil || !strings.Contains(err.Error(), "is unavailable") {
					t.Errorf("List with the folder gone midway = %v, %v; want the folder unavailable", objs, err)
				}
				return
			}
			var ids []string
			for _, o := range objs {
				ids = append(ids, o.ID)
			}
			if err != nil || !slices.Equal(ids, c.want) {
				t.Errorf("List = %v, %v; want %v", ids, err, c.want)
			}
		})
	}
	if objs, err := s.List(ctx); err != nil || len(objs) != 2 {
		t.Errorf("List after both = %+v, %v; want a-1 and b-2", objs, err)
	}
}

// TestFSConsistentReads: a Get racing Puts returns one version's two files
// together, with that version's ETag.
func TestFSConsistentReads(t *testing.T) {
	s, err := store.NewFS(t.TempDir(), store.FSOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if _, err := s.Put(ctx, "x", []byte("0"), bytes.Repeat([]byte("0"), 1<<16)); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	stop := make(chan struct{})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 1; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			d := []byte{byte('0' + i%10)}
			if _, err := s.Put(ctx, "x", d, bytes.Repeat(d, 1<<16)); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	for range 300 {
		c, w, etag, err := s.Get(ctx, "x", store.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if len(w) != 1<<16 || w[0] != c[0] || w[len(w)-1] != c[0] || etag == "" {
			t.Fatalf("torn read: config %q, weights start %q end %q", c, w[0], w[len(w)-1])
		}
	}
	close(stop)
	wg.Wait()
}

func TestOpen(t *testing.T) {
	dir := t.TempDir()
	s, err := store.Open("file://"+dir+"?poll=10ms", nil)
	if err != nil {
		t.Fatal(err)
	}
	if fs, ok := s.(*store.FS); !ok || fs.Root() != dir {
		t.Fatalf("Open(file://) = %T", s)
	}
	s3, err := store.Open("s3://bkt/adapters?endpoint=http://127.0.0.1:1&path_style=true&region=us-east-1", nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := s3.(*store.S3); !ok {
		t.Fatalf("Open(s3://) = %T", s3)
	}
}
