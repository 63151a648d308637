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

// TestPenaltyFields: presence_penalty, frequency_penalty,
// repetition_penalty and logit_bias are taken on the three routes; values
// out of range, a logit_bias that is not an object of token ids to numbers
// in [-100, 100], or one naming a token outside the vocabulary get a 400
// naming the field. A bias of +100 makes its token every pick, on the
// native route and the OpenAI ones.
func TestPenaltyFields(t *testing.T) {
	url, _ := storiesServer(t, true, nil)
	bad := []struct{ field, value string }{
		{"presence_penalty", "2.5"}, {"presence_penalty", `"high"`}, {"frequency_penalty", "-3"},
		{"repetition_penalty", "0"}, {"repetition_penalty", "-1"}, {"repetition_penalty", "1000"},
		{"logit_bias", `{"x": 1}`}, {"logit_bias", `{"-5": 1}`}, {"logit_bias", `{"5": 101}`}, {"logit_bias", `{"5": "a"}`},
		{"logit_bias", `[1, 2]`}, {"logit_bias", `{"99999999": 1}`}, {"logit_bias", `"5"`},
	}
	routes := []struct{ path, body string }{
		{"/v1/completions", `{"model":"pirate","prompt":"Once","max_tokens":4,"return_token_ids":true%s}`},
		{"/v1/chat/completions", `{"model":"pirate","messages":[{"role":"user","content":"hi"}],"max_tokens":4,"return_token_ids":true%s}`},
		{"/v1/adapters/pirate/invoke", `{"prompt":"Once","max_tokens":4%s}`},
	}
	body := func(t *testing.T, tmpl, extra string) map[string]any {
		var m map[string]any
		if err := json.Unmarshal([]byte(fmt.Sprintf(tmpl, extra)), &m); err != nil {
			t.Fatal(err)
		}
		return m
	}
	for _, route := range routes {
		for _, b := range bad {
			wantErr(t, do(t, "POST", url+route.path, body(t, route.body, fmt.Sprintf(`,%q:%s`, b.field, b.value))), 400, b.field)
		}
		ok := `,"presence_penalty":0.5,"frequency_penalty":-0.5,"repetition_penalty":1.3,"logit_bias":{"7":-100,"12":2.5}`
		if r := do(t, "POST", url+route.path, body(t, route.body, ok)); r.Status != 200 {
			t.Errorf("%s with penalties: %d %s", route.path, r.Status, r.Body)
		}
		r := do(t, "POST", url+route.path, body(t, route.body, `,"logit_bias":{"100":100}`))
		if r.Status != 200 {
			t.Fatalf("%s with a +100 bias: %d %s", route.path, r.Status, r.Body)
		}
		var ids []any
		switch m := r.JSON(t); {
		case m["choices"] != nil:
			ids, _ = m["choices"].([]any)[0].(map[string]any)["token_ids"].([]any)
		default:
			ids, _ = m["token_ids"].([]any)
		}
		if len(ids) != 4 {
			t.Fatalf("%s: token ids %v in %s", route.path, ids, r.Body)
		}
		for _, id := range ids {
			if id != float64(100) {
				t.Errorf("%s with logit_bias {100: +100}: token ids %v, want all 100", route.path, ids)
				break
			}
		}
	}
}
