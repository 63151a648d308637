package api_test

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// openaiDir installs the official openai npm package once per machine (in
// the temp dir, reused by later runs) and returns its folder.
func openaiDir(t *testing.T) string {
	t.Helper()
	if os.Getenv("PEFTD_SKIP_NPM") == "1" {
		t.Skip("PEFTD_SKIP_NPM=1: skipping the openai npm client test")
	}
	npm, err := exec.LookPath("npm")
	if err != nil {
		t.Fatal("npm is not installed (needed for the openai client test; set PEFTD_SKIP_NPM=1 to skip)")
	}
	if _, err := exec.LookPath("node"); err != nil {
		t.Fatal("node is not installed (needed for the openai client test; set PEFTD_SKIP_NPM=1 to skip)")
	}
	dir := os.Getenv("PEFTD_OPENAI_NPM_DIR")
	if dir == "" {
		dir = filepath.Join(os.TempDir(), "peftd-openai-npm")
	}
	if _, err := os.Stat(filepath.Join(dir, "node_modules", "openai", "package.json")); err == nil {
		return dir
	}
	// Install beside dir, then rename: concurrent test runs never see half an install.
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		t.Fatal(err)
	}
	tmp, err := os.MkdirTemp(filepath.Dir(dir), ".peftd-openai-npm-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(tmp)
	os.WriteFile(filepath.Join(tmp, "package.json"), []byte(`{"name":"peftd-openai-test","private":true,"type":"module"}`), 0o644)
	cmd := exec.Command(npm, "install", "--no-audit", "--no-fund", "--loglevel=error", "openai@^6")
	cmd.Dir = tmp
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("npm install openai: %v\n%s", err, out)
	}
	os.RemoveAll(dir + ".old")
	os.Rename(dir, dir+".old") // a broken earlier install
	if err := os.Rename(tmp, dir); err != nil {
		if _, e2 := os.Stat(filepath.Join(dir, "node_modules", "openai", "package.json")); e2 != nil {
			t.Fatal(err)
		}
	}
	os.RemoveAll(dir + ".old")
	return dir
}

const openaiScript = `
import OpenAI from 'openai';
const client = new OpenAI({ baseURL: process.env.PEFTD_URL + '/v1', apiKey: 'sk-test', maxRetries: 0 });
const out = {};
const c = await client.completions.create({ model: 'pirate', prompt: 'Once upon a time', max_tokens: 80, temperature: 0 });
out.completion = c.choices[0].text;
out.completionFinish = c.choices[0].finish_reason;
out.usage = c.usage;
const s = await client.completions.create({ model: 'pirate', prompt: 'Once upon a time', max_tokens: 80, temperature: 0,
  stream: true, stream_options: { include_usage: true } });
out.streamed = '';
for await (const ch of s) {
  if (ch.choices.length) { out.streamed += ch.choices[0].text; if (ch.choices[0].finish_reason) out.streamFinish = ch.choices[0].finish_reason; }
  if (ch.usage) out.streamUsage = ch.usage;
}
const chat = await client.chat.completions.create({ model: 'space', messages: [{ role: 'user', content: 'Tell me a story' }],
  max_tokens: 8, temperature: 0, logprobs: true, top_logprobs: 2 });
out.chat = chat.choices[0].message.content;
out.chatRole = chat.choices[0].message.role;
out.chatLogprobs = chat.choices[0].logprobs.content.length;
const cs = await client.chat.completions.create({ model: 'space', messages: [{ role: 'user', content: 'Tell me a story' }],
  max_tokens: 8, temperature: 0, stream: true });
out.chatStreamed = '';
for await (const ch of cs) { if (ch.choices.length) out.chatStreamed += ch.choices[0].delta.content ?? ''; }
const ids = await client.completions.create({ model: 'pirate', prompt: [1, 403, 407, 261, 378], max_tokens: 80, temperature: 0,
  return_token_ids: true });
out.idsText = ids.choices[0].text;
out.idsTokens = ids.choices[0].token_ids;
const batch = await client.completions.create({ model: 'pirate', prompt: [[1, 403, 407, 261, 378], [1, 403, 407]], max_tokens: 80,
  temperature: 0 });
out.batch = batch.choices.map(c => ({ index: c.index, text: c.text, finish: c.finish_reason }));
out.batchUsage = batch.usage;
const alone = await client.completions.create({ model: 'pirate', prompt: [1, 403, 407], max_tokens: 80, temperature: 0 });
out.alone = alone.choices[0].text;
const bs = await client.completions.create({ model: 'pirate', prompt: [[1, 403, 407, 261, 378], [1, 403, 407]], max_tokens: 80,
  temperature: 0, stream: true, stream_options: { include_usage: true } });
out.batchStreamed = ['', ''];
for await (const ch of bs) {
  for (const c of ch.choices) out.batchStreamed[c.index] += c.text;
  if (ch.usage) out.batchStreamUsage = ch.usage;
}
const models = await client.models.list();
out.models = models.data.map(m => m.id);
try {
  await client.completions.create({ model: 'nope', prompt: 'x' });
} catch (e) { out.errStatus = e.status; out.errMessage = e.message; }
console.log(JSON.stringify(out));
`

func TestOpenAINodeClient(t *testing.T) {
	dir := openaiDir(t)
	url, _ := storiesServer(t, true, nil)
	script := filepath.Join(dir, fmt.Sprintf("peftd_test_%d.mjs", os.Getpid()))
	defer os.Remove(script)
	if err := os.WriteFile(script, []byte(openaiScript), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("node", script)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "PEFTD_URL="+url)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("node: %v\n%s", err, out)
	}
	var got struct {
		Completion, CompletionFinish, Streamed, StreamFinish string
		Usage, StreamUsage                                   map[string]int
		Chat, ChatRole, ChatStreamed, IDsText                string
		IDsTokens                                            []int32
		ChatLogprobs                                         int
		Models                                               []string
		ErrStatus                                            int
		Batch                                                []struct {
			Index        int
			Text, Finish string
		}
		BatchUsage, BatchStreamUsage map[string]int
		Alone                        string
		BatchStreamed                []string
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if err := json.Unmarshal([]byte(lines[len(lines)-1]), &got); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	want := strings.TrimPrefix(pirateText, storyPrompt)
	if got.Completion != want || got.CompletionFinish != "stop" || got.Usage["prompt_tokens"] != 5 {
		t.Errorf("completion: %s", out)
	}
	if got.Streamed != want || got.StreamFinish != "stop" || got.StreamUsage["completion_tokens"] != got.Usage["completion_tokens"] {
		t.Errorf("streamed completion: %s", out)
	}
	if got.Chat == "" || got.ChatRole != "assistant" || got.ChatStreamed != got.Chat || got.ChatLogprobs == 0 {
		t.Errorf("chat: %s", out)
	}
	if got.IDsText != want || len(got.IDsTokens) == 0 || got.IDsTokens[len(got.IDsTokens)-1] != 1 {
		t.Errorf("token-id prompt: text %q, token_ids %v", got.IDsText, got.IDsTokens)
	}
	if len(got.Batch) != 2 || got.Batch[0].Index != 0 || got.Batch[1].Index != 1 || got.Batch[0].Text != want ||
		got.Batch[1].Text != got.Alone || got.Batch[0].Finish != "stop" || got.BatchUsage["prompt_tokens"] != 8 {
		t.Errorf("batched completion: %s", out)
	}
	if len(got.BatchStreamed) != 2 || got.BatchStreamed[0] != want || got.BatchStreamed[1] != got.Alone ||
		got.BatchStreamUsage["completion_tokens"] != got.BatchUsage["completion_tokens"] {
		t.Errorf("streamed batched completion: %s", out)
	}
	if strings.Join(got.Models, ",") != "stories260K,pirate,space" || got.ErrStatus != 404 {
		t.Errorf("models / error: %s", out)
	}
}
