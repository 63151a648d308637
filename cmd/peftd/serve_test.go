package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/peftd/peftd/internal/adaptertest"
	"github.com/peftd/peftd/internal/testlog"
	"github.com/peftd/peftd/runtime/gpu"
	"github.com/peftd/peftd/server"
)

// TestServe runs `peftd serve` with the defaults (embedded stories260K, a
// store seeded with pirate and space) on a loopback port, invokes pirate,
// then shuts down on context cancellation.
func TestServe(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var logs testlog.Buffer
	errc := make(chan error, 1)
	go func() {
		errc <- run(ctx, []string{"serve", "--listen", "127.0.0.1:0", "--slots", "2", "--kv-blocks", "128", "--pin", "space"}, io.Discard, &logs)
	}()
	re := regexp.MustCompile(`msg="listening on" addr=(\S+)`)
	var addr string
	for deadline := time.Now().Add(30 * time.Second); addr == "" && time.Now().Before(deadline); {
		select {
		case err := <-errc:
			t.Fatalf("serve ended: %v\n%s", err, logs.String())
		case <-time.After(20 * time.Millisecond):
		}
		if m := re.FindStringSubmatch(logs.String()); m != nil {
			addr = m[1]
		}
	}
	if addr == "" {
		t.Fatalf("no 'listening on' log:\n%s", logs.String())
	}
	for _, want := range []string{"msg=device", "msg=model", "name=stories260K", "msg=store", "adapters=2", "ids=pirate,space", "msg=pinned adapter=space"} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("startup logs lack %q:\n%s", want, logs.String())
		}
	}
	body := `{"prompt":"Once upon a time","max_tokens":80}`
	resp, err := http.Post("http://"+addr+"/v1/adapters/pirate/invoke", "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	var raw map[string]any
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	json.Unmarshal(b, &raw)
	if text, _ := raw["text"].(string); resp.StatusCode != 200 || text != ", a little pirate girl named Sue had a boat. She loved the sea and the waves." {
		t.Errorf("invoke: %d %s", resp.StatusCode, b)
	}
	// Deploy a copy of space through the loader's store, invoke it, delete it.
	up := adaptertest.TarGz(t, adaptertest.Files(t, "../../models/adapters/space", "space/"))
	req, _ := http.NewRequest("PUT", "http://"+addr+"/v1/adapters/space2", bytes.NewReader(up))
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 201 {
		t.Fatalf("upload: %d %s", resp.StatusCode, b)
	}
	resp, err = http.Post("http://"+addr+"/v1/completions", "application/json",
		strings.NewReader(`{"model":"space2","prompt":"Once upon a time","max_tokens":80,"temperature":0}`))
	if err != nil {
		t.Fatal(err)
	}
	b, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.Contains(string(b), `"text":", a girl named Mia wanted to go to space. She built a rocket in her yard."`) {
		t.Errorf("space2: %d %s", resp.StatusCode, b)
	}
	// One structured log line per request and per deploy.
	for _, re := range []string{`msg="adapter deployed" id=space2 version=\S+ rank=8`, `msg=request id=cmpl-\S+ model=space2 status=200 stream=false prompt_tokens=5 completion_tokens=\d+ finish=stop`} {
		if !regexp.MustCompile(re).MatchString(logs.String()) {
			t.Errorf("logs lack %s:\n%s", re, logs.String())
		}
	}
	resp, err = http.Get("http://" + addr + "/v1/adapters/space2")
	if err != nil {
		t.Fatal(err)
	}
	b, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(b), `"tier":"device"`) || !strings.Contains(string(b), `"invocations":1`) {
		t.Errorf("adapter info: %s", b)
	}
	req, _ = http.NewRequest("DELETE", "http://"+addr+"/v1/adapters/space2", nil)
	if resp, err = http.DefaultClient.Do(req); err != nil || resp.StatusCode != 200 {
		t.Fatalf("delete: %v %v", err, resp)
	}
	resp.Body.Close()
	resp, err = http.Post("http://"+addr+"/v1/completions", "application/json",
		strings.NewReader(`{"model":"space2","prompt":"Once upon a time"}`))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 404 {
		t.Errorf("deleted adapter: %d", resp.StatusCode)
	}

	cancel()
	select {
	case err := <-errc:
		if err != nil {
			t.Errorf("serve: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("serve did not stop")
	}
	if !strings.Contains(logs.String(), "stopped") {
		t.Errorf("no shutdown log:\n%s", logs.String())
	}
}

func TestServeRefusesPublicWithoutKeys(t *testing.T) {
	for _, args := range [][]string{{"serve", "--listen", "0.0.0.0:0"}, {"serve", "--listen", ":8080"}} {
		_, err := runCLI(t, args...)
		if err == nil || !strings.Contains(err.Error(), "without API keys") {
			t.Errorf("%v: %v", args, err)
		}
	}
	t.Setenv("PEFTD_LISTEN", "10.1.2.3:80")
	if _, err := runCLI(t, "serve"); err == nil || !strings.Contains(err.Error(), "10.1.2.3:80") {
		t.Errorf("PEFTD_LISTEN: %v", err)
	}
	for _, a := range []string{"127.0.0.1:0", "[::1]:0", "localhost:0"} {
		if err := checkListen(a, 0); err != nil {
			t.Errorf("%s: %v", a, err)
		}
	}
	if err := checkListen("0.0.0.0:80", 1); err != nil {
		t.Errorf("with keys: %v", err)
	}
}

// TestServeNegativeGraphRows: --graph-rows below zero is refused before
// anything starts.
func TestServeNegativeGraphRows(t *testing.T) {
	if _, err := runCLI(t, "serve", "--listen", "127.0.0.1:0", "--graph-rows", "-1"); err == nil || !strings.Contains(err.Error(), "--graph-rows must not be negative") {
		t.Errorf("--graph-rows -1: %v", err)
	}
}

// TestServeNegativeTuneFrom: --tune-fp8-from below zero is refused before
// anything starts, naming the flag.
func TestServeNegativeTuneFrom(t *testing.T) {
	if _, err := runCLI(t, "serve", "--listen", "127.0.0.1:0", "--tune-fp8-from", "-3"); err == nil || !strings.Contains(err.Error(), "--tune-fp8-from -3") {
		t.Errorf("--tune-fp8-from -3: %v", err)
	}
}

// TestServeDevice: --device cuda without a usable GPU is an error naming the
// cause; auto falls back to cpu with one "device" line saying why.
func TestServeDevice(t *testing.T) {
	if gpu.Available() == nil {
		t.Skip("a usable GPU is present")
	}
	_, err := runCLI(t, "serve", "--listen", "127.0.0.1:0", "--device", "cuda")
	if err == nil || !strings.Contains(err.Error(), "--device cuda") || !strings.Contains(err.Error(), gpu.Available().Error()) {
		t.Errorf("--device cuda: %v", err)
	}
	if _, err := runCLI(t, "serve", "--listen", "127.0.0.1:0", "--device", "tpu"); err == nil || !strings.Contains(err.Error(), "auto, cpu or cuda") {
		t.Errorf("--device tpu: %v", err)
	}
	var logs bytes.Buffer
	srv, err := server.New(context.Background(), server.Config{Device: server.DeviceAuto, Store: t.TempDir(),
		CacheDir: "-", Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Shutdown(context.Background()); err != nil {
		t.Errorf("shutdown: %v", err)
	}
	if n := strings.Count(logs.String(), "msg=device"); n != 1 || !strings.Contains(logs.String(), "device=cpu") ||
		!strings.Contains(logs.String(), "reason=\"no usable GPU: ") {
		t.Errorf("auto without a GPU logged %d device lines:\n%s", n, logs.String())
	}
}

func TestServeConfigFile(t *testing.T) {
	dir := t.TempDir()
	write := func(s string) string {
		p := filepath.Join(dir, "c.json")
		if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	listen := fs.String("listen", "", "")
	slots := fs.Int("slots", 1, "")
	big := fs.Int64("max-upload-bytes", 0, "")
	if err := applyConfigFile(fs, write(`{"listen":"127.0.0.1:9","slots":8,"max-upload-bytes":3221225472}`)); err != nil {
		t.Fatal(err)
	}
	if *listen != "127.0.0.1:9" || *slots != 8 || *big != 3221225472 {
		t.Errorf("got %q %d %d", *listen, *slots, *big)
	}
	for cfg, msg := range map[string]string{
		`{"nope":1}`:    `unknown setting "nope"`,
		`{"slots":"x"}`: `slots="x"`,
		`[1]`:           "JSON object",
		`{"slots":[1]}`: "string, number or boolean",
	} {
		if err := applyConfigFile(fs, write(cfg)); err == nil || !strings.Contains(err.Error(), msg) {
			t.Errorf("%s: %v, want %q", cfg, err, msg)
		}
	}
	// --sqs-queue-url / PEFTD_SQS_QUEUE_URL need an s3:// store.
	if _, err := runCLI(t, "serve", "--listen", "127.0.0.1:0", "--store", t.TempDir(), "--sqs-queue-url", "https://sqs.us-east-1.amazonaws.com/1/q"); err == nil ||
		!strings.Contains(err.Error(), "needs an s3:// store") {
		t.Errorf("--sqs-queue-url with a folder store: %v", err)
	}
	t.Setenv("PEFTD_SQS_QUEUE_URL", "https://sqs.us-east-1.amazonaws.com/1/q")
	if _, err := runCLI(t, "serve", "--listen", "127.0.0.1:0", "--store", t.TempDir()); err == nil ||
		!strings.Contains(err.Error(), "needs an s3:// store") {
		t.Errorf("PEFTD_SQS_QUEUE_URL with a folder store: %v", err)
	}
	// Through the command: a bad file stops serve before anything starts.
	var out, errb bytes.Buffer
	if err := run(context.Background(), []string{"serve", "--config", write(`{"device":"tpu"}`)}, &out, &errb); err == nil || !strings.Contains(err.Error(), "tpu") {
		t.Errorf("serve with a bad config: %v", err)
	}
}
