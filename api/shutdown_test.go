package api_test

import (
	"context"
	"net"
	"testing"
	"time"

	"github.com/peftd/peftd/api"
)

// TestShutdownWithUnusedConnection: a client connection that never sends a
// request (HTTP clients dial spares) must not hold up Shutdown.
func TestShutdownWithUnusedConnection(t *testing.T) {
	srv := api.New(api.Config{ModelName: "m"})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	time.Sleep(100 * time.Millisecond) // the server has accepted it
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	start := time.Now()
	if err := srv.Shutdown(ctx); err != nil {
		t.Fatalf("shutdown with an unused connection open: %v after %v", err, time.Since(start))
	}
	if err := <-served; err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("shutdown took %v", d)
	}
}
