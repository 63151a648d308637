package api_test

import (
	"encoding/json"
	"fmt"
	"testing"
)

// TestUnsupportedFields: OpenAI fields peftd does not implement are taken
// at their neutral values, which clients send by default, and refused with
// a 400 naming the field otherwise, never silently ignored.
func TestUnsupportedFields(t *testing.T) {
	url, _ := storiesServer(t, true, nil)
	for _, c := range []struct {
		field   string
		neutral string
		other   string
	}{
		{"presence_penalty", "0", "0.5"},
		{"frequency_penalty", "0", "-1"},
		{"repetition_penalty", "1", "1.2"},
		{"logit_bias", "{}", `{"50": -100}`},
		{"tools", "[]", `[{"type":"function","function":{"name":"f"}}]`},
		{"tool_choice", `"none"`, `"auto"`},
		{"functions", "null", `[{"name":"f"}]`},
		{"response_format", `{"type":"text"}`, `{"type":"json_object"}`},
		{"suffix", `""`, `"the end"`},
	} {
		for _, route := range []struct{ path, body string }{
			{"/v1/completions", `{"model":"pirate","prompt":"Once","max_tokens":2,"%s":%s}`},
			{"/v1/chat/completions", `{"model":"pirate","messages":[{"role":"user","content":"hi"}],"max_tokens":2,"%s":%s}`},
		} {
			if c.field == "suffix" && route.path != "/v1/completions" {
				continue
			}
			var ok, bad map[string]any
			if err := json.Unmarshal([]byte(fmt.Sprintf(route.body, c.field, c.neutral)), &ok); err != nil {
				t.Fatal(err)
			}
			if err := json.Unmarshal([]byte(fmt.Sprintf(route.body, c.field, c.other)), &bad); err != nil {
				t.Fatal(err)
			}
			if r := do(t, "POST", url+route.path, ok); r.Status != 200 {
				t.Errorf("%s %s=%s: %d %s, want 200", route.path, c.field, c.neutral, r.Status, r.Body)
			}
			wantErr(t, do(t, "POST", url+route.path, bad), 400, c.field)
		}
	}
}
