//go:build !unix

package hub

import "context"

// lockFile does not lock where flock is missing.
func lockFile(context.Context, string, func()) (func(), error) { return func() {}, nil }

// freeBytes is unknown here.
func freeBytes(string) (int64, bool) { return 0, false }
