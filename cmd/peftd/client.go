package main

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/peftd/peftd/runtime/lora"
)

// clientFlags are the flags every command that talks to a server shares.
type clientFlags struct {
	url, apiKey string
	timeout     time.Duration
}

func (c *clientFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&c.url, "url", envOr("PEFTD_URL", "http://127.0.0.1:8080"), "peftd server URL (env PEFTD_URL)")
	fs.StringVar(&c.apiKey, "api-key", os.Getenv("PEFTD_API_KEY"), "Bearer API key (env PEFTD_API_KEY)")
	fs.DurationVar(&c.timeout, "timeout", 10*time.Minute, "request timeout")
}

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

// do sends a request and returns the response, or the server's error
// message for a non-2xx status.
func (c *clientFlags) do(ctx context.Context, method, path, contentType string, body io.Reader) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, method, strings.TrimRight(c.url, "/")+path, body)
	if err != nil {
		if rc, ok := body.(io.Closer); ok {
			rc.Close()
		}
		return nil, err
	}
	if s, ok := body.(sized); ok {
		req.ContentLength = s.n
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	if c.apiKey != "" {
		req.Header.Set("Authorization", "Bearer "+c.apiKey)
	}
	resp, err := (&http.Client{Timeout: c.timeout}).Do(req)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode/100 != 2 {
		defer resp.Body.Close()
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		var e struct {
			Error struct{ Message string } `json:"error"`
		}
		if json.Unmarshal(b, &e) == nil && e.Error.Message != "" {
			return nil, fmt.Errorf("%s %s: HTTP %d: %s", method, path, resp.StatusCode, e.Error.Message)
		}
		return nil, fmt.Errorf("%s %s: HTTP %d: %s", method, path, resp.StatusCode, bytes.TrimSpace(b))
	}
	return resp, nil
}

// cmdDeploy uploads an adapter folder to a server: PUT /v1/adapters/{id}
// with a tar of its two files. The server validates it against its base
// model and writes it to its store.
func cmdDeploy(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet(ctx, "deploy", stdout, stderr)
	var c clientFlags
	c.register(fs)
	id := fs.String("id", "", "adapter ID to deploy as (default: the folder's name)")
	if err := fs.Parse(args); err != nil {
		return errUsage
	}
	if fs.NArg() != 1 {
		printUsage(stderr, fs)
		return fmt.Errorf("deploy: give exactly one adapter folder")
	}
	dir := fs.Arg(0)
	if *id == "" {
		*id = filepath.Base(filepath.Clean(dir))
	}
	body, n, err := adapterStream(dir)
	if err != nil {
		return fmt.Errorf("deploy: %w", err)
	}
	resp, err := c.do(ctx, http.MethodPut, "/v1/adapters/"+*id, "application/x-tar", sized{body, n})
	if err != nil {
		return fmt.Errorf("deploy %s: %w", *id, err)
	}
	defer resp.Body.Close()
	_, err = io.Copy(stdout, resp.Body)
	fmt.Fprintln(stdout)
	return err
}

// adapterStream is a tar of an adapter folder's two files, written while
// it is read (the request sends it as the files are read: no copy of the
// adapter in memory), and its exact length. The files are opened and
// sized first, so a missing one fails before any request. Plain tar: the
// weights are floating-point numbers gzip barely shrinks, and compressing
// them was most of a deploy's time.
func adapterStream(dir string) (io.ReadCloser, int64, error) {
	names := []string{lora.ConfigFile, lora.WeightsFile}
	files := make([]*os.File, len(names))
	sizes := make([]int64, len(names))
	closeAll := func() {
		for _, f := range files {
			if f != nil {
				f.Close()
			}
		}
	}
	total := int64(1024) // the end-of-archive blocks
	for i, name := range names {
		f, err := os.Open(filepath.Join(dir, name))
		if err != nil {
			closeAll()
			return nil, 0, err
		}
		files[i] = f
		st, err := f.Stat()
		if err != nil {
			closeAll()
			return nil, 0, err
		}
		sizes[i] = st.Size()
		total += 512 + (st.Size()+511)&^511 // a USTAR header, the data padded to blocks
	}
	pr, pw := io.Pipe()
	go func() {
		defer closeAll()
		tw := tar.NewWriter(pw)
		now := time.Now().Truncate(time.Second) // whole seconds: a plain USTAR header
		for i, name := range names {
			err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: sizes[i], ModTime: now, Format: tar.FormatUSTAR})
			if err == nil {
				_, err = io.Copy(tw, files[i])
			}
			if err != nil {
				pw.CloseWithError(err)
				return
			}
		}
		pw.CloseWithError(tw.Close())
	}()
	return pr, total, nil
}

// sized is a request body of a known length.
type sized struct {
	io.ReadCloser
	n int64
}

// cmdInvoke runs POST /v1/adapters/{id}/invoke and prints the text (as it
// arrives with --stream), or the JSON answer with --json.
func cmdInvoke(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet(ctx, "invoke", stdout, stderr)
	var c clientFlags
	c.register(fs)
	adapter := fs.String("adapter", "", "adapter ID (or the base model's name)")
	prompt := fs.String("prompt", "", "prompt text")
	promptIDs := fs.String("prompt-ids", "", "prompt as token ids: 1,2,3")
	maxTokens := fs.Int("max-tokens", 128, "tokens to generate at most")
	temp := fs.Float64("temperature", 0, "sampling temperature (0: greedy)")
	stream := fs.Bool("stream", false, "print the text as it is generated")
	asJSON := fs.Bool("json", false, "print the server's JSON answer")
	if err := fs.Parse(args); err != nil {
		return errUsage
	}
	if *adapter == "" {
		return fmt.Errorf("invoke: --adapter is required")
	}
	if (*prompt == "") == (*promptIDs == "") {
		return fmt.Errorf("invoke: give exactly one of --prompt and --prompt-ids")
	}
	if *stream && *asJSON {
		return fmt.Errorf("invoke: --stream and --json do not go together")
	}
	body := map[string]any{"max_tokens": *maxTokens, "temperature": *temp, "stream": *stream}
	if *prompt != "" {
		body["prompt"] = *prompt
	} else {
		ids, err := parseIDs(*promptIDs)
		if err != nil {
			return fmt.Errorf("invoke: --prompt-ids: %w", err)
		}
		body["prompt_ids"] = ids
	}
	b, _ := json.Marshal(body)
	resp, err := c.do(ctx, http.MethodPost, "/v1/adapters/"+*adapter+"/invoke", "application/json", bytes.NewReader(b))
	if err != nil {
		return fmt.Errorf("invoke: %w", err)
	}
	defer resp.Body.Close()
	if *asJSON {
		_, err := io.Copy(stdout, resp.Body)
		return err
	}
	if !*stream {
		var r struct{ Text string }
		if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
			return fmt.Errorf("invoke: reading the answer: %w", err)
		}
		fmt.Fprintln(stdout, r.Text)
		return nil
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	for sc.Scan() {
		data, ok := strings.CutPrefix(sc.Text(), "data: ")
		if !ok || data == "[DONE]" {
			continue
		}
		var ch struct {
			Text  string
			Error *struct{ Message string }
		}
		if err := json.Unmarshal([]byte(data), &ch); err != nil {
			return fmt.Errorf("invoke: bad stream chunk %q: %w", data, err)
		}
		if ch.Error != nil {
			return fmt.Errorf("invoke: %s", ch.Error.Message)
		}
		fmt.Fprint(stdout, ch.Text)
	}
	fmt.Fprintln(stdout)
	return sc.Err()
}
