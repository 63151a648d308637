// Package parallel splits a loop over [0, n) into contiguous ranges run on
// up to eight goroutines: the load path's conversions and copies (weights
// to bf16, FP8 dequantization, adapter pairs to float32, stacked
// projections), each a memory-bound pass over gigabytes.
package parallel

import (
	"runtime"
	"sync"
	"sync/atomic"
)

// maxWorkers bounds the goroutines: a memory-bound loop gains little past
// it. Each worker takes ranges in turn from chunksPer*workers of them, so
// a worker slowed down (a busy core, page faults) takes fewer.
const (
	maxWorkers = 8
	chunksPer  = 4
)

// Ranges calls fn on contiguous ranges that cover [0, n), each at least
// minPer long (one range, on the calling goroutine, when n < 2*minPer),
// on up to min(GOMAXPROCS, 8) goroutines, and returns the error of the
// first range, in order, that failed.
func Ranges(n, minPer int, fn func(lo, hi int) error) error {
	most := n / max(minPer, 1) // ranges of at least minPer
	workers := min(runtime.GOMAXPROCS(0), maxWorkers, most)
	if workers <= 1 {
		if n <= 0 {
			return nil
		}
		return fn(0, n)
	}
	chunks := min(chunksPer*workers, most)
	errs := make([]error, chunks)
	var next atomic.Int64
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				c := int(next.Add(1) - 1)
				if c >= chunks {
					return
				}
				errs[c] = fn(n*c/chunks, n*(c+1)/chunks)
			}
		}()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}
