package api

import (
	"context"
	"errors"
	"time"

	"github.com/peftd/peftd/loader/store"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/scheduler"
)

// Generator runs generations (the scheduler implements it).
type Generator interface {
	Submit(ctx context.Context, r scheduler.Request) (<-chan scheduler.Event, error)
}

// AdapterInfo describes one deployed adapter.
type AdapterInfo struct {
	ID          string    `json:"id"`
	Tier        string    `json:"tier"` // store, disk, host or device
	Version     string    `json:"version"`
	Rank        int       `json:"rank"`
	Bytes       int64     `json:"bytes"`
	Refcount    int       `json:"refcount"`
	LastUsed    time.Time `json:"last_used,omitzero"`
	Invocations int64     `json:"invocations"`
	Pinned      bool      `json:"pinned"`
	Created     time.Time `json:"created,omitzero"`
	// Status is StatusReady, or StatusInvalid when this version failed
	// validation against the base model (Error says why; invoking it
	// answers 400 with the same message).
	Status string `json:"status"`
	Error  string `json:"error,omitempty"`
}

// Adapter statuses.
const (
	StatusReady   = "ready"
	StatusInvalid = "invalid"
)

// Catalog lists and changes the deployed adapters.
type Catalog interface {
	List(ctx context.Context) ([]AdapterInfo, error)
	// Get returns an error wrapping ErrNotFound for an unknown adapter.
	Get(ctx context.Context, id string) (AdapterInfo, error)
	// Put validates the adapter against the base model (an error wrapping
	// ErrInvalidAdapter, lora.ErrConfig, lora.ErrMismatch or
	// lora.ErrUnsupported when it does not fit), then writes it to the store.
	// configJSON and weights may alias the request body, which is reused
	// once the handler returns: Put must not keep them past its return.
	Put(ctx context.Context, id string, configJSON, weights []byte) error
	Delete(ctx context.Context, id string) error
}

// Pinner keeps adapters resident on the device (a Catalog may implement it).
type Pinner interface {
	// Pin loads id and keeps it on the device until Unpin; an error wrapping
	// ErrTooManyPinned when pinning would leave no slot for other adapters.
	Pin(ctx context.Context, id string) error
	Unpin(ctx context.Context, id string) error
}

// BaseModeler is a Catalog that knows the base model adapters are validated
// against: uploads are then bounded by what an adapter for that model can
// be (lora.MaxWeightsBytes) and checked while they stream.
type BaseModeler interface {
	BaseModel() *llama.Config
}

// InvalidUploadCounter is a Catalog that counts uploads the server refused
// (peftd_adapter_invalid_uploads_total).
type InvalidUploadCounter interface {
	CountInvalidUpload()
}

// Errors a Catalog returns (wrapped).
var (
	ErrNotFound       = errors.New("adapter not found")
	ErrInvalidAdapter = errors.New("invalid adapter")
	ErrTooManyPinned  = errors.New("too many pinned adapters")
	// ErrUnavailable: a dependency (the adapter store) failed; the request
	// may succeed later. Answered with 503.
	ErrUnavailable = errors.New("service unavailable")
)

// ValidID reports whether id is a usable adapter ID (store.IDRule: letters,
// digits, '.', '_' and '-', at most 128 characters, starting with a letter
// or digit, no ".."). The rule is store.ValidateID's, the one every layer
// applies; its error says what is wrong with an ID.
func ValidID(id string) bool { return store.ValidateID(id) == nil }
