package hub

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// The files of a model folder the engine reads besides config.json and the
// weights (the ones modelfetch mirrors from S3 too); absent ones are skipped.
var optionalFiles = []string{"generation_config.json", "tokenizer.json", "tokenizer_config.json",
	"special_tokens_map.json", "chat_template.jinja", "chat_template.json"}

const (
	configFile  = "config.json"
	weightsFile = "model.safetensors"
	indexFile   = "model.safetensors.index.json"
)

// repoCache is one repository's folder of the hub cache, laid out as
// huggingface_hub lays it out:
//
//	<root>/models--ORG--NAME/refs/<revision>              the commit, no newline
//	<root>/models--ORG--NAME/blobs/<etag>                  the contents
//	<root>/models--ORG--NAME/blobs/<etag>.incomplete       a download under way
//	<root>/models--ORG--NAME/snapshots/<commit>/<file>     -> ../../blobs/<etag>
//	<root>/models--ORG--NAME/.no_exist/<commit>/<file>     the file is not in that commit
//	<root>/.locks/models--ORG--NAME/<etag>.lock            held while writing the blob
type repoCache struct {
	root, dir, folder string
}

func newRepoCache(root, repo string) repoCache {
	folder := "models--" + strings.ReplaceAll(repo, "/", "--")
	return repoCache{root: root, dir: filepath.Join(root, folder), folder: folder}
}

func (c repoCache) snapshot(commit string) string {
	return filepath.Join(c.dir, "snapshots", commit)
}

func (c repoCache) pointer(commit, name string) string {
	return filepath.Join(c.snapshot(commit), filepath.FromSlash(name))
}

func (c repoCache) blob(etag string) string { return filepath.Join(c.dir, "blobs", etag) }

func (c repoCache) lock(etag string) string {
	return filepath.Join(c.root, ".locks", c.folder, etag+".lock")
}

func (c repoCache) noExist(commit, name string) string {
	return filepath.Join(c.dir, ".no_exist", commit, filepath.FromSlash(name))
}

func (c repoCache) refPath(rev string) string {
	return filepath.Join(c.dir, "refs", filepath.FromSlash(rev))
}

// commitFor finds the commit a revision names in the cache: the contents of
// refs/<rev>, or rev itself when it is a commit hash with a snapshot (as
// huggingface_hub's try_to_load_from_cache does).
func (c repoCache) commitFor(rev string) (string, bool) {
	if b, err := os.ReadFile(c.refPath(rev)); err == nil {
		if commit := strings.TrimSpace(string(b)); commitRE.MatchString(commit) {
			return commit, true
		}
	}
	if commitRE.MatchString(rev) {
		if st, err := os.Stat(c.snapshot(rev)); err == nil && st.IsDir() {
			return rev, true
		}
	}
	return "", false
}

// writeRef records that rev names commit (nothing when rev is the commit).
func (c repoCache) writeRef(rev, commit string) error {
	if rev == commit {
		return nil
	}
	p := c.refPath(rev)
	if b, err := os.ReadFile(p); err == nil && string(b) == commit {
		return nil
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return fmt.Errorf("hub: %w", err)
	}
	tmp := fmt.Sprintf("%s.tmp-%d", p, os.Getpid())
	if err := os.WriteFile(tmp, []byte(commit), 0o644); err != nil {
		return fmt.Errorf("hub: %w", err)
	}
	if err := os.Rename(tmp, p); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("hub: %w", err)
	}
	return nil
}

// markNoExist records, as huggingface_hub does after a 404, that the
// commit has no such file, so the next start knows the snapshot is whole.
func (c repoCache) markNoExist(commit, name string) {
	p := c.noExist(commit, name)
	if os.MkdirAll(filepath.Dir(p), 0o755) == nil {
		if f, err := os.OpenFile(p, os.O_CREATE|os.O_WRONLY, 0o644); err == nil {
			f.Close()
		}
	}
}

// snapState is what a cached snapshot holds.
type snapState struct {
	missing   []string // required files (config, weights) absent or dangling
	tokenizer bool     // tokenizer.json present, or known absent from the commit
}

// usable: the config and every weight file are there.
func (s snapState) usable() bool { return len(s.missing) == 0 }

// complete: usable, and the tokenizer is there or known not to exist.
func (s snapState) complete() bool { return s.usable() && s.tokenizer }

// exists reports whether p resolves to a regular file (a snapshot link
// whose blob is there).
func exists(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular()
}

// check inspects snapshots/<commit>: config.json, model.safetensors or the
// index and every shard it names, and the tokenizer.
func (c repoCache) check(commit string) snapState {
	var s snapState
	if !exists(c.pointer(commit, configFile)) {
		s.missing = append(s.missing, configFile)
	}
	switch {
	case exists(c.pointer(commit, indexFile)):
		shards, err := readIndex(c.pointer(commit, indexFile))
		if err != nil {
			s.missing = append(s.missing, indexFile+" (unreadable: "+err.Error()+")")
		}
		for _, sh := range shards {
			if !exists(c.pointer(commit, sh)) {
				s.missing = append(s.missing, sh)
			}
		}
	case exists(c.pointer(commit, weightsFile)):
	default:
		s.missing = append(s.missing, weightsFile+" (or "+indexFile+" and its shards)")
	}
	s.tokenizer = exists(c.pointer(commit, "tokenizer.json")) || exists(c.noExist(commit, "tokenizer.json"))
	return s
}

// readIndex returns the shard files model.safetensors.index.json names,
// sorted.
func readIndex(p string) ([]string, error) {
	b, err := os.ReadFile(p)
	if err != nil {
		return nil, err
	}
	var idx struct {
		WeightMap map[string]string `json:"weight_map"`
	}
	if err := json.Unmarshal(b, &idx); err != nil {
		return nil, err
	}
	if len(idx.WeightMap) == 0 {
		return nil, errors.New("empty weight_map")
	}
	seen := map[string]bool{}
	var shards []string
	for _, sh := range idx.WeightMap {
		if seen[sh] {
			continue
		}
		seen[sh] = true
		if sh != filepath.Base(sh) || strings.ContainsAny(sh, `/\`) || !strings.HasSuffix(sh, ".safetensors") {
			return nil, fmt.Errorf("shard %q: want a plain .safetensors file name", sh)
		}
		shards = append(shards, sh)
	}
	slices.Sort(shards)
	return shards, nil
}
