package scheduler

import (
	"context"
	"fmt"
)

// Static is a Residency over adapters placed in fixed slots up front (the
// engine's LoadAdapter was already called); it never evicts.
type Static map[string]int

type staticLease int

func (l staticLease) Slot() int       { return int(l) }
func (l staticLease) Version() string { return "" }
func (l staticLease) Release()        {}

// ErrUnknownAdapter is returned for an adapter ID that is not deployed.
var ErrUnknownAdapter = fmt.Errorf("scheduler: unknown adapter")

// Acquire returns the adapter's fixed slot.
func (s Static) Acquire(ctx context.Context, id string) (Lease, error) {
	slot, ok := s[id]
	if !ok {
		return nil, fmt.Errorf("%w %q", ErrUnknownAdapter, id)
	}
	return staticLease(slot), nil
}
