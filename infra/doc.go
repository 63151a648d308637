// Package infra holds peftd's deployment files (Docker image, compose stack,
// AWS SAM template at the repository root, Kubernetes manifests, HAProxy
// config) and the tests that validate them. It has no runtime code; the
// exported constants name the contract between the server's /metrics
// endpoint and the routers configured here, so the server's own tests can
// assert a live scrape against the same names.
package infra

// Metric and label names the Gateway API Inference Extension endpoint picker
// (EPP) reads for LoRA affinity. peftd exports them vLLM-compatibly.
const (
	// LoRAInfoMetric is the gauge whose labels list the adapters resident
	// and queued on a replica.
	LoRAInfoMetric = "vllm:lora_requests_info"
	// LoRARunningLabel is the comma-separated list of adapters running now.
	LoRARunningLabel = "running_lora_adapters"
	// LoRAWaitingLabel is the comma-separated list of adapters with queued requests.
	LoRAWaitingLabel = "waiting_lora_adapters"
	// LoRAMaxLabel is the number of adapter slots on the device.
	LoRAMaxLabel = "max_lora"

	// QueuedRequestsMetric and KVCacheUsageMetric are the vLLM-style gauges
	// the EPP's queue and KV-cache scorers read.
	QueuedRequestsMetric = "vllm:num_requests_waiting"
	KVCacheUsageMetric   = "vllm:kv_cache_usage_perc"
)

// HTTP paths the orchestrators probe.
const (
	HealthPath  = "/healthz"
	ReadyPath   = "/readyz"
	MetricsPath = "/metrics"
	// ContainerPort is the port peftd listens on inside containers.
	ContainerPort = 8080
	// AdapterHeader is the client-set header HAProxy hashes on for OpenAI
	// routes, whose adapter ID sits in the JSON body it cannot read.
	AdapterHeader = "X-Peftd-Adapter"
)
