package api

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"fmt"
	"os"
	"strings"
)

// Key is one API key: the adapters its tenant may use, and whether it may
// manage every adapter.
type Key struct {
	Key string `json:"key"`
	// Adapters the key may invoke: exact IDs, or prefixes ending in '*'.
	// Empty: every adapter. A key may deploy and delete adapters matching
	// one of its prefixes.
	Adapters []string `json:"adapters,omitempty"`
	Admin    bool     `json:"admin,omitempty"`
}

// Keys is a set of API keys; an empty set turns authentication off.
type Keys struct {
	byHash map[[32]byte]*Key
}

// NewKeys builds a key set.
func NewKeys(keys []Key) (*Keys, error) {
	ks := &Keys{byHash: map[[32]byte]*Key{}}
	for i := range keys {
		k := keys[i]
		if k.Key == "" {
			return nil, fmt.Errorf("api keys: entry %d has an empty key", i+1)
		}
		ks.byHash[sha256.Sum256([]byte(k.Key))] = &k
	}
	return ks, nil
}

// LoadKeys reads an API key file: a JSON array of {"key", "adapters",
// "admin"} objects, or lines "KEY [ADAPTERS] [admin]" where ADAPTERS is a
// comma-separated list of IDs or prefixes ending in '*' ('*' alone: all);
// '#' starts a comment.
func LoadKeys(path string) (*Keys, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	if t := bytes.TrimSpace(b); len(t) > 0 && t[0] == '[' {
		var keys []Key
		if err := json.Unmarshal(t, &keys); err != nil {
			return nil, fmt.Errorf("api keys %s: %w", path, err)
		}
		return NewKeys(keys)
	}
	var keys []Key
	sc := bufio.NewScanner(bytes.NewReader(b))
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		if i := strings.IndexByte(line, '#'); i >= 0 {
			line = line[:i]
		}
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		k := Key{Key: f[0]}
		for _, x := range f[1:] {
			switch {
			case x == "admin":
				k.Admin = true
			case x == "*":
			default:
				for _, a := range strings.Split(x, ",") {
					if a = strings.TrimSpace(a); a != "" {
						k.Adapters = append(k.Adapters, a)
					}
				}
			}
		}
		if len(f) > 3 {
			return nil, fmt.Errorf("api keys %s:%d: want KEY [ADAPTERS] [admin]", path, n)
		}
		keys = append(keys, k)
	}
	return NewKeys(keys)
}

// Len is the number of keys.
func (ks *Keys) Len() int {
	if ks == nil {
		return 0
	}
	return len(ks.byHash)
}

func (ks *Keys) lookup(key string) *Key {
	h := sha256.Sum256([]byte(key))
	k, ok := ks.byHash[h]
	if !ok || subtle.ConstantTimeCompare([]byte(k.Key), []byte(key)) != 1 {
		return nil
	}
	return k
}

// CanInvoke reports whether the key may run adapter id ("" is the base model).
func (k *Key) CanInvoke(id string) bool {
	if k == nil || k.Admin || id == "" || len(k.Adapters) == 0 {
		return true
	}
	for _, a := range k.Adapters {
		if p, ok := strings.CutSuffix(a, "*"); ok && strings.HasPrefix(id, p) || a == id {
			return true
		}
	}
	return false
}

// CanManage reports whether the key may deploy or delete adapter id.
func (k *Key) CanManage(id string) bool {
	if k == nil || k.Admin {
		return true
	}
	for _, a := range k.Adapters {
		if p, ok := strings.CutSuffix(a, "*"); ok && p != "" && strings.HasPrefix(id, p) {
			return true
		}
	}
	return false
}
