package loadgen

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// events runs the outage and the replacement at their times.
func (k *soaker) events(ctx context.Context, start time.Time, rep *SoakReport) {
	cfg := k.cfg
	sleepUntil := func(t time.Time) bool {
		select {
		case <-time.After(time.Until(t)):
			return true
		case <-ctx.Done():
			return false
		}
	}
	at := func(f float64) time.Time { return start.Add(time.Duration(f * float64(cfg.Duration))) }
	replaceAt := at(cfg.ReplaceAt)
	if cfg.OutageStart != nil {
		if !sleepUntil(at(cfg.OutageAt)) {
			return
		}
		k.mu.Lock()
		k.outage.Start = time.Now()
		k.mu.Unlock()
		k.progress("outage: stopping the store (for %v)", cfg.OutageFor)
		// The commands run to completion even past the end of the run: the
		// store must come back.
		if err := cfg.OutageStart(context.WithoutCancel(ctx)); err != nil {
			rep.OutageErr = "start: " + err.Error()
		}
		// The reserve opens once the store is down, so that no reserve
		// adapter is fetched before.
		k.mu.Lock()
		k.downAt = time.Now()
		k.mu.Unlock()
		k.reserveOpen.Store(true)
		k.inOutage.Store(true)
		sleepUntil(time.Now().Add(cfg.OutageFor))
		k.mu.Lock()
		k.upAt = time.Now()
		k.mu.Unlock()
		if err := cfg.OutageStop(context.WithoutCancel(ctx)); err != nil {
			rep.OutageErr = strings.TrimPrefix(rep.OutageErr+"; stop: "+err.Error(), "; ")
		}
		k.mu.Lock()
		k.outage.End = time.Now()
		k.mu.Unlock()
		k.inOutage.Store(false)
		k.progress("outage: the store is back after %.1fs", time.Since(k.outage.Start).Seconds())
		if !sleepUntil(time.Now().Add(cfg.OutageGrace)) {
			k.afterGrace.Store(true)
			return
		}
		k.afterGrace.Store(true)
		if t := time.Now(); replaceAt.Before(t) {
			replaceAt = t
		}
	}
	if cfg.ReplaceBody == nil || !sleepUntil(replaceAt) {
		return
	}
	k.replace(ctx, rep)
}

// replace uploads ReplaceBody as ReplaceID and checks that the server
// reports a new version.
func (k *soaker) replace(ctx context.Context, rep *SoakReport) {
	id := k.cfg.ReplaceID
	old, err := k.version(ctx, id)
	if err != nil {
		rep.ReplaceErr = "before: " + err.Error()
		return
	}
	rep.OldVersion = old
	before, _ := k.greedyText(ctx, id)
	k.progress("replace: uploading a new %s (version %s)", id, old)
	rep.ReplacedAt = time.Now()
	k.replacedAt.Store(rep.ReplacedAt.UnixNano())
	st, msg := k.simple(ctx, http.MethodPut, "/v1/adapters/"+id, k.cfg.ReplaceBody, "application/gzip")
	if st != http.StatusOK && st != http.StatusCreated {
		rep.ReplaceErr = fmt.Sprintf("PUT /v1/adapters/%s: HTTP %d: %s", id, st, msg)
		return
	}
	var info struct {
		Version string `json:"version"`
	}
	_ = json.Unmarshal([]byte(msg), &info)
	cur, err := k.version(ctx, id)
	if err != nil {
		rep.ReplaceErr = "after: " + err.Error()
		return
	}
	rep.NewVersion = cur
	switch {
	case cur == old:
		rep.ReplaceErr = fmt.Sprintf("GET /v1/adapters/%s still reports version %s after the upload", id, old)
	case info.Version != "" && cur != info.Version:
		rep.ReplaceErr = fmt.Sprintf("the upload answered version %s, GET /v1/adapters/%s reports %s", info.Version, id, cur)
	}
	after, err := k.greedyText(ctx, id)
	if err != nil {
		rep.ReplaceErr = strings.TrimPrefix(rep.ReplaceErr+"; serving the new version: "+err.Error(), "; ")
	} else if before != "" {
		rep.OutputBefore = before
		rep.OutputSame = "no"
		if before == after {
			rep.OutputSame = "yes"
		}
	}
	k.progress("replace: %s is now version %s", id, cur)
}

func (k *soaker) version(ctx context.Context, id string) (string, error) {
	st, body := k.simple(ctx, http.MethodGet, "/v1/adapters/"+id, nil, "")
	if st != http.StatusOK {
		return "", fmt.Errorf("GET /v1/adapters/%s: HTTP %d: %s", id, st, body)
	}
	var info struct {
		Version string `json:"version"`
	}
	if err := json.Unmarshal([]byte(body), &info); err != nil || info.Version == "" {
		return "", fmt.Errorf("GET /v1/adapters/%s: no version in %s", id, body)
	}
	return info.Version, nil
}

// greedyText is the adapter's greedy answer to a fixed prompt.
func (k *soaker) greedyText(ctx context.Context, id string) (string, error) {
	body := map[string]any{"max_tokens": 16, "temperature": 0, "ignore_eos": true}
	if k.cfg.TokenPrompts {
		body["prompt_ids"] = []int32{10, 20, 30, 40}
	} else {
		body["prompt"] = "Once upon a time"
	}
	b, _ := json.Marshal(body)
	st, msg := k.simple(ctx, http.MethodPost, "/v1/adapters/"+id+"/invoke", b, "application/json")
	if st != http.StatusOK {
		return "", fmt.Errorf("HTTP %d: %s", st, msg)
	}
	var r struct {
		Text     string  `json:"text"`
		TokenIDs []int32 `json:"token_ids"`
	}
	if err := json.Unmarshal([]byte(msg), &r); err != nil {
		return "", err
	}
	return fmt.Sprint(r.Text, r.TokenIDs), nil
}

// TarGzAdapter packs an adapter folder's two files (PEFT's
// adapter_config.json and adapter_model.safetensors) as a tar.gz, the body
// PUT /v1/adapters/{id} takes. With fresh, the config ends with a blank
// line (white space JSON ignores), so that uploading the adapter a store
// already holds still makes new bytes, hence a new version.
func TarGzAdapter(dir string, fresh bool) ([]byte, error) {
	var buf bytes.Buffer
	gz := gzip.NewWriter(&buf)
	tw := tar.NewWriter(gz)
	for _, name := range []string{"adapter_config.json", "adapter_model.safetensors"} {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			return nil, err
		}
		if name == "adapter_config.json" && fresh {
			b = append(bytes.TrimRight(b, " \t\r\n"), "\n\n"...)
		}
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(b)), ModTime: time.Now(), Typeflag: tar.TypeReg}); err != nil {
			return nil, err
		}
		if _, err := tw.Write(b); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	if err := gz.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}
