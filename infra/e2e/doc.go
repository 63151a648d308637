// Package e2e holds end-to-end tests of peftd's deployment contract: they run
// real peftd servers (server.New on loopback ports, CPU) and check what the
// routers configured in package infra rely on — the vLLM-compatible metrics
// the Gateway API Inference Extension endpoint picker scrapes, and
// consistent-hash scale-out behind infra/haproxy/haproxy.cfg over a shared
// S3 store (versitygw). It has no non-test code; it is separate from infra
// so that infra's file checks stay light.
package e2e
