package api_test

import (
	"archive/tar"
	"archive/zip"
	"bytes"
	"compress/flate"
	"compress/gzip"
	"compress/zlib"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"hash/crc32"
	"maps"
	"math"
	"mime/multipart"
	"net/textproto"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/peftd/peftd/internal/adaptertest"
	"github.com/peftd/peftd/internal/apitest"
	"github.com/peftd/peftd/internal/fixture"
	"github.com/peftd/peftd/runtime/lora"
	"github.com/peftd/peftd/runtime/safetensors"
)

// bombDeflate is a raw deflate stream of prefix, n zero bytes and suffix,
// and the CRC-32 of what it expands to. The zeros are not compressed one by
// one: after a sync flush every further MiB of zeros compresses to the same
// bytes (its window holds only zeros), so those bytes are repeated.
func bombDeflate(t *testing.T, prefix []byte, n int64, suffix []byte) ([]byte, uint32) {
	t.Helper()
	const chunk = 1 << 20
	zeros := make([]byte, chunk)
	var buf bytes.Buffer
	w, err := flate.NewWriter(&buf, flate.BestCompression)
	if err != nil {
		t.Fatal(err)
	}
	crc := crc32.ChecksumIEEE(prefix)
	w.Write(prefix)
	w.Flush()
	left := n
	if left >= 2*chunk {
		w.Write(zeros)
		w.Flush()
		start := buf.Len()
		w.Write(zeros)
		w.Flush()
		left -= 2 * chunk
		rep := slices.Clone(buf.Bytes()[start:])
		for ; left >= chunk; left -= chunk {
			buf.Write(rep)
		}
	}
	w.Write(zeros[:left])
	w.Write(suffix)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	for k := n; k > 0; k -= chunk {
		crc = crc32.Update(crc, crc32.IEEETable, zeros[:min(k, chunk)])
	}
	return buf.Bytes(), crc32.Update(crc, crc32.IEEETable, suffix)
}

// bombGzip is a gzip file of prefix, n zeros and suffix.
func bombGzip(t *testing.T, prefix []byte, n int64, suffix []byte) []byte {
	t.Helper()
	raw, crc := bombDeflate(t, prefix, n, suffix)
	out := append([]byte{0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff}, raw...)
	out = binary.LittleEndian.AppendUint32(out, crc)
	return binary.LittleEndian.AppendUint32(out, uint32(int64(len(prefix))+n+int64(len(suffix))))
}

// bombTarGz is a tar.gz of files, then name holding n zeros (its tar
// header declares n, as any tar writer's would).
func bombTarGz(t *testing.T, files map[string][]byte, name string, n int64) []byte {
	t.Helper()
	var pre bytes.Buffer
	tw := tar.NewWriter(&pre)
	for _, f := range slices.Sorted(maps.Keys(files)) {
		tw.WriteHeader(&tar.Header{Name: f, Mode: 0o644, Size: int64(len(files[f])), Typeflag: tar.TypeReg})
		tw.Write(files[f])
	}
	tw.Flush()
	// The header only: the zeros, the padding and the two end blocks are all zeros.
	if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: n, Typeflag: tar.TypeReg}); err != nil {
		t.Fatal(err)
	}
	return bombGzip(t, pre.Bytes(), (n+511)/512*512+1024, nil)
}

// bombZip is a zip holding name with n zeros, deflated.
func bombZip(t *testing.T, name string, n int64) []byte {
	t.Helper()
	raw, crc := bombDeflate(t, nil, n, nil)
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	w, err := zw.CreateRaw(&zip.FileHeader{Name: name, Method: zip.Deflate, CRC32: crc,
		CompressedSize64: uint64(len(raw)), UncompressedSize64: uint64(n)})
	if err != nil {
		t.Fatal(err)
	}
	w.Write(raw)
	zw.Close()
	return buf.Bytes()
}

// bombMultipart is a gzip (for Content-Encoding: gzip) of a multipart form
// with the part name holding head then n zeros, and its Content-Type.
func bombMultipart(t *testing.T, name string, head []byte, n int64) ([]byte, string) {
	t.Helper()
	var pre bytes.Buffer
	mw := multipart.NewWriter(&pre)
	h := textproto.MIMEHeader{}
	h.Set("Content-Disposition", fmt.Sprintf(`form-data; name=%q; filename=%q`, name, name))
	h.Set("Content-Type", "application/octet-stream")
	mw.CreatePart(h)
	pre.Write(head)
	return bombGzip(t, pre.Bytes(), n, []byte("\r\n--"+mw.Boundary()+"--\r\n")), mw.FormDataContentType()
}

// timedPut measures one PUT: its reply, how long it took and how many bytes
// were allocated meanwhile (client and server both run in this process).
func timedPut(t *testing.T, url string, body []byte, hdr ...string) (apitest.Reply, time.Duration, uint64) {
	t.Helper()
	runtime.GC()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	start := time.Now()
	r := do(t, "PUT", url, body, hdr...)
	d := time.Since(start)
	runtime.ReadMemStats(&after)
	return r, d, after.TotalAlloc - before.TotalAlloc
}

func invalidUploads(t *testing.T, url string) float64 {
	t.Helper()
	v, ok := apitest.Value(httpc.Scrape(t, url), "peftd_adapter_invalid_uploads_total")
	if !ok {
		t.Fatal("no peftd_adapter_invalid_uploads_total")
	}
	return v
}

// TestUploadBomb: uploads that expand to gigabytes (3 MB of tar.gz for
// 3 GiB, zip, a gzip Content-Encoding, a multipart form) are refused in well
// under a second without allocating anything near their size, with a
// message naming the file and the bound (an adapter for the base model at
// the largest rank it serves, MaxUploadBytes being the default 2 GiB); the
// adapters already deployed keep serving and each refusal counts in
// peftd_adapter_invalid_uploads_total.
func TestUploadBomb(t *testing.T) {
	st, f := fixtureStack(t, 2, 16)
	url := start(t, st.config("base")) // MaxUploadBytes: the default, 2 GiB
	bound := lora.MaxWeightsBytes(f.Model.Config)
	if bound > 8<<20 {
		t.Fatalf("the fixture's bound is %d bytes", bound)
	}
	boundStr := fmt.Sprint(bound)
	qvCfg, qvW := adaptertest.Read(t, filepath.Join(fixture.Dir(), "adapters", "qv-r8"))
	// A header declaring more than the base model can take: refused before its data.
	const q = "base_model.model.model.layers.0.self_attn.q_proj"
	hugeHdr := []byte(`{"` + q + `.lora_A.weight":{"dtype":"F32","shape":[4000000,128],"data_offsets":[0,2048000000]},` +
		`"` + q + `.lora_B.weight":{"dtype":"F32","shape":[128,4000000],"data_offsets":[2048000000,4096000000]}}`)
	hugeHead := binary.LittleEndian.AppendUint64(nil, uint64(len(hugeHdr)))
	hugeHead = append(hugeHead, hugeHdr...)

	const gib = 1 << 30
	type bomb struct {
		name    string
		body    func() ([]byte, []string) // body, header pairs
		expands int64
		status  int
		say     []string
	}
	for _, tc := range []bomb{
		{"tar.gz: 3 GiB of adapter_model.safetensors", func() ([]byte, []string) {
			return bombTarGz(t, map[string][]byte{lora.ConfigFile: qvCfg}, lora.WeightsFile, 3*gib), []string{"Content-Type", "application/gzip"}
		}, 3 * gib, 413, []string{lora.WeightsFile, boundStr, "rank 128"}},
		{"tar.gz: the adapter, then a 1 GiB entry", func() ([]byte, []string) {
			return bombTarGz(t, map[string][]byte{lora.ConfigFile: qvCfg, lora.WeightsFile: qvW}, "junk.bin", gib), []string{"Content-Type", "application/gzip"}
		}, gib, 413, []string{"junk.bin", boundStr}},
		{"zip: 2 GiB of adapter_model.safetensors", func() ([]byte, []string) {
			return bombZip(t, lora.WeightsFile, 2*gib), []string{"Content-Type", "application/zip"}
		}, 2 * gib, 413, []string{lora.WeightsFile, boundStr}},
		{"Content-Encoding gzip over a tar: 2 GiB", func() ([]byte, []string) {
			var pre bytes.Buffer
			tw := tar.NewWriter(&pre)
			tw.WriteHeader(&tar.Header{Name: lora.WeightsFile, Mode: 0o644, Size: 2 * gib, Typeflag: tar.TypeReg})
			return bombGzip(t, pre.Bytes(), 2*gib+1024, nil), []string{"Content-Type", "application/x-tar", "Content-Encoding", "gzip"}
		}, 2 * gib, 413, []string{lora.WeightsFile, boundStr}},
		{"multipart, Content-Encoding gzip: 2 GiB of zeros", func() ([]byte, []string) {
			b, ct := bombMultipart(t, lora.WeightsFile, nil, 2*gib)
			return b, []string{"Content-Type", ct, "Content-Encoding", "gzip"}
		}, 2 * gib, 400, []string{lora.WeightsFile + " is corrupt"}},
		{"multipart, Content-Encoding gzip: a header declaring 4 GB, then 2 GiB", func() ([]byte, []string) {
			b, ct := bombMultipart(t, lora.WeightsFile, hugeHead, 2*gib)
			return b, []string{"Content-Type", ct, "Content-Encoding", "gzip"}
		}, 2 * gib, 400, []string{q + ".lora_A.weight", "rank 4000000", "want 1..128"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			body, hdr := tc.body()
			if len(body) > 4<<20 {
				t.Fatalf("the bomb is %d bytes", len(body))
			}
			before := invalidUploads(t, url)
			r, took, alloc := timedPut(t, url+"/v1/adapters/bomb", body, hdr...)
			t.Logf("%d bytes expanding to %d: %d in %v, %.1f MiB allocated: %s", len(body), tc.expands, r.Status, took, float64(alloc)/(1<<20), r.Body)
			msg, _ := wantErr(t, r, tc.status, "body")["message"].(string)
			for _, s := range tc.say {
				if !strings.Contains(msg, s) {
					t.Errorf("message %q does not say %q", msg, s)
				}
			}
			if took > time.Second {
				t.Errorf("refused after %v, want well under a second", took)
			}
			if alloc > 64<<20 {
				t.Errorf("%d bytes allocated for a %d-byte bomb", alloc, tc.expands)
			}
			if got := invalidUploads(t, url); got != before+1 {
				t.Errorf("peftd_adapter_invalid_uploads_total %v -> %v, want +1", before, got)
			}
		})
	}
	c := f.Case(t, "all-r16")
	r := do(t, "POST", url+"/v1/completions", map[string]any{"model": "all-r16", "prompt": c.Prompt,
		"max_tokens": len(c.Greedy), "temperature": 0, "ignore_eos": true, "return_token_ids": true})
	if r.Status != 200 || !slices.Equal(toInts(r.JSON(t)["choices"].([]any)[0].(map[string]any)["token_ids"]), c.Greedy) {
		t.Errorf("all-r16 after the bombs: %d %s", r.Status, r.Body)
	}
	wantErr(t, do(t, "GET", url+"/v1/adapters/bomb", nil), 404, "")
}

// TestUploadRefusals: each refused upload gets a 4xx whose message says
// what is wrong once (a truncated file is truncated, not a misfit), and
// counts in peftd_adapter_invalid_uploads_total; accepted encodings still
// deploy.
func TestUploadRefusals(t *testing.T) {
	st, f := fixtureStack(t, 2, 16)
	url := start(t, st.config("base"))
	dir := filepath.Join(fixture.Dir(), "adapters", "qv-r8")
	qvCfg, qvW := adaptertest.Read(t, dir)
	pirateCfg, pirateW := adaptertest.Read(t, "../models/adapters/pirate")
	withCfg := func(edit func(m map[string]any)) []byte {
		var m map[string]any
		json.Unmarshal(qvCfg, &m)
		edit(m)
		b, _ := json.Marshal(m)
		return b
	}
	// qv-r8's weights with one value of its first tensor replaced.
	withWeight := func(v float32) ([]byte, string) {
		sf, err := safetensors.Parse(qvW)
		if err != nil {
			t.Fatal(err)
		}
		var ts []safetensors.Tensor
		for i, n := range sf.Names() {
			x, info, _ := sf.Float32(n)
			if i == 0 {
				x[5] = v
			}
			ts = append(ts, safetensors.F32Tensor(n, info.Shape, x))
		}
		b, err := safetensors.Encode(ts, nil)
		if err != nil {
			t.Fatal(err)
		}
		return b, sf.Names()[0]
	}
	nanW, nanName := withWeight(float32(math.NaN()))
	infW, infName := withWeight(float32(math.Inf(1)))
	tgz := func(cfg, w []byte) []byte {
		return adaptertest.TarGz(t, map[string][]byte{lora.ConfigFile: cfg, lora.WeightsFile: w})
	}
	gz := "application/gzip"
	for _, tc := range []struct {
		name   string
		body   []byte
		hdr    []string
		status int
		say    []string
	}{
		{"truncated weights", tgz(qvCfg, qvW[:len(qvW)/2]), nil, 400, []string{"adapter_model.safetensors is truncated", "header describes"}},
		{"garbled weights", tgz(qvCfg, bytes.Repeat([]byte{0xff}, 4096)), nil, 400, []string{"adapter_model.safetensors is corrupt: header length"}},
		{"bytes after the tensors", tgz(qvCfg, append(slices.Clone(qvW), 1, 2, 3)), nil, 400, []string{"adapter_model.safetensors is corrupt: 3 bytes follow"}},
		{"lora_alpha 1e300", tgz(withCfg(func(m map[string]any) { m["lora_alpha"] = 1e300 }), qvW), nil, 400,
			[]string{"lora_alpha 1e+300 gives scale alpha/r = 1e+300/8 = +Inf in float32"}},
		{"lora_alpha 1e38", tgz(withCfg(func(m map[string]any) { m["lora_alpha"] = 1e38 }), qvW), nil, 400, []string{"lora_alpha 1e+38", "|scale| <= 10000"}},
		{"alpha_pattern huge", tgz(withCfg(func(m map[string]any) { m["alpha_pattern"] = map[string]any{"v_proj": -1e300} }), qvW), nil, 400,
			[]string{`alpha_pattern["v_proj"] -1e+300`, "-Inf"}},
		{"rank_pattern 0", tgz(withCfg(func(m map[string]any) { m["rank_pattern"] = map[string]any{"v_proj": 0} }), qvW), nil, 400,
			[]string{`rank_pattern["v_proj"] = 0`}},
		{"r past the model's hidden size", tgz(withCfg(func(m map[string]any) { m["r"] = 1024 }), qvW), nil, 400,
			[]string{"r = 1024", "above 128", `base model "base"`}},
		{"NaN weight", tgz(qvCfg, nanW), nil, 400, []string{nanName, "NaN"}},
		{"+Inf weight", tgz(qvCfg, infW), nil, 400, []string{infName, "+Inf"}},
		{"another model's adapter", tgz(pirateCfg, pirateW), nil, 400, []string{`adapter does not fit the base model "base"`, "shape"}},
		{"brotli", tgz(qvCfg, qvW), []string{"Content-Encoding", "br"}, 415, []string{`Content-Encoding "br"`}},
		{"config past its bound", adaptertest.TarGz(t, map[string][]byte{lora.ConfigFile: bytes.Repeat([]byte(" "), lora.MaxConfigSize+1), lora.WeightsFile: qvW}),
			nil, 413, []string{lora.ConfigFile, fmt.Sprint(lora.MaxConfigSize)}},
		{"many entries under the bound", func() []byte {
			files := map[string][]byte{}
			for i := range 12 {
				files[fmt.Sprintf("junk-%02d", i)] = make([]byte, lora.MaxWeightsBytes(f.Model.Config)-1)
			}
			return adaptertest.TarGz(t, files)
		}(), nil, 413, []string{"expands past"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := invalidUploads(t, url)
			hdr := append([]string{"Content-Type", gz}, tc.hdr...)
			r := do(t, "PUT", url+"/v1/adapters/refused", tc.body, hdr...)
			msg, _ := wantErr(t, r, tc.status, "body")["message"].(string)
			for _, s := range tc.say {
				if !strings.Contains(msg, s) {
					t.Errorf("message %q does not say %q", msg, s)
				}
			}
			for _, twice := range []string{"does not fit", "invalid adapter", "is truncated", "is corrupt", "bad adapter_config.json"} {
				if strings.Count(msg, twice) > 1 {
					t.Errorf("message %q says %q twice", msg, twice)
				}
			}
			if strings.Contains(msg, "lora:") || strings.Contains(msg, "loader:") || strings.Contains(msg, "safetensors:") {
				t.Errorf("message %q carries a package prefix", msg)
			}
			if strings.Contains(tc.say[0], "safetensors is") && strings.Contains(msg, "does not fit") {
				t.Errorf("message %q calls a bad file a misfit", msg)
			}
			if got := invalidUploads(t, url); got != before+1 {
				t.Errorf("peftd_adapter_invalid_uploads_total %v -> %v, want +1", before, got)
			}
		})
	}
	wantErr(t, do(t, "GET", url+"/v1/adapters/refused", nil), 404, "")

	// Accepted: a multipart form under Content-Encoding gzip, and a tar
	// under deflate.
	var form bytes.Buffer
	mw := multipart.NewWriter(&form)
	for name, b := range adaptertest.Files(t, dir, "") {
		w, _ := mw.CreateFormFile("file", name)
		w.Write(b)
	}
	mw.Close()
	var zform bytes.Buffer
	zw := gzip.NewWriter(&zform)
	zw.Write(form.Bytes())
	zw.Close()
	if r := do(t, "PUT", url+"/v1/adapters/qv-gz", zform.Bytes(), "Content-Type", mw.FormDataContentType(), "Content-Encoding", "gzip"); r.Status != 201 {
		t.Fatalf("multipart under gzip: %d %s", r.Status, r.Body)
	}
	var tb bytes.Buffer
	tw := tar.NewWriter(&tb)
	for name, b := range adaptertest.Files(t, dir, "qv/") {
		tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(b)), Typeflag: tar.TypeReg})
		tw.Write(b)
	}
	tw.Close()
	var zt bytes.Buffer
	zl := zlib.NewWriter(&zt) // HTTP's deflate is zlib
	zl.Write(tb.Bytes())
	zl.Close()
	if r := do(t, "PUT", url+"/v1/adapters/qv-deflate", zt.Bytes(), "Content-Type", "application/x-tar", "Content-Encoding", "deflate"); r.Status != 201 {
		t.Fatalf("tar under deflate: %d %s", r.Status, r.Body)
	}
	c := f.Case(t, "qv-r8")
	for _, id := range []string{"qv-gz", "qv-deflate"} {
		r := do(t, "POST", url+"/v1/completions", map[string]any{"model": id, "prompt": c.Prompt,
			"max_tokens": len(c.Greedy), "temperature": 0, "ignore_eos": true, "return_token_ids": true})
		if r.Status != 200 || !slices.Equal(toInts(r.JSON(t)["choices"].([]any)[0].(map[string]any)["token_ids"]), c.Greedy) {
			t.Errorf("%s: %d %s", id, r.Status, r.Body)
		}
	}
}

// TestInvalidAdapterInStore: a bad adapter folder put in the store directly
// is reported the same way by invoke (400) and GET (status invalid, with
// the same reason), said once, listed by GET /v1/adapters but not
// /v1/models, refused for pinning, and can be deleted.
func TestInvalidAdapterInStore(t *testing.T) {
	qvCfg, qvW := adaptertest.Read(t, filepath.Join(fixture.Dir(), "adapters", "qv-r8"))
	var store string
	st, f := fixtureStackWith(t, 2, 16, func(dir string) {
		store = dir
		os.MkdirAll(filepath.Join(store, "broken"), 0o755)
		os.WriteFile(filepath.Join(store, "broken", lora.ConfigFile), qvCfg, 0o644)
		os.WriteFile(filepath.Join(store, "broken", lora.WeightsFile), qvW[:len(qvW)/2], 0o644)
	})
	url := start(t, st.config("base"))
	const reason = "adapter_model.safetensors is truncated: the header describes"

	check := func(when string) {
		t.Helper()
		for _, req := range []struct{ path, body string }{
			{"/v1/adapters/broken/invoke", `{"prompt_ids":[1,2,3],"max_tokens":2}`},
			{"/v1/completions", `{"model":"broken","prompt":[1,2,3],"max_tokens":2}`},
		} {
			r := do(t, "POST", url+req.path, req.body)
			msg, _ := wantErr(t, r, 400, "model")["message"].(string)
			if !strings.Contains(msg, `adapter "broken"`) || !strings.Contains(msg, reason) ||
				strings.Count(msg, "invalid") != 1 || strings.Contains(msg, "loader:") || strings.Contains(msg, "lora:") {
				t.Errorf("%s: %s: message %q", when, req.path, msg)
			}
		}
		r := do(t, "GET", url+"/v1/adapters/broken", nil)
		if r.Status != 200 {
			t.Fatalf("%s: GET: %d %s", when, r.Status, r.Body)
		}
		if m := r.JSON(t); m["status"] != "invalid" || !strings.HasPrefix(m["error"].(string), reason) {
			t.Errorf("%s: GET: %s", when, r.Body)
		}
	}
	// The first invoke finds it out.
	r := do(t, "POST", url+"/v1/adapters/broken/invoke", `{"prompt_ids":[1,2,3],"max_tokens":2}`)
	wantErr(t, r, 400, "model")
	check("after the first invoke")
	check("again")

	r = do(t, "GET", url+"/v1/adapters", nil)
	var listed []string
	for _, a := range r.JSON(t)["data"].([]any) {
		m := a.(map[string]any)
		listed = append(listed, fmt.Sprint(m["id"], ":", m["status"]))
	}
	if !slices.Equal(listed, []string{"all-r16:ready", "broken:invalid"}) {
		t.Errorf("GET /v1/adapters: %v", listed)
	}
	r = do(t, "GET", url+"/v1/models", nil)
	if strings.Contains(string(r.Body), "broken") {
		t.Errorf("/v1/models lists the invalid adapter: %s", r.Body)
	}
	msg, _ := wantErr(t, do(t, "PUT", url+"/v1/adapters/broken/pin", nil), 400, "id")["message"].(string)
	if !strings.Contains(msg, reason) {
		t.Errorf("pin: %q", msg)
	}
	if r := do(t, "DELETE", url+"/v1/adapters/broken", nil); r.Status != 200 {
		t.Errorf("DELETE: %d %s", r.Status, r.Body)
	}
	wantErr(t, do(t, "GET", url+"/v1/adapters/broken", nil), 404, "")
	c := f.Case(t, "all-r16")
	r = do(t, "POST", url+"/v1/completions", map[string]any{"model": "all-r16", "prompt": c.Prompt,
		"max_tokens": len(c.Greedy), "temperature": 0, "ignore_eos": true, "return_token_ids": true})
	if r.Status != 200 {
		t.Errorf("all-r16: %d %s", r.Status, r.Body)
	}
}
