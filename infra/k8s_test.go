package infra

import (
	"bytes"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/yaml"
)

// loadManifests parses every document of every infra/k8s/*.yaml file into
// unstructured objects, keyed "<Kind>/<name>".
func loadManifests(t *testing.T) map[string]*unstructured.Unstructured {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(repoRoot(t), "infra/k8s/*.yaml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no manifests: %v", err)
	}
	objs := map[string]*unstructured.Unstructured{}
	sep := regexp.MustCompile(`(?m)^---\s*$`)
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for i, doc := range sep.Split(string(b), -1) {
			if len(bytes.TrimSpace(stripComments([]byte(doc)))) == 0 {
				continue
			}
			var m map[string]any
			if err := yaml.UnmarshalStrict([]byte(doc), &m); err != nil {
				t.Fatalf("%s doc %d: %v", filepath.Base(f), i, err)
			}
			u := &unstructured.Unstructured{Object: m}
			if u.GetAPIVersion() == "" || u.GetKind() == "" || u.GetName() == "" {
				t.Fatalf("%s doc %d: missing apiVersion/kind/metadata.name", filepath.Base(f), i)
			}
			key := u.GetKind() + "/" + u.GetName()
			if u.GetAPIVersion() == "serving.knative.dev/v1" {
				key = "KnativeService/" + u.GetName()
			}
			if _, dup := objs[key]; dup {
				t.Fatalf("duplicate %s", key)
			}
			objs[key] = u
		}
	}
	return objs
}

func stripComments(b []byte) []byte {
	var out []byte
	for _, l := range bytes.Split(b, []byte("\n")) {
		if t := bytes.TrimSpace(l); len(t) > 0 && t[0] != '#' {
			out = append(out, l...)
			out = append(out, '\n')
		}
	}
	return out
}

func get(t *testing.T, u *unstructured.Unstructured, path ...string) any {
	t.Helper()
	v, ok, err := unstructured.NestedFieldNoCopy(u.Object, path...)
	if err != nil || !ok {
		t.Fatalf("%s/%s: no %s (%v)", u.GetKind(), u.GetName(), strings.Join(path, "."), err)
	}
	return v
}

func str(t *testing.T, u *unstructured.Unstructured, path ...string) string {
	t.Helper()
	s, ok := get(t, u, path...).(string)
	if !ok {
		t.Fatalf("%s/%s: %s is not a string", u.GetKind(), u.GetName(), strings.Join(path, "."))
	}
	return s
}

func container(t *testing.T, u *unstructured.Unstructured, name string) map[string]any {
	t.Helper()
	for _, c := range get(t, u, "spec", "template", "spec", "containers").([]any) {
		if c := c.(map[string]any); c["name"] == name {
			return c
		}
	}
	t.Fatalf("%s/%s: no container %q", u.GetKind(), u.GetName(), name)
	return nil
}

func TestK8sManifests(t *testing.T) {
	objs := loadManifests(t)
	want := map[string]string{
		"KnativeService/peftd":     "serving.knative.dev/v1",
		"Deployment/peftd":         "apps/v1",
		"Service/peftd":            "v1",
		"Secret/peftd-api-keys":    "v1",
		"Secret/peftd-s3":          "v1",
		"InferencePool/peftd":      "inference.networking.k8s.io/v1",
		"ConfigMap/peftd-epp":      "v1",
		"ServiceAccount/peftd-epp": "v1",
		"Role/peftd-epp":           "rbac.authorization.k8s.io/v1",
		"RoleBinding/peftd-epp":    "rbac.authorization.k8s.io/v1",
		"Deployment/peftd-epp":     "apps/v1",
		"Service/peftd-epp":        "v1",
		"HTTPRoute/peftd":          "gateway.networking.k8s.io/v1",
	}
	for key, api := range want {
		u, ok := objs[key]
		if !ok {
			t.Errorf("missing %s", key)
			continue
		}
		if u.GetAPIVersion() != api {
			t.Errorf("%s apiVersion = %s, want %s", key, u.GetAPIVersion(), api)
		}
	}
	for key := range objs {
		if _, ok := want[key]; !ok {
			t.Errorf("unexpected object %s (add it to the test)", key)
		}
	}
	if t.Failed() {
		t.FailNow()
	}

	// Both peftd workloads: one GPU, probes on /readyz and /healthz, port
	// 8080, API keys from the Secret mounted as a file.
	for _, key := range []string{"KnativeService/peftd", "Deployment/peftd"} {
		u := objs[key]
		c := container(t, u, "peftd")
		cu := &unstructured.Unstructured{Object: c}
		for _, kind := range []string{"requests", "limits"} {
			if g, _, _ := unstructured.NestedString(c, "resources", kind, "nvidia.com/gpu"); g != "1" {
				t.Errorf("%s: resources.%s[nvidia.com/gpu] = %q, want \"1\"", key, kind, g)
			}
		}
		if p := str(t, cu, "readinessProbe", "httpGet", "path"); p != ReadyPath {
			t.Errorf("%s readinessProbe path = %s", key, p)
		}
		if p := str(t, cu, "livenessProbe", "httpGet", "path"); p != HealthPath {
			t.Errorf("%s livenessProbe path = %s", key, p)
		}
		ports := c["ports"].([]any)
		if len(ports) != 1 || ports[0].(map[string]any)["containerPort"] != float64(ContainerPort) {
			t.Errorf("%s ports = %v", key, ports)
		}
		args := strings.Join(asStrings(c["args"]), " ")
		m := regexp.MustCompile(`--api-keys (\S+)`).FindStringSubmatch(args)
		if m == nil {
			t.Fatalf("%s: no --api-keys in %q", key, args)
		}
		var mountedAt string
		for _, vm := range c["volumeMounts"].([]any) {
			vm := vm.(map[string]any)
			if vm["name"] == "api-keys" {
				mountedAt = vm["mountPath"].(string)
			}
		}
		if mountedAt == "" || filepath.Dir(m[1]) != mountedAt {
			t.Errorf("%s: --api-keys %s is not in the api-keys mount (%q)", key, m[1], mountedAt)
		}
		var secret string
		for _, v := range get(t, u, "spec", "template", "spec", "volumes").([]any) {
			v := v.(map[string]any)
			if v["name"] == "api-keys" {
				secret, _, _ = unstructured.NestedString(v, "secret", "secretName")
			}
		}
		if sec, ok := objs["Secret/"+secret]; !ok {
			t.Errorf("%s: api-keys volume secret %q not defined", key, secret)
		} else if _, ok, _ := unstructured.NestedString(sec.Object, "stringData", filepath.Base(m[1])); !ok {
			t.Errorf("Secret/%s has no key %q", secret, filepath.Base(m[1]))
		}
		env := map[string]bool{}
		for _, e := range c["env"].([]any) {
			env[e.(map[string]any)["name"].(string)] = true
		}
		if !env["PEFTD_STORE"] || !env["PEFTD_MODEL"] {
			t.Errorf("%s env lacks PEFTD_STORE/PEFTD_MODEL: %v", key, env)
		}
	}

	ksvc := objs["KnativeService/peftd"]
	ann := get(t, ksvc, "spec", "template", "metadata", "annotations").(map[string]any)
	if ann["autoscaling.knative.dev/min-scale"] != "0" {
		t.Errorf("knative min-scale = %v, want \"0\"", ann["autoscaling.knative.dev/min-scale"])
	}
	if ann["autoscaling.knative.dev/metric"] != "concurrency" || ann["autoscaling.knative.dev/target"] == nil {
		t.Errorf("knative autoscaling annotations = %v, want concurrency target", ann)
	}

	// The InferencePool selects the Deployment's pods on the container port
	// and points at the EPP Service's ext-proc port.
	pool := objs["InferencePool/peftd"]
	sel := get(t, pool, "spec", "selector", "matchLabels").(map[string]any)
	podLabels := get(t, objs["Deployment/peftd"], "spec", "template", "metadata", "labels").(map[string]any)
	for k, v := range sel {
		if podLabels[k] != v {
			t.Errorf("InferencePool selector %s=%v does not match peftd pods %v", k, v, podLabels)
		}
	}
	tp := get(t, pool, "spec", "targetPorts").([]any)
	if len(tp) != 1 || tp[0].(map[string]any)["number"] != float64(ContainerPort) {
		t.Errorf("InferencePool targetPorts = %v", tp)
	}
	eppName := str(t, pool, "spec", "endpointPickerRef", "name")
	eppPort := get(t, pool, "spec", "endpointPickerRef", "port", "number")
	eppSvc, ok := objs["Service/"+eppName]
	if !ok {
		t.Fatalf("endpointPickerRef %s: no such Service", eppName)
	}
	found := false
	for _, p := range get(t, eppSvc, "spec", "ports").([]any) {
		found = found || p.(map[string]any)["port"] == eppPort
	}
	if !found {
		t.Errorf("EPP Service has no port %v", eppPort)
	}

	// The EPP reads peftd's LoRA metric, and its config enables LoRA affinity.
	epp := container(t, objs["Deployment/peftd-epp"], "epp")
	args := asStrings(epp["args"])
	for _, want := range []string{
		"--lora-info-metric=" + LoRAInfoMetric,
		"--total-queued-requests-metric=" + QueuedRequestsMetric,
		"--kv-cache-usage-percentage-metric=" + KVCacheUsageMetric,
		"--pool-name=" + pool.GetName(),
		"--config-file=/config/epp-config.yaml",
	} {
		if !slices.Contains(args, want) {
			t.Errorf("EPP args lack %s: %v", want, args)
		}
	}
	cm := objs["ConfigMap/peftd-epp"]
	var pc map[string]any
	if err := yaml.UnmarshalStrict([]byte(str(t, cm, "data", "epp-config.yaml")), &pc); err != nil {
		t.Fatal(err)
	}
	pcu := &unstructured.Unstructured{Object: pc}
	if pcu.GetAPIVersion() != "inference.networking.x-k8s.io/v1alpha1" || pcu.GetKind() != "EndpointPickerConfig" {
		t.Errorf("EPP config is %s %s", pcu.GetAPIVersion(), pcu.GetKind())
	}
	types := map[string]bool{}
	for _, p := range pc["plugins"].([]any) {
		types[p.(map[string]any)["type"].(string)] = true
	}
	var refs []string
	for _, prof := range pc["schedulingProfiles"].([]any) {
		for _, p := range prof.(map[string]any)["plugins"].([]any) {
			r := p.(map[string]any)["pluginRef"].(string)
			refs = append(refs, r)
			if !types[r] {
				t.Errorf("schedulingProfiles references undeclared plugin %s", r)
			}
		}
	}
	if !slices.Contains(refs, "lora-affinity-scorer") {
		t.Errorf("EPP profile does not use lora-affinity-scorer: %v", refs)
	}
	var contract struct {
		LoRAInfo struct {
			Metric string            `json:"metric"`
			Labels map[string]string `json:"labels"`
		} `json:"loraInfo"`
		QueuedRequests struct{ Metric string } `json:"queuedRequests"`
		KVCacheUsage   struct{ Metric string } `json:"kvCacheUsage"`
	}
	if err := yaml.UnmarshalStrict([]byte(str(t, cm, "data", "model-server-metrics.yaml")), &contract); err != nil {
		t.Fatal(err)
	}
	if contract.LoRAInfo.Metric != LoRAInfoMetric ||
		contract.LoRAInfo.Labels["running"] != LoRARunningLabel ||
		contract.LoRAInfo.Labels["waiting"] != LoRAWaitingLabel ||
		contract.LoRAInfo.Labels["max"] != LoRAMaxLabel ||
		contract.QueuedRequests.Metric != QueuedRequestsMetric ||
		contract.KVCacheUsage.Metric != KVCacheUsageMetric {
		t.Errorf("model-server metric contract = %+v", contract)
	}

	// HTTPRoute sends /v1/ to the InferencePool.
	route := objs["HTTPRoute/peftd"]
	rules := get(t, route, "spec", "rules").([]any)
	br := rules[0].(map[string]any)["backendRefs"].([]any)[0].(map[string]any)
	if br["group"] != "inference.networking.k8s.io" || br["kind"] != "InferencePool" || br["name"] != pool.GetName() {
		t.Errorf("HTTPRoute backendRef = %v", br)
	}
}
