package api_test

import (
	"archive/tar"
	"archive/zip"
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"

	"github.com/peftd/peftd/internal/adaptertest"
)

// uploadCase is a hostile adapter upload and the status it must get.
type uploadCase struct {
	name   string
	body   []byte
	status int // 0: any 4xx
}

// mutateConfig returns the pirate adapter's config with key set to raw
// JSON (a nil raw deletes the key).
func mutateConfig(t *testing.T, cfg []byte, key string, raw *string) []byte {
	t.Helper()
	var m map[string]json.RawMessage
	if err := json.Unmarshal(cfg, &m); err != nil {
		t.Fatal(err)
	}
	if raw == nil {
		delete(m, key)
	} else {
		m[key] = json.RawMessage(*raw)
	}
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatalf("%s=%v: %v", key, raw, err)
	}
	return b
}

// splitST splits a safetensors file into its header map and data.
func splitST(t *testing.T, b []byte) (map[string]any, []byte) {
	t.Helper()
	n := binary.LittleEndian.Uint64(b[:8])
	var h map[string]any
	if err := json.Unmarshal(b[8:8+n], &h); err != nil {
		t.Fatal(err)
	}
	return h, b[8+n:]
}

func joinST(t *testing.T, h map[string]any, data []byte) []byte {
	t.Helper()
	hb, err := json.Marshal(h)
	if err != nil {
		t.Fatal(err)
	}
	out := binary.LittleEndian.AppendUint64(nil, uint64(len(hb)))
	return append(append(out, hb...), data...)
}

func tarOf(t *testing.T, entries ...tar.Header) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, h := range entries {
		h := h
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatal(err)
		}
		if h.Typeflag == tar.TypeReg {
			tw.Write(bytes.Repeat([]byte("x"), int(h.Size)))
		}
	}
	tw.Close()
	return buf.Bytes()
}

func zipOf(t *testing.T, files map[string][]byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	for _, name := range slices.Sorted(maps.Keys(files)) {
		w, err := zw.Create(name)
		if err != nil {
			t.Fatal(err)
		}
		w.Write(files[name])
	}
	zw.Close()
	return buf.Bytes()
}

func hostileUploads(t *testing.T) []uploadCase {
	cfg, weights := adaptertest.Read(t, "../models/adapters/pirate")
	pack := func(c, w []byte) []byte {
		return adaptertest.TarGz(t, map[string][]byte{"adapter_config.json": c, "adapter_model.safetensors": w})
	}
	var cs []uploadCase
	add := func(name string, body []byte) {
		cs = append(cs, uploadCase{name: name, body: body})
	}
	// adapter_config.json fields.
	for key, vals := range map[string][]string{
		"r":                       {"0", "-1", "1e9", `"8"`, "8.5", "null", "1024", "4"},
		"lora_alpha":              {"1e300", "1e38", "-1e300", `"16"`, "[]"},
		"peft_type":               {`"IA3"`, `"PREFIX_TUNING"`, "5", `""`},
		"use_dora":                {"true", `"yes"`},
		"bias":                    {`"all"`, `"lora_only"`, "1"},
		"modules_to_save":         {`["lm_head"]`, `"embed_tokens"`},
		"target_modules":          {`["nonexistent"]`, "[]", "5", `["q_proj", 7]`, `"(.*"`},
		"rank_pattern":            {`{"q_proj": 0}`, `{"q_proj": -4}`, `{"q_proj": "x"}`, `[1]`},
		"alpha_pattern":           {`{"q_proj": 1e300}`, `{"q_proj": "x"}`},
		"use_rslora":              {`"true"`},
		"layers_to_transform":     {`[99]`, `[-1]`, `"x"`},
		"fan_in_fan_out":          {"true"},
		"lora_bias":               {"true"},
		"layer_replication":       {"[[0, 1]]"},
		"trainable_token_indices": {"[1, 2]"},
	} {
		for _, v := range vals {
			v := v
			add("config "+key+"="+v, pack(mutateConfig(t, cfg, key, &v), weights))
		}
	}
	add("config without r", pack(mutateConfig(t, cfg, "r", nil), weights))
	add("config without target_modules", pack(mutateConfig(t, cfg, "target_modules", nil), weights))
	for _, raw := range []string{"", "{", "[]", "null", `"x"`, "{}", strings.Repeat("[", 5000), "\xff\xfe"} {
		add(fmt.Sprintf("config body %.12q", raw), pack([]byte(raw), weights))
	}
	// adapter_model.safetensors headers and data.
	h, data := splitST(t, weights)
	firstKey := ""
	for _, k := range slices.Sorted(maps.Keys(h)) {
		if k != "__metadata__" {
			firstKey = k
			break
		}
	}
	mut := func(name string, f func(h map[string]any) []byte) {
		hc := map[string]any{}
		b, _ := json.Marshal(h)
		json.Unmarshal(b, &hc)
		add("weights "+name, pack(cfg, f(hc)))
	}
	entry := func(h map[string]any) map[string]any { return h[firstKey].(map[string]any) }
	mut("dtype I64", func(h map[string]any) []byte { entry(h)["dtype"] = "I64"; return joinST(t, h, data) })
	mut("dtype unknown", func(h map[string]any) []byte { entry(h)["dtype"] = "F7"; return joinST(t, h, data) })
	mut("shape transposed", func(h map[string]any) []byte {
		s := entry(h)["shape"].([]any)
		entry(h)["shape"] = []any{s[1], s[0]}
		return joinST(t, h, data)
	})
	mut("shape 3-d", func(h map[string]any) []byte {
		entry(h)["shape"] = []any{1, 1, 1}
		return joinST(t, h, data)
	})
	mut("shape negative", func(h map[string]any) []byte { entry(h)["shape"] = []any{-8, 172}; return joinST(t, h, data) })
	mut("shape huge", func(h map[string]any) []byte {
		entry(h)["shape"] = []any{1 << 40, 1 << 40}
		return joinST(t, h, data)
	})
	mut("offsets past the data", func(h map[string]any) []byte {
		entry(h)["data_offsets"] = []any{0, len(data) + 100}
		return joinST(t, h, data)
	})
	mut("offsets reversed", func(h map[string]any) []byte { entry(h)["data_offsets"] = []any{100, 0}; return joinST(t, h, data) })
	mut("offsets overlapping", func(h map[string]any) []byte { entry(h)["data_offsets"] = []any{0, 16}; return joinST(t, h, data) })
	mut("offsets not numbers", func(h map[string]any) []byte { entry(h)["data_offsets"] = "0-10"; return joinST(t, h, data) })
	mut("tensor missing", func(h map[string]any) []byte { delete(h, firstKey); return joinST(t, h, data) })
	mut("tensor renamed", func(h map[string]any) []byte {
		h["base_model.model.model.layers.99.mlp.down_proj.lora_A.weight"] = h[firstKey]
		delete(h, firstKey)
		return joinST(t, h, data)
	})
	mut("extra module", func(h map[string]any) []byte {
		h["base_model.model.lm_head.lora_A.weight"] = h[firstKey]
		return joinST(t, h, data)
	})
	mut("metadata not strings", func(h map[string]any) []byte { h["__metadata__"] = map[string]any{"a": 1}; return joinST(t, h, data) })
	mut("truncated data", func(h map[string]any) []byte { return joinST(t, h, data[:len(data)/2]) })
	mut("data trailing bytes", func(h map[string]any) []byte { return joinST(t, h, append(slices.Clone(data), 1, 2, 3)) })
	for _, n := range []uint64{0, 1, 1 << 62, uint64(len(weights))} {
		b := slices.Clone(weights)
		binary.LittleEndian.PutUint64(b[:8], n)
		add(fmt.Sprintf("weights header length %d", n), pack(cfg, b))
	}
	add("weights 7 bytes", pack(cfg, weights[:7]))
	add("weights empty", pack(cfg, nil))
	add("weights header not JSON", pack(cfg, append(binary.LittleEndian.AppendUint64(nil, 4), []byte("{{{{")...)))
	add("weights pickle", pack(cfg, []byte("\x80\x02}q\x00.")))
	// Archives.
	files := map[string][]byte{"adapter_config.json": cfg, "adapter_model.safetensors": weights}
	tgz := adaptertest.TarGz(t, files)
	add("empty body", nil)
	add("not an archive", []byte("hello, this is not an archive"))
	add("truncated tar.gz", tgz[:len(tgz)/2])
	add("gzip of garbage", func() []byte {
		var b bytes.Buffer
		zw := gzip.NewWriter(&b)
		zw.Write([]byte("garbage that is not tar"))
		zw.Close()
		return b.Bytes()
	}())
	add("tar without weights", adaptertest.TarGz(t, map[string][]byte{"adapter_config.json": cfg}))
	add("tar without config", adaptertest.TarGz(t, map[string][]byte{"adapter_model.safetensors": weights}))
	add("tar two folders down", adaptertest.TarGz(t, map[string][]byte{"a/b/adapter_config.json": cfg, "a/b/adapter_model.safetensors": weights}))
	add("tar ../ entry", tarOf(t, tar.Header{Name: "../adapter_config.json", Typeflag: tar.TypeReg, Size: 3, Mode: 0o644}))
	add("tar absolute entry", tarOf(t, tar.Header{Name: "/etc/adapter_config.json", Typeflag: tar.TypeReg, Size: 3, Mode: 0o644}))
	add("tar symlink only", tarOf(t, tar.Header{Name: "adapter_model.safetensors", Typeflag: tar.TypeSymlink, Linkname: "/etc/passwd", Mode: 0o777}))
	add("tar hardlink only", tarOf(t, tar.Header{Name: "adapter_config.json", Typeflag: tar.TypeLink, Linkname: "../../x", Mode: 0o644}))
	add("tar device entry", tarOf(t, tar.Header{Name: "adapter_config.json", Typeflag: tar.TypeChar, Devmajor: 1, Devminor: 3, Mode: 0o644}))
	add("zip ../ entry", zipOf(t, map[string][]byte{"../adapter_config.json": cfg, "adapter_model.safetensors": weights}))
	add("zip without weights", zipOf(t, map[string][]byte{"adapter_config.json": cfg}))
	add("zip truncated", zipOf(t, files)[:100])
	add("zip of garbage config", zipOf(t, map[string][]byte{"adapter_config.json": []byte("{"), "adapter_model.safetensors": weights}))
	return cs
}

// TestHostileUploads: every hostile upload is refused with a 4xx JSON error
// naming the problem, and the adapters already serving keep serving (the
// refused ID was never deployed).
func TestHostileUploads(t *testing.T) {
	url, _ := storiesServer(t, false, nil)
	cases := hostileUploads(t)
	for i, c := range cases {
		r := httpc.Do(t, "PUT", url+"/v1/adapters/hostile", c.body, "Content-Type", "application/octet-stream")
		checkHostile(t, c.name, r.Status, r.Header, r.Body, c.status)
		if i%10 == 9 {
			knownAnswer(t, url)
		}
	}
	if r := do(t, "GET", url+"/v1/adapters/hostile", nil); r.Status != 404 {
		t.Errorf("the refused adapter is visible: %d %s", r.Status, r.Body)
	}
	knownAnswer(t, url)
	t.Logf("%d hostile uploads refused", len(cases))
}
