package s3test

import (
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"testing"
	"time"

	"github.com/peftd/peftd/internal/testlog"
)

// Moto is a running moto_server: real SQS (the AWS JSON protocol of
// aws-sdk-go-v2) and S3 APIs in one process, with S3 event notifications
// delivered to its SQS queues.
type Moto struct {
	Endpoint  string // http://127.0.0.1:port, for both S3 and SQS
	Addr      string
	AccessKey string
	Secret    string
	Region    string
	Account   string // the account of its queue URLs and ARNs
}

// StartMoto runs moto_server (the Python moto package's server, which this
// project's machine image ships; PyPI is not reachable to install it) on a
// free loopback port until the test ends. Without it the test is skipped,
// naming it, except in CI (CI set), where it fails; PEFTD_SKIP_S3=1 skips.
func StartMoto(t testing.TB) *Moto {
	t.Helper()
	if os.Getenv("PEFTD_SKIP_S3") == "1" {
		t.Skip("PEFTD_SKIP_S3=1")
	}
	argv := motoCommand()
	if argv == nil {
		msg := "SQS tests need moto_server (the Python moto package with its server extras: Flask, flask-cors): neither moto_server on PATH nor python3 -m moto.server works; set PEFTD_MOTO_SERVER, or PEFTD_SKIP_S3=1"
		if os.Getenv("CI") != "" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	var out testlog.Buffer
	var lastErr error
	for range 3 {
		addr, err := freeAddr()
		if err != nil {
			t.Fatal(err)
		}
		_, port, _ := net.SplitHostPort(addr)
		cmd := exec.Command(argv[0], append(argv[1:], "-H", "127.0.0.1", "-p", port)...)
		out.Reset()
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatalf("start moto_server: %v", err)
		}
		exited := make(chan struct{}) // closed when it has exited
		go func() { _ = cmd.Wait(); close(exited) }()
		if lastErr = waitHTTP("http://"+addr+"/moto-api/", exited, 60*time.Second); lastErr == nil {
			t.Cleanup(func() { _ = cmd.Process.Kill(); <-exited })
			return &Moto{Endpoint: "http://" + addr, Addr: addr, AccessKey: "testing", Secret: "testing",
				Region: "us-east-1", Account: "123456789012"}
		}
		_ = cmd.Process.Kill()
		<-exited
	}
	t.Fatalf("moto_server did not start: %v; output:\n%s", lastErr, out.String())
	return nil
}

// waitHTTP waits until url answers (any status), or the process exits.
func waitHTTP(url string, exited <-chan struct{}, within time.Duration) error {
	hc := &http.Client{Timeout: time.Second}
	for deadline := time.Now().Add(within); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		select {
		case <-exited:
			return fmt.Errorf("it exited")
		default:
		}
		if resp, err := hc.Get(url); err == nil {
			resp.Body.Close()
			return nil
		}
	}
	return fmt.Errorf("no answer from %s after %v", url, within)
}

// motoCommand is how to run moto's server: $PEFTD_MOTO_SERVER, moto_server
// on PATH, or python3 -m moto.server; nil if none works.
func motoCommand() []string {
	if p := os.Getenv("PEFTD_MOTO_SERVER"); p != "" {
		return []string{p}
	}
	if p, err := exec.LookPath("moto_server"); err == nil {
		return []string{p}
	}
	if p, err := exec.LookPath("python3"); err == nil && exec.Command(p, "-c", "import moto.server, flask, flask_cors").Run() == nil {
		return []string{p, "-m", "moto.server"}
	}
	return nil
}
