//go:build !linux

package cuda

func gettid() int { return -2 }
