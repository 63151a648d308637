package hub

import (
	"context"
	"crypto/sha1"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"hash"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

// download writes blob from m.location through blob.incomplete, resuming
// what an earlier attempt left there, and checks it against the ETag. A
// resumed download that does not match is downloaded once more from the
// start (the kept part may be the bad one); a fresh one that does not match
// is an error. Either way the bad file is deleted.
func (f *fetcher) download(ctx context.Context, name string, m fileMeta, blob string) error {
	inc := blob + ".incomplete"
	for fresh := false; ; fresh = true {
		p, err := openPartial(inc, sha256RE.MatchString(m.etag))
		if err != nil {
			return err
		}
		if p.n > 0 {
			f.log.Info("resuming an interrupted download", "file", name, "bytes_kept", p.n, "bytes", m.size)
		}
		start := time.Now()
		if err := f.transfer(ctx, p, name, m); err != nil {
			p.f.Close()
			return err
		}
		if err := p.f.Sync(); err != nil {
			p.f.Close()
			return fmt.Errorf("hub: %w", err)
		}
		if err := p.f.Close(); err != nil {
			return fmt.Errorf("hub: %w", err)
		}
		if err := f.verify(p, inc, name, m); err != nil {
			os.Remove(inc)
			if p.resumed && !fresh {
				f.log.Warn("a resumed download does not match its checksum; downloading it again from the start", "file", name, "err", err)
				continue
			}
			return err
		}
		if err := os.Rename(inc, blob); err != nil {
			return fmt.Errorf("hub: %w", err)
		}
		f.log.Info("model file downloaded", "file", name, "bytes", p.n, "seconds", fmt.Sprintf("%.1f", time.Since(start).Seconds()))
		return nil
	}
}

// transfer fills p, resuming with a Range request after a broken transfer
// (up to Retries times, with a growing pause).
func (f *fetcher) transfer(ctx context.Context, p *partial, name string, m fileMeta) error {
	for attempt := 0; ; attempt++ {
		err := f.getOnce(ctx, p, name, m)
		if err == nil {
			return nil
		}
		if !transient(err) || attempt >= f.opts.Retries || ctx.Err() != nil {
			if transient(err) {
				return fmt.Errorf("%w (%s keeps %d bytes: the next start resumes from there)", err, filepath.Base(p.f.Name()), p.n)
			}
			return err
		}
		wait := f.pause(attempt)
		f.log.Warn("download interrupted; resuming", "file", name, "at", p.n, "of", m.size, "in", wait, "err", err)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(wait):
		}
	}
}

func (f *fetcher) pause(attempt int) time.Duration {
	d := f.opts.backoff << min(attempt, 5)
	return min(d, 10*time.Second)
}

// getOnce downloads from p.n on: a Range request when p already holds
// bytes. It fails with a transientError when the transfer breaks.
func (f *fetcher) getOnce(ctx context.Context, p *partial, name string, m fileMeta) error {
	if m.size >= 0 && p.n == m.size {
		return nil
	}
	if m.size >= 0 && p.n > m.size {
		if err := p.reset(); err != nil {
			return err
		}
	}
	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var stalled atomic.Bool
	watchdog := time.AfterFunc(f.opts.stall, func() { stalled.Store(true); cancel() })
	defer watchdog.Stop()

	req, err := http.NewRequestWithContext(rctx, http.MethodGet, m.location, nil)
	if err != nil {
		return fmt.Errorf("hub: %w", err)
	}
	f.header(req)
	if p.n > 0 {
		req.Header.Set("Range", fmt.Sprintf("bytes=%d-", p.n))
		p.resumed = true
	}
	resp, err := f.opts.Client.Do(req)
	if err != nil {
		return f.netError(ctx, err, stalled.Load())
	}
	defer resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusPartialContent:
		if start, ok := rangeStart(resp.Header.Get("Content-Range")); !ok || start != p.n {
			if err := p.reset(); err != nil {
				return err
			}
			return &transientError{fmt.Errorf("hub: %s: the server resumed at %q, not at byte %d", name, resp.Header.Get("Content-Range"), p.n)}
		}
	case http.StatusOK:
		if p.n > 0 {
			f.log.Info("the server ignored the Range request; downloading from the start", "file", name)
			if err := p.reset(); err != nil {
				return err
			}
		}
	case http.StatusRequestedRangeNotSatisfiable:
		if err := p.reset(); err != nil {
			return err
		}
		return &transientError{fmt.Errorf("hub: %s: the server refused to resume (416)", name)}
	default:
		return f.statusError(resp, name)
	}
	if p.n < m.size {
		f.opts.Progress(name, p.n, m.size)
	}
	buf := make([]byte, 1<<20)
	for {
		n, rerr := resp.Body.Read(buf)
		if n > 0 {
			watchdog.Reset(f.opts.stall)
			if _, err := p.Write(buf[:n]); err != nil {
				return fmt.Errorf("hub: %s: writing %s: %w", name, p.f.Name(), err)
			}
			f.downloaded.Add(int64(n))
			if p.n < m.size { // the end is told once, below; an unknown size only then
				f.opts.Progress(name, p.n, m.size)
			}
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if stalled.Load() {
				rerr = fmt.Errorf("no data for %s", f.opts.stall)
			}
			return &transientError{fmt.Errorf("hub: %s: download interrupted at byte %d of %d: %w", name, p.n, m.size, rerr)}
		}
	}
	if m.size >= 0 && p.n < m.size {
		return &transientError{fmt.Errorf("hub: %s: the connection ended at byte %d of %d", name, p.n, m.size)}
	}
	f.opts.Progress(name, p.n, max(m.size, p.n))
	return nil
}

// rangeStart parses the first byte of "bytes START-END/TOTAL".
func rangeStart(cr string) (int64, bool) {
	s, ok := strings.CutPrefix(cr, "bytes ")
	if !ok {
		return 0, false
	}
	s, _, ok = strings.Cut(s, "-")
	if !ok {
		return 0, false
	}
	n, err := strconv.ParseInt(strings.TrimSpace(s), 10, 64)
	return n, err == nil
}

// verify checks the downloaded file against the size and the ETag: the
// sha256 of an LFS file, the git blob id (sha1 of "blob <size>\0" and the
// contents) of a file stored in git.
func (f *fetcher) verify(p *partial, file, name string, m fileMeta) error {
	if m.size >= 0 && p.n != m.size {
		return fmt.Errorf("%w: %s: %s: downloaded %d bytes, the Hub said %d; the download is deleted: run again", ErrChecksum, f.ref, name, p.n, m.size)
	}
	var got, kind string
	switch {
	case p.h != nil:
		got, kind = hex.EncodeToString(p.h.Sum(nil)), "sha256"
	case commitRE.MatchString(strings.ToLower(m.etag)):
		s, err := gitBlobID(file, p.n)
		if err != nil {
			return err
		}
		got, kind = s, "git blob id"
	default:
		f.log.Debug("no checksum to verify", "file", name, "etag", m.etag)
		return nil
	}
	if !strings.EqualFold(got, m.etag) {
		return fmt.Errorf("%w: %s: %s: the %s of the download is %s but its ETag says %s; the download is deleted: run again, and if it happens again a proxy or the CDN serves corrupt data",
			ErrChecksum, f.ref, name, kind, got, m.etag)
	}
	return nil
}

func gitBlobID(file string, size int64) (string, error) {
	r, err := os.Open(file)
	if err != nil {
		return "", fmt.Errorf("hub: %w", err)
	}
	defer r.Close()
	h := sha1.New()
	fmt.Fprintf(h, "blob %d\x00", size)
	if _, err := io.Copy(h, r); err != nil {
		return "", fmt.Errorf("hub: %w", err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// partial is blobs/<etag>.incomplete being written, hashed as it grows.
type partial struct {
	f       *os.File
	h       hash.Hash // sha256 of the bytes written so far; nil when the ETag is not one
	n       int64
	resumed bool // some bytes came from an earlier transfer
}

// openPartial opens (or creates) path for appending, hashing what it holds.
func openPartial(path string, hashed bool) (*partial, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("hub: %w", err)
	}
	p := &partial{f: f}
	if hashed {
		p.h = sha256.New()
		p.n, err = io.Copy(p.h, f)
	} else {
		p.n, err = f.Seek(0, io.SeekEnd)
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("hub: %s: %w", path, err)
	}
	return p, nil
}

func (p *partial) Write(b []byte) (int, error) {
	n, err := p.f.Write(b)
	if p.h != nil {
		p.h.Write(b[:n])
	}
	p.n += int64(n)
	return n, err
}

func (p *partial) reset() error {
	if err := p.f.Truncate(0); err != nil {
		return fmt.Errorf("hub: %w", err)
	}
	if _, err := p.f.Seek(0, io.SeekStart); err != nil {
		return fmt.Errorf("hub: %w", err)
	}
	if p.h != nil {
		p.h.Reset()
	}
	p.n = 0
	return nil
}
