package hub

import (
	"bytes"
	"crypto/sha1"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeHub serves the Hub's routes as huggingface.co does, for the tests:
//
//	GET  /api/models/{org}/{name}/revision/{rev}   {"id","sha","siblings"}
//	HEAD /{org}/{name}/resolve/{rev}/{file}        X-Repo-Commit, ETag (git blob id);
//	GET                                            LFS files: 302 to the CDN with X-Linked-Etag (sha256), X-Linked-Size
//
// and a second server, the CDN, serving LFS blobs by sha256 with Range
// support. It records every request, refuses gated repositories without the
// right token, and can break or corrupt a transfer.
type fakeHub struct {
	hub, cdn *httptest.Server

	mu       sync.Mutex
	repos    map[string]*fakeRepo
	renamed  map[string]string // old repo id -> new one (answered with a relative 307)
	token    string            // the token gated repositories accept
	requests []fakeRequest
	cut      map[string]int64 // file name -> close the connection after this many bytes, once
	corrupt  map[string]bool  // file name -> serve it with a byte flipped
	cdnAuth  []string         // Authorization headers the CDN saw (must stay empty)
	slow     time.Duration    // pause between the headers and the body of a full GET
}

type fakeRequest struct {
	Server, Method, Path, Range string
}

func (r fakeRequest) String() string {
	s := r.Server + " " + r.Method + " " + r.Path
	if r.Range != "" {
		s += " [" + r.Range + "]"
	}
	return s
}

type fakeRepo struct {
	commit string
	refs   map[string]string // branch or tag -> commit
	files  map[string]*fakeFile
	gated  bool
}

type fakeFile struct {
	name string
	data []byte
	lfs  bool
}

func (f *fakeFile) sha256() string {
	s := sha256.Sum256(f.data)
	return hex.EncodeToString(s[:])
}

func gitOID(b []byte) string {
	h := sha1.New()
	fmt.Fprintf(h, "blob %d\x00", len(b))
	h.Write(b)
	return hex.EncodeToString(h.Sum(nil))
}

// etag is the name the cache gives the file's blob.
func (f *fakeFile) etag() string {
	if f.lfs {
		return f.sha256()
	}
	return gitOID(f.data)
}

func newFakeHub(t *testing.T) *fakeHub {
	h := &fakeHub{repos: map[string]*fakeRepo{}, renamed: map[string]string{}, cut: map[string]int64{}, corrupt: map[string]bool{}, token: "hf_good"}
	h.cdn = httptest.NewServer(http.HandlerFunc(h.serveCDN))
	h.hub = httptest.NewServer(http.HandlerFunc(h.serveHub))
	t.Cleanup(h.close)
	return h
}

func (h *fakeHub) close() {
	h.hub.Close()
	h.cdn.Close()
}

// addRepo adds a repository whose main branch (and the given tags) point at
// one commit holding files; *.safetensors, *.bin, *.pth and *.gguf are LFS.
func (h *fakeHub) addRepo(id string, gated bool, files map[string][]byte, tags ...string) *fakeRepo {
	r := &fakeRepo{refs: map[string]string{}, files: map[string]*fakeFile{}, gated: gated}
	c := sha1.New()
	c.Write([]byte(id))
	for name, b := range files {
		lfs := false
		for _, ext := range []string{".safetensors", ".bin", ".pth", ".gguf"} {
			lfs = lfs || strings.HasSuffix(name, ext)
		}
		r.files[name] = &fakeFile{name: name, data: b, lfs: lfs}
		c.Write([]byte(name))
		c.Write(b)
	}
	r.commit = hex.EncodeToString(c.Sum(nil))
	r.refs["main"] = r.commit
	for _, tag := range tags {
		r.refs[tag] = r.commit
	}
	h.mu.Lock()
	h.repos[id] = r
	h.mu.Unlock()
	return r
}

func (h *fakeHub) record(server string, r *http.Request) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.requests = append(h.requests, fakeRequest{server, r.Method, r.URL.EscapedPath(), r.Header.Get("Range")})
}

// set changes the fake's behaviour under its lock: handlers still running
// from an earlier Resolve (a failed one returns before its siblings end)
// read these maps.
func (h *fakeHub) set(f func()) {
	h.mu.Lock()
	defer h.mu.Unlock()
	f()
}

// took returns and forgets the requests made so far.
func (h *fakeHub) took() []fakeRequest {
	h.mu.Lock()
	defer h.mu.Unlock()
	r := h.requests
	h.requests = nil
	return r
}

func hubError(w http.ResponseWriter, status int, code, msg string) {
	if code != "" {
		w.Header().Set("X-Error-Code", code)
	}
	w.Header().Set("X-Error-Message", msg)
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(map[string]string{"error": msg})
}

// access answers as the Hub does for a repository the request may not read,
// and reports whether it may.
func (h *fakeHub) access(w http.ResponseWriter, r *http.Request, id string, repo *fakeRepo) bool {
	auth := r.Header.Get("Authorization")
	switch {
	case repo == nil && auth == "":
		hubError(w, 401, "RepoNotFound", "Repository not found")
	case repo == nil:
		hubError(w, 404, "RepoNotFound", "Repository not found")
	case repo.gated && auth == "":
		hubError(w, 401, "GatedRepo", "Access to model "+id+" is restricted. You must have access to it and be authenticated to access it. Please log in.")
	case repo.gated && auth != "Bearer "+h.token:
		hubError(w, 403, "GatedRepo", "Access to model "+id+" is restricted and you are not in the authorized list.")
	default:
		return true
	}
	return false
}

func (h *fakeHub) serveHub(w http.ResponseWriter, r *http.Request) {
	h.record("hub", r)
	segs := strings.Split(strings.TrimPrefix(r.URL.EscapedPath(), "/"), "/")
	unescape := func(s string) string { u, _ := url.PathUnescape(s); return u }
	h.mu.Lock()
	defer h.mu.Unlock()
	var id string
	api := len(segs) == 6 && segs[0] == "api" && segs[1] == "models" && segs[4] == "revision" && r.Method == http.MethodGet
	resolve := len(segs) >= 5 && segs[2] == "resolve"
	switch {
	case api:
		id = segs[2] + "/" + segs[3]
	case resolve:
		id = segs[0] + "/" + segs[1]
	default:
		http.NotFound(w, r)
		return
	}
	if to, ok := h.renamed[id]; ok {
		http.Redirect(w, r, strings.Replace(r.URL.RequestURI(), id, to, 1), http.StatusTemporaryRedirect)
		return
	}
	repo := h.repos[id]
	// As on the Hub, a gated repository's listing is public; its files are not.
	if !(api && repo != nil) && !h.access(w, r, id, repo) {
		return
	}
	var rev string
	if api {
		rev = unescape(segs[5])
	} else {
		rev = unescape(segs[3])
	}
	commit, ok := repo.refs[rev]
	if !ok && rev == repo.commit {
		commit, ok = rev, true
	}
	if !ok {
		hubError(w, 404, "RevisionNotFound", "Invalid rev id: "+rev)
		return
	}
	if api {
		type lfs struct {
			SHA256 string `json:"sha256"`
			Size   int    `json:"size"`
		}
		type sib struct {
			Name string `json:"rfilename"`
			Size int    `json:"size"`
			Blob string `json:"blobId"`
			LFS  *lfs   `json:"lfs,omitempty"`
		}
		var sibs []sib
		for _, f := range repo.files {
			s := sib{Name: f.name, Size: len(f.data), Blob: gitOID(f.data)}
			if f.lfs {
				s.LFS = &lfs{f.sha256(), len(f.data)}
			}
			sibs = append(sibs, s)
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]any{"id": id, "sha": commit, "siblings": sibs})
		return
	}
	name := unescape(strings.Join(segs[4:], "/"))
	f := repo.files[name]
	w.Header().Set("X-Repo-Commit", commit)
	if f == nil {
		hubError(w, 404, "EntryNotFound", name+" does not exist on \""+rev+"\"")
		return
	}
	if f.lfs {
		// The Hub's ETag here is the pointer's; the blob's is X-Linked-Etag.
		w.Header().Set("ETag", `"`+gitOID([]byte("version https://git-lfs.github.com/spec/v1\noid sha256:"+f.sha256()))+`"`)
		w.Header().Set("X-Linked-Etag", `"`+f.sha256()+`"`)
		w.Header().Set("X-Linked-Size", strconv.Itoa(len(f.data)))
		w.Header().Set("Location", h.cdn.URL+"/blobs/"+f.sha256()+"?X-Amz-Signature=x")
		w.WriteHeader(http.StatusFound)
		return
	}
	w.Header().Set("ETag", `"`+gitOID(f.data)+`"`)
	data, cut, slow := h.contents(r, f)
	h.mu.Unlock()
	defer h.mu.Lock()
	h.serveFile(w, r, f.name, data, cut, slow)
}

func (h *fakeHub) serveCDN(w http.ResponseWriter, r *http.Request) {
	h.record("cdn", r)
	h.mu.Lock()
	defer h.mu.Unlock()
	if a := r.Header.Get("Authorization"); a != "" {
		h.cdnAuth = append(h.cdnAuth, a)
	}
	sha := strings.TrimPrefix(r.URL.Path, "/blobs/")
	for _, repo := range h.repos {
		for _, f := range repo.files {
			if f.lfs && f.sha256() == sha {
				data, cut, slow := h.contents(r, f)
				h.mu.Unlock()
				defer h.mu.Lock()
				h.serveFile(w, r, f.name, data, cut, slow)
				return
			}
		}
	}
	http.NotFound(w, r)
}

// contents is what to serve of f: corrupted or not, where to cut the
// first full GET (-1: never), how long to pause. The caller holds h.mu.
func (h *fakeHub) contents(r *http.Request, f *fakeFile) ([]byte, int64, time.Duration) {
	data := f.data
	if h.corrupt[f.name] {
		data = bytes.Clone(data)
		data[len(data)/2] ^= 0xff
	}
	cut := int64(-1)
	if n, ok := h.cut[f.name]; ok && r.Method == http.MethodGet && r.Header.Get("Range") == "" {
		delete(h.cut, f.name)
		cut = n
	}
	return data, cut, h.slow
}

// serveFile serves data with Range support (http.ServeContent), closing
// the connection after cut bytes when cut >= 0, and pausing slow between
// the headers and the body of full GETs.
func (h *fakeHub) serveFile(w http.ResponseWriter, r *http.Request, name string, data []byte, cut int64, slow time.Duration) {
	if cut >= 0 {
		w.Header().Set("Content-Length", strconv.Itoa(len(data)))
		w.WriteHeader(http.StatusOK)
		w.Write(data[:cut])
		w.(http.Flusher).Flush()
		panic(http.ErrAbortHandler) // the connection closes mid-body
	}
	if slow > 0 && r.Method == http.MethodGet && r.Header.Get("Range") == "" {
		w.Header().Set("Content-Length", strconv.Itoa(len(data)))
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
		time.Sleep(slow)
		w.Write(data)
		return
	}
	http.ServeContent(w, r, name, time.Time{}, bytes.NewReader(data))
}
