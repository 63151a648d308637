// Package hub resolves a Hugging Face Hub model, --model ORG/NAME[@REVISION],
// to a local folder the model loader opens: a snapshot folder of the
// Hugging Face cache (the layout huggingface_hub writes and reads, so Python
// tools and peftd share one copy).
//
// A snapshot already in the cache that holds what the model needs is used
// as it is, without a request (so HF_HUB_OFFLINE=1 works). Otherwise the
// revision is resolved to a commit through the Hub's API, and only the files
// the engine reads (config, generation config, tokenizer, safetensors
// weights: never pickles, GGUF or original/ checkpoints) are downloaded from
// $HF_ENDPOINT with $HF_TOKEN into blobs/ named by their ETag, linked from
// snapshots/<commit>/, with refs/<revision> naming the commit. Downloads run
// in parallel (bounded), resume an interrupted blobs/<etag>.incomplete with a
// Range request, are checked against the ETag (the sha256 of LFS files, the
// git blob id of the others) and log their progress.
package hub

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/peftd/peftd/loader/modelfetch"
)

// DefaultEndpoint is the Hub's address when $HF_ENDPOINT is not set.
const DefaultEndpoint = "https://huggingface.co"

// DefaultRevision is the revision of ORG/NAME without @REVISION.
const DefaultRevision = "main"

// Errors the resolution wraps, for callers and tests to tell apart.
var (
	// ErrOffline: offline (HF_HUB_OFFLINE) and the cache lacks the model.
	ErrOffline = errors.New("hub: offline and not in the Hugging Face cache")
	// ErrAccess: the Hub answered 401 or 403 (gated, private, bad token).
	ErrAccess = errors.New("hub: access denied")
	// ErrNotFound: no such repository, revision or file.
	ErrNotFound = errors.New("hub: not found")
	// ErrChecksum: a download does not match its ETag (sha256 or git blob id).
	ErrChecksum = errors.New("hub: checksum mismatch")
	// ErrUnsupported: the repository has no weights peftd can load.
	ErrUnsupported = errors.New("hub: unsupported model repository")
)

// Options configure Resolve. FromEnv fills them as huggingface_hub does.
type Options struct {
	CacheDir string // the hub cache: holds models--ORG--NAME/ (default CacheDir())
	Endpoint string // the Hub (default $HF_ENDPOINT, else DefaultEndpoint)
	Token    string // sent as Authorization: Bearer to the Hub only (never to a CDN)
	Offline  bool   // never make a request: the cache has the model or it is an error

	Client   *http.Client        // default: proxies from the environment, timeouts on headers and stalls
	Parallel int                 // files downloaded at once (default 4)
	Retries  int                 // resumes of a broken transfer per file (default 5; negative: none)
	Progress modelfetch.Progress // told how far each file is (default: logged every 5 s)
	Log      *slog.Logger        // default slog.Default()

	stall   time.Duration // a transfer with no byte for this long is broken (default 60 s)
	backoff time.Duration // first wait before a retry (default 500 ms, doubling)
}

// FromEnv returns the options huggingface_hub would use: the cache from
// HF_HUB_CACHE, HF_HOME or XDG_CACHE_HOME, the endpoint from HF_ENDPOINT, the
// token from HF_TOKEN or the token file `huggingface-cli login` writes, and
// HF_HUB_OFFLINE. log may be nil.
func FromEnv(log *slog.Logger) Options {
	return Options{CacheDir: CacheDir(), Endpoint: Endpoint(), Token: Token(), Offline: Offline(), Log: log}
}

// CacheDir is the Hugging Face hub cache: $HF_HUB_CACHE (or the older
// $HUGGINGFACE_HUB_CACHE), else $HF_HOME/hub, else
// $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub.
func CacheDir() string {
	for _, v := range []string{"HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"} {
		if d := os.Getenv(v); d != "" {
			return expandHome(d)
		}
	}
	return filepath.Join(hfHome(), "hub")
}

// hfHome is $HF_HOME, else $XDG_CACHE_HOME/huggingface, else
// ~/.cache/huggingface.
func hfHome() string {
	if d := os.Getenv("HF_HOME"); d != "" {
		return expandHome(d)
	}
	if d := os.Getenv("XDG_CACHE_HOME"); d != "" {
		return filepath.Join(expandHome(d), "huggingface")
	}
	return filepath.Join(expandHome("~/.cache"), "huggingface")
}

func expandHome(p string) string {
	if p == "~" || strings.HasPrefix(p, "~/") {
		if h, err := os.UserHomeDir(); err == nil {
			return filepath.Join(h, p[1:])
		}
	}
	return p
}

// Endpoint is $HF_ENDPOINT without a trailing slash, else DefaultEndpoint.
func Endpoint() string {
	if e := strings.TrimRight(os.Getenv("HF_ENDPOINT"), "/"); e != "" {
		return e
	}
	return DefaultEndpoint
}

// Token is $HF_TOKEN (or the older $HUGGING_FACE_HUB_TOKEN), else the
// contents of $HF_TOKEN_PATH or $HF_HOME/token; empty when none is set.
func Token() string {
	for _, v := range []string{"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"} {
		if t := strings.TrimSpace(os.Getenv(v)); t != "" {
			return t
		}
	}
	p := os.Getenv("HF_TOKEN_PATH")
	if p == "" {
		p = filepath.Join(hfHome(), "token")
	}
	b, err := os.ReadFile(expandHome(p))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// Offline reports whether HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set to
// 1, true, yes or on.
func Offline() bool {
	for _, v := range []string{"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"} {
		switch strings.ToUpper(strings.TrimSpace(os.Getenv(v))) {
		case "1", "TRUE", "YES", "ON":
			return true
		}
	}
	return false
}

// Ref names a model on the Hub: a repository and a revision (a branch, a
// tag, refs/pr/N or a commit hash).
type Ref struct {
	Repo     string // ORG/NAME
	Revision string // DefaultRevision when not given
}

func (r Ref) String() string {
	if r.Revision == DefaultRevision {
		return r.Repo
	}
	return r.Repo + "@" + r.Revision
}

const scheme = "hf://"

// repoPart is one side of ORG/NAME as the Hub accepts it: letters, digits,
// '-', '_' and '.', starting and ending with a letter, digit or '_'.
var repoPart = regexp.MustCompile(`^[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?$`)

// commitRE is a full commit hash, as the cache names snapshots.
var commitRE = regexp.MustCompile(`^[0-9a-f]{40}$`)

// ParseRef parses [hf://]ORG/NAME[@REVISION]; ok is false when model is not
// of that form.
func ParseRef(model string) (ref Ref, ok bool) {
	s := model
	if len(s) >= len(scheme) && strings.EqualFold(s[:len(scheme)], scheme) {
		s = s[len(scheme):]
	}
	repo, rev, hasRev := strings.Cut(s, "@")
	if hasRev && !validRevision(rev) {
		return Ref{}, false
	}
	if !hasRev {
		rev = DefaultRevision
	}
	org, name, found := strings.Cut(repo, "/")
	if !found || len(repo) > 96 || !repoPart.MatchString(org) || !repoPart.MatchString(name) ||
		strings.Contains(repo, "--") || strings.Contains(repo, "..") {
		return Ref{}, false
	}
	return Ref{Repo: repo, Revision: rev}, true
}

// validRevision accepts what can name a ref file under refs/ safely.
func validRevision(rev string) bool {
	if rev == "" || len(rev) > 255 || strings.ContainsAny(rev, "\\\x00:") || strings.HasPrefix(rev, "/") || strings.HasSuffix(rev, "/") {
		return false
	}
	for _, seg := range strings.Split(rev, "/") {
		if seg == "" || seg == "." || seg == ".." {
			return false
		}
	}
	return true
}

// Is reports whether --model names a Hub model: hf://ORG/NAME[@REVISION]
// always; ORG/NAME[@REVISION] when no such local path exists (a folder
// wins, so models/stories260K stays a folder).
func Is(model string) bool {
	if _, ok := ParseRef(model); !ok {
		return false
	}
	if strings.HasPrefix(strings.ToLower(model), scheme) {
		return true
	}
	_, err := os.Lstat(model)
	return errors.Is(err, os.ErrNotExist)
}

// Name is the model's name for the API: ORG/NAME, as vLLM names a Hub
// model; empty when model is not a Hub reference.
func Name(model string) string {
	r, ok := ParseRef(model)
	if !ok {
		return ""
	}
	return r.Repo
}

func (o Options) withDefaults() Options {
	if o.CacheDir == "" {
		o.CacheDir = CacheDir()
	}
	if o.Endpoint == "" {
		o.Endpoint = Endpoint()
	}
	o.Endpoint = strings.TrimRight(o.Endpoint, "/")
	if o.Log == nil {
		o.Log = slog.Default()
	}
	if o.Parallel <= 0 {
		o.Parallel = 4
	}
	if o.Retries == 0 {
		o.Retries = 5
	} else if o.Retries < 0 {
		o.Retries = 0
	}
	if o.Progress == nil {
		o.Progress = modelfetch.LogProgress(o.Log, "downloading model", 5*time.Second)
	}
	if o.stall <= 0 {
		o.stall = 60 * time.Second
	}
	if o.backoff <= 0 {
		o.backoff = 500 * time.Millisecond
	}
	if o.Client == nil {
		t := http.DefaultTransport.(*http.Transport).Clone()
		t.ResponseHeaderTimeout = 60 * time.Second
		o.Client = &http.Client{Transport: t}
	}
	return o
}

// Resolve returns the snapshot folder of model ([hf://]ORG/NAME[@REVISION])
// in the Hugging Face cache, downloading what is missing unless offline. A
// snapshot that holds the config, the complete weights and the tokenizer
// (or the knowledge that the repository has none) is used without any
// request. When the Hub cannot be reached (a network error, a 5xx, a 401 or
// 403) but the cache holds a snapshot with the config and the weights, that
// one is used, with a warning.
func Resolve(ctx context.Context, model string, opts Options) (string, error) {
	ref, ok := ParseRef(model)
	if !ok {
		return "", fmt.Errorf("hub: %q is not a Hugging Face model (want ORG/NAME or ORG/NAME@REVISION)", model)
	}
	opts = opts.withDefaults()
	c := newRepoCache(opts.CacheDir, ref.Repo)
	log := opts.Log.With("model", ref.String())

	commit, cached := c.commitFor(ref.Revision)
	var st snapState
	if cached {
		st = c.check(commit)
		if st.complete() {
			log.Info("model found in the Hugging Face cache", "commit", commit, "dir", c.snapshot(commit))
			return c.snapshot(commit), nil
		}
	}
	if opts.Offline {
		if cached && st.usable() {
			log.Warn("offline: using the cached snapshot, which lacks "+strings.Join(st.missing, ", "), "commit", commit, "dir", c.snapshot(commit))
			return c.snapshot(commit), nil
		}
		return "", offlineError(ref, c, commit, cached, st)
	}
	// With a usable snapshot at hand, a failing Hub is not retried: the
	// snapshot is used at once, as huggingface_hub falls back to its cache.
	f := &fetcher{opts: opts, ref: ref, c: c, log: log, fallback: cached && st.usable()}
	dir, err := f.run(ctx)
	if err != nil {
		if f.fallback && (transient(err) || errors.Is(err, ErrAccess)) && ctx.Err() == nil {
			log.Warn("cannot reach the model on the Hub; using the cached snapshot", "commit", commit, "dir", c.snapshot(commit), "err", err)
			return c.snapshot(commit), nil
		}
		return "", err
	}
	return dir, nil
}

func offlineError(ref Ref, c repoCache, commit string, cached bool, st snapState) error {
	where := fmt.Sprintf("the Hugging Face cache %s", c.root)
	switch {
	case !cached && commitRE.MatchString(ref.Revision):
		return fmt.Errorf("%w: %s: %s has no snapshot %s (HF_HUB_OFFLINE is set): unset HF_HUB_OFFLINE to download it, or fill the cache first (huggingface-cli download %s --revision %s)",
			ErrOffline, ref, where, ref.Revision, ref.Repo, ref.Revision)
	case !cached:
		return fmt.Errorf("%w: %s is not in %s (no %s; HF_HUB_OFFLINE is set): unset HF_HUB_OFFLINE to download it, or fill the cache first (huggingface-cli download %s --revision %s)",
			ErrOffline, ref, where, filepath.Join(c.dir, "refs", filepath.FromSlash(ref.Revision)), ref.Repo, ref.Revision)
	}
	return fmt.Errorf("%w: %s: the cached snapshot %s lacks %s (HF_HUB_OFFLINE is set): unset HF_HUB_OFFLINE to complete it",
		ErrOffline, ref, c.snapshot(commit), strings.Join(st.missing, ", "))
}
