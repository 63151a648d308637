package gpu

import (
	"context"
	"fmt"
	"math"
	"path/filepath"
	"testing"

	qm "github.com/peftd/peftd/quality"
	"github.com/peftd/peftd/runtime/cpu"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/lora"
	"github.com/peftd/peftd/runtime/sample"
	"github.com/peftd/peftd/text/tokenizer"
)

// Story openings for the generated-text half of TestFP8QualityStories.
var qualityPrompts = []string{
	"Once upon a time",
	"One day, a little boy named Tom",
	"There was a big dog who",
	"Lily wanted to play with her friend",
	"The sun was hot and the birds",
	"Max had a red ball. He",
	"In a small house near the woods",
	"Mom said, \"Let's go to the park",
}

// Held-out text of the kind stories260K and its adapters were trained on,
// written for this test (not taken from TinyStories), by the model it is
// scored under: "" the base model, else the adapter.
var qualityHeldOut = []struct{ model, text string }{
	{"", "Once upon a time, there was a little cat named Tim. Tim liked to sit in the sun. One day, he saw a bird in the tree. He wanted to play with the bird. The bird flew away, and Tim was sad. Then his friend Sam came and they played with a ball. Tim was happy again."},
	{"", "Anna had a new doll. She took the doll to the park. A boy asked, \"Can I see your doll?\" Anna said yes. They sat on the grass and talked. When it was time to go home, the boy said thank you. Anna smiled and waved goodbye."},
	{"", "One day, a big bear walked in the forest. He was hungry and looked for food. He found a tree with red apples. The bear ate one apple and then another. Soon he was full and sleepy, so he lay down under the tree and took a nap."},
	{"pirate", "Once upon a time, a brave pirate named Jack sailed his ship on the blue sea. He had a map with a big red X. Jack and his crew looked for the treasure for many days. At last they found a chest full of gold on a small island."},
	{"space", "Once upon a time, a girl named Zoe wanted to fly to the moon. She built a rocket with her dad. They counted to ten and the rocket went up, up into the sky. Zoe saw the stars and the earth, and she waved to her friends at home."},
}

// storyResult is what storyQuality measured.
type storyResult struct {
	kl         float64 // mean KL(bf || f8) per generated token, nats
	agree, n   int     // argmax agreements over n generated positions
	worstRatio float64 // largest perplexity ratio between bf and f8 on held-out text
}

// storyModel opens stories260K, its tokenizer and its two adapters.
func storyModel(t *testing.T) (*llama.Model, *tokenizer.Tokenizer, map[string]*lora.Adapter) {
	t.Helper()
	dir := "../../models/stories260K"
	m, err := llama.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	tok, err := tokenizer.Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	ads := map[string]*lora.Adapter{}
	for _, n := range []string{"pirate", "space"} {
		if ads[n], err = lora.Load(filepath.Join("../../models/adapters", n), m.Config); err != nil {
			t.Fatal(err)
		}
	}
	return m, tok, ads
}

// storySlots are the adapter slots storyEngine loads them into ("": none).
var storySlots = map[string]int{"": -1, "pirate": 0, "space": 1}

// storyEngine is an engine on b over m with the adapters in storySlots.
func storyEngine(t *testing.T, m *llama.Model, ads map[string]*lora.Adapter, b engine.Backend) *engine.Engine {
	t.Helper()
	opts := engine.DefaultOptions()
	opts.AdapterSlots = 2
	e, err := engine.New(m, b, opts)
	if err != nil {
		b.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	for n, s := range storySlots {
		if s >= 0 {
			if err := e.LoadAdapter(s, ads[n]); err != nil {
				t.Fatal(err)
			}
		}
	}
	return e
}

// storyQuality compares engine f8 with engine bf (and ref, a float32
// engine, on held-out text) on the stories model: see TestFP8QualityStories.
func storyQuality(t *testing.T, m *llama.Model, tok *tokenizer.Tokenizer, ref, bf, f8 *engine.Engine) storyResult {
	t.Helper()
	slots := storySlots
	V := m.Config.VocabSize
	ctx := context.Background()

	// forced runs tokens through e in one step and returns every row's logits.
	forced := func(e *engine.Engine, toks []int32, slot int) [][]float32 {
		seq := &engine.Sequence{}
		out, err := e.Step(ctx, []engine.Input{{Seq: seq, Tokens: toks, Slot: slot, AllLogits: true}})
		if err != nil {
			t.Fatal(err)
		}
		e.Release(seq)
		rows := make([][]float32, len(toks))
		for i := range rows {
			rows[i] = out[0][i*V : (i+1)*V]
		}
		return rows
	}

	// Generated text: all 24 (model, opening) sequences decode together on bf16.
	const newTokens = 120
	type gen struct {
		model string
		toks  []int32
	}
	var gens []gen
	for _, model := range []string{"", "pirate", "space"} {
		for _, p := range qualityPrompts {
			gens = append(gens, gen{model, tok.Encode(p, true)})
		}
	}
	seqs := make([]*engine.Sequence, len(gens))
	next := make([][]int32, len(gens))
	for i := range gens {
		seqs[i], next[i] = &engine.Sequence{}, gens[i].toks
	}
	for range newTokens {
		in := make([]engine.Input, len(gens))
		for i, g := range gens {
			in[i] = engine.Input{Seq: seqs[i], Tokens: next[i], Slot: slots[g.model]}
		}
		out, err := bf.Step(ctx, in)
		if err != nil {
			t.Fatal(err)
		}
		for i := range gens {
			id := sample.Argmax(out[i][len(out[i])-V:])
			gens[i].toks = append(gens[i].toks, id)
			next[i] = []int32{id}
		}
	}
	for _, s := range seqs {
		bf.Release(s)
	}
	var kl float64
	agree, n := 0, 0
	perModel := map[string][3]float64{} // kl sum, agreements, positions
	for _, g := range gens {
		a, b := forced(bf, g.toks, slots[g.model]), forced(f8, g.toks, slots[g.model])
		start := len(g.toks) - newTokens - 1 // the positions that predict generated tokens
		for i := start; i < len(g.toks)-1; i++ {
			k := qm.KL(a[i], b[i])
			same := sample.Argmax(a[i]) == sample.Argmax(b[i])
			kl += k
			n++
			pm := perModel[g.model]
			pm[0] += k
			pm[2]++
			if same {
				agree++
				pm[1]++
			}
			perModel[g.model] = pm
		}
	}
	kl /= float64(n)
	for _, model := range []string{"", "pirate", "space"} {
		pm := perModel[model]
		t.Logf("generated, %-6s: mean KL(bf16||fp8) %.4f nats/token, greedy agreement %.3f over %d tokens", name0(model), pm[0]/pm[2], pm[1]/pm[2], int(pm[2]))
	}
	t.Logf("generated, all   : mean KL(bf16||fp8) %.4f nats/token, greedy agreement %.3f over %d tokens", kl, float64(agree)/float64(n), n)

	// Held-out text: perplexity under each engine.
	var worstRatio float64
	for _, h := range qualityHeldOut {
		toks := tok.Encode(h.text, true)
		var ppl [3]float64
		for k, e := range []*engine.Engine{ref, bf, f8} {
			rows := forced(e, toks, slots[h.model])
			var nll float64
			for i := 0; i+1 < len(toks); i++ {
				nll -= logSoftmaxAt(rows[i], toks[i+1])
			}
			ppl[k] = math.Exp(nll / float64(len(toks)-1))
		}
		worstRatio = max(worstRatio, ppl[2]/ppl[1], ppl[1]/ppl[2])
		t.Logf("held-out, %-6s (%3d tokens): perplexity float32 %.3f, bf16 %.3f, fp8 %.3f", name0(h.model), len(toks), ppl[0], ppl[1], ppl[2])
	}
	return storyResult{kl: kl, agree: agree, n: n, worstRatio: worstRatio}
}

// TestStoryQualitySelf checks storyQuality's arithmetic on three identical
// float32 engines: no divergence, full agreement over every generated
// token, equal perplexities.
func TestStoryQualitySelf(t *testing.T) {
	if testing.Short() {
		t.Skip("-short")
	}
	m, tok, ads := storyModel(t)
	a, b, c := storyEngine(t, m, ads, cpu.New(0)), storyEngine(t, m, ads, cpu.New(0)), storyEngine(t, m, ads, cpu.New(0))
	r := storyQuality(t, m, tok, a, b, c)
	if r.kl > 1e-9 || r.agree != r.n || r.n != 3*len(qualityPrompts)*120 || r.worstRatio != 1 {
		t.Errorf("identical engines: KL %g, agreement %d/%d, perplexity ratio %g", r.kl, r.agree, r.n, r.worstRatio)
	}
}

func name0(model string) string {
	if model == "" {
		return "base"
	}
	return model
}

func logSoftmaxAt(v []float32, id int32) float64 {
	if int(id) >= len(v) || id < 0 {
		panic(fmt.Sprintf("token %d outside %d logits", id, len(v)))
	}
	return qm.LogSoftmax(v)[id]
}
