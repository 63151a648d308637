//go:build !linux

package atomicdir

import (
	"errors"
	"os"
	"syscall"
)

func exchange(tmp, dst string) error { return fallbackExchange(tmp, dst) }

func isNotEmpty(err error) bool {
	return errors.Is(err, os.ErrExist) || errors.Is(err, syscall.ENOTEMPTY) || errors.Is(err, syscall.EEXIST)
}
