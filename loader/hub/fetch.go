package hub

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/sync/errgroup"
)

// fetcher downloads one revision of a repository into the cache.
type fetcher struct {
	opts       Options
	ref        Ref
	c          repoCache
	log        *slog.Logger
	fallback   bool         // the cache has a usable snapshot: do not retry the revision call
	downloaded atomic.Int64 // bytes received, for the summary
}

// sibling is a file of the repository as the Hub's API lists it.
type sibling struct {
	Name string `json:"rfilename"`
	Size int64  `json:"size"`
	LFS  *struct {
		SHA256 string `json:"sha256"`
		Size   int64  `json:"size"`
	} `json:"lfs"`
}

func (s sibling) size() int64 {
	if s.LFS != nil && s.LFS.Size > 0 {
		return s.LFS.Size
	}
	return s.Size
}

type repoInfo struct {
	ID       string    `json:"id"`
	SHA      string    `json:"sha"`
	Siblings []sibling `json:"siblings"`
}

// run resolves the revision to a commit, downloads what the snapshot lacks
// and records the ref; it returns the snapshot folder.
func (f *fetcher) run(ctx context.Context) (string, error) {
	start := time.Now()
	info, err := f.repoInfo(ctx)
	if err != nil {
		return "", err
	}
	commit := info.SHA
	have := map[string]sibling{}
	for _, s := range info.Siblings {
		have[s.Name] = s
	}
	files, index, err := plan(f.ref, have, info.Siblings)
	if err != nil {
		return "", err
	}
	if index != "" {
		if err := f.fetch(ctx, commit, index); err != nil {
			return "", err
		}
		shards, err := readIndex(f.c.pointer(commit, index))
		if err != nil {
			return "", fmt.Errorf("%w: %s: %s: %v", ErrUnsupported, f.ref, index, err)
		}
		for _, sh := range shards {
			if _, ok := have[sh]; !ok {
				return "", fmt.Errorf("%w: %s: %s names the shard %s, which the repository lacks", ErrUnsupported, f.ref, index, sh)
			}
		}
		files = append(files, shards...)
	}
	f.checkSpace(commit, files, have)

	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(f.opts.Parallel)
	for _, name := range files {
		g.Go(func() error { return f.fetch(gctx, commit, name) })
	}
	if err := g.Wait(); err != nil {
		return "", err
	}
	for _, name := range optionalFiles {
		if _, ok := have[name]; !ok {
			f.c.markNoExist(commit, name)
		}
	}
	if err := f.c.writeRef(f.ref.Revision, commit); err != nil {
		return "", err
	}
	if st := f.c.check(commit); !st.usable() {
		return "", fmt.Errorf("hub: %s: the snapshot %s still lacks %s after the download", f.ref, f.c.snapshot(commit), strings.Join(st.missing, ", "))
	}
	dir := f.c.snapshot(commit)
	f.log.Info("model ready in the Hugging Face cache", "commit", commit, "dir", dir, "files", len(files),
		"downloaded_mib", fmt.Sprintf("%.1f", float64(f.downloaded.Load())/(1<<20)),
		"seconds", fmt.Sprintf("%.1f", time.Since(start).Seconds()))
	return dir, nil
}

// plan picks the files the engine needs from the repository's listing: the
// config, the optional files present, and model.safetensors (or the index,
// returned apart: its shards are known once it is read). Pickles, GGUF,
// original/ checkpoints and the rest are never downloaded.
func plan(ref Ref, have map[string]sibling, all []sibling) (files []string, index string, err error) {
	if _, ok := have[configFile]; !ok {
		if _, ok := have["adapter_config.json"]; ok {
			return nil, "", fmt.Errorf("%w: %s is a PEFT adapter (adapter_config.json), not a base model: put it in the adapter store and serve its base model",
				ErrUnsupported, ref)
		}
		return nil, "", fmt.Errorf("%w: %s has no config.json at its root, so it is not a transformers model (it holds %s)",
			ErrUnsupported, ref, listing(all, func(string) bool { return true }))
	}
	files = []string{configFile}
	for _, name := range optionalFiles {
		if _, ok := have[name]; ok {
			files = append(files, name)
		}
	}
	if _, ok := have[indexFile]; ok {
		return files, indexFile, nil
	}
	if _, ok := have[weightsFile]; ok {
		return append(files, weightsFile), "", nil
	}
	pickle := func(n string) bool {
		switch path.Ext(n) {
		case ".bin", ".pth", ".pt", ".ckpt", ".pkl", ".pickle":
			return true
		}
		return false
	}
	weights := func(n string) bool {
		switch path.Ext(n) {
		case ".safetensors", ".gguf", ".h5", ".msgpack", ".onnx", ".npz":
			return true
		}
		return false
	}
	if p := listing(all, pickle); p != "" {
		return nil, "", fmt.Errorf("%w: %s has no safetensors weights (model.safetensors or model.safetensors.index.json), only PyTorch pickle files (%s), "+
			"which peftd does not load: a pickle can run code when loaded. Convert them to safetensors (transformers: save_pretrained(dir, safe_serialization=True)) "+
			"or pick a revision that has them (the Hub's conversion bot opens one as a pull request: --model %s@refs/pr/N)",
			ErrUnsupported, ref, p, ref.Repo)
	}
	if w := listing(all, weights); w != "" {
		return nil, "", fmt.Errorf("%w: %s has no model.safetensors or model.safetensors.index.json at its root (it has %s), and peftd loads only those",
			ErrUnsupported, ref, w)
	}
	return nil, "", fmt.Errorf("%w: %s has no weights (model.safetensors or model.safetensors.index.json)", ErrUnsupported, ref)
}

// listing names the files keep accepts, at most 8 of them.
func listing(all []sibling, keep func(string) bool) string {
	var names []string
	n := 0
	for _, s := range all {
		if !keep(s.Name) {
			continue
		}
		if n++; n <= 8 {
			names = append(names, s.Name)
		}
	}
	if n > 8 {
		names = append(names, fmt.Sprintf("and %d more", n-8))
	}
	if n == 0 && keep("") {
		return "no files"
	}
	return strings.Join(names, ", ")
}

// repoInfo asks the Hub which commit the revision names and which files it
// holds: GET /api/models/{repo}/revision/{revision}.
func (f *fetcher) repoInfo(ctx context.Context) (repoInfo, error) {
	u := f.opts.Endpoint + "/api/models/" + f.ref.Repo + "/revision/" + url.PathEscape(f.ref.Revision) + "?blobs=true"
	var info repoInfo
	retry := f.retry
	if f.fallback {
		retry = func(_ context.Context, _ string, fn func() error) error { return fn() }
	}
	err := retry(ctx, "revision "+f.ref.Revision, func() error {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
		if err != nil {
			return fmt.Errorf("hub: %w", err)
		}
		f.header(req)
		resp, err := f.opts.Client.Do(req)
		if err != nil {
			return f.netError(ctx, err, false)
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return f.statusError(resp, "")
		}
		info = repoInfo{}
		if err := json.NewDecoder(io.LimitReader(resp.Body, 64<<20)).Decode(&info); err != nil {
			return &transientError{fmt.Errorf("hub: %s: reading %s: %w", f.ref, u, err)}
		}
		return nil
	})
	if err != nil {
		return info, err
	}
	if !commitRE.MatchString(info.SHA) {
		return info, fmt.Errorf("hub: %s: %s answered no commit hash (sha %q): is HF_ENDPOINT (%s) a Hugging Face Hub?", f.ref, u, info.SHA, f.opts.Endpoint)
	}
	return info, nil
}

// fileMeta is what the Hub says of a file at a commit (a HEAD on resolve).
type fileMeta struct {
	etag     string // names the blob: the sha256 of an LFS file, else its git blob id
	size     int64  // -1 when unknown
	location string // where to GET it: the resolve URL or the CDN it redirects to
}

var (
	sha256RE = regexp.MustCompile(`^[0-9a-fA-F]{64}$`)
	safeETag = regexp.MustCompile(`^[A-Za-z0-9_.-]{1,128}$`)
)

// fetch makes snapshots/<commit>/<name> a link to its blob, downloading the
// blob unless the cache has it (from any commit).
func (f *fetcher) fetch(ctx context.Context, commit, name string) error {
	ptr := f.c.pointer(commit, name)
	if exists(ptr) {
		return nil
	}
	var m fileMeta
	err := f.retry(ctx, name, func() (err error) {
		m, err = f.head(ctx, commit, name)
		return err
	})
	if err != nil {
		return err
	}
	blob := f.c.blob(m.etag)
	for _, d := range []string{filepath.Dir(blob), filepath.Dir(ptr)} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("hub: %w", err)
		}
	}
	// The lock huggingface_hub takes, so that it and peftd (or two peftd)
	// never write the same blob at once.
	unlock, err := lockFile(ctx, f.c.lock(m.etag), func() {
		f.log.Info("waiting for another process downloading the same file", "file", name, "lock", f.c.lock(m.etag))
	})
	if err != nil {
		return err
	}
	defer unlock()
	if !exists(blob) {
		if err := f.download(ctx, name, m, blob); err != nil {
			return err
		}
	}
	return link(blob, ptr)
}

// link makes ptr a relative symbolic link to blob (../../blobs/<etag>), as
// huggingface_hub does; where symbolic links are not allowed, a hard link or
// a copy.
func link(blob, ptr string) error {
	rel, err := filepath.Rel(filepath.Dir(ptr), blob)
	if err != nil {
		return fmt.Errorf("hub: %w", err)
	}
	if err := os.Remove(ptr); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("hub: %w", err)
	}
	if err := os.Symlink(rel, ptr); err == nil || exists(ptr) {
		return nil
	}
	if err := os.Link(blob, ptr); err == nil {
		return nil
	}
	src, err := os.Open(blob)
	if err != nil {
		return fmt.Errorf("hub: %w", err)
	}
	defer src.Close()
	dst, err := os.Create(ptr)
	if err != nil {
		return fmt.Errorf("hub: %w", err)
	}
	if _, err := io.Copy(dst, src); err != nil {
		dst.Close()
		os.Remove(ptr)
		return fmt.Errorf("hub: copy %s: %w", blob, err)
	}
	return dst.Close()
}

// head reads a file's metadata: HEAD /{repo}/resolve/{commit}/{name},
// following only relative redirects (a renamed repository); an absolute one
// (the CDN) is where the file is downloaded from, and the Hub puts the
// file's headers on it.
func (f *fetcher) head(ctx context.Context, commit, name string) (fileMeta, error) {
	u := f.opts.Endpoint + "/" + f.ref.Repo + "/resolve/" + commit + "/" + escapePath(name)
	client := *f.opts.Client
	client.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	for hops := 0; hops < 10; hops++ {
		req, err := http.NewRequestWithContext(ctx, http.MethodHead, u, nil)
		if err != nil {
			return fileMeta{}, fmt.Errorf("hub: %w", err)
		}
		f.header(req)
		resp, err := client.Do(req)
		if err != nil {
			return fileMeta{}, f.netError(ctx, err, false)
		}
		resp.Body.Close()
		redirect := resp.StatusCode >= 300 && resp.StatusCode < 400
		if !redirect && resp.StatusCode != http.StatusOK {
			return fileMeta{}, f.statusError(resp, name)
		}
		loc := u
		if redirect {
			l, err := resp.Location()
			if err != nil {
				return fileMeta{}, fmt.Errorf("hub: %s: %s: a redirect without a location: %w", f.ref, name, err)
			}
			if raw, _ := url.Parse(resp.Header.Get("Location")); raw != nil && raw.Host == "" {
				u = l.String() // same server: follow it
				continue
			}
			loc = l.String()
		}
		m := fileMeta{location: loc, size: -1}
		m.etag = normalizeETag(resp.Header.Get("X-Linked-Etag"))
		if m.etag == "" {
			m.etag = normalizeETag(resp.Header.Get("ETag"))
		}
		if s := resp.Header.Get("X-Linked-Size"); s != "" {
			m.size, _ = strconv.ParseInt(s, 10, 64)
		} else if !redirect && resp.ContentLength >= 0 {
			m.size = resp.ContentLength
		}
		if m.size < 0 {
			m.size = -1
		}
		if m.etag == "" {
			return fileMeta{}, fmt.Errorf("hub: %s: %s: the server sent no ETag for the file: is HF_ENDPOINT (%s) a Hugging Face Hub?", f.ref, name, f.opts.Endpoint)
		}
		if !safeETag.MatchString(m.etag) || m.etag == "." || m.etag == ".." {
			return fileMeta{}, fmt.Errorf("hub: %s: %s: the ETag %q cannot name a blob", f.ref, name, m.etag)
		}
		return m, nil
	}
	return fileMeta{}, fmt.Errorf("hub: %s: %s: too many redirects", f.ref, name)
}

// normalizeETag strips the weak marker and the quotes.
func normalizeETag(e string) string {
	e = strings.TrimSpace(e)
	e = strings.TrimPrefix(e, "W/")
	return strings.Trim(e, `"`)
}

func escapePath(name string) string {
	parts := strings.Split(name, "/")
	for i, p := range parts {
		parts[i] = url.PathEscape(p)
	}
	return strings.Join(parts, "/")
}

// checkSpace warns, as huggingface_hub does, when the disk looks too small
// for what is left to download.
func (f *fetcher) checkSpace(commit string, files []string, have map[string]sibling) {
	var need int64
	for _, name := range files {
		if !exists(f.c.pointer(commit, name)) {
			need += have[name].size()
		}
	}
	if free, ok := freeBytes(f.c.dir); ok && need > free {
		f.log.Warn("not enough free disk space for the model", "dir", f.c.dir,
			"need_gib", fmt.Sprintf("%.2f", float64(need)/(1<<30)), "free_gib", fmt.Sprintf("%.2f", float64(free)/(1<<30)))
	}
}

// header sets the User-Agent, and the token when the request goes to the
// Hub itself (never to a CDN it redirects to).
func (f *fetcher) header(req *http.Request) {
	req.Header.Set("User-Agent", "peftd (huggingface_hub-compatible)")
	req.Header.Set("Accept-Encoding", "identity")
	if f.opts.Token != "" && sameHost(req.URL, f.opts.Endpoint) {
		req.Header.Set("Authorization", "Bearer "+f.opts.Token)
	}
}

func sameHost(u *url.URL, endpoint string) bool {
	e, err := url.Parse(endpoint)
	return err == nil && strings.EqualFold(u.Host, e.Host) && u.Scheme == e.Scheme
}

// transientError is a failure worth retrying (and, when the cache has a
// usable snapshot, worth falling back to it): the network, a 5xx, a 429, a
// broken transfer.
type transientError struct{ err error }

func (e *transientError) Error() string { return e.err.Error() }
func (e *transientError) Unwrap() error { return e.err }

func transient(err error) bool {
	var t *transientError
	return errors.As(err, &t)
}

func (f *fetcher) netError(ctx context.Context, err error, stalled bool) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if stalled {
		err = fmt.Errorf("no answer for %s: %w", f.opts.stall, err)
	}
	return &transientError{fmt.Errorf("hub: %s: cannot reach %s: %w", f.ref, f.opts.Endpoint, err)}
}

// statusError turns a Hub error answer into an error naming the problem
// and what to do.
func (f *fetcher) statusError(resp *http.Response, file string) error {
	code := resp.Header.Get("X-Error-Code")
	msg := resp.Header.Get("X-Error-Message")
	if msg == "" {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		var j struct {
			Error string `json:"error"`
		}
		if json.Unmarshal(b, &j) == nil && j.Error != "" {
			msg = j.Error
		} else if s := strings.TrimSpace(string(b)); len(s) < 200 && !strings.Contains(s, "<") {
			msg = s
		}
	}
	what := f.ref.String()
	if file != "" {
		what += ": " + file
	}
	said := fmt.Sprintf("%s answered %s", resp.Request.URL.Host, resp.Status)
	if msg != "" {
		said += " (" + msg + ")"
	}
	page := f.opts.Endpoint + "/" + f.ref.Repo
	gated := code == "GatedRepo" || strings.Contains(strings.ToLower(msg), "gated") || strings.Contains(strings.ToLower(msg), "restricted")
	switch s := resp.StatusCode; {
	case (s == 401 || s == 403) && gated && f.opts.Token == "":
		return fmt.Errorf("%w: %s: %s: the repository is gated: set HF_TOKEN to an access token of an account that was granted access (request it at %s)", ErrAccess, what, said, page)
	case (s == 401 || s == 403) && gated:
		return fmt.Errorf("%w: %s: %s: the repository is gated and the account of HF_TOKEN has not been granted access (request it at %s), or the token is invalid", ErrAccess, what, said, page)
	case s == 401 && f.opts.Token == "":
		return fmt.Errorf("%w: %s: %s: the repository is private or gated, or does not exist: check the name, and set HF_TOKEN to an access token that can read it", ErrAccess, what, said)
	case s == 401:
		return fmt.Errorf("%w: %s: %s: HF_TOKEN was not accepted (an invalid or expired token?), or the repository does not exist", ErrAccess, what, said)
	case s == 403 && f.opts.Token == "":
		return fmt.Errorf("%w: %s: %s: set HF_TOKEN to an access token that can read the repository", ErrAccess, what, said)
	case s == 403:
		return fmt.Errorf("%w: %s: %s: HF_TOKEN may not read this repository (a fine-grained token needs read access to it)", ErrAccess, what, said)
	case s == 404 && code == "RevisionNotFound":
		return fmt.Errorf("%w: %s: %s: the repository has no revision %q", ErrNotFound, what, said, f.ref.Revision)
	case s == 404 && (code == "EntryNotFound" || file != ""):
		return fmt.Errorf("%w: %s: %s: no such file in the repository", ErrNotFound, what, said)
	case s == 404:
		return fmt.Errorf("%w: %s: %s: no such model repository on %s (check ORG/NAME)", ErrNotFound, what, said, f.opts.Endpoint)
	case s == 408 || s == 429 || s >= 500:
		return &transientError{fmt.Errorf("hub: %s: %s", what, said)}
	}
	return fmt.Errorf("hub: %s: %s", what, said)
}

// retry runs fn again after a transient failure, up to Retries times.
func (f *fetcher) retry(ctx context.Context, what string, fn func() error) error {
	for attempt := 0; ; attempt++ {
		err := fn()
		if err == nil || !transient(err) || attempt >= f.opts.Retries || ctx.Err() != nil {
			return err
		}
		wait := f.pause(attempt)
		f.log.Warn("the Hub request failed; retrying", "what", what, "in", wait, "err", err)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(wait):
		}
	}
}
