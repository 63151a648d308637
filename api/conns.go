package api

import (
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// connTracker wraps a listener to know its open connections, so Shutdown can
// close the ones that never carried a request: HTTP clients dial spare
// connections they may never use, and the server would otherwise wait for
// them (up to its read timeout) before it can stop.
type connTracker struct {
	net.Listener
	mu    sync.Mutex
	conns map[*trackedConn]struct{}
}

type trackedConn struct {
	net.Conn
	t    *connTracker
	used atomic.Bool
}

func (c *trackedConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	if n > 0 {
		c.used.Store(true)
	}
	return n, err
}

// Unwrap is the accepted connection.
func (c *trackedConn) Unwrap() net.Conn { return c.Conn }

func (c *trackedConn) Close() error {
	c.t.mu.Lock()
	delete(c.t.conns, c)
	c.t.mu.Unlock()
	return c.Conn.Close()
}

func newConnTracker(ln net.Listener) *connTracker {
	return &connTracker{Listener: ln, conns: map[*trackedConn]struct{}{}}
}

func (t *connTracker) Accept() (net.Conn, error) {
	c, err := t.Listener.Accept()
	if err != nil {
		return nil, err
	}
	tc := &trackedConn{Conn: c, t: t}
	t.mu.Lock()
	t.conns[tc] = struct{}{}
	t.mu.Unlock()
	return tc, nil
}

// closeUnused closes every connection that has not sent a byte yet.
func (t *connTracker) closeUnused() {
	t.mu.Lock()
	var idle []*trackedConn
	for c := range t.conns {
		if !c.used.Load() {
			idle = append(idle, c)
		}
	}
	t.mu.Unlock()
	for _, c := range idle {
		c.Close()
	}
}

// reapUnused closes unused connections every interval until done closes.
func (t *connTracker) reapUnused(done <-chan struct{}, interval time.Duration) {
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		t.closeUnused()
		select {
		case <-done:
			return
		case <-tick.C:
		}
	}
}
