// Package modelfetch mirrors a base model folder from S3 (or MinIO) onto the
// local disk so it can be memory-mapped: its config, tokenizer and
// safetensors objects (found by name: no bucket listing) are downloaded once,
// streamed to disk with progress, and kept in a cache keyed by the URL;
// later starts download only objects whose ETag changed.
package modelfetch

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/peftd/peftd/loader/store"
)

// ErrNoModel means the prefix holds no config.json.
var ErrNoModel = errors.New("modelfetch: no model under the URL")

const manifestName = ".peftd-manifest.json"

// IsRemote reports whether model names an object store rather than a folder.
func IsRemote(model string) bool { return strings.HasPrefix(strings.ToLower(model), "s3://") }

// Progress is told how far each download is.
type Progress func(file string, done, total int64)

// Fetch mirrors the model under rawURL (s3://bucket/prefix?endpoint=...) into
// cacheRoot/<hash of the URL>/ and returns that folder. When the store cannot
// be listed but a complete earlier copy exists, that copy is used (and the
// error logged), so a restart survives a store outage.
func Fetch(ctx context.Context, rawURL, cacheRoot string, progress Progress, log *slog.Logger) (string, error) {
	if log == nil {
		log = slog.Default()
	}
	parsed, err := store.ParseURL(rawURL)
	if err != nil {
		return "", err
	}
	opts, ok := parsed.(store.S3Options)
	if !ok {
		return "", fmt.Errorf("modelfetch: %q is not an s3:// URL", rawURL)
	}
	s3, err := store.NewS3(opts)
	if err != nil {
		return "", err
	}
	h := sha256.Sum256([]byte(rawURL))
	dst := filepath.Join(cacheRoot, "models", hex.EncodeToString(h[:8]))
	if err := os.MkdirAll(dst, 0o755); err != nil {
		return "", fmt.Errorf("modelfetch: %w", err)
	}
	prefix := opts.Prefix
	if prefix != "" && !strings.HasSuffix(prefix, "/") {
		prefix += "/"
	}
	old := readManifest(dst)
	objs, err := discover(ctx, s3.Client(), opts.Bucket, prefix)
	if errors.Is(err, ErrNoModel) {
		return "", fmt.Errorf("%w: %s has no config.json (or it is not readable)", ErrNoModel, rawURL)
	}
	if err != nil {
		if _, e := os.Stat(filepath.Join(dst, "config.json")); e == nil && len(old) > 0 {
			log.Warn("model store unreachable; using the cached copy", "url", rawURL, "dir", dst, "err", err)
			return dst, nil
		}
		return "", fmt.Errorf("modelfetch: %s: %w", rawURL, err)
	}
	manifest := map[string]string{}
	for _, o := range objs {
		name := path.Base(o.Key)
		local := filepath.Join(dst, name)
		if st, err := os.Stat(local); err == nil && old[name] == o.ETag && st.Size() == o.Size {
			manifest[name] = o.ETag
			continue
		}
		start := time.Now()
		if err := download(ctx, s3.Client(), opts.Bucket, o, local, progress); err != nil {
			return "", err
		}
		manifest[name] = o.ETag
		log.Info("model file downloaded", "file", name, "bytes", o.Size, "seconds", fmt.Sprintf("%.1f", time.Since(start).Seconds()))
		// Record progress so an interrupted fetch resumes where it stopped.
		if err := writeManifest(dst, manifest); err != nil {
			return "", err
		}
	}
	// Files that left the store leave the cache.
	for name := range old {
		if _, ok := manifest[name]; !ok {
			os.Remove(filepath.Join(dst, name))
		}
	}
	if err := writeManifest(dst, manifest); err != nil {
		return "", err
	}
	return dst, nil
}

// optional are the files of a Hugging Face model folder the engine reads
// besides config.json and the weights; absent ones are skipped.
var optional = []string{"generation_config.json", "tokenizer.json", "tokenizer_config.json",
	"special_tokens_map.json", "chat_template.jinja", "chat_template.json"}

// discover finds the model's objects by name, without listing the bucket (so
// read access to the model's objects is all the fetch needs): config.json,
// the optional files, and model.safetensors or the shards named by
// model.safetensors.index.json.
func discover(ctx context.Context, c *minio.Client, bucket, prefix string) ([]minio.ObjectInfo, error) {
	// Without s3:ListBucket, S3 answers 403 rather than 404 for a missing
	// key: both mean "absent" here (config.json's absence is reported).
	stat := func(name string) (minio.ObjectInfo, bool, error) {
		o, err := c.StatObject(ctx, bucket, prefix+name, minio.StatObjectOptions{})
		if err != nil {
			if r := minio.ToErrorResponse(err); r.StatusCode == 404 || r.StatusCode == 403 || r.Code == "NoSuchKey" {
				return o, false, nil
			}
			return o, false, fmt.Errorf("stat %s: %w", name, err)
		}
		return o, true, nil
	}
	cfg, ok, err := stat("config.json")
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, ErrNoModel // or no read access to it
	}
	out := []minio.ObjectInfo{cfg}
	for _, name := range optional {
		o, ok, err := stat(name)
		if err != nil {
			return nil, err
		}
		if ok {
			out = append(out, o)
		}
	}
	idx, ok, err := stat("model.safetensors.index.json")
	if err != nil {
		return nil, err
	}
	if !ok {
		w, ok, err := stat("model.safetensors")
		if err != nil {
			return nil, err
		}
		if !ok {
			return nil, fmt.Errorf("neither model.safetensors nor model.safetensors.index.json is there (or readable)")
		}
		return append(out, w), nil
	}
	out = append(out, idx)
	r, err := c.GetObject(ctx, bucket, idx.Key, minio.GetObjectOptions{})
	if err != nil {
		return nil, err
	}
	defer r.Close()
	var index struct {
		WeightMap map[string]string `json:"weight_map"`
	}
	if err := json.NewDecoder(io.LimitReader(r, 64<<20)).Decode(&index); err != nil {
		return nil, fmt.Errorf("model.safetensors.index.json: %w", err)
	}
	seen := map[string]bool{}
	for _, shard := range index.WeightMap {
		if seen[shard] {
			continue
		}
		seen[shard] = true
		if shard != path.Base(shard) || !strings.HasSuffix(shard, ".safetensors") {
			return nil, fmt.Errorf("model.safetensors.index.json names shard %q: want a plain .safetensors file name", shard)
		}
		o, ok, err := stat(shard)
		if err != nil {
			return nil, err
		}
		if !ok {
			return nil, fmt.Errorf("shard %s named by the index is missing", shard)
		}
		out = append(out, o)
	}
	return out, nil
}

// download streams one object into local via a temporary file.
func download(ctx context.Context, c *minio.Client, bucket string, o minio.ObjectInfo, local string, progress Progress) error {
	r, err := c.GetObject(ctx, bucket, o.Key, minio.GetObjectOptions{})
	if err != nil {
		return fmt.Errorf("modelfetch: get %s: %w", o.Key, err)
	}
	defer r.Close()
	tmp, err := os.CreateTemp(filepath.Dir(local), ".download-")
	if err != nil {
		return fmt.Errorf("modelfetch: %w", err)
	}
	defer os.Remove(tmp.Name())
	name := filepath.Base(local)
	var done int64
	buf := make([]byte, 4<<20)
	for {
		n, rerr := r.Read(buf)
		if n > 0 {
			if _, err := tmp.Write(buf[:n]); err != nil {
				tmp.Close()
				return fmt.Errorf("modelfetch: write %s: %w", name, err)
			}
			done += int64(n)
			if progress != nil {
				progress(name, done, o.Size)
			}
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			tmp.Close()
			return fmt.Errorf("modelfetch: read %s: %w", o.Key, rerr)
		}
	}
	if done != o.Size {
		tmp.Close()
		return fmt.Errorf("modelfetch: %s: got %d bytes, the listing said %d", o.Key, done, o.Size)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("modelfetch: %w", err)
	}
	return os.Rename(tmp.Name(), local)
}

func readManifest(dir string) map[string]string {
	m := map[string]string{}
	if b, err := os.ReadFile(filepath.Join(dir, manifestName)); err == nil {
		_ = json.Unmarshal(b, &m)
	}
	return m
}

func writeManifest(dir string, m map[string]string) error {
	b, _ := json.MarshalIndent(m, "", " ")
	tmp := filepath.Join(dir, manifestName+".tmp")
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return fmt.Errorf("modelfetch: %w", err)
	}
	return os.Rename(tmp, filepath.Join(dir, manifestName))
}

// LogProgress returns a Progress that logs each file at most every interval
// and when it completes. It is safe for concurrent use.
func LogProgress(log *slog.Logger, what string, interval time.Duration) Progress {
	var mu sync.Mutex
	last := map[string]time.Time{}
	return func(file string, done, total int64) {
		mu.Lock()
		defer mu.Unlock()
		now := time.Now()
		if done < total && now.Sub(last[file]) < interval {
			return
		}
		last[file] = now
		pct := 100.0
		if total > 0 {
			pct = 100 * float64(done) / float64(total)
		}
		log.Info(what, "file", file, "mib", fmt.Sprintf("%.1f/%.1f", float64(done)/(1<<20), float64(total)/(1<<20)),
			"percent", fmt.Sprintf("%.0f", pct))
	}
}

// Name is the model's name as the URL gives it: the last element of the
// prefix (s3://bucket/llama/8b-instruct -> 8b-instruct), else the bucket.
func Name(rawURL string) string {
	parsed, err := store.ParseURL(rawURL)
	if err != nil {
		return ""
	}
	opts, ok := parsed.(store.S3Options)
	if !ok {
		return ""
	}
	if p := strings.Trim(opts.Prefix, "/"); p != "" {
		return path.Base(p)
	}
	return opts.Bucket
}
