package loadgen_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/peftd/peftd/api"
	"github.com/peftd/peftd/internal/adaptertest"
	"github.com/peftd/peftd/internal/testlog"
	"github.com/peftd/peftd/loader/store"
	"github.com/peftd/peftd/loadgen"
	"github.com/peftd/peftd/runtime/cpu"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/server"
	"github.com/peftd/peftd/text/tokenizer"
)

func TestSoakClassify(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)
	at := func(s float64) time.Time { return t0.Add(time.Duration(s * float64(time.Second))) }
	outage := loadgen.Window{Start: at(10), End: at(35)} // 20s down + 5s grace
	const storeMsg = `service unavailable: adapter "soak-150" is not cached here and the store failed: loader: store unavailable: dial tcp: connection refused`
	for _, tc := range []struct {
		name       string
		status     int
		hot        bool
		start, end float64
		msg        string
		noOutage   bool
		want       loadgen.Verdict
	}{
		{"served", 200, false, 1, 2, "", false, loadgen.VerdictOK},
		{"served hot during the outage", 200, true, 12, 13, "", false, loadgen.VerdictOK},
		{"200 whose stream broke", 200, false, 1, 2, "reading the stream: unexpected EOF", false, loadgen.VerdictFailed},
		{"cold 503 naming the store during the outage", 503, false, 12, 14, storeMsg, false, loadgen.VerdictAllowed},
		{"cold 503 in a stream's error event", 503, false, 12, 14, "(in the stream) " + storeMsg, false, loadgen.VerdictAllowed},
		{"cold 503 sent before the outage, answered during it", 503, false, 9, 11, storeMsg, false, loadgen.VerdictAllowed},
		{"cold 503 within the grace", 503, false, 34, 34.5, storeMsg, false, loadgen.VerdictAllowed},
		{"cold 503 after the grace", 503, false, 36, 37, storeMsg, false, loadgen.VerdictFailed},
		{"cold 503 before the outage", 503, false, 5, 6, storeMsg, false, loadgen.VerdictFailed},
		{"cold 503 with no outage at all", 503, false, 12, 14, storeMsg, true, loadgen.VerdictFailed},
		{"hot 503 during the outage", 503, true, 12, 14, storeMsg, false, loadgen.VerdictFailed},
		{"cold 503 not naming the store", 503, false, 12, 14, "the server is shutting down", false, loadgen.VerdictFailed},
		{"cold 500 naming the store", 500, false, 12, 14, storeMsg, false, loadgen.VerdictFailed},
		{"cold 404 during the outage", 404, false, 12, 14, `adapter "soak-150" is not deployed`, false, loadgen.VerdictFailed},
		{"cold 429 during the outage", 429, false, 12, 14, "the server is at capacity", false, loadgen.VerdictFailed},
		{"no response during the outage", 0, false, 12, 14, "connection reset by peer", false, loadgen.VerdictFailed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := outage
			if tc.noOutage {
				w = loadgen.Window{}
			}
			s := loadgen.SoakSample{Status: tc.status, Hot: tc.hot, Start: at(tc.start), End: at(tc.end), Message: tc.msg, Adapter: "soak-150"}
			if got := loadgen.Classify(s, w); got != tc.want {
				t.Errorf("Classify = %v, want %v", got, tc.want)
			}
		})
	}
}

// flakyStore fails every call while down is set, as a store that cannot
// be reached does.
type flakyStore struct {
	store.Store
	down atomic.Bool
}

var errDown = errors.New("dial tcp 127.0.0.1:9000: connect: connection refused")

func (f *flakyStore) err(op, id string) error {
	if f.down.Load() {
		return fmt.Errorf("store: s3 soak/%s: %s: %w", id, op, errDown)
	}
	return nil
}

func (f *flakyStore) List(ctx context.Context) ([]store.Object, error) {
	if err := f.err("list", ""); err != nil {
		return nil, err
	}
	return f.Store.List(ctx)
}

func (f *flakyStore) Stat(ctx context.Context, id string) (store.Object, error) {
	if err := f.err("head", id); err != nil {
		return store.Object{}, err
	}
	return f.Store.Stat(ctx, id)
}

func (f *flakyStore) Get(ctx context.Context, id string, o store.GetOptions) ([]byte, []byte, string, error) {
	if err := f.err("get", id); err != nil {
		return nil, nil, "", err
	}
	return f.Store.Get(ctx, id, o)
}

func (f *flakyStore) Put(ctx context.Context, id string, cfg, w []byte) (string, error) {
	if err := f.err("put", id); err != nil {
		return "", err
	}
	return f.Store.Put(ctx, id, cfg, w)
}

// soakServer serves stories260K over a flaky folder store of n copies of
// the demo adapters (soak-00, ...) and returns the store and the URL.
func soakServer(t *testing.T, n, slots int) (*flakyStore, string) {
	t.Helper()
	const models = "../models"
	m, err := llama.Open(filepath.Join(models, "stories260K"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	tok, err := tokenizer.Load(filepath.Join(models, "stories260K"))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	for i := range n {
		adaptertest.Copy(t, filepath.Join(models, "adapters", []string{"pirate", "space"}[i%2]), filepath.Join(dir, fmt.Sprintf("soak-%02d", i)))
	}
	fsStore, err := store.NewFS(dir, store.FSOptions{PollInterval: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	st := &flakyStore{Store: fsStore}
	log := testlog.Logger(t)
	core, err := server.NewCore(context.Background(), server.CoreConfig{Model: m, Backend: cpu.New(0), Store: st, Slots: slots,
		KVBlocks: 256, CacheDir: t.TempDir(), RecheckInterval: 200 * time.Millisecond, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { core.Close() })
	eos := tok.EOS()
	for _, id := range m.Config.EOS {
		eos = append(eos, int32(id))
	}
	srv := api.New(api.Config{Generator: core.Scheduler, Catalog: core.Catalog, Tokenizer: tok, ModelName: "stories260K",
		MaxModelLen: 512, EOS: eos, Metrics: core.Metrics, Logger: log})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
	})
	return st, "http://" + ln.Addr().String()
}

// TestSoakOutage runs the soak driver against a real server whose store
// goes down by a hook mid-run: cold adapters get 503s naming the store
// and are served after, the hot ones never fail, and the replaced adapter
// reports its new version. A proxy in front answers one hot request with a
// 500 during the outage: the one failure the report must show.
func TestSoakOutage(t *testing.T) {
	st, backend := soakServer(t, 10, 3)
	u, _ := url.Parse(backend)
	proxy := httputil.NewSingleHostReverseProxy(u)
	proxy.FlushInterval = -1
	var inject, injected atomic.Bool
	front := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if inject.Load() && r.Method == http.MethodPost && !injected.Load() {
			b, _ := io.ReadAll(r.Body)
			r.Body = io.NopCloser(bytes.NewReader(b))
			var body struct{ Model string }
			_ = json.Unmarshal(b, &body)
			if (body.Model == "soak-01" || strings.HasPrefix(r.URL.Path, "/v1/adapters/soak-01/")) && injected.CompareAndSwap(false, true) {
				w.Header().Set("Content-Type", "application/json")
				w.WriteHeader(http.StatusInternalServerError)
				io.WriteString(w, `{"error":{"message":"injected failure","type":"server_error","code":"internal_error"}}`)
				return
			}
		}
		proxy.ServeHTTP(w, r)
	}))
	t.Cleanup(front.Close)

	body, err := loadgen.TarGzAdapter("../models/adapters/space", true)
	if err != nil {
		t.Fatal(err)
	}
	var progress bytes.Buffer
	dur := 4 * time.Second
	if testing.Short() {
		dur = 3 * time.Second
	}
	ids := make([]string, 10)
	for i := range ids {
		ids[i] = fmt.Sprintf("soak-%02d", i)
	}
	rep, err := loadgen.RunSoak(context.Background(), loadgen.SoakConfig{
		URL: front.URL, Adapters: ids, Hot: ids[:2], Reserve: 3, Duration: dur, Concurrency: 4,
		MinTokens: 4, MaxTokens: 8, StreamShare: 0.3, PromptWords: 4, Warmup: true,
		OutageAt: 0.25, OutageFor: dur / 4, OutageGrace: 300 * time.Millisecond,
		OutageStart: func(context.Context) error { st.down.Store(true); inject.Store(true); return nil },
		OutageStop:  func(context.Context) error { st.down.Store(false); inject.Store(false); return nil },
		ReplaceID:   "soak-00", ReplaceBody: body, ReplaceAt: 0.6,
		Progress: &progress, ProgressEvery: time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	rep.Print(&out)
	t.Logf("progress:\n%s\nreport:\n%s", progress.String(), out.String())
	if !injected.Load() {
		t.Fatal("no hot request during the outage to inject a 500 into")
	}
	if rep.Failed != 1 || rep.ByStatus[500] != 1 || len(rep.Examples) != 1 || !strings.Contains(rep.Examples[0], "injected failure") {
		t.Errorf("want exactly the injected 500 as a failure: failed %d, by status %v, examples %q", rep.Failed, rep.ByStatus, rep.Examples)
	}
	if rep.OK() || !strings.Contains(out.String(), "FAIL: 1 failed requests") {
		t.Errorf("the injected 500 must fail the soak: problems %q", rep.Problems)
	}
	if rep.Allowed == 0 || len(rep.Refused) == 0 || rep.Recovered != len(rep.Refused) {
		t.Errorf("allowed %d, refused %v, recovered %d, not recovered %v", rep.Allowed, rep.Refused, rep.Recovered, rep.NotRecovered)
	}
	if rep.ReserveMet == 0 || rep.ReserveServed != 0 {
		t.Errorf("requests for store-only adapters: %d met the outage, %d served during it", rep.ReserveMet, rep.ReserveServed)
	}
	for _, a := range rep.Refused {
		if a < "soak-07" {
			t.Errorf("%s was refused: only the reserve (soak-07..09) is cold to the store", a)
		}
	}
	if rep.OldVersion == "" || rep.NewVersion == "" || rep.OldVersion == rep.NewVersion || rep.ReplaceErr != "" || rep.ReplacedServed == 0 {
		t.Errorf("replacement: %s -> %s, err %q, served %d", rep.OldVersion, rep.NewVersion, rep.ReplaceErr, rep.ReplacedServed)
	}
	if rep.OutputSame != "no" {
		t.Errorf("soak-00 (pirate) replaced by space: same greedy output %q", rep.OutputSame)
	}
	if rep.Hot.Served == 0 || rep.Cold.Served == 0 || rep.Overall.P99 < rep.Overall.P50 || rep.TokensPS <= 0 {
		t.Errorf("stats: %+v %+v %+v %v", rep.Overall, rep.Hot, rep.Cold, rep.TokensPS)
	}
	for _, p := range []string{"outage: stopping the store", "outage: the store is back", "replace: soak-00 is now version"} {
		if !strings.Contains(progress.String(), p) {
			t.Errorf("progress lacks %q", p)
		}
	}
}

// TestSoakOutageNotEffective: outage commands that do not stop the store
// fail the soak (store-only adapters are served while it should be down).
func TestSoakOutageNotEffective(t *testing.T) {
	_, url := soakServer(t, 8, 3)
	ids := make([]string, 8)
	for i := range ids {
		ids[i] = fmt.Sprintf("soak-%02d", i)
	}
	noop := func(context.Context) error { return nil }
	rep, err := loadgen.RunSoak(context.Background(), loadgen.SoakConfig{
		URL: url, Adapters: ids, Hot: ids[:2], Reserve: 3, Duration: 2 * time.Second, Concurrency: 3,
		MinTokens: 2, MaxTokens: 4, PromptWords: 3, Warmup: true,
		OutageAt: 0.25, OutageFor: time.Second, OutageGrace: 100 * time.Millisecond, OutageStart: noop, OutageStop: noop,
	})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Failed != 0 || rep.Allowed != 0 || rep.ReserveServed == 0 || rep.OK() ||
		!strings.Contains(strings.Join(rep.Problems, "; "), "served while the store was down") {
		t.Errorf("failed %d, allowed %d, reserve served %d, problems %q", rep.Failed, rep.Allowed, rep.ReserveServed, rep.Problems)
	}
}
