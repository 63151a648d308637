package cuda

import (
	"errors"
	"sync"
	"testing"
)

// TestUploadAfterClose: an upload that reaches a closed uploader (Start's
// goroutine runs after Backend.Close) fails with ErrClosed instead of
// panicking on the freed ring; every mark and Done report it.
func TestUploadAfterClose(t *testing.T) {
	u := &Uploader{} // what Close leaves: no stream, no chunks
	fill := func([]byte, int) error { t.Error("fill called on a closed uploader"); return nil }
	if _, err := u.Upload(0, 100, fill, 0, 50); !errors.Is(err, ErrClosed) {
		t.Errorf("Upload: %v, want ErrClosed", err)
	}
	tr, err := u.Start(0, 100, fill, 0, 50)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tr.Done(); !errors.Is(err, ErrClosed) {
		t.Errorf("Done: %v, want ErrClosed", err)
	}
	for i := range 2 {
		if ev, err := tr.Through(i); ev != nil || !errors.Is(err, ErrClosed) {
			t.Errorf("Through(%d): %v, %v; want ErrClosed", i, ev, err)
		}
	}
	if err := tr.Quiesce(); err != nil {
		t.Errorf("Quiesce after a failure: %v, want nil (nothing in flight)", err)
	}
}

// TestThroughAfterFailure: a mark reached before the upload fails (or at
// offset 0, reached at once) stays usable, without a race between the
// failure and a reader of that mark; the marks after it report the error.
func TestThroughAfterFailure(t *testing.T) {
	boom := errors.New("boom")
	for range 100 {
		tr := newTransfer(nil, 3)
		tr.reach(0, 1) // mark 0 at offset 0: nothing to wait for
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			tr.finish(1, boom)
		}()
		if ev, err := tr.Through(0); ev != nil || err != nil {
			t.Fatalf("Through(0) = %v, %v; want nothing to wait for", ev, err)
		}
		wg.Wait()
		for i := 1; i < 3; i++ {
			if _, err := tr.Through(i); !errors.Is(err, boom) {
				t.Fatalf("Through(%d): %v, want the failure", i, err)
			}
		}
	}
}
