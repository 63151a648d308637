// Package store is where adapters live: an object store (S3, MinIO) or a
// local folder. An adapter <id> is two objects, <id>/adapter_config.json and
// <id>/adapter_model.safetensors; uploading both deploys it.
package store

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"
)

// File names of an adapter (the PEFT save_pretrained names).
const (
	ConfigFile  = "adapter_config.json"
	WeightsFile = "adapter_model.safetensors"
)

// MaxConfigSize bounds adapter_config.json.
const MaxConfigSize = 1 << 20

// Errors returned (wrapped) by stores.
var (
	ErrBadID    = errors.New("store: bad adapter id")
	ErrNotFound = errors.New("store: adapter not found")
	ErrTooLarge = errors.New("store: adapter exceeds the size limit")
)

// Object describes one stored adapter.
type Object struct {
	ID       string
	ETag     string // CombineETag of the two objects' ETags
	Size     int64  // both files
	Modified time.Time
}

// EventType says what happened to an adapter.
type EventType int

// Event types.
const (
	EventPut EventType = iota + 1
	EventDelete
	// EventSync (no ID): list the store again. A watch sends it after its
	// first listing, which it keeps as the baseline of later changes: what
	// changed before that listing (and after the consumer's own) is sent
	// as no other event.
	EventSync
)

func (t EventType) String() string {
	switch t {
	case EventPut:
		return "put"
	case EventDelete:
		return "delete"
	case EventSync:
		return "sync"
	}
	return fmt.Sprintf("EventType(%d)", int(t))
}

// Event is a change notice. It is a hint: consumers confirm with Stat.
type Event struct {
	Type EventType
	ID   string
}

// GetOptions bound and observe a download.
type GetOptions struct {
	// MaxBytes bounds adapter_model.safetensors; 0 means no bound.
	MaxBytes int64
	// Progress, if set, is called as the weights arrive (total may be -1).
	Progress func(done, total int64)
}

// Store holds adapters. Implementations are safe for concurrent use.
type Store interface {
	// List returns every complete adapter (both files present).
	List(ctx context.Context) ([]Object, error)
	// Stat returns one adapter's ETag cheaply (no download).
	Stat(ctx context.Context, id string) (Object, error)
	// Get downloads both files; etag describes exactly the bytes returned.
	Get(ctx context.Context, id string, opts GetOptions) (config, weights []byte, etag string, err error)
	// Put uploads an adapter (weights first, then config) and returns its ETag.
	Put(ctx context.Context, id string, config, weights []byte) (etag string, err error)
	// Delete removes an adapter; deleting a missing one is not an error.
	Delete(ctx context.Context, id string) error
	// Watch reports changes until ctx ends, then closes the channel.
	Watch(ctx context.Context) <-chan Event
}

// IDRule is the adapter ID rule, as ValidateID's errors state it. Every
// layer (the HTTP API, the loader, the stores) checks IDs with ValidateID.
const IDRule = `an adapter ID is 1 to 128 of A-Z a-z 0-9 . _ -, starts with a letter or digit and has no ".."`

// ValidateID checks an adapter id against IDRule; the error (wrapping
// ErrBadID) says what is wrong and states the rule. IDs that start with
// '.', '_' or '-', or hold "..", passed the stores' check before the rule
// was made one for every layer (the API refused the former, served the
// latter): such an adapter is not listed or served until its folder or S3
// prefix is renamed, and the error says so.
func ValidateID(id string) error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: %s (%s)", ErrBadID, fmt.Sprintf(format, a...), IDRule)
	}
	switch {
	case id == "":
		return bad("empty")
	case len(id) > 128:
		return bad("%d characters, at most 128", len(id))
	case id == "." || id == "..":
		return bad("%q is a path element", id)
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-' {
			continue
		}
		what := fmt.Sprintf("character %q", c)
		switch {
		case c == '/' || c == '\\':
			what = "path separator " + what
		case c >= 0x80:
			what = fmt.Sprintf("non-ASCII byte 0x%02x", c)
		}
		return bad("%q has %s at offset %d", id, what, i)
	}
	const rename = "; an adapter stored under such an ID is no longer listed or served: rename its folder or S3 prefix"
	if c := id[0]; c == '.' || c == '_' || c == '-' {
		return bad("%q starts with %q%s", id, c, rename)
	}
	if i := strings.Index(id, ".."); i >= 0 {
		return bad("%q has \"..\" at offset %d%s", id, i, rename)
	}
	return nil
}

// CombineETag makes an adapter's ETag from its two objects' ETags.
func CombineETag(configETag, weightsETag string) string {
	h := sha256.Sum256([]byte(strings.Trim(configETag, `"`) + "\x00" + strings.Trim(weightsETag, `"`)))
	return hex.EncodeToString(h[:16])
}

// pollWatch lists every interval and reports differences from the previous
// listing. The first listing is the baseline and reports nothing.
func pollWatch(ctx context.Context, interval time.Duration, list func(context.Context) ([]Object, error), log *slog.Logger) <-chan Event {
	ch := make(chan Event, 64)
	go func() {
		defer close(ch)
		pollLoop(ctx, interval, list, ch, nil, log)
	}()
	return ch
}

// pollLoop runs until ctx ends; prev (nil: take a baseline first) is the
// last known listing.
func pollLoop(ctx context.Context, interval time.Duration, list func(context.Context) ([]Object, error), ch chan<- Event, prev map[string]string, log *slog.Logger) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		if objs, err := list(ctx); err != nil {
			if ctx.Err() != nil {
				return
			}
			log.Warn("store: watch: list failed", "err", err)
		} else {
			cur := make(map[string]string, len(objs))
			for _, o := range objs {
				cur[o.ID] = o.ETag
			}
			evs := []Event{{Type: EventSync}} // the first listing: the baseline
			if prev != nil {
				evs = diff(prev, cur)
			}
			if !sendEvents(ctx, ch, evs) {
				return
			}
			prev = cur
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func orDefault(l *slog.Logger) *slog.Logger {
	if l == nil {
		return slog.Default()
	}
	return l
}

// sendEvents sends evs on ch in order; false when ctx ends first.
func sendEvents(ctx context.Context, ch chan<- Event, evs []Event) bool {
	for _, ev := range evs {
		select {
		case ch <- ev:
		case <-ctx.Done():
			return false
		}
	}
	return true
}
