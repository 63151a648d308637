package api_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/peftd/peftd/api"
)

func TestLoadKeysJSON(t *testing.T) {
	p := filepath.Join(t.TempDir(), "keys.json")
	os.WriteFile(p, []byte(`[{"key":"a","admin":true},{"key":"b","adapters":["x","team-*"]}]`), 0o600)
	ks, err := api.LoadKeys(p)
	if err != nil || ks.Len() != 2 {
		t.Fatal(ks.Len(), err)
	}
	b := api.Key{Key: "b", Adapters: []string{"x", "team-*"}}
	for id, want := range map[string][2]bool{"x": {true, false}, "team-1": {true, true}, "y": {false, false}, "": {true, false}} {
		if got := [2]bool{b.CanInvoke(id), b.CanManage(id)}; got != want {
			t.Errorf("%q: invoke/manage %v, want %v", id, got, want)
		}
	}
	os.WriteFile(p, []byte(`[{"key":""}]`), 0o600)
	if _, err := api.LoadKeys(p); err == nil {
		t.Error("empty key accepted")
	}
}
