//go:build linux || darwin || freebsd || netbsd || openbsd

package api

import (
	"errors"
	"net"
	"syscall"
)

// peerClosed reports whether the client closed its end of c: a peek at the
// socket (MSG_PEEK, so no request byte is consumed) returns end of file. It
// reports false whenever it cannot tell.
func peerClosed(c net.Conn) bool {
	for {
		u, ok := c.(interface{ Unwrap() net.Conn })
		if !ok {
			break
		}
		c = u.Unwrap()
	}
	sc, ok := c.(syscall.Conn)
	if !ok {
		return false
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	closed := false
	var buf [1]byte
	_ = raw.Read(func(fd uintptr) bool {
		n, _, err := syscall.Recvfrom(int(fd), buf[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		closed = n == 0 && err == nil || errors.Is(err, syscall.ECONNRESET)
		return true // never wait for readiness
	})
	return closed
}
