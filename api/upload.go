// Adapter uploads: archives and forms read as streams, bounded by what an
// adapter of the base model can be, checked against it as they arrive.

package api

import (
	"archive/tar"
	"archive/zip"
	"bufio"
	"bytes"
	"compress/gzip"
	"compress/zlib"
	"errors"
	"fmt"
	"io"
	"math"
	"mime/multipart"
	"path"
	"slices"
	"strings"

	"github.com/gofiber/fiber/v2"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/lora"
)

// uploadLimits bound what an upload may expand to: archives and a
// Content-Encoding are decompressed as they are read, never past these.
type uploadLimits struct {
	base    *llama.Config // nil: the catalog does not say (MaxUploadBytes bounds alone)
	weights int64         // adapter_model.safetensors
	config  int64         // adapter_config.json
	total   int64         // everything decompressed, other archive entries included
	why     string        // where the weights bound comes from
}

func (s *Server) uploadLimits(cat Catalog) uploadLimits {
	l := uploadLimits{weights: s.cfg.MaxUploadBytes, config: min(lora.MaxConfigSize, s.cfg.MaxUploadBytes),
		why: "the server's upload limit, --max-upload-bytes"}
	if bm, ok := cat.(BaseModeler); ok {
		if base := bm.BaseModel(); base != nil {
			l.base = base
			if b := lora.MaxWeightsBytes(base); b < l.weights {
				l.weights = b
				l.why = fmt.Sprintf("the largest an adapter for the base model %q can be: lora_A and lora_B of its %d projections in each of its %d layers at rank %d (the largest served) in F32, plus the header",
					s.cfg.ModelName, llama.NumModules, base.Layers, lora.MaxRank(base))
			}
		}
	}
	// Room for other small files (README.md, a tokenizer) and archive framing.
	l.total = 2*l.weights + l.config + 1<<20
	return l
}

// errExpands: a decompressed stream went past its bound.
var errExpands = errors.New("the upload expands past its bound")

// capReader fails with errExpands once more than max bytes come out of r.
type capReader struct {
	r      io.Reader
	n, max int64
}

func (c *capReader) Read(p []byte) (int, error) {
	if c.n > c.max {
		return 0, errExpands
	}
	if left := c.max + 1 - c.n; int64(len(p)) > left {
		p = p[:left]
	}
	k, err := c.r.Read(p)
	c.n += int64(k)
	if c.n > c.max {
		return k, errExpands
	}
	return k, err
}

// upload collects the adapter's two files from a request body.
type upload struct {
	s     *Server
	lim   uploadLimits
	files map[string][]byte
	// body is the request body when a tar is read from it as it is, through
	// at: the weights are then taken in place, not copied.
	body []byte
	at   *bytes.Reader
}

func (u *upload) cap(r io.Reader) io.Reader { return &capReader{r: r, max: u.lim.total} }

func (u *upload) tooLarge(format string, args ...any) *Error {
	return apiErr(fiber.StatusRequestEntityTooLarge, "invalid_request_error", "body", fmt.Sprintf(format, args...))
}

// readErr reports a failure reading name out of the upload.
func (u *upload) readErr(name string, err error) error {
	var e *Error
	switch {
	case errors.As(err, &e):
		return e
	case errors.Is(err, errExpands):
		return u.tooLarge("the upload expands past %d bytes once decompressed (twice the bound on %s, %d bytes: %s)",
			u.lim.total, lora.WeightsFile, u.lim.weights, u.lim.why)
	case errors.Is(err, lora.ErrConfig), errors.Is(err, lora.ErrMismatch), errors.Is(err, lora.ErrUnsupported),
		errors.Is(err, lora.ErrCorrupt), errors.Is(err, lora.ErrWeights):
		return u.s.invalidAdapter(err)
	}
	return badRequest("body", "reading %s from the upload: %v", name, err)
}

// readUpload finds adapter_config.json and adapter_model.safetensors in the
// body: a multipart form, or a tar, tar.gz or zip (at the top level or one
// folder down), under an optional gzip or deflate Content-Encoding.
// Nothing is decompressed or kept past uploadLimits, and the weights'
// header is checked against the base model before their data is read.
func (s *Server) readUpload(c *fiber.Ctx, lim uploadLimits) (cfg, weights []byte, err error) {
	// The raw body: c.Body() would undo a Content-Encoding whole, unbounded.
	body := c.Request().Body()
	if int64(len(body)) > s.cfg.MaxUploadBytes {
		return nil, nil, apiErr(fiber.StatusRequestEntityTooLarge, "invalid_request_error", "", fmt.Sprintf("upload larger than %d bytes", s.cfg.MaxUploadBytes))
	}
	if len(body) == 0 {
		return nil, nil, badRequest("body", "empty upload: send a tar, tar.gz or zip of the adapter folder, or a multipart form")
	}
	u := &upload{s: s, lim: lim, files: map[string][]byte{}}
	var r io.Reader = bytes.NewReader(body)
	decoded := false
	encs := strings.Split(c.Get(fiber.HeaderContentEncoding), ",")
	for i := len(encs) - 1; i >= 0; i-- { // the last applied is undone first
		switch enc := strings.ToLower(strings.TrimSpace(encs[i])); enc {
		case "", "identity":
		case "gzip", "x-gzip":
			gz, err := gzip.NewReader(r)
			if err != nil {
				return nil, nil, badRequest("body", "bad gzip Content-Encoding: %v", err)
			}
			r, decoded = u.cap(gz), true
		case "deflate":
			zr, err := zlib.NewReader(r)
			if err != nil {
				return nil, nil, badRequest("body", "bad deflate Content-Encoding: %v", err)
			}
			r, decoded = u.cap(zr), true
		default:
			return nil, nil, apiErr(fiber.StatusUnsupportedMediaType, "invalid_request_error", "body",
				fmt.Sprintf("unsupported Content-Encoding %q: send the archive as is, or gzip or deflate it", enc))
		}
	}
	if strings.HasPrefix(c.Get(fiber.HeaderContentType), fiber.MIMEMultipartForm) {
		boundary := string(c.Request().Header.MultipartFormBoundary())
		if boundary == "" {
			return nil, nil, badRequest("body", "bad multipart form: no boundary in Content-Type")
		}
		if err := u.fromMultipart(r, boundary); err != nil {
			return nil, nil, err
		}
		for _, name := range []string{lora.ConfigFile, lora.WeightsFile} {
			if u.files[name] == nil {
				return nil, nil, badRequest(name, "the form has no %s file", name)
			}
		}
		return u.files[lora.ConfigFile], u.files[lora.WeightsFile], nil
	}
	raw := body
	if decoded {
		raw = nil
	}
	if err := u.fromArchive(r, raw); err != nil {
		return nil, nil, err
	}
	cfg, weights = u.files[lora.ConfigFile], u.files[lora.WeightsFile]
	if cfg == nil || weights == nil {
		return nil, nil, badRequest("body", "the archive must hold %s and %s at the top level or one folder down", lora.ConfigFile, lora.WeightsFile)
	}
	return cfg, weights, nil
}

func (u *upload) fromMultipart(r io.Reader, boundary string) error {
	mr := multipart.NewReader(r, boundary)
	byField := map[string]bool{} // a part named after the file wins over a file name match
	for {
		p, err := mr.NextPart()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			if errors.Is(err, errExpands) {
				return u.readErr("the form", err)
			}
			return badRequest("body", "bad multipart form: %v", err)
		}
		name, field := "", false
		switch f := p.FormName(); {
		case f == lora.ConfigFile || f == lora.WeightsFile:
			name, field = f, true
		case p.FileName() != "" && (path.Base(p.FileName()) == lora.ConfigFile || path.Base(p.FileName()) == lora.WeightsFile):
			name = path.Base(p.FileName())
		}
		if name == "" || byField[name] || (!field && u.files[name] != nil) {
			p.Close()
			continue
		}
		b, err := u.read(name, p, -1, nil)
		p.Close()
		if err != nil {
			return err
		}
		u.files[name], byField[name] = b, field
	}
}

// fromArchive reads a tar, tar.gz or zip; raw is the body when r is it
// undecoded (a zip or tar is then read in place).
func (u *upload) fromArchive(r io.Reader, raw []byte) error {
	if raw != nil && !bytes.HasPrefix(raw, []byte("PK")) && !bytes.HasPrefix(raw, []byte{0x1f, 0x8b}) {
		u.body, u.at = raw, bytes.NewReader(raw)
		return u.fromTar(u.at)
	}
	br := bufio.NewReaderSize(r, 64<<10)
	head, _ := br.Peek(4)
	switch {
	case len(head) == 0:
		return badRequest("body", "empty upload: send a tar, tar.gz or zip of the adapter folder, or a multipart form")
	case bytes.HasPrefix(head, []byte("PK\x03\x04")) || bytes.HasPrefix(head, []byte("PK\x05\x06")):
		if raw == nil {
			b, err := io.ReadAll(br)
			if err != nil {
				return u.readErr("the zip archive", err)
			}
			raw = b
		}
		return u.fromZip(raw)
	case bytes.HasPrefix(head, []byte{0x1f, 0x8b}):
		gz, err := gzip.NewReader(br)
		if err != nil {
			return badRequest("body", "bad gzip stream: %v", err)
		}
		return u.fromTar(u.cap(gz))
	}
	return u.fromTar(br)
}

// want reports whether an archive entry is one of the adapter's files, at
// the top level or one folder down.
func want(name string) bool {
	name = strings.TrimPrefix(path.Clean("/"+name), "/")
	base := path.Base(name)
	if base != lora.ConfigFile && base != lora.WeightsFile {
		return false
	}
	return strings.Count(name, "/") <= 1
}

// unsafeEntry refuses entries that climb out of the archive (../x) or are
// absolute: nothing is written from them, but such an archive is not an
// adapter folder.
func unsafeEntry(name string) error {
	n := strings.ReplaceAll(name, "\\", "/")
	if strings.HasPrefix(n, "/") || slices.Contains(strings.Split(n, "/"), "..") {
		return badRequest("body", "archive entry %q leaves the adapter folder (absolute path or '..'): "+
			"archive the adapter folder's files with relative paths", name)
	}
	return nil
}

func (u *upload) fromZip(body []byte) error {
	zr, err := zip.NewReader(bytes.NewReader(body), int64(len(body)))
	if err != nil {
		return badRequest("body", "bad zip archive: %v", err)
	}
	for _, f := range zr.File {
		if err := unsafeEntry(f.Name); err != nil {
			return err
		}
		if f.FileInfo().IsDir() || !want(f.Name) {
			continue
		}
		size := int64(min(f.UncompressedSize64, math.MaxInt64)) // the zip reader holds the entry to it
		if err := u.fits(f.Name, size); err != nil {
			return err
		}
		rc, err := f.Open()
		if err != nil {
			return badRequest("body", "bad zip entry %s: %v", f.Name, err)
		}
		err = u.keep(f.Name, rc, size, nil)
		rc.Close()
		if err != nil {
			return err
		}
	}
	return nil
}

func (u *upload) fromTar(r io.Reader) error {
	tr := tar.NewReader(r)
	for n := 0; ; n++ {
		h, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			if errors.Is(err, errExpands) {
				return u.readErr("the archive", err)
			}
			if n == 0 {
				return badRequest("body", "the upload is not a tar, tar.gz or zip archive (or a multipart form): %v", err)
			}
			return badRequest("body", "bad tar archive: %v", err)
		}
		if err := unsafeEntry(h.Name); err != nil {
			return err
		}
		// Skipping an entry decompresses it too: every entry is bounded.
		if err := u.fits(h.Name, h.Size); err != nil {
			return err
		}
		if h.Typeflag != tar.TypeReg || !want(h.Name) {
			continue
		}
		if err := u.keep(h.Name, tr, h.Size, u.inPlace(h)); err != nil {
			return err
		}
	}
}

// inPlace is the data of the tar entry h in the body when the tar is read
// from it as it is (u.at) and the entry's data lies there whole: a regular
// file, not sparse, that the tar reader is about to read from u.at's
// position; nil otherwise.
func (u *upload) inPlace(h *tar.Header) []byte {
	if u.at == nil || h.Typeflag != tar.TypeReg || h.Size < 0 {
		return nil
	}
	for k := range h.PAXRecords {
		if strings.HasPrefix(k, "GNU.sparse.") {
			return nil
		}
	}
	pos := u.at.Size() - int64(u.at.Len())
	if pos < 0 || h.Size > int64(len(u.body))-pos {
		return nil
	}
	return u.body[pos : pos+h.Size : pos+h.Size]
}

// fits refuses an archive entry whose declared size is past its bound,
// before reading it.
func (u *upload) fits(name string, size int64) error {
	base := path.Base(strings.TrimPrefix(path.Clean("/"+name), "/"))
	switch {
	case base == lora.ConfigFile && want(name) && size > u.lim.config:
		return u.tooLarge("%s in the upload is %d bytes, past its bound of %d bytes", name, size, u.lim.config)
	case size > u.lim.weights:
		if base == lora.WeightsFile && want(name) {
			return u.tooLarge("%s in the upload is %d bytes once decompressed, past its bound of %d bytes: %s",
				name, size, u.lim.weights, u.lim.why)
		}
		return u.tooLarge("archive entry %q is %d bytes once decompressed, past the bound of %d bytes on any adapter file (%s): "+
			"archive only %s and %s", name, size, u.lim.weights, u.lim.why, lora.ConfigFile, lora.WeightsFile)
	}
	return nil
}

// keep reads a wanted archive entry; size is its declared size, and
// inPlace its data in the body, if there (see read).
func (u *upload) keep(name string, r io.Reader, size int64, inPlace []byte) error {
	clean := strings.TrimPrefix(path.Clean("/"+name), "/")
	base := path.Base(clean)
	if _, dup := u.files[base]; dup && strings.Contains(clean, "/") {
		return nil // a top-level file wins
	}
	b, err := u.read(base, r, size, inPlace)
	if err != nil {
		return err
	}
	u.files[base] = b
	return nil
}

// read reads file (lora.ConfigFile or lora.WeightsFile) from r, size bytes
// when size >= 0, and checks it against the base model as it comes: the
// config whole, the weights' header before their data. inPlace, when not
// nil, is what r holds, in the request body: the weights are returned as
// that slice once their header is read from r and found there, not copied
// (the rest of r is left unread), so they alias the body.
func (u *upload) read(file string, r io.Reader, size int64, inPlace []byte) ([]byte, error) {
	if file == lora.ConfigFile {
		b, err := io.ReadAll(io.LimitReader(r, u.lim.config+1))
		if err != nil {
			return nil, u.readErr(file, err)
		}
		if int64(len(b)) > u.lim.config {
			return nil, u.tooLarge("%s in the upload is past its bound of %d bytes", file, u.lim.config)
		}
		if u.lim.base != nil {
			c, err := lora.ParseConfig(b)
			if err == nil {
				err = c.Check(u.lim.base)
			}
			if err != nil {
				return nil, u.s.invalidAdapter(err)
			}
		}
		return b, nil
	}
	if u.lim.base == nil {
		b, err := io.ReadAll(io.LimitReader(r, u.lim.weights+1))
		if err != nil {
			return nil, u.readErr(file, err)
		}
		if int64(len(b)) > u.lim.weights {
			return nil, u.tooLarge("%s in the upload is past its bound of %d bytes: %s", file, u.lim.weights, u.lim.why)
		}
		return b, nil
	}
	f, prefix, err := lora.ReadWeightsHeader(r, u.lim.base)
	if err != nil {
		return nil, u.readErr(file, err)
	}
	total := int64(len(prefix)) + f.DataSize()
	switch {
	case total > u.lim.weights:
		return nil, u.tooLarge("the header of %s describes a %d-byte file, past its bound of %d bytes: %s", file, total, u.lim.weights, u.lim.why)
	case size >= 0 && size < total:
		return nil, badRequest("body", "%s is truncated: its header describes %d bytes of tensor data, the upload holds %d", file, f.DataSize(), size-int64(len(prefix)))
	case size > total:
		return nil, badRequest("body", "%s is corrupt: %d bytes follow the tensor data its header describes", file, size-total)
	}
	if int64(len(inPlace)) == total && bytes.Equal(inPlace[:len(prefix)], prefix) {
		return inPlace, nil
	}
	buf := make([]byte, total)
	copy(buf, prefix)
	if k, err := io.ReadFull(r, buf[len(prefix):]); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, badRequest("body", "%s is truncated: its header describes %d bytes of tensor data, the upload holds %d", file, f.DataSize(), k)
		}
		return nil, u.readErr(file, err)
	}
	if size < 0 { // a form part: nothing may follow
		var one [1]byte
		if k, _ := io.ReadFull(r, one[:]); k > 0 {
			return nil, badRequest("body", "%s is corrupt: bytes follow the tensor data its header describes", file)
		}
	}
	return buf, nil
}
