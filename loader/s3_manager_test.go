package loader_test

import (
	"context"
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/peftd/peftd/internal/s3test"
	"github.com/peftd/peftd/loader"
	"github.com/peftd/peftd/loader/store"
)

// TestS3DeployReplaceDelete runs the Manager on a real S3 server
// (versitygw): adapters uploaded with a plain S3 client deploy, replace and
// undeploy without a restart, seen through Watch (polling; versitygw has no
// MinIO bucket notifications).
func TestS3DeployReplaceDelete(t *testing.T) {
	srv := s3test.Start(t)
	srv.MakeBucket(t, "models")
	ctx := context.Background()
	st, err := store.NewS3(store.S3Options{Endpoint: srv.Endpoint, Region: srv.Region, Bucket: "models", Prefix: "lora/",
		PathStyle: true, AccessKey: srv.AccessKey, SecretKey: srv.Secret, PollInterval: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	// Acquire trusts the index for an hour: changes must arrive through Watch.
	e := newEnvWithStore(t, 2, st, loader.Options{RecheckInterval: time.Hour})

	upload := func(id, fixtureName string) {
		t.Helper()
		c, w := readAdapter(t, fixtureName)
		srv.Put(t, "models", "lora/"+id, c, w) // weights first, as store.S3.Put does
	}
	if _, err := e.m.Acquire(ctx, "prod"); !errors.Is(err, loader.ErrNotFound) {
		t.Fatalf("Acquire before upload: %v", err)
	}

	// Deploy.
	upload("prod", "qv-r8")
	e.waitTier("prod", loader.TierStore, 10*time.Second)
	l1 := e.acquire("prod")
	out1 := e.dev.step(t, l1.Slot())
	if e.store.gets.Load() != 1 {
		t.Errorf("gets = %d", e.store.gets.Load())
	}

	// Replace: a new version serves new Acquires; the old lease keeps its slot.
	upload("prod", "all-r16")
	eventually(t, 10*time.Second, "the new version", func() bool {
		info, _ := e.m.Get("prod")
		return info.Version != l1.Version()
	})
	l2 := e.acquire("prod")
	if l2.Version() == l1.Version() || l2.Slot() == l1.Slot() {
		t.Fatalf("replacement: version %s slot %d, old %s slot %d", l2.Version(), l2.Slot(), l1.Version(), l1.Slot())
	}
	if !slices.Equal(e.dev.step(t, l1.Slot()), out1) || slices.Equal(e.dev.step(t, l2.Slot()), out1) {
		t.Error("slots do not hold old and new weights")
	}
	l1.Release()
	l2.Release()

	// Delete.
	for _, f := range []string{store.ConfigFile, store.WeightsFile} {
		if err := srv.Client.RemoveObject(ctx, "models", "lora/prod/"+f, minio.RemoveObjectOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	e.waitTier("prod", loader.TierNone, 10*time.Second)
	eventually(t, 10*time.Second, "the deleted adapter to leave every tier", func() bool {
		return len(e.m.List()) == 0 && e.dev.slotName(l2.Slot()) == "" && e.m.Idle()
	})
	if _, err := e.m.Acquire(ctx, "prod"); !errors.Is(err, loader.ErrNotFound) {
		t.Fatalf("Acquire after delete: %v", err)
	}

	// An invalid upload is refused; the Manager keeps serving others.
	upload("ok", "mlp-r64")
	c, _ := readAdapter(t, "qv-r8")
	_, w := readAdapter(t, "mlp-r64")
	if _, err := st.Put(ctx, "broken", c, w); err != nil {
		t.Fatal(err)
	}
	okLease := e.acquire("ok")
	defer okLease.Release()
	e.waitTier("broken", loader.TierStore, 10*time.Second)
	if _, err := e.m.Acquire(ctx, "broken"); !errors.Is(err, loader.ErrInvalidAdapter) {
		t.Fatalf("Acquire(broken) = %v", err)
	}
	e.dev.step(t, okLease.Slot())
}
