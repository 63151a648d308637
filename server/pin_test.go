package server_test

import (
	"testing"

	"github.com/peftd/peftd/internal/fixture"
	"github.com/peftd/peftd/server"
)

// TestPinRoutes: a pinned adapter stays on the device while others cycle
// through the remaining slot; pinning may not take every slot; unpinning
// lets it go.
func TestPinRoutes(t *testing.T) {
	_, url := start(t, server.Config{Store: fixtureStore(t), Slots: 2})
	r := do(t, "PUT", url+"/v1/adapters/qv-r8/pin", nil)
	if r.Status != 200 || r.JSON(t)["pinned"] != true || r.JSON(t)["tier"] != "device" {
		t.Fatalf("pin: %d %s", r.Status, r.Body)
	}
	if r := do(t, "PUT", url+"/v1/adapters/all-r16/pin", nil); r.Status != 409 {
		t.Errorf("pinning every slot: %d %s", r.Status, r.Body)
	}
	if r := do(t, "PUT", url+"/v1/adapters/nope/pin", nil); r.Status != 404 {
		t.Errorf("pin unknown: %d %s", r.Status, r.Body)
	}
	for _, n := range fixture.AdapterNames[1:] { // three adapters through one free slot
		wantServes(t, url, n)
	}
	if tr, _ := tier(t, url, "qv-r8"); tr != "device" {
		t.Errorf("pinned adapter left the device: tier %s", tr)
	}
	wantServes(t, url, "qv-r8")
	r = do(t, "DELETE", url+"/v1/adapters/qv-r8/pin", nil)
	if r.Status != 200 || r.JSON(t)["pinned"] != false {
		t.Fatalf("unpin: %d %s", r.Status, r.Body)
	}
	if r := do(t, "PUT", url+"/v1/adapters/all-r16/pin", nil); r.Status != 200 {
		t.Errorf("pin after unpin: %d %s", r.Status, r.Body)
	}
}
