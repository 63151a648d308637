package parallel

import (
	"errors"
	"sync"
	"testing"
)

func TestRanges(t *testing.T) {
	for _, c := range []struct{ n, minPer int }{{0, 1}, {1, 1}, {7, 1}, {1000, 1}, {1000, 600}, {1 << 20, 1 << 10}, {5, 0}} {
		var mu sync.Mutex
		seen := make([]int, c.n)
		calls := 0
		err := Ranges(c.n, c.minPer, func(lo, hi int) error {
			mu.Lock()
			defer mu.Unlock()
			calls++
			if hi-lo < min(c.minPer, c.n) {
				t.Errorf("n %d minPer %d: range [%d, %d) is shorter than minPer", c.n, c.minPer, lo, hi)
			}
			for i := lo; i < hi; i++ {
				seen[i]++
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		for i, k := range seen {
			if k != 1 {
				t.Fatalf("n %d minPer %d: index %d covered %d times", c.n, c.minPer, i, k)
			}
		}
		if calls > chunksPer*maxWorkers {
			t.Errorf("n %d: %d ranges, more than %d", c.n, calls, chunksPer*maxWorkers)
		}
	}
	first, second := errors.New("first"), errors.New("second")
	err := Ranges(1<<10, 1, func(lo, hi int) error {
		switch {
		case lo == 0:
			return first
		case hi == 1<<10:
			return second
		}
		return nil
	})
	if err != first {
		t.Errorf("error %v, want the first range's", err)
	}
}
