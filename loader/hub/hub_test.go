package hub

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/peftd/peftd/internal/testlog"
)

// testOptions points at the fake Hub, with a fresh cache and fast retries.
func testOptions(t *testing.T, h *fakeHub) (Options, *testlog.Buffer) {
	buf := &testlog.Buffer{}
	log := slog.New(slog.NewTextHandler(buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("log:\n%s", buf)
		}
	})
	return Options{CacheDir: t.TempDir(), Endpoint: h.hub.URL, Log: log, backoff: time.Millisecond, stall: 10 * time.Second}, buf
}

func randomBytes(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, 1))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// tinyModel is a sharded model as the Hub holds one, with files peftd must
// not download next to the ones it needs.
func tinyModel() map[string][]byte {
	idx, _ := json.Marshal(map[string]any{
		"metadata": map[string]any{"total_size": 500_000},
		"weight_map": map[string]string{
			"model.embed_tokens.weight":    "model-00001-of-00002.safetensors",
			"model.layers.0.mlp.up.weight": "model-00001-of-00002.safetensors",
			"lm_head.weight":               "model-00002-of-00002.safetensors",
		},
	})
	return map[string][]byte{
		"config.json":                      []byte(`{"architectures":["LlamaForCausalLM"],"hidden_size":64}`),
		"generation_config.json":           []byte(`{"bos_token_id":1,"eos_token_id":2}`),
		"tokenizer.json":                   []byte(`{"version":"1.0","model":{"type":"BPE"}}`),
		"tokenizer_config.json":            []byte(`{"bos_token":"<s>"}`),
		"model.safetensors.index.json":     idx,
		"model-00001-of-00002.safetensors": randomBytes(300_000, 1),
		"model-00002-of-00002.safetensors": randomBytes(200_000, 2),
		"pytorch_model.bin":                randomBytes(1000, 3),
		"original/consolidated.00.pth":     randomBytes(1000, 4),
		"model.gguf":                       randomBytes(1000, 5),
		"README.md":                        []byte("# tiny\n"),
		".gitattributes":                   []byte("*.safetensors filter=lfs\n"),
	}
}

var needed = []string{"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
	"model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}

// checkLayout verifies the huggingface_hub cache layout of repo in cache:
// refs/main, snapshots/<commit>/<file> -> ../../blobs/<etag>, and blobs/
// holding exactly the needed files, complete.
func checkLayout(t *testing.T, cache string, id string, repo *fakeRepo, dir string) {
	t.Helper()
	root := filepath.Join(cache, "models--"+strings.ReplaceAll(id, "/", "--"))
	if want := filepath.Join(root, "snapshots", repo.commit); dir != want {
		t.Fatalf("dir %s, want %s", dir, want)
	}
	if b, err := os.ReadFile(filepath.Join(root, "refs", "main")); err != nil || string(b) != repo.commit {
		t.Fatalf("refs/main = %q, %v; want %q without a newline", b, err, repo.commit)
	}
	var blobs []string
	for _, name := range needed {
		f := repo.files[name]
		p := filepath.Join(dir, name)
		target, err := os.Readlink(p)
		if err != nil {
			t.Fatalf("%s: %v (want a symbolic link)", name, err)
		}
		if want := "../../blobs/" + f.etag(); target != want {
			t.Errorf("%s -> %s, want %s", name, target, want)
		}
		b, err := os.ReadFile(p)
		if err != nil || !bytes.Equal(b, f.data) {
			t.Errorf("%s: contents differ (%v)", name, err)
		}
		blobs = append(blobs, f.etag())
	}
	ents, err := os.ReadDir(filepath.Join(root, "blobs"))
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range ents {
		got = append(got, e.Name())
	}
	slices.Sort(got)
	slices.Sort(blobs)
	if !slices.Equal(got, blobs) {
		t.Errorf("blobs/ holds %v, want %v", got, blobs)
	}
	snap, _ := os.ReadDir(dir)
	var names []string
	for _, e := range snap {
		names = append(names, e.Name())
	}
	want := slices.Clone(needed)
	slices.Sort(want)
	if !slices.Equal(names, want) {
		t.Errorf("snapshot holds %v, want %v", names, want)
	}
}

func TestDownloadCacheLayout(t *testing.T) {
	h := newFakeHub(t)
	repo := h.addRepo("acme/tiny-llama", false, tinyModel(), "v1.0")
	opts, logs := testOptions(t, h)
	opts.Token = "hf_secret"
	ctx := context.Background()

	dir, err := Resolve(ctx, "acme/tiny-llama", opts)
	if err != nil {
		t.Fatal(err)
	}
	checkLayout(t, opts.CacheDir, "acme/tiny-llama", repo, dir)
	reqs := h.took()
	for _, r := range reqs {
		for _, skip := range []string{"pytorch_model.bin", "original", "gguf", "README", "gitattributes"} {
			if strings.Contains(r.Path, skip) {
				t.Errorf("requested %s", r)
			}
		}
	}
	if len(h.cdnAuth) > 0 {
		t.Errorf("the CDN received the token: %v", h.cdnAuth)
	}
	if c := countRequests(reqs, "cdn", "GET"); c != 2 {
		t.Errorf("%d CDN GETs, want 2 (one per shard): %v", c, reqs)
	}
	// The tokenizer files and the chat template are known absent, so the
	// next start needs nothing.
	root := filepath.Join(opts.CacheDir, "models--acme--tiny-llama")
	if _, err := os.Stat(filepath.Join(root, ".no_exist", repo.commit, "chat_template.jinja")); err != nil {
		t.Errorf("no .no_exist marker for chat_template.jinja: %v", err)
	}
	if _, err := os.Stat(filepath.Join(opts.CacheDir, ".locks", "models--acme--tiny-llama", repo.files["model-00001-of-00002.safetensors"].etag()+".lock")); err != nil {
		t.Errorf("no lock file where huggingface_hub takes it: %v", err)
	}
	for _, want := range []string{"downloading model", "percent=100", "model-00001-of-00002.safetensors", "model ready in the Hugging Face cache"} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("the log lacks %q", want)
		}
	}

	// Every later start is offline: the cached snapshot is whole.
	for _, model := range []string{"acme/tiny-llama", "hf://acme/tiny-llama@main", "acme/tiny-llama@" + repo.commit} {
		d, err := Resolve(ctx, model, opts)
		if err != nil || d != dir {
			t.Fatalf("%s: %s, %v; want %s", model, d, err, dir)
		}
	}
	if reqs := h.took(); len(reqs) > 0 {
		t.Fatalf("a cached model made requests: %v", reqs)
	}
	// A new revision name for the same commit: one API call, no download.
	d, err := Resolve(ctx, "acme/tiny-llama@v1.0", opts)
	if err != nil || d != dir {
		t.Fatalf("@v1.0: %s, %v", d, err)
	}
	if reqs := h.took(); len(reqs) != 1 || !strings.Contains(reqs[0].Path, "/api/models/acme/tiny-llama/revision/v1.0") {
		t.Errorf("@v1.0 of a cached commit made %v, want the revision API call only", reqs)
	}
	if b, _ := os.ReadFile(filepath.Join(root, "refs", "v1.0")); string(b) != repo.commit {
		t.Errorf("refs/v1.0 = %q", b)
	}
	// With the Hub gone, the cache still answers, offline or not.
	h.close()
	for _, offline := range []bool{false, true} {
		o := opts
		o.Offline = offline
		if d, err := Resolve(ctx, "acme/tiny-llama", o); err != nil || d != dir {
			t.Fatalf("offline=%v with the Hub down: %s, %v", offline, d, err)
		}
	}
}

func countRequests(reqs []fakeRequest, server, method string) int {
	n := 0
	for _, r := range reqs {
		if r.Server == server && r.Method == method {
			n++
		}
	}
	return n
}

// TestSingleFileAndPRRevision: model.safetensors without an index, a
// revision with a slash (refs/pr/1), and a renamed repository (the Hub
// answers with a relative redirect).
func TestSingleFileAndPRRevision(t *testing.T) {
	h := newFakeHub(t)
	files := map[string][]byte{
		"config.json":       []byte(`{}`),
		"model.safetensors": randomBytes(50_000, 9),
		"pytorch_model.bin": randomBytes(50_000, 10),
	}
	repo := h.addRepo("acme/single", false, files, "refs/pr/1")
	h.set(func() { h.renamed["old-acme/single"] = "acme/single" })
	opts, _ := testOptions(t, h)
	dir, err := Resolve(context.Background(), "old-acme/single@refs/pr/1", opts)
	if err != nil {
		t.Fatal(err)
	}
	root := filepath.Join(opts.CacheDir, "models--old-acme--single")
	if dir != filepath.Join(root, "snapshots", repo.commit) {
		t.Fatalf("dir %s", dir)
	}
	if b, _ := os.ReadFile(filepath.Join(root, "refs", "refs", "pr", "1")); string(b) != repo.commit {
		t.Errorf("refs/refs/pr/1 = %q, want %s", b, repo.commit)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "model.safetensors")); !bytes.Equal(b, files["model.safetensors"]) {
		t.Error("model.safetensors differs")
	}
	if _, err := os.Stat(filepath.Join(root, ".no_exist", repo.commit, "tokenizer.json")); err != nil {
		t.Errorf("tokenizer.json not marked absent: %v", err)
	}
	reqs := h.took()
	if !slices.ContainsFunc(reqs, func(r fakeRequest) bool {
		return r.Path == "/api/models/old-acme/single/revision/refs%2Fpr%2F1"
	}) {
		t.Errorf("the revision was not escaped as huggingface_hub escapes it: %v", reqs)
	}
	if _, err := Resolve(context.Background(), "old-acme/single@refs/pr/1", opts); err != nil || len(h.took()) > 0 {
		t.Errorf("second resolve: %v (requests made)", err)
	}
}

// TestResume cuts a shard's transfer halfway: it resumes with a Range
// request, in the same run or, with no retries, in the next one.
func TestResume(t *testing.T) {
	const shard = "model-00001-of-00002.safetensors"
	for _, tc := range []struct {
		name     string
		retries  int
		failOnce bool // the first Resolve fails and keeps the .incomplete
	}{
		{"in the same run", 0, false},
		{"in the next run", -1, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newFakeHub(t)
			repo := h.addRepo("acme/tiny-llama", false, tinyModel())
			h.set(func() { h.cut[shard] = 120_000 })
			opts, _ := testOptions(t, h)
			opts.Retries = tc.retries
			f := repo.files[shard]
			inc := filepath.Join(opts.CacheDir, "models--acme--tiny-llama", "blobs", f.etag()+".incomplete")
			dir, err := Resolve(context.Background(), "acme/tiny-llama", opts)
			if tc.failOnce {
				if err == nil || !strings.Contains(err.Error(), "resumes from there") {
					t.Fatalf("err %v, want an interrupted download", err)
				}
				if st, err := os.Stat(inc); err != nil || st.Size() != 120_000 {
					t.Fatalf("the .incomplete: %v, %v; want 120000 bytes kept", st, err)
				}
				if _, err := os.Stat(filepath.Join(opts.CacheDir, "models--acme--tiny-llama", "refs", "main")); err == nil {
					t.Error("refs/main written for an incomplete snapshot")
				}
				if dir, err = Resolve(context.Background(), "acme/tiny-llama", opts); err != nil {
					t.Fatal(err)
				}
			} else if err != nil {
				t.Fatal(err)
			}
			checkLayout(t, opts.CacheDir, "acme/tiny-llama", repo, dir)
			b, _ := os.ReadFile(filepath.Join(dir, shard))
			if s := sha256.Sum256(b); hex.EncodeToString(s[:]) != f.sha256() {
				t.Fatal("wrong sha256 after resuming")
			}
			var ranges []string
			for _, r := range h.took() {
				if r.Server == "cdn" && r.Range != "" && strings.Contains(r.Path, f.sha256()) {
					ranges = append(ranges, r.Range)
				}
			}
			if !slices.Equal(ranges, []string{"bytes=120000-"}) {
				t.Errorf("Range requests %v, want [bytes=120000-]", ranges)
			}
			if _, err := os.Stat(inc); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("the .incomplete is still there: %v", err)
			}
		})
	}
}

// TestChecksum: a blob whose sha256 (or git blob id) is not its ETag is
// refused and deleted; a resumed one that does not match is downloaded
// again from the start.
func TestChecksum(t *testing.T) {
	const shard = "model-00002-of-00002.safetensors"
	for _, tc := range []struct {
		name     string
		corrupt  string // served corrupted
		poison   bool   // a bad .incomplete left by an earlier run
		wantErr  string
		wantGets int // GETs of the shard from the CDN
	}{
		{"corrupt LFS shard", shard, false, "sha256 of the download is", 1},
		{"corrupt git file", "tokenizer.json", false, "git blob id of the download is", 0},
		{"bad resumed part", "", true, "", 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newFakeHub(t)
			repo := h.addRepo("acme/tiny-llama", false, tinyModel())
			if tc.corrupt != "" {
				h.set(func() { h.corrupt[tc.corrupt] = true })
			}
			opts, logs := testOptions(t, h)
			etag := repo.files[shard].etag()
			if tc.corrupt != "" {
				etag = repo.files[tc.corrupt].etag()
			}
			blobs := filepath.Join(opts.CacheDir, "models--acme--tiny-llama", "blobs")
			if tc.poison {
				os.MkdirAll(blobs, 0o755)
				if err := os.WriteFile(filepath.Join(blobs, etag+".incomplete"), randomBytes(5000, 77), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			dir, err := Resolve(context.Background(), "acme/tiny-llama", opts)
			reqs := h.took()
			gets := 0
			for _, r := range reqs {
				if r.Server == "cdn" && strings.Contains(r.Path, repo.files[shard].sha256()) {
					gets++
				}
			}
			if tc.wantGets > 0 && gets != tc.wantGets {
				t.Errorf("%d GETs of %s, want %d: %v", gets, shard, tc.wantGets, reqs)
			}
			for _, p := range []string{etag, etag + ".incomplete"} {
				if tc.wantErr != "" {
					if _, err := os.Stat(filepath.Join(blobs, p)); !errors.Is(err, os.ErrNotExist) {
						t.Errorf("%s kept after a checksum mismatch", p)
					}
				}
			}
			if tc.wantErr != "" {
				if !errors.Is(err, ErrChecksum) || !strings.Contains(err.Error(), tc.wantErr) || !strings.Contains(err.Error(), etag) {
					t.Fatalf("err %v, want ErrChecksum mentioning %q and %s", err, tc.wantErr, etag)
				}
				// Served right again, the next run succeeds.
				h.set(func() { delete(h.corrupt, tc.corrupt) })
				if dir, err = Resolve(context.Background(), "acme/tiny-llama", opts); err != nil {
					t.Fatal(err)
				}
			} else {
				if err != nil {
					t.Fatal(err)
				}
				if !strings.Contains(logs.String(), "downloading it again from the start") {
					t.Error("no restart logged")
				}
				if !slices.ContainsFunc(reqs, func(r fakeRequest) bool { return r.Range == "bytes=5000-" }) {
					t.Errorf("the kept part was not resumed first: %v", reqs)
				}
			}
			checkLayout(t, opts.CacheDir, "acme/tiny-llama", repo, dir)
		})
	}
}

func TestErrors(t *testing.T) {
	h := newFakeHub(t)
	h.addRepo("acme/gated", true, tinyModel())
	h.addRepo("acme/pickle", false, map[string][]byte{"config.json": []byte(`{}`), "pytorch_model.bin": randomBytes(100, 1)})
	h.addRepo("acme/adapter", false, map[string][]byte{"adapter_config.json": []byte(`{}`), "adapter_model.safetensors": randomBytes(100, 1)})
	h.addRepo("acme/gguf", false, map[string][]byte{"config.json": []byte(`{}`), "model-q4.gguf": randomBytes(100, 1)})
	h.addRepo("acme/tiny", false, tinyModel())
	for _, tc := range []struct {
		name, model, token string
		offline            bool
		want               error
		says               []string
	}{
		{"gated without a token", "acme/gated", "", false, ErrAccess, []string{"401", "gated", "set HF_TOKEN", h.hub.URL + "/acme/gated"}},
		{"gated, token not granted", "acme/gated", "hf_other", false, ErrAccess, []string{"403", "gated", "HF_TOKEN", "not been granted"}},
		{"no such repo, no token", "acme/nope", "", false, ErrAccess, []string{"401", "does not exist", "HF_TOKEN"}},
		{"no such repo", "acme/nope", "hf_other", false, ErrNotFound, []string{"404", "no such model repository", "acme/nope"}},
		{"no such revision", "acme/tiny@v9", "", false, ErrNotFound, []string{"404", `no revision "v9"`}},
		{"pickle weights only", "acme/pickle", "", false, ErrUnsupported, []string{"pytorch_model.bin", "pickle", "safetensors", "acme/pickle@refs/pr/N"}},
		{"an adapter", "acme/adapter", "", false, ErrUnsupported, []string{"PEFT adapter"}},
		{"gguf only", "acme/gguf", "", false, ErrUnsupported, []string{"model-q4.gguf", "model.safetensors"}},
		{"offline, empty cache", "acme/tiny", "", true, ErrOffline, []string{"HF_HUB_OFFLINE", "not in", "huggingface-cli download acme/tiny"}},
		{"offline, commit not cached", "acme/tiny@0123456789abcdef0123456789abcdef01234567", "", true, ErrOffline, []string{"no snapshot 0123456789abcdef0123456789abcdef01234567"}},
		{"not a repo id", "acme/a--b", "", false, nil, []string{"not a Hugging Face model"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			opts, _ := testOptions(t, h)
			opts.Token, opts.Offline = tc.token, tc.offline
			h.took()
			_, err := Resolve(context.Background(), tc.model, opts)
			if err == nil || (tc.want != nil && !errors.Is(err, tc.want)) {
				t.Fatalf("err %v, want %v", err, tc.want)
			}
			t.Log(err)
			for _, s := range tc.says {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("%q does not say %q", err, s)
				}
			}
			if reqs := h.took(); tc.offline && len(reqs) > 0 {
				t.Errorf("offline, yet requests: %v", reqs)
			}
			if tc.want == ErrUnsupported {
				if ents, _ := os.ReadDir(filepath.Join(opts.CacheDir, "models--"+strings.ReplaceAll(Name(tc.model), "/", "--"), "blobs")); len(ents) > 0 {
					t.Errorf("downloaded %d blobs of an unsupported repository", len(ents))
				}
			}
		})
	}
	t.Run("gated with the token", func(t *testing.T) {
		opts, _ := testOptions(t, h)
		opts.Token = "hf_good"
		if _, err := Resolve(context.Background(), "acme/gated", opts); err != nil {
			t.Fatal(err)
		}
		if len(h.cdnAuth) > 0 {
			t.Errorf("the CDN received the token: %v", h.cdnAuth)
		}
	})
	t.Run("hub down, nothing cached", func(t *testing.T) {
		opts, _ := testOptions(t, h)
		opts.Endpoint = "http://127.0.0.1:1"
		opts.Retries = -1
		_, err := Resolve(context.Background(), "acme/tiny", opts)
		if err == nil || !strings.Contains(err.Error(), "cannot reach http://127.0.0.1:1") {
			t.Fatalf("err %v", err)
		}
	})
}

// handMadeCache writes, by hand, what huggingface_hub leaves after
// snapshot_download: refs/<ref>, blobs/<etag>, snapshot links.
func handMadeCache(t *testing.T, cache, id, commit string, refs []string, files map[string][]byte, lfs map[string]bool) string {
	t.Helper()
	root := filepath.Join(cache, "models--"+strings.ReplaceAll(id, "/", "--"))
	snap := filepath.Join(root, "snapshots", commit)
	for _, d := range []string{filepath.Join(root, "refs"), filepath.Join(root, "blobs"), snap} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, ref := range refs {
		if err := os.WriteFile(filepath.Join(root, "refs", ref), []byte(commit), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for name, b := range files {
		etag := gitOID(b)
		if lfs[name] {
			s := sha256.Sum256(b)
			etag = hex.EncodeToString(s[:])
		}
		if err := os.WriteFile(filepath.Join(root, "blobs", etag), b, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink("../../blobs/"+etag, filepath.Join(snap, name)); err != nil {
			t.Fatal(err)
		}
	}
	return snap
}

func TestHandMadeCache(t *testing.T) {
	const commit = "4e3b3d2f5a1c0b9d8e7f6a5b4c3d2e1f0a9b8c7d"
	files := map[string][]byte{
		"config.json":       []byte(`{"hidden_size":64}`),
		"tokenizer.json":    []byte(`{}`),
		"model.safetensors": randomBytes(4096, 5),
	}
	lfs := map[string]bool{"model.safetensors": true}
	for _, tc := range []struct {
		name, model string
		refs        []string
		offline     bool
		env         string // where the cache is found: HF_HUB_CACHE, HF_HOME or XDG_CACHE_HOME
	}{
		{"main", "meta/llama", []string{"main"}, false, "HF_HUB_CACHE"},
		{"main, offline", "meta/llama", []string{"main"}, true, "HF_HOME"},
		{"a tag", "meta/llama@v2", []string{"main", "v2"}, true, "XDG_CACHE_HOME"},
		{"a commit without refs", "meta/llama@" + commit, nil, true, "HF_HUB_CACHE"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			home := t.TempDir()
			cache := home
			switch tc.env {
			case "HF_HOME":
				cache = filepath.Join(home, "hub")
			case "XDG_CACHE_HOME":
				cache = filepath.Join(home, "huggingface", "hub")
			}
			for _, v := range []string{"HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "TRANSFORMERS_OFFLINE"} {
				t.Setenv(v, "")
			}
			t.Setenv(tc.env, home)
			t.Setenv("HF_ENDPOINT", "http://127.0.0.1:1") // any request fails
			t.Setenv("HF_HUB_OFFLINE", map[bool]string{true: "1", false: ""}[tc.offline])
			want := handMadeCache(t, cache, "meta/llama", commit, tc.refs, files, lfs)
			dir, err := Resolve(context.Background(), tc.model, FromEnv(slog.New(slog.DiscardHandler)))
			if err != nil || dir != want {
				t.Fatalf("%s, %v; want %s", dir, err, want)
			}
		})
	}
	t.Run("a dangling link is not a cached file", func(t *testing.T) {
		h := newFakeHub(t)
		repo := h.addRepo("acme/tiny-llama", false, tinyModel())
		opts, _ := testOptions(t, h)
		m := map[string][]byte{}
		for _, n := range needed {
			m[n] = repo.files[n].data
		}
		handMadeCache(t, opts.CacheDir, "acme/tiny-llama", repo.commit, []string{"main"}, m, map[string]bool{"model-00001-of-00002.safetensors": true, "model-00002-of-00002.safetensors": true})
		blob := filepath.Join(opts.CacheDir, "models--acme--tiny-llama", "blobs", repo.files["model-00002-of-00002.safetensors"].etag())
		os.Remove(blob)
		o := opts
		o.Offline = true
		if _, err := Resolve(context.Background(), "acme/tiny-llama", o); !errors.Is(err, ErrOffline) || !strings.Contains(err.Error(), "model-00002-of-00002.safetensors") {
			t.Fatalf("err %v, want offline naming the missing shard", err)
		}
		if _, err := Resolve(context.Background(), "acme/tiny-llama", opts); err != nil {
			t.Fatal(err)
		}
		reqs := h.took()
		if countRequests(reqs, "cdn", "GET") != 1 {
			t.Errorf("want only the missing shard downloaded: %v", reqs)
		}
		if _, err := os.Stat(blob); err != nil {
			t.Error(err)
		}
	})
}

// TestUsableSnapshotWithoutTokenizer: a cached snapshot with the config and
// the weights but no word on the tokenizer is completed from the Hub (only
// the missing small files), and used as it is when the Hub is unreachable.
func TestUsableSnapshotWithoutTokenizer(t *testing.T) {
	h := newFakeHub(t)
	repo := h.addRepo("acme/tiny-llama", false, tinyModel())
	weights := map[string][]byte{}
	for _, n := range []string{"config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"} {
		weights[n] = repo.files[n].data
	}
	lfs := map[string]bool{"model-00001-of-00002.safetensors": true, "model-00002-of-00002.safetensors": true}

	t.Run("hub down", func(t *testing.T) {
		opts, logs := testOptions(t, h)
		want := handMadeCache(t, opts.CacheDir, "acme/tiny-llama", repo.commit, []string{"main"}, weights, lfs)
		opts.Endpoint = "http://127.0.0.1:1"
		dir, err := Resolve(context.Background(), "acme/tiny-llama", opts)
		if err != nil || dir != want {
			t.Fatalf("%s, %v", dir, err)
		}
		if !strings.Contains(logs.String(), "using the cached snapshot") || strings.Contains(logs.String(), "retrying") {
			t.Errorf("want one failed call and a warning:\n%s", logs)
		}
	})
	t.Run("hub up", func(t *testing.T) {
		opts, _ := testOptions(t, h)
		handMadeCache(t, opts.CacheDir, "acme/tiny-llama", repo.commit, []string{"main"}, weights, lfs)
		h.took()
		dir, err := Resolve(context.Background(), "acme/tiny-llama", opts)
		if err != nil {
			t.Fatal(err)
		}
		checkLayout(t, opts.CacheDir, "acme/tiny-llama", repo, dir)
		reqs := h.took()
		if n := countRequests(reqs, "hub", "GET"); n != 4 || countRequests(reqs, "cdn", "GET") != 0 {
			t.Errorf("want the listing and 3 small files: %v", reqs)
		}
	})
}

func TestParseRef(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Ref
		ok   bool
	}{
		{"meta-llama/Llama-3.1-8B-Instruct", Ref{"meta-llama/Llama-3.1-8B-Instruct", "main"}, true},
		{"hf://Qwen/Qwen2.5-0.5B@v1.0", Ref{"Qwen/Qwen2.5-0.5B", "v1.0"}, true},
		{"HF://a/b", Ref{"a/b", "main"}, true},
		{"a_b/c.d@refs/pr/12", Ref{"a_b/c.d", "refs/pr/12"}, true},
		{"a/b@0123456789abcdef0123456789abcdef01234567", Ref{"a/b", "0123456789abcdef0123456789abcdef01234567"}, true},
		{"gpt2", Ref{}, false},
		{"a/b/c", Ref{}, false},
		{"/abs/path", Ref{}, false},
		{"./rel/path", Ref{}, false},
		{"a/b@", Ref{}, false},
		{"a/b@../../etc", Ref{}, false},
		{"a/b@/x", Ref{}, false},
		{"a--b/c", Ref{}, false},
		{"a/b..c", Ref{}, false},
		{"a/.b", Ref{}, false},
		{"a/b-", Ref{}, false},
		{"s3://bucket/x", Ref{}, false},
		{"", Ref{}, false},
	} {
		got, ok := ParseRef(tc.in)
		if ok != tc.ok || got != tc.want {
			t.Errorf("ParseRef(%q) = %+v, %v; want %+v, %v", tc.in, got, ok, tc.want, tc.ok)
		}
	}
}

func TestIsPrefersALocalFolder(t *testing.T) {
	t.Chdir(t.TempDir())
	if err := os.MkdirAll("models/stories260K", 0o755); err != nil {
		t.Fatal(err)
	}
	for in, want := range map[string]bool{
		"models/stories260K":      false, // a folder here
		"hf://models/stories260K": true,
		"acme/tiny":               true,
		"/models/x":               false,
		"":                        false,
	} {
		if got := Is(in); got != want {
			t.Errorf("Is(%q) = %v, want %v", in, got, want)
		}
	}
}

func TestFromEnv(t *testing.T) {
	home := t.TempDir()
	for _, v := range []string{"HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
		"HF_TOKEN_PATH", "HF_ENDPOINT", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"} {
		t.Setenv(v, "")
	}
	t.Setenv("HOME", home)
	o := FromEnv(nil)
	if want := filepath.Join(home, ".cache", "huggingface", "hub"); o.CacheDir != want || o.Endpoint != DefaultEndpoint || o.Token != "" || o.Offline {
		t.Fatalf("defaults: %+v, want the cache %s", o, want)
	}
	t.Setenv("HF_HOME", filepath.Join(home, "hf"))
	if err := os.MkdirAll(filepath.Join(home, "hf"), 0o755); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(home, "hf", "token"), []byte("hf_fromfile\n"), 0o600)
	t.Setenv("HF_ENDPOINT", "https://mirror.example/")
	t.Setenv("HF_HUB_OFFLINE", "true")
	o = FromEnv(nil)
	if o.CacheDir != filepath.Join(home, "hf", "hub") || o.Token != "hf_fromfile" || o.Endpoint != "https://mirror.example" || !o.Offline {
		t.Fatalf("HF_HOME: %+v", o)
	}
	t.Setenv("HF_HUB_CACHE", "~/elsewhere")
	t.Setenv("HF_TOKEN", "hf_env")
	t.Setenv("HF_HUB_OFFLINE", "0")
	o = FromEnv(nil)
	if o.CacheDir != filepath.Join(home, "elsewhere") || o.Token != "hf_env" || o.Offline {
		t.Fatalf("HF_HUB_CACHE: %+v", o)
	}
}

// TestParallelDownloads: shards download at once, bounded by Parallel.
func TestParallelDownloads(t *testing.T) {
	h := newFakeHub(t)
	files := map[string][]byte{"config.json": []byte(`{}`)}
	wm := map[string]string{}
	for i := range 8 {
		name := "model-0000" + string(rune('1'+i)) + "-of-00008.safetensors"
		files[name] = randomBytes(20_000, uint64(i))
		wm["t"+name] = name
	}
	idx, _ := json.Marshal(map[string]any{"weight_map": wm})
	files["model.safetensors.index.json"] = idx
	h.addRepo("acme/eight", false, files)
	h.set(func() { h.slow = 100 * time.Millisecond })
	opts, _ := testOptions(t, h)
	opts.Parallel = 3
	var mu sync.Mutex
	active, peak := map[string]bool{}, 0
	opts.Progress = func(file string, done, total int64) {
		mu.Lock()
		defer mu.Unlock()
		if done < total {
			active[file] = true
		} else {
			delete(active, file)
		}
		peak = max(peak, len(active))
	}
	dir, err := Resolve(context.Background(), "acme/eight", opts)
	if err != nil {
		t.Fatal(err)
	}
	for name, b := range files {
		if got, _ := os.ReadFile(filepath.Join(dir, name)); !bytes.Equal(got, b) {
			t.Errorf("%s differs", name)
		}
	}
	if peak > 3 || peak < 2 {
		t.Errorf("%d downloads at once, want 2 or 3", peak)
	}
}
