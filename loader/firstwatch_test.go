package loader_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/peftd/peftd/loader"
	"github.com/peftd/peftd/loader/store"
)

// landsAfterFirstList is a folder store where an adapter lands just after
// the first listing (the Manager's own, at New) returns: before the watch's
// first listing, which the watch keeps as its baseline.
type landsAfterFirstList struct {
	*store.FS
	once sync.Once
	land func()
}

func (s *landsAfterFirstList) List(ctx context.Context) ([]store.Object, error) {
	objs, err := s.FS.List(ctx)
	s.once.Do(s.land)
	return objs, err
}

// TestAdapterLandingBeforeTheWatch: an adapter uploaded between the
// Manager's first listing and its watch's first one deploys (the watch asks
// for a listing once it has its baseline; without that, nothing would ever
// announce it: later listings only send what changes after the baseline).
func TestAdapterLandingBeforeTheWatch(t *testing.T) {
	fs := fixtureFS(t)
	c, w := readAdapter(t, "qv-r8")
	st := &landsAfterFirstList{FS: fs, land: func() {
		if _, err := fs.Put(context.Background(), "late", c, w); err != nil {
			t.Error(err)
		}
	}}
	e := newEnvWithStore(t, 2, st, loader.Options{RecheckInterval: time.Hour})
	e.waitTier("late", loader.TierStore, 5*time.Second)
}
