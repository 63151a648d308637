//go:build !(linux || darwin || freebsd)

package loader

import "errors"

func statfsAvail(dir string) (int64, error) {
	return 0, errors.New("loader: free disk space is unknown on this system")
}
