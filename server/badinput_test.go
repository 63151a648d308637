package server_test

import (
	"bytes"
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"

	"github.com/peftd/peftd/internal/adaptertest"
	"github.com/peftd/peftd/runtime/lora"
	"github.com/peftd/peftd/server"
)

// TestBadInputs: each bad input gets a 4xx whose message names the problem,
// and an existing adapter still returns its reference tokens afterwards.
func TestBadInputs(t *testing.T) {
	const maxUpload = 1 << 20 // every fixture adapter fits; the oversized upload does not
	_, url := start(t, server.Config{Store: fixtureStore(t), Slots: 2, MaxUpload: maxUpload})
	wantServes(t, url, "qv-r8")
	qvCfg, qvW := adaptertest.Read(t, adapterDir("qv-r8"))
	pirateCfg, pirateW := adaptertest.Read(t, filepath.Join("..", "models", "adapters", "pirate"))
	put := func(id string, body []byte) reply {
		return do(t, "PUT", url+"/v1/adapters/"+id, body, "Content-Type", "application/gzip")
	}
	rankCfg := func() []byte {
		var m map[string]any
		json.Unmarshal(qvCfg, &m)
		m["r"] = 4
		b, _ := json.Marshal(m)
		return b
	}()

	for _, tc := range []struct {
		name   string
		do     func() reply
		status int
		want   []string // substrings of the error message
	}{
		{"corrupt safetensors", func() reply {
			return put("corrupt", adaptertest.TarGz(t, map[string][]byte{lora.ConfigFile: qvCfg, lora.WeightsFile: bytes.Repeat([]byte{0xff}, 4096)}))
		}, 400, []string{"adapter_model.safetensors is corrupt"}},
		{"another base model's adapter", func() reply {
			return put("pirate", adaptertest.TarGz(t, map[string][]byte{lora.ConfigFile: pirateCfg, lora.WeightsFile: pirateW}))
		}, 400, []string{"does not fit", "shape"}},
		{"rank mismatch", func() reply {
			return put("rank", adaptertest.TarGz(t, map[string][]byte{lora.ConfigFile: rankCfg, lora.WeightsFile: qvW}))
		}, 400, []string{"rank 8", "adapter_config.json says 4"}},
		{"missing file in the archive", func() reply {
			return put("half", adaptertest.TarGz(t, map[string][]byte{"half/" + lora.ConfigFile: qvCfg}))
		}, 400, []string{lora.WeightsFile}},
		{"../ in the ID", func() reply {
			return put("..%2Fx", adaptertest.TarGz(t, map[string][]byte{lora.ConfigFile: qvCfg, lora.WeightsFile: qvW}))
		},
			400, []string{"bad adapter id", "has character"}},
		{"../ paths in the archive", func() reply {
			return put("escape", adaptertest.TarGz(t, map[string][]byte{"../" + lora.ConfigFile: qvCfg, "../" + lora.WeightsFile: qvW}))
		}, 400, []string{"../", "leaves the adapter folder"}},
		{"unknown adapter (completions)", func() reply {
			return do(t, "POST", url+"/v1/completions", map[string]any{"model": "nope", "prompt": []int{1, 2}, "max_tokens": 2})
		}, 404, []string{`"nope" does not exist`}},
		{"unknown adapter (invoke)", func() reply {
			return do(t, "POST", url+"/v1/adapters/nope/invoke", map[string]any{"prompt_ids": []int{1, 2}, "max_tokens": 2})
		}, 404, []string{`"nope"`}},
		{"unknown adapter (info)", func() reply { return do(t, "GET", url+"/v1/adapters/nope", nil) }, 404, []string{`"nope" is not deployed`}},
		{"oversized upload", func() reply { return put("big", bytes.Repeat([]byte{'x'}, maxUpload+200<<10)) }, 413, []string{"larger than"}},
		{"malformed JSON", func() reply {
			return do(t, "POST", url+"/v1/completions", `{"model": "qv-r8", "prompt": [1, 2`, "Content-Type", "application/json")
		}, 400, []string{"JSON"}},
		{"max_tokens 0", func() reply {
			return do(t, "POST", url+"/v1/completions", map[string]any{"model": "qv-r8", "prompt": []int{1, 2}, "max_tokens": 0})
		}, 400, []string{"max_tokens"}},
		{"max_tokens negative", func() reply {
			return do(t, "POST", url+"/v1/adapters/qv-r8/invoke", map[string]any{"prompt_ids": []int{1, 2}, "max_tokens": -5})
		}, 400, []string{"max_tokens"}},
		{"max_tokens past the context", func() reply {
			return do(t, "POST", url+"/v1/completions", map[string]any{"model": "qv-r8", "prompt": []int{1, 2}, "max_tokens": 1 << 20})
		}, 400, []string{"context"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := tc.do()
			if r.Status != tc.status {
				t.Fatalf("status %d, want %d: %s", r.Status, tc.status, r.Body)
			}
			msg := r.ErrMessage(t)
			for _, w := range tc.want {
				if !strings.Contains(msg, w) {
					t.Errorf("message %q lacks %q", msg, w)
				}
			}
			t.Logf("%d %s", r.Status, msg)
			wantServes(t, url, "qv-r8")
		})
	}
	// Nothing bad was deployed.
	r := do(t, "GET", url+"/v1/adapters", nil)
	if n := len(r.JSON(t)["data"].([]any)); n != 4 {
		t.Errorf("%d adapters listed, want the fixture's 4: %s", n, r.Body)
	}
}
