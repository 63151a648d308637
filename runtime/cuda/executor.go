package cuda

import (
	"fmt"
	"runtime"
	"runtime/debug"
	"sync"
)

// Executor runs functions on one goroutine locked to its OS thread, where a
// CUDA context is current. Do is reentrant: called from a function already
// running on the executor, it runs inline.
type Executor struct {
	tid  int
	work chan func()
	quit chan struct{}
	once sync.Once
	done chan struct{}
}

type panicked struct {
	v     any
	stack []byte
}

// NewExecutor starts the executor goroutine and runs setup on it first.
func NewExecutor(setup func() error) (*Executor, error) {
	e := &Executor{work: make(chan func()), quit: make(chan struct{}), done: make(chan struct{})}
	ready := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
		defer close(e.done)
		e.tid = gettid()
		var err error
		if setup != nil {
			err = setup()
		}
		ready <- err
		if err != nil {
			return
		}
		for {
			select {
			case fn := <-e.work:
				fn()
			case <-e.quit:
				return
			}
		}
	}()
	if err := <-ready; err != nil {
		return nil, err
	}
	return e, nil
}

// Do runs fn on the executor's thread and returns its error. A panic in fn is
// re-raised in the caller.
func (e *Executor) Do(fn func() error) error {
	if gettid() == e.tid {
		return fn()
	}
	res := make(chan any, 1)
	select {
	case e.work <- func() {
		defer func() {
			if p := recover(); p != nil {
				res <- panicked{v: p, stack: debug.Stack()}
			}
		}()
		res <- fn()
	}:
	case <-e.quit:
		return ErrClosed
	}
	switch r := (<-res).(type) {
	case panicked:
		panic(fmt.Sprintf("cuda executor: %v\n\n[executor thread]\n%s", r.v, r.stack))
	case error:
		return r
	}
	return nil
}

// Close stops the executor after the function in flight, if any.
func (e *Executor) Close() {
	e.once.Do(func() { close(e.quit) })
	<-e.done
}
