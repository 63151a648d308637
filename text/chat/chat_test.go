package chat

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

const (
	repoRoot       = "../.."
	llama3Dir      = repoRoot + "/testdata/llama3-tokenizer"
	llama3Model    = llama3Dir + "/model"
	stories260K    = repoRoot + "/models/stories260K"
	simpleTemplate = "{% for m in messages %}{{ m.role }}:{{ m.content }}\n{% endfor %}"
)

var fixedNow = func() time.Time { return time.Date(2025, 3, 5, 14, 7, 9, 0, time.UTC) }

type chatCase struct {
	Messages            []Message `json:"messages"`
	AddGenerationPrompt bool      `json:"add_generation_prompt"`
	Text                string    `json:"text"`
}

// TestLlama31Fixture renders every chat case of testdata/llama3-tokenizer/expected.json
// with the real Llama 3.1 tokenizer_config.json and compares byte for byte.
func TestLlama31Fixture(t *testing.T) {
	if _, err := os.Stat(filepath.Join(llama3Model, "tokenizer_config.json")); err != nil {
		if os.Getenv("PEFTD_SKIP_NPM") == "1" {
			t.Skipf("PEFTD_SKIP_NPM=1 and %s is missing: %v", llama3Model, err)
		}
		t.Fatalf("Llama 3.1 tokenizer model folder missing (%v): run .ci/setup-tokenizer.sh (or set PEFTD_SKIP_NPM=1 to skip)", err)
	}
	tmpl, err := LoadTemplate(llama3Model)
	if err != nil {
		t.Fatalf("LoadTemplate: %v", err)
	}
	tmpl.Now = fixedNow
	if got, want := tmpl.BOSToken(), "<|begin_of_text|>"; got != want {
		t.Errorf("bos_token = %q, want %q", got, want)
	}
	if got, want := tmpl.EOSToken(), "<|eot_id|>"; got != want {
		t.Errorf("eos_token = %q, want %q", got, want)
	}

	checkChatFixture(t, tmpl, filepath.Join(llama3Dir, "expected.json"))
}

// checkChatFixture renders every chat case of a tokenizer fixture
// (tools/make_tokenizer_fixture.py: transformers' apply_chat_template) with
// tmpl and compares byte for byte.
func checkChatFixture(t *testing.T, tmpl *Template, path string) {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var fx struct {
		Chat []chatCase `json:"chat"`
	}
	if err := json.Unmarshal(raw, &fx); err != nil {
		t.Fatal(err)
	}
	if len(fx.Chat) == 0 {
		t.Fatalf("%s has no chat cases", path)
	}
	for i, c := range fx.Chat {
		got, err := tmpl.Render(c.Messages, c.AddGenerationPrompt)
		if err != nil {
			t.Errorf("case %d: Render: %v", i, err)
			continue
		}
		if got != c.Text {
			t.Errorf("case %d: Render mismatch\n got: %q\nwant: %q", i, got, c.Text)
		}
	}
}

// TestLlama32Template checks a full upstream Llama 3.x template (date lines via
// strftime_now, system-message extraction, trim/lstrip_blocks) against Python jinja2.
func TestLlama32Template(t *testing.T) {
	src, err := os.ReadFile("testdata/llama3.2-instruct.jinja")
	if err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile("testdata/llama3.2-instruct.expected.json")
	if err != nil {
		t.Fatal(err)
	}
	var fx struct {
		Now   time.Time  `json:"now"`
		Cases []chatCase `json:"cases"`
	}
	if err := json.Unmarshal(raw, &fx); err != nil {
		t.Fatal(err)
	}
	tmpl, err := NewTemplate(string(src), "<|begin_of_text|>", "<|eot_id|>")
	if err != nil {
		t.Fatal(err)
	}
	tmpl.Now = func() time.Time { return fx.Now }
	for i, c := range fx.Cases {
		got, err := tmpl.Render(c.Messages, c.AddGenerationPrompt)
		if err != nil {
			t.Errorf("case %d: Render: %v", i, err)
			continue
		}
		if got != c.Text {
			t.Errorf("case %d: Render mismatch\n got: %q\nwant: %q", i, got, c.Text)
		}
		if !strings.Contains(got, "Today Date: 05 Mar 2025\n") {
			t.Errorf("case %d: missing date line from strftime_now: %q", i, got)
		}
	}
}

func writeConfig(t *testing.T, cfg string) string {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "tokenizer_config.json"), []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

func TestLoadTemplate(t *testing.T) {
	msgs := []Message{{Role: "user", Content: "hi"}}
	tests := []struct {
		name    string
		dir     func(t *testing.T) string
		wantErr error  // errors.Is target; nil means success
		errSub  string // substring of the error, if an error is expected
		want    string // rendering of msgs with add_generation_prompt=true
	}{
		{
			name:    "stories260K has no chat template",
			dir:     func(*testing.T) string { return stories260K },
			wantErr: ErrNoTemplate,
		},
		{
			name: "string template, string tokens",
			dir: func(t *testing.T) string {
				return writeConfig(t, `{"chat_template": "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}", "bos_token": "<s>", "eos_token": "</s>"}`)
			},
			want: "<s>[user]hi</s>[assistant]",
		},
		{
			name: "list form uses default, token objects",
			dir: func(t *testing.T) string {
				return writeConfig(t, `{"chat_template": [
					{"name": "tool_use", "template": "TOOLS"},
					{"name": "default", "template": "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}"},
					{"name": "rag", "template": "RAG"}],
				"bos_token": {"content": "<B>", "lstrip": false}, "eos_token": {"content": "<E>"}}`)
			},
			want: "<B>hi<E>",
		},
		{
			name: "list form without default",
			dir: func(t *testing.T) string {
				return writeConfig(t, `{"chat_template": [{"name": "tool_use", "template": "x"}]}`)
			},
			wantErr: ErrNoTemplate,
			errSub:  "tool_use",
		},
		{
			name:    "null chat_template",
			dir:     func(t *testing.T) string { return writeConfig(t, `{"chat_template": null, "bos_token": null}`) },
			wantErr: ErrNoTemplate,
		},
		{
			name: "chat_template.jinja side file",
			dir: func(t *testing.T) string {
				dir := writeConfig(t, `{"bos_token": "<s>"}`)
				if err := os.WriteFile(filepath.Join(dir, "chat_template.jinja"), []byte("{{ bos_token }}{{ messages[0].content }}"), 0o644); err != nil {
					t.Fatal(err)
				}
				return dir
			},
			want: "<s>hi",
		},
		{
			name:   "missing folder",
			dir:    func(t *testing.T) string { return filepath.Join(t.TempDir(), "nope") },
			errSub: "tokenizer_config.json",
		},
		{
			name:   "syntax error in template",
			dir:    func(t *testing.T) string { return writeConfig(t, `{"chat_template": "{% for m in messages %}"}`) },
			errSub: "compiling chat template",
		},
		{
			name:   "bad chat_template type",
			dir:    func(t *testing.T) string { return writeConfig(t, `{"chat_template": 42}`) },
			errSub: "chat_template must be",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tmpl, err := LoadTemplate(tc.dir(t))
			if tc.wantErr != nil || tc.errSub != "" {
				if err == nil {
					t.Fatalf("LoadTemplate succeeded, want error")
				}
				if tc.wantErr != nil && !errors.Is(err, tc.wantErr) {
					t.Errorf("error %v is not %v", err, tc.wantErr)
				}
				if !strings.Contains(err.Error(), tc.errSub) {
					t.Errorf("error %q does not contain %q", err, tc.errSub)
				}
				return
			}
			if err != nil {
				t.Fatalf("LoadTemplate: %v", err)
			}
			got, err := tmpl.Render(msgs, true)
			if err != nil {
				t.Fatalf("Render: %v", err)
			}
			if got != tc.want {
				t.Errorf("Render = %q, want %q", got, tc.want)
			}
		})
	}
}

func TestRender(t *testing.T) {
	const roleCheck = `{% for m in messages %}{% if m.role not in ['system', 'user', 'assistant'] %}{{ raise_exception('Unsupported role: ' + m.role) }}{% endif %}<{{ m.role }}>{{ m.content | trim }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}`
	tests := []struct {
		name      string
		src       string
		msgs      []Message
		gen       bool
		want      string
		errSub    string
		wantRaise bool // error must be a *TemplateError
	}{
		{
			name: "basic with generation prompt",
			src:  roleCheck,
			msgs: []Message{{Role: "system", Content: "sys"}, {Role: "user", Content: "  hi \n"}},
			gen:  true,
			want: "<system>sys<user>hi<assistant>",
		},
		{
			name: "no generation prompt",
			src:  roleCheck,
			msgs: []Message{{Role: "user", Content: "hi"}, {Role: "assistant", Content: "yo"}},
			want: "<user>hi<assistant>yo",
		},
		{
			name:      "raise_exception on bad role",
			src:       roleCheck,
			msgs:      []Message{{Role: "wizard", Content: "hi"}},
			errSub:    "Unsupported role: wizard",
			wantRaise: true,
		},
		{
			name:   "empty message list",
			src:    roleCheck,
			msgs:   nil,
			errSub: "no messages",
		},
		{
			name:   "empty role",
			src:    roleCheck,
			msgs:   []Message{{Role: "user", Content: "a"}, {Role: "", Content: "b"}},
			errSub: "message 1 has an empty role",
		},
		{
			name: "filter binds tighter than +",
			src:  `{% for m in messages %}{{ '[' + m['content'] | trim + ']' }}{% endfor %}`,
			msgs: []Message{{Role: "user", Content: "  x  "}},
			want: "[x]",
		},
		{
			name: "globals: tools none, date_string undefined, strftime_now",
			src:  `{{ tools is none }}|{{ date_string is defined }}|{{ strftime_now('%d %b %Y') }}|{{ strftime_now('%-d/%-m %H:%M:%S %A %B %j %y %p %I %%') }}`,
			msgs: []Message{{Role: "user"}},
			want: "True|False|05 Mar 2025|5/3 14:07:09 Wednesday March 064 25 PM 02 %",
		},
		{
			name:   "runtime error is wrapped",
			src:    `{{ messages[0].content | nosuchfilter }}`,
			msgs:   []Message{{Role: "user", Content: "x"}},
			errSub: "chat: rendering chat template",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tmpl, err := NewTemplate(tc.src, "<s>", "</s>")
			if err != nil {
				t.Fatalf("NewTemplate: %v", err)
			}
			tmpl.Now = fixedNow
			got, err := tmpl.Render(tc.msgs, tc.gen)
			if tc.errSub != "" {
				if err == nil {
					t.Fatalf("Render = %q, want error containing %q", got, tc.errSub)
				}
				if !strings.Contains(err.Error(), tc.errSub) {
					t.Errorf("error %q does not contain %q", err, tc.errSub)
				}
				var te *TemplateError
				if errors.As(err, &te) != tc.wantRaise {
					t.Errorf("errors.As(*TemplateError) = %v, want %v (err %v)", !tc.wantRaise, tc.wantRaise, err)
				}
				return
			}
			if err != nil {
				t.Fatalf("Render: %v", err)
			}
			if got != tc.want {
				t.Errorf("Render = %q, want %q", got, tc.want)
			}
		})
	}
}

func TestNewTemplateErrors(t *testing.T) {
	tests := []struct {
		name, src, errSub string
	}{
		{"empty", "  ", "empty chat template"},
		{"unclosed tag", "{{ messages ", "compiling chat template"},
		{"unclosed block", "{% if add_generation_prompt %}x", "compiling chat template"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := NewTemplate(tc.src, "", "")
			if err == nil || !strings.Contains(err.Error(), tc.errSub) {
				t.Fatalf("NewTemplate error = %v, want containing %q", err, tc.errSub)
			}
		})
	}
}

func TestMessageUnmarshalJSON(t *testing.T) {
	tests := []struct {
		name   string
		in     string
		want   Message
		errSub string
	}{
		{name: "string content", in: `{"role":"user","content":"hello"}`, want: Message{Role: "user", Content: "hello"}},
		{name: "null content", in: `{"role":"assistant","content":null}`, want: Message{Role: "assistant"}},
		{name: "missing content", in: `{"role":"assistant"}`, want: Message{Role: "assistant"}},
		{
			name: "text parts concatenated",
			in:   `{"role":"user","content":[{"type":"text","text":"Hello, "},{"type":"text","text":"world"}]}`,
			want: Message{Role: "user", Content: "Hello, world"},
		},
		{name: "empty parts", in: `{"role":"user","content":[]}`, want: Message{Role: "user"}},
		{
			name:   "image part rejected",
			in:     `{"role":"user","content":[{"type":"text","text":"a"},{"type":"image_url","image_url":{"url":"x"}}]}`,
			errSub: `content part 1 has unsupported type "image_url"`,
		},
		{name: "text part without text", in: `{"role":"user","content":[{"type":"text"}]}`, errSub: `no "text" field`},
		{name: "number content", in: `{"role":"user","content":5}`, errSub: "must be a string or an array"},
		{name: "malformed", in: `{"role":`, errSub: ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var m Message
			err := json.Unmarshal([]byte(tc.in), &m)
			if tc.errSub != "" || tc.name == "malformed" {
				if err == nil || !strings.Contains(err.Error(), tc.errSub) {
					t.Fatalf("error = %v, want containing %q", err, tc.errSub)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if m != tc.want {
				t.Errorf("got %+v, want %+v", m, tc.want)
			}
		})
	}

	// A request body with a list of messages decodes and renders.
	var req struct {
		Messages []Message `json:"messages"`
	}
	body := `{"messages":[{"role":"user","content":[{"type":"text","text":"What is "},{"type":"text","text":"LoRA?"}]}]}`
	if err := json.Unmarshal([]byte(body), &req); err != nil {
		t.Fatal(err)
	}
	tmpl, err := NewTemplate(simpleTemplate, "", "")
	if err != nil {
		t.Fatal(err)
	}
	got, err := tmpl.Render(req.Messages, false)
	if err != nil {
		t.Fatal(err)
	}
	if want := "user:What is LoRA?\n"; got != want {
		t.Errorf("Render = %q, want %q", got, want)
	}
}

func TestStrftime(t *testing.T) {
	midnight := time.Date(2024, 7, 6, 0, 5, 0, 123456000, time.UTC)
	tests := []struct{ format, want string }{
		{"%d %b %Y", "06 Jul 2024"},
		{"%-d %B %Y", "6 July 2024"},
		{"%Y-%m-%d", "2024-07-06"},
		{"%I:%M %p", "12:05 AM"},
		{"%e|%a|%f|%F %T|%Z", " 6|Sat|123456|2024-07-06 00:05:00|UTC"},
		{"100%% %q trailing %", "100% %q trailing %"},
	}
	for _, tc := range tests {
		if got := strftime(midnight, tc.format); got != tc.want {
			t.Errorf("strftime(%q) = %q, want %q", tc.format, got, tc.want)
		}
	}
}
