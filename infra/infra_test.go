package infra

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os/exec"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/awslabs/goformation/v7"
	"github.com/awslabs/goformation/v7/cloudformation"
	"github.com/awslabs/goformation/v7/cloudformation/applicationautoscaling"
	"github.com/awslabs/goformation/v7/cloudformation/cloudwatch"
	"github.com/awslabs/goformation/v7/cloudformation/ec2"
	"github.com/awslabs/goformation/v7/cloudformation/ecs"
	"github.com/awslabs/goformation/v7/cloudformation/elasticloadbalancingv2"
	"github.com/awslabs/goformation/v7/cloudformation/iam"
	"github.com/awslabs/goformation/v7/cloudformation/s3"
	"github.com/awslabs/goformation/v7/cloudformation/sqs"
	"github.com/awslabs/goformation/v7/intrinsics"
	yamlv3 "go.yaml.in/yaml/v3"
)

const templateFile = "template.yaml"

// ---------------------------------------------------------------- raw walk

// A reference found in the raw template.
type cfnRef struct {
	Kind   string // Ref, GetAtt, Sub, DependsOn
	Target string // logical ID or parameter (attribute stripped)
	Line   int
}

var subVar = regexp.MustCompile(`\$\{([^}]*)\}`)

// rawRefs walks the YAML node tree (short !Tags and long Fn:: forms alike)
// and returns every Ref, GetAtt, Sub variable and DependsOn target. goformation
// resolves or drops intrinsics while parsing, so references are checked here.
func rawRefs(t *testing.T, root *yamlv3.Node) []cfnRef {
	var out []cfnRef
	var subRefs func(s string, locals map[string]bool, line int)
	subRefs = func(s string, locals map[string]bool, line int) {
		for _, m := range subVar.FindAllStringSubmatch(s, -1) {
			v := m[1]
			if strings.HasPrefix(v, "!") || locals[v] { // ${!Literal}, Sub's own variables
				continue
			}
			out = append(out, cfnRef{"Sub", strings.SplitN(v, ".", 2)[0], line})
		}
	}
	var walk func(n *yamlv3.Node)
	sub := func(n *yamlv3.Node) {
		switch n.Kind {
		case yamlv3.ScalarNode:
			subRefs(n.Value, nil, n.Line)
		case yamlv3.SequenceNode:
			if len(n.Content) != 2 || n.Content[1].Kind != yamlv3.MappingNode {
				t.Fatalf("line %d: Fn::Sub list form needs [string, map]", n.Line)
			}
			locals := map[string]bool{}
			for i := 0; i < len(n.Content[1].Content); i += 2 {
				locals[n.Content[1].Content[i].Value] = true
			}
			subRefs(n.Content[0].Value, locals, n.Line)
			walk(n.Content[1])
		default:
			t.Fatalf("line %d: bad Fn::Sub", n.Line)
		}
	}
	getAtt := func(n *yamlv3.Node) {
		switch {
		case n.Kind == yamlv3.ScalarNode && strings.Contains(n.Value, "."):
			out = append(out, cfnRef{"GetAtt", strings.SplitN(n.Value, ".", 2)[0], n.Line})
		case n.Kind == yamlv3.SequenceNode && len(n.Content) == 2:
			out = append(out, cfnRef{"GetAtt", n.Content[0].Value, n.Line})
		default:
			t.Fatalf("line %d: bad Fn::GetAtt", n.Line)
		}
	}
	walk = func(n *yamlv3.Node) {
		switch n.Tag {
		case "!Ref":
			out = append(out, cfnRef{"Ref", n.Value, n.Line})
			return
		case "!GetAtt":
			getAtt(n)
			return
		case "!Sub":
			sub(n)
			return
		}
		if n.Kind == yamlv3.MappingNode {
			for i := 0; i < len(n.Content); i += 2 {
				k, v := n.Content[i], n.Content[i+1]
				switch k.Value {
				case "Ref":
					out = append(out, cfnRef{"Ref", v.Value, v.Line})
					continue
				case "Fn::GetAtt":
					getAtt(v)
					continue
				case "Fn::Sub":
					sub(v)
					continue
				case "DependsOn":
					if v.Kind == yamlv3.ScalarNode {
						out = append(out, cfnRef{"DependsOn", v.Value, v.Line})
					} else {
						for _, d := range v.Content {
							out = append(out, cfnRef{"DependsOn", d.Value, d.Line})
						}
					}
					continue
				}
				walk(v)
			}
			return
		}
		for _, c := range n.Content {
			walk(c)
		}
	}
	walk(root)
	return out
}

func TestTemplateReferencesResolve(t *testing.T) {
	var doc yamlv3.Node
	if err := yamlv3.Unmarshal(readFile(t, templateFile), &doc); err != nil {
		t.Fatal(err)
	}
	var raw struct {
		Parameters map[string]any `yaml:"Parameters"`
		Resources  map[string]any `yaml:"Resources"`
		Outputs    map[string]any `yaml:"Outputs"`
	}
	if err := doc.Decode(&raw); err != nil {
		t.Fatal(err)
	}
	refs := rawRefs(t, &doc)
	if len(refs) < 50 {
		t.Fatalf("found only %d references; is the walker broken?", len(refs))
	}
	used := map[string]bool{}
	for _, r := range refs {
		used[r.Target] = true
		_, isRes := raw.Resources[r.Target]
		_, isParam := raw.Parameters[r.Target]
		pseudo := strings.HasPrefix(r.Target, "AWS::")
		switch {
		case r.Kind == "GetAtt" || r.Kind == "DependsOn":
			if !isRes {
				t.Errorf("line %d: %s %s: no such resource", r.Line, r.Kind, r.Target)
			}
		case pseudo:
			if !slices.Contains([]string{"AWS::AccountId", "AWS::Region", "AWS::StackId", "AWS::StackName", "AWS::Partition", "AWS::URLSuffix", "AWS::NoValue"}, r.Target) {
				t.Errorf("line %d: unknown pseudo parameter %s", r.Line, r.Target)
			}
		case !isRes && !isParam:
			t.Errorf("line %d: %s %s: no such resource or parameter", r.Line, r.Kind, r.Target)
		}
	}
	for p := range raw.Parameters {
		if !used[p] {
			t.Errorf("parameter %s is never referenced", p)
		}
	}
}

// ------------------------------------------------------- goformation parse

// keepIntrinsics makes goformation keep every intrinsic as its base64-encoded
// JSON (goformation's own encoding for intrinsics in string fields) instead
// of resolving it against made-up pseudo-parameter values. Refs to List
// parameters become one-element lists and Refs to Number parameters their
// default (as a number, or as a string when numbersAsStrings), so the typed
// structs accept them.
func keepIntrinsics(numbersAsStrings bool) map[string]intrinsics.IntrinsicHandler {
	m := map[string]intrinsics.IntrinsicHandler{}
	for _, n := range []string{"Fn::Base64", "Fn::And", "Fn::Equals", "Fn::If", "Fn::Not", "Fn::Or",
		"Fn::FindInMap", "Fn::GetAtt", "Fn::GetAZs", "Fn::ImportValue", "Fn::Join", "Fn::Select",
		"Fn::Split", "Fn::Sub", "Ref", "Fn::Cidr", "Fn::Transform"} {
		m[n] = func(name string, input any, template any) any {
			b, _ := json.Marshal(map[string]any{name: input})
			enc := base64.StdEncoding.EncodeToString(b)
			if name != "Ref" {
				return enc
			}
			tm, _ := template.(map[string]any)
			ps, _ := tm["Parameters"].(map[string]any)
			p, _ := ps[fmt.Sprint(input)].(map[string]any)
			switch ty, _ := p["Type"].(string); {
			case ty == "Number" && numbersAsStrings:
				return fmt.Sprint(p["Default"])
			case ty == "Number":
				return p["Default"]
			case strings.HasPrefix(ty, "List<") || ty == "CommaDelimitedList":
				return []any{enc}
			}
			return enc
		}
	}
	return m
}

// parseTyped returns every resource parsed into its goformation type. Each
// resource is parsed on its own, first with Number refs as numbers, then as
// strings (goformation types e.g. ASG MaxSize as string, TargetValue as float).
func parseTyped(t *testing.T) (map[string]cloudformation.Resource, map[string]any) {
	t.Helper()
	data := readFile(t, templateFile)
	if _, err := goformation.ParseYAML(data); err != nil && !strings.Contains(err.Error(), "cannot unmarshal") {
		t.Fatalf("goformation: %v", err)
	}
	var passes [2]map[string]any
	for i := range passes {
		j, err := intrinsics.ProcessYAML(data, &intrinsics.ProcessorOptions{IntrinsicHandlerOverrides: keepIntrinsics(i == 1)})
		if err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal(j, &passes[i]); err != nil {
			t.Fatal(err)
		}
	}
	out := map[string]cloudformation.Resource{}
	for name := range passes[0]["Resources"].(map[string]any) {
		var errs []string
		for _, p := range passes {
			mini, _ := json.Marshal(map[string]any{"Resources": map[string]any{name: p["Resources"].(map[string]any)[name]}})
			tpl, err := goformation.ParseJSONWithOptions(mini, &intrinsics.ProcessorOptions{NoProcess: true})
			if err == nil {
				out[name] = tpl.Resources[name]
				break
			}
			errs = append(errs, err.Error())
		}
		if _, ok := out[name]; !ok {
			t.Errorf("resource %s does not fit its goformation type: %v", name, errs)
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	return out, passes[0]
}

// canon decodes kept intrinsics (recursively) and returns compact JSON, e.g.
// {"Fn::GetAtt":["AdapterEventsQueue","Arn"]}. Plain strings stay strings.
func canon(v any) string {
	b, _ := json.Marshal(decodeIntrinsics(v))
	return string(b)
}

func decodeIntrinsics(v any) any {
	switch v := v.(type) {
	case string:
		b, err := base64.StdEncoding.DecodeString(v)
		if err != nil {
			return v
		}
		var m map[string]any
		if json.Unmarshal(b, &m) != nil || len(m) != 1 {
			return v
		}
		for k := range m {
			if k != "Ref" && !strings.HasPrefix(k, "Fn::") {
				return v
			}
		}
		if ga, ok := m["Fn::GetAtt"].(string); ok { // short form "Res.Attr"
			r, a, _ := strings.Cut(ga, ".")
			m["Fn::GetAtt"] = []any{r, a}
		}
		return decodeIntrinsics(m)
	case *string:
		if v == nil {
			return nil
		}
		return decodeIntrinsics(*v)
	case map[string]any:
		out := map[string]any{}
		for k, x := range v {
			out[k] = decodeIntrinsics(x)
		}
		return out
	case []any:
		out := make([]any, len(v))
		for i, x := range v {
			out[i] = decodeIntrinsics(x)
		}
		return out
	case []string:
		out := make([]any, len(v))
		for i, x := range v {
			out[i] = decodeIntrinsics(x)
		}
		return out
	}
	return v
}

func ref(name string) string { return canon(map[string]any{"Ref": name}) }
func getAtt(res, attr string) string {
	return canon(map[string]any{"Fn::GetAtt": []any{res, attr}})
}

func mustType[T any](t *testing.T, rs map[string]cloudformation.Resource, name string) T {
	t.Helper()
	r, ok := rs[name].(T)
	if !ok {
		t.Fatalf("resource %s is %T, want %T", name, rs[name], *new(T))
	}
	return r
}

func deref[T any](p *T) T {
	var z T
	if p == nil {
		return z
	}
	return *p
}

// grants flattens a role's inline policies into sorted "Effect action on resource" lines.
func grants(t *testing.T, role iam.Role) []string {
	t.Helper()
	var out []string
	for _, p := range role.Policies {
		doc := decodeIntrinsics(p.PolicyDocument).(map[string]any)
		for _, s := range doc["Statement"].([]any) {
			s := s.(map[string]any)
			for _, bad := range []string{"NotAction", "NotResource", "NotPrincipal"} {
				if _, ok := s[bad]; ok {
					t.Errorf("%s: statement uses %s", p.PolicyName, bad)
				}
			}
			acts, res := s["Action"], s["Resource"]
			as, ok := acts.([]any)
			if !ok {
				as = []any{acts}
			}
			rs, ok := res.([]any)
			if !ok {
				rs = []any{res}
			}
			for _, a := range as {
				for _, r := range rs {
					out = append(out, fmt.Sprintf("%v %v on %s", s["Effect"], a, canon(r)))
				}
			}
		}
	}
	sort.Strings(out)
	return out
}

func TestTemplateTyped(t *testing.T) {
	rs, processed := parseTyped(t)

	// Parameters.
	params := processed["Parameters"].(map[string]any)
	for _, p := range []string{"BaseModelS3Uri", "InstanceType", "MinReplicas", "MaxReplicas", "VpcId", "SubnetIds"} {
		if _, ok := params[p]; !ok {
			t.Errorf("parameter %s missing", p)
		}
	}
	it := params["InstanceType"].(map[string]any)
	if it["Default"] != "g6e.xlarge" {
		t.Errorf("InstanceType default = %v", it["Default"])
	}
	for _, v := range it["AllowedValues"].([]any) {
		if !regexp.MustCompile(`^(p5|g6e|g5)\.[0-9]*x?large$`).MatchString(v.(string)) {
			t.Errorf("InstanceType allows %v (only p5/g6e/g5)", v)
		}
	}
	if mr := params["MinReplicas"].(map[string]any); mr["MinValue"] != float64(0) {
		t.Errorf("MinReplicas MinValue = %v, want 0", mr["MinValue"])
	}
	if p := params["VpcId"].(map[string]any); p["Type"] != "AWS::EC2::VPC::Id" {
		t.Errorf("VpcId type %v", p["Type"])
	}
	if p := params["SubnetIds"].(map[string]any); p["Type"] != "List<AWS::EC2::Subnet::Id>" {
		t.Errorf("SubnetIds type %v", p["Type"])
	}
	outs := processed["Outputs"].(map[string]any)
	if o := outs["AdapterBucketName"]; o == nil || canon(o.(map[string]any)["Value"]) != ref("AdapterBucket") {
		t.Errorf("Output AdapterBucketName = %v", o)
	}
	if o := outs["EndpointURL"]; o == nil || !strings.Contains(canon(o.(map[string]any)["Value"]), "${LoadBalancer.DNSName}") {
		t.Errorf("Output EndpointURL = %v", o)
	}

	// The container: one GPU, port 8080, env, logs.
	td := mustType[*ecs.TaskDefinition](t, rs, "TaskDefinition")
	if len(td.ContainerDefinitions) != 1 {
		t.Fatalf("%d containers", len(td.ContainerDefinitions))
	}
	c := td.ContainerDefinitions[0]
	if len(c.ResourceRequirements) != 1 || c.ResourceRequirements[0].Type != "GPU" || c.ResourceRequirements[0].Value != "1" {
		t.Errorf("ResourceRequirements = %+v, want GPU 1", c.ResourceRequirements)
	}
	if len(c.PortMappings) != 1 || deref(c.PortMappings[0].ContainerPort) != ContainerPort {
		t.Errorf("PortMappings = %+v", c.PortMappings)
	}
	env := map[string]string{}
	for _, e := range c.Environment {
		env[deref(e.Name)] = canon(e.Value)
	}
	for _, n := range []string{"PEFTD_STORE", "PEFTD_SQS_QUEUE_URL", "PEFTD_MODEL"} {
		if _, ok := env[n]; !ok {
			t.Errorf("container env lacks %s", n)
		}
	}
	if env["PEFTD_MODEL"] != ref("BaseModelS3Uri") {
		t.Errorf("PEFTD_MODEL = %s", env["PEFTD_MODEL"])
	}
	if !strings.Contains(env["PEFTD_STORE"], `s3://${AdapterBucket}/${AdapterPrefix}`) {
		t.Errorf("PEFTD_STORE = %s, want the adapter bucket and prefix", env["PEFTD_STORE"])
	}
	var queueRef struct {
		Ref string `json:"Ref"`
	}
	if err := json.Unmarshal([]byte(env["PEFTD_SQS_QUEUE_URL"]), &queueRef); err != nil || queueRef.Ref == "" {
		t.Fatalf("PEFTD_SQS_QUEUE_URL = %s, want a Ref to the queue", env["PEFTD_SQS_QUEUE_URL"])
	}
	queue := queueRef.Ref
	mustType[*sqs.Queue](t, rs, queue)
	if !strings.Contains(env["PEFTD_STORE"], "sqs_queue=${"+queue+"}") {
		t.Errorf("PEFTD_STORE = %s, want sqs_queue=${%s}", env["PEFTD_STORE"], queue)
	}
	// API keys: peftd refuses a public --listen without them.
	if len(c.Secrets) != 1 || canon(c.Secrets[0].ValueFrom) != ref("ApiKeysSecret") ||
		!strings.Contains(strings.Join(c.Command, " "), "--api-keys /tmp/peftd-api-keys") ||
		!strings.Contains(strings.Join(c.Command, " "), "$"+c.Secrets[0].Name) {
		t.Errorf("API keys not wired: Secrets %+v Command %q", c.Secrets, c.Command)
	}
	if c.LogConfiguration == nil || c.LogConfiguration.LogDriver != "awslogs" ||
		canon(c.LogConfiguration.Options["awslogs-group"]) != ref("LogGroup") {
		t.Errorf("LogConfiguration = %+v", c.LogConfiguration)
	}
	if canon(td.TaskRoleArn) != getAtt("TaskRole", "Arn") || canon(td.ExecutionRoleArn) != getAtt("ExecutionRole", "Arn") {
		t.Errorf("task roles = %s / %s", canon(td.TaskRoleArn), canon(td.ExecutionRoleArn))
	}
	if !slices.Contains(td.RequiresCompatibilities, "EC2") {
		t.Errorf("RequiresCompatibilities = %v", td.RequiresCompatibilities)
	}

	// The bucket notifies exactly that queue of creations and removals, and
	// the queue policy lets that bucket (and only S3) send.
	bucket := mustType[*s3.Bucket](t, rs, "AdapterBucket")
	if bucket.NotificationConfiguration == nil {
		t.Fatal("AdapterBucket has no NotificationConfiguration")
	}
	events := map[string]bool{}
	for _, qc := range bucket.NotificationConfiguration.QueueConfigurations {
		if canon(qc.Queue) != getAtt(queue, "Arn") {
			t.Errorf("bucket notifies %s, but the service reads %s", canon(qc.Queue), queue)
		}
		events[qc.Event] = true
	}
	if !events["s3:ObjectCreated:*"] || !events["s3:ObjectRemoved:*"] || len(events) != 2 {
		t.Errorf("bucket events = %v", events)
	}
	var qp *sqs.QueuePolicy
	for name, r := range rs {
		if p, ok := r.(*sqs.QueuePolicy); ok && slices.ContainsFunc(p.Queues, func(q string) bool { return canon(q) == ref(queue) }) {
			qp = p
			if !slices.Contains(bucket.AWSCloudFormationDependsOn, name) {
				t.Errorf("AdapterBucket must DependsOn %s (S3 validates the destination on create)", name)
			}
		}
	}
	if qp == nil {
		t.Fatalf("no QueuePolicy for %s", queue)
	}
	qdoc := canon(qp.PolicyDocument)
	for _, want := range []string{`"Service":"s3.amazonaws.com"`, `"Action":"sqs:SendMessage"`, `"aws:SourceArn"`, getAtt(queue, "Arn")} {
		if !strings.Contains(qdoc, want) {
			t.Errorf("queue policy lacks %s: %s", want, qdoc)
		}
	}
	// The SourceArn names the bucket's (computed) name.
	bn := canon(bucket.BucketName)
	nameExpr := regexp.MustCompile(`peftd-\$\{AWS::AccountId\}-\$\{StackUuid\}`)
	if !nameExpr.MatchString(bn) || !nameExpr.MatchString(qdoc) {
		t.Errorf("bucket name %s and queue policy SourceArn do not agree", bn)
	}

	// IAM: exactly these grants.
	task := mustType[*iam.Role](t, rs, "TaskRole")
	wantTask := []string{
		"Allow s3:GetObject on " + canon(map[string]any{"Fn::Sub": "${AdapterBucket.Arn}/${AdapterPrefix}*"}),
		"Allow s3:GetObject on " + canon(map[string]any{"Fn::Sub": []any{"arn:${AWS::Partition}:s3:::${ModelPath}*",
			map[string]any{"ModelPath": map[string]any{"Fn::Select": []any{1, map[string]any{"Fn::Split": []any{"s3://", map[string]any{"Ref": "BaseModelS3Uri"}}}}}}}}),
		"Allow s3:ListBucket on " + getAtt("AdapterBucket", "Arn"),
		"Allow sqs:DeleteMessage on " + getAtt(queue, "Arn"),
		"Allow sqs:GetQueueAttributes on " + getAtt(queue, "Arn"),
		"Allow sqs:ReceiveMessage on " + getAtt(queue, "Arn"),
	}
	sort.Strings(wantTask)
	if got := grants(t, *task); !slices.Equal(got, wantTask) {
		t.Errorf("TaskRole grants:\n  %s\nwant:\n  %s", strings.Join(got, "\n  "), strings.Join(wantTask, "\n  "))
	}
	if len(task.ManagedPolicyArns) != 0 || task.PermissionsBoundary != nil {
		t.Errorf("TaskRole has managed policies %v", task.ManagedPolicyArns)
	}
	if !strings.Contains(canon(task.Policies[0].PolicyDocument), `"s3:prefix":[`) {
		t.Error("TaskRole s3:ListBucket is not limited to the adapter prefix")
	}
	exec := mustType[*iam.Role](t, rs, "ExecutionRole")
	ecrRepo := canon(map[string]any{"Fn::Sub": "arn:${AWS::Partition}:ecr:${AWS::Region}:${AWS::AccountId}:repository/*"})
	wantExec := []string{
		"Allow ecr:BatchCheckLayerAvailability on " + ecrRepo,
		"Allow ecr:BatchGetImage on " + ecrRepo,
		"Allow ecr:GetAuthorizationToken on \"*\"",
		"Allow ecr:GetDownloadUrlForLayer on " + ecrRepo,
		"Allow logs:CreateLogStream on " + getAtt("LogGroup", "Arn"),
		"Allow secretsmanager:GetSecretValue on " + ref("ApiKeysSecret"),
		"Allow logs:PutLogEvents on " + getAtt("LogGroup", "Arn"),
	}
	sort.Strings(wantExec)
	if got := grants(t, *exec); !slices.Equal(got, wantExec) {
		t.Errorf("ExecutionRole grants:\n  %s\nwant:\n  %s", strings.Join(got, "\n  "), strings.Join(wantExec, "\n  "))
	}
	if len(exec.ManagedPolicyArns) != 0 {
		t.Errorf("ExecutionRole has managed policies %v", exec.ManagedPolicyArns)
	}
	for _, role := range []*iam.Role{task, exec} {
		if d := canon(role.AssumeRolePolicyDocument); !strings.Contains(d, `"Service":"ecs-tasks.amazonaws.com"`) {
			t.Errorf("task/execution role trust = %s", d)
		}
	}
	for name, r := range rs {
		switch r.(type) {
		case *iam.Policy, *iam.ManagedPolicy, *iam.RolePolicy:
			t.Errorf("%s: stand-alone IAM policies would bypass the grant assertions", name)
		}
	}

	// ALB target group health check, service wiring.
	tg := mustType[*elasticloadbalancingv2.TargetGroup](t, rs, "TargetGroup")
	if deref(tg.HealthCheckPath) != HealthPath || deref(tg.Port) != ContainerPort {
		t.Errorf("TargetGroup health check %q port %d", deref(tg.HealthCheckPath), deref(tg.Port))
	}
	svc := mustType[*ecs.Service](t, rs, "Service")
	if len(svc.LoadBalancers) != 1 || canon(svc.LoadBalancers[0].TargetGroupArn) != ref("TargetGroup") ||
		deref(svc.LoadBalancers[0].ContainerPort) != ContainerPort || deref(svc.LoadBalancers[0].ContainerName) != c.Name {
		t.Errorf("Service LoadBalancers = %+v", svc.LoadBalancers)
	}
	if len(svc.CapacityProviderStrategy) != 1 || canon(svc.CapacityProviderStrategy[0].CapacityProvider) != ref("CapacityProvider") {
		t.Errorf("Service CapacityProviderStrategy = %+v", svc.CapacityProviderStrategy)
	}
	if svc.LaunchType != nil {
		t.Error("Service sets LaunchType; it must use the GPU capacity provider")
	}

	// GPU capacity: ECS GPU AMI from SSM, instance type parameter.
	cp := mustType[*ecs.CapacityProvider](t, rs, "CapacityProvider")
	if cp.AutoScalingGroupProvider == nil || canon(cp.AutoScalingGroupProvider.AutoScalingGroupArn) != ref("AutoScalingGroup") ||
		cp.AutoScalingGroupProvider.ManagedScaling == nil || deref(cp.AutoScalingGroupProvider.ManagedScaling.Status) != "ENABLED" {
		t.Errorf("CapacityProvider = %+v", cp.AutoScalingGroupProvider)
	}
	lt := mustType[*ec2.LaunchTemplate](t, rs, "LaunchTemplate")
	if canon(lt.LaunchTemplateData.InstanceType) != ref("InstanceType") || canon(lt.LaunchTemplateData.ImageId) != ref("EcsGpuAmiId") {
		t.Errorf("LaunchTemplate image %s type %s", canon(lt.LaunchTemplateData.ImageId), canon(lt.LaunchTemplateData.InstanceType))
	}
	ami := params["EcsGpuAmiId"].(map[string]any)
	if ami["Type"] != "AWS::SSM::Parameter::Value<AWS::EC2::Image::Id>" || !strings.Contains(fmt.Sprint(ami["Default"]), "/aws/service/ecs/optimized-ami/") || !strings.Contains(fmt.Sprint(ami["Default"]), "/gpu/") {
		t.Errorf("EcsGpuAmiId = %v", ami)
	}
	if ud := canon(lt.LaunchTemplateData.UserData); !strings.Contains(ud, "ECS_ENABLE_GPU_SUPPORT=true") || !strings.Contains(ud, "ECS_CLUSTER=${Cluster}") {
		t.Errorf("UserData = %s", ud)
	}

	// Scaling: target tracking on ALBRequestCountPerTarget, min from the
	// parameter (may be 0), and alarm-driven step policies to/from zero.
	st := mustType[*applicationautoscaling.ScalableTarget](t, rs, "ScalableTarget")
	if st.ScalableDimension != "ecs:service:DesiredCount" || !strings.Contains(canon(st.ResourceId), "${Service.Name}") {
		t.Errorf("ScalableTarget = %+v", st)
	}
	rawST := processed["Resources"].(map[string]any)["ScalableTarget"].(map[string]any)["Properties"].(map[string]any)
	if rawST["MinCapacity"] != params["MinReplicas"].(map[string]any)["Default"] || rawST["MaxCapacity"] != params["MaxReplicas"].(map[string]any)["Default"] {
		t.Errorf("ScalableTarget capacity = %v..%v, want the MinReplicas..MaxReplicas parameters", rawST["MinCapacity"], rawST["MaxCapacity"])
	}
	var tracking, fromZero, toZero bool
	for name, r := range rs {
		p, ok := r.(*applicationautoscaling.ScalingPolicy)
		if !ok {
			continue
		}
		if canon(p.ScalingTargetId) != ref("ScalableTarget") {
			t.Errorf("%s targets %s", name, canon(p.ScalingTargetId))
		}
		if tc := p.TargetTrackingScalingPolicyConfiguration; tc != nil && tc.PredefinedMetricSpecification != nil &&
			tc.PredefinedMetricSpecification.PredefinedMetricType == "ALBRequestCountPerTarget" {
			tracking = strings.Contains(canon(tc.PredefinedMetricSpecification.ResourceLabel), "${TargetGroup.TargetGroupFullName}")
		}
		if sc := p.StepScalingPolicyConfiguration; sc != nil {
			alarm := alarmFor(rs, name)
			if alarm == nil {
				t.Errorf("step policy %s has no alarm", name)
				continue
			}
			adj := sc.StepAdjustments[0].ScalingAdjustment
			switch {
			case deref(sc.AdjustmentType) == "ChangeInCapacity" && adj > 0 && alarm.MetricName != nil &&
				strings.HasPrefix(*alarm.MetricName, "HTTPCode_ELB_5") && deref(alarm.Namespace) == "AWS/ApplicationELB":
				fromZero = true
			case deref(sc.AdjustmentType) == "ExactCapacity" && adj == 0 && deref(alarm.MetricName) == "RequestCount" &&
				deref(alarm.TreatMissingData) == "breaching":
				toZero = true
			}
		}
	}
	if !tracking || !fromZero || !toZero {
		t.Errorf("scaling: ALBRequestCountPerTarget tracking %v, scale-from-zero %v, scale-to-zero %v", tracking, fromZero, toZero)
	}
}

func alarmFor(rs map[string]cloudformation.Resource, policy string) *cloudwatch.Alarm {
	for _, r := range rs {
		if a, ok := r.(*cloudwatch.Alarm); ok && slices.ContainsFunc(a.AlarmActions, func(s string) bool { return canon(s) == ref(policy) }) {
			return a
		}
	}
	return nil
}

// TestTemplateCfnLint runs cfn-lint (shipped with this project's machine
// image's Python) over template.yaml: resource schemas, property types,
// ECS/ALB cross-checks that goformation's structs don't know.
func TestTemplateCfnLint(t *testing.T) {
	if testing.Short() {
		t.Skip("cfn-lint takes a few seconds")
	}
	lint := requireTool(t, "cfn-lint on template.yaml", "cfn-lint")
	cmd := exec.Command(lint, "--non-zero-exit-code", "warning", templateFile)
	cmd.Dir = repoRoot(t)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("cfn-lint: %v\n%s", err, out)
	}
}
