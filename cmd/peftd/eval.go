package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/peftd/peftd/models"
	"github.com/peftd/peftd/quality"
	"github.com/peftd/peftd/runtime/engine"
	"github.com/peftd/peftd/runtime/llama"
	"github.com/peftd/peftd/runtime/lora"
	"github.com/peftd/peftd/server"
	"github.com/peftd/peftd/text/tokenizer"
)

// evalPrompts are the default story openings generated under every
// adapter (and the base model).
var evalPrompts = []string{
	"Once upon a time",
	"One day",
	"Lily and Ben were",
	"Once upon a time, there was a little dog",
	"Tom had a big red ball",
	"The sun was shining and",
	"Mia wanted to",
	"Once upon a time, a little pirate",
	"The boy looked up at the stars",
	"There was a big ship on the sea",
	"Sam found a shiny rock",
	"Once upon a time, a girl named Mia",
	"The cat and the bird",
	"Grandma gave Lucy a",
	"It was a rainy day, and",
	"Max wanted to go to the moon",
}

// engineSpec is one side of the comparison: how to build its engine.
type engineSpec struct {
	Device  string `json:"device"`
	Weights string `json:"weights"`
	KVCache string `json:"kv_cache"`
	Eager   bool   `json:"eager,omitempty"`
	// PreciseAccum: cuBLASLt's FP8 products with their periodic promotion
	// to float32 (serve's --fp8-fast-accum=false)
	PreciseAccum bool `json:"precise_accum,omitempty"`
}

// String names the setup; on the CPU, whose own format is float32, an
// fp8 part is an emulation.
func (s engineSpec) String() string {
	w, kv := s.Weights, s.KVCache
	if s.Device == server.DeviceCPU {
		w, kv = cpuFormat(w), cpuFormat(kv)
	}
	out := fmt.Sprintf("device=%s,weights=%s,kv-cache=%s", s.Device, w, kv)
	if s.Eager {
		out += ",eager"
	}
	if s.PreciseAccum {
		out += ",precise-accum"
	}
	return out
}

func cpuFormat(f string) string {
	if f == server.WeightsFP8 {
		return "fp8(emulated)"
	}
	return "f32"
}

// fellBack refuses an fp8 setup that device=auto put on the CPU: the
// fallback computes in float32 and would compare nothing.
func fellBack(sp engineSpec, device string) error {
	if sp.Device == server.DeviceAuto && device == server.DeviceCPU && (sp.Weights == server.WeightsFP8 || sp.KVCache == server.KVCacheFP8) {
		return fmt.Errorf("eval: engine %s: device=auto found no GPU, and the CPU fallback does not apply fp8: say device=cpu to emulate it, or device=cuda", sp)
	}
	return nil
}

// parseEngineSpec reads "device=cuda,weights=fp8,kv-cache=fp8,eager,precise-accum".
func parseEngineSpec(s string) (engineSpec, error) {
	sp := engineSpec{Device: server.DeviceAuto, Weights: server.WeightsBF16, KVCache: server.KVCacheBF16}
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		k, v, _ := strings.Cut(f, "=")
		switch k {
		case "device":
			switch v {
			case server.DeviceAuto, server.DeviceCPU, server.DeviceCUDA:
			default:
				return sp, fmt.Errorf("engine %q: device %q: want auto, cpu or cuda", s, v)
			}
			sp.Device = v
		case "weights":
			if v != server.WeightsBF16 && v != server.WeightsFP8 {
				return sp, fmt.Errorf("engine %q: weights %q: want bf16 or fp8", s, v)
			}
			sp.Weights = v
		case "kv-cache":
			if v != server.KVCacheBF16 && v != server.KVCacheFP8 {
				return sp, fmt.Errorf("engine %q: kv-cache %q: want bf16 or fp8", s, v)
			}
			sp.KVCache = v
		case "eager", "precise-accum":
			b := true
			if v != "" {
				var err error
				if b, err = strconv.ParseBool(v); err != nil {
					return sp, fmt.Errorf("engine %q: %s %q: want true or false", s, k, v)
				}
			}
			if k == "eager" {
				sp.Eager = b
			} else {
				sp.PreciseAccum = b
			}
		default:
			return sp, fmt.Errorf("engine %q: unknown key %q (want device, weights, kv-cache, eager, precise-accum)", s, k)
		}
	}
	return sp, nil
}

type specList []string

func (l *specList) String() string     { return strings.Join(*l, " ") }
func (l *specList) Set(s string) error { *l = append(*l, s); return nil }

// evalRow is one line of the report: one candidate, one adapter, one kind
// of stream.
type evalRow struct {
	Candidate string  `json:"candidate"`
	Adapter   string  `json:"adapter"` // "base" for the base model
	Stream    string  `json:"stream"`  // held-out or generated
	Tokens    int     `json:"tokens"`  // positions compared
	MeanKL    float64 `json:"mean_kl"`
	MaxKL     float64 `json:"max_kl"`
	Agreement float64 `json:"top1_agreement"`
	Scored    int     `json:"scored_tokens,omitempty"`
	PPLRef    float64 `json:"ppl_reference,omitempty"`
	PPLCand   float64 `json:"ppl_candidate,omitempty"`
}

type evalReport struct {
	Model     string    `json:"model"`
	Reference string    `json:"reference"`
	Rows      []evalRow `json:"rows"`
}

// evalAdapter is one adapter of the comparison and its held-out text.
type evalAdapter struct {
	name, dir string
	docs      [][]int32
}

func cmdEval(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet(ctx, "eval", stdout, stderr)
	modelDir := fs.String("model", "", "model: a folder, s3://bucket/prefix, or a Hugging Face Hub ID ORG/NAME[@REVISION] (default: the embedded stories260K, with its demo adapters and held-out text)")
	var adapters, texts, prompts, cands specList
	fs.Var(&adapters, "adapter", "NAME=DIR, or an embedded demo adapter name (pirate, space); repeat for several (default with the embedded model: pirate and space)")
	fs.Var(&texts, "text", "NAME=FILE: held-out text scored under adapter NAME (base: the base model), stories separated by blank lines; repeat (default with the embedded model: its held-out text)")
	fs.Var(&prompts, "prompt", "a prompt generated from under every adapter and the base model; repeat (default: 16 story openings)")
	refSpec := fs.String("ref", "device=auto", "the reference engine: comma-separated device=auto|cpu|cuda, weights=bf16|fp8, kv-cache=bf16|fp8, eager, precise-accum (cuBLASLt's FP8 products with float32 promotion)")
	fs.Var(&cands, "cand", "a candidate engine, as --ref; repeat to compare several with the same reference (required)")
	maxNew := fs.Int("max-new", 128, "tokens generated per prompt at most")
	batch := fs.Int("batch", 16, "prompts generated at once (co-batched decode steps)")
	asJSON := fs.Bool("json", false, "print one JSON object")
	if err := fs.Parse(args); err != nil {
		return errUsage
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("eval: unexpected argument %q", fs.Arg(0))
	}
	if len(cands) == 0 {
		return fmt.Errorf("eval: give at least one --cand (e.g. --cand device=cuda,weights=fp8)")
	}
	if *maxNew <= 0 || *batch <= 0 {
		return fmt.Errorf("eval: --max-new and --batch must be positive, got %d and %d", *maxNew, *batch)
	}
	ref, err := parseEngineSpec(*refSpec)
	if err != nil {
		return fmt.Errorf("eval: --ref: %w", err)
	}
	var specs []engineSpec
	for _, c := range cands {
		sp, err := parseEngineSpec(c)
		if err != nil {
			return fmt.Errorf("eval: --cand: %w", err)
		}
		specs = append(specs, sp)
	}
	if len(prompts) == 0 {
		prompts = evalPrompts
	}
	embedded := *modelDir == ""
	if embedded && len(adapters) == 0 {
		adapters = []string{"pirate", "space"}
	}
	var textFiles map[string]string
	if embedded && len(texts) == 0 {
		root, err := embeddedRoot()
		if err != nil {
			return err
		}
		dir := filepath.Join(root, models.HeldoutDir)
		textFiles = map[string]string{"base": filepath.Join(dir, "stories.txt"), "pirate": filepath.Join(dir, "pirate.txt"), "space": filepath.Join(dir, "space.txt")}
	} else {
		textFiles = map[string]string{}
		for _, t := range texts {
			name, file, ok := strings.Cut(t, "=")
			if !ok || name == "" || file == "" {
				return fmt.Errorf("eval: --text %q: want NAME=FILE", t)
			}
			textFiles[name] = file
		}
	}
	var ads []evalAdapter
	for _, a := range adapters {
		name, dir, ok := strings.Cut(a, "=")
		if !ok {
			name, dir = a, a
		}
		if name == "base" || slices.ContainsFunc(ads, func(x evalAdapter) bool { return x.name == name }) {
			return fmt.Errorf("eval: --adapter %q: the name %q is taken", a, name)
		}
		d, err := resolveAdapter(dir)
		if err != nil {
			return fmt.Errorf("eval: %w", err)
		}
		ads = append(ads, evalAdapter{name: name, dir: d})
	}
	for name := range textFiles {
		if name != "base" && !slices.ContainsFunc(ads, func(x evalAdapter) bool { return x.name == name }) {
			return fmt.Errorf("eval: --text for %q: no --adapter of that name", name)
		}
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))

	// The reference engine first: its model and tokenizer encode the texts
	// and prompts, and size every engine's KV cache.
	var (
		base     evalAdapter
		jobs     []quality.Job
		jobNames []string
		kvTokens int
	)
	encode := func(m *llama.Model, tok *tokenizer.Tokenizer) (int, error) {
		if tok == nil {
			return 0, fmt.Errorf("eval: model %s has no tokenizer.json", m.Dir)
		}
		limit := m.Config.MaxPositions
		if limit <= 0 {
			limit = 1 << 30
		}
		base = evalAdapter{name: "base"}
		all := append([]evalAdapter{base}, ads...)
		for i := range all {
			file, ok := textFiles[all[i].name]
			if !ok {
				continue
			}
			b, err := os.ReadFile(file)
			if err != nil {
				return 0, fmt.Errorf("eval: --text: %w", err)
			}
			for k, story := range splitStories(string(b)) {
				ids := tok.Encode(story, true)
				if len(ids) > limit {
					return 0, fmt.Errorf("eval: %s: story %d has %d tokens, more than the model's context of %d: split it", file, k+1, len(ids), limit)
				}
				if len(ids) >= 2 {
					all[i].docs = append(all[i].docs, ids)
					kvTokens = max(kvTokens, len(ids))
				}
			}
			if len(all[i].docs) == 0 {
				return 0, fmt.Errorf("eval: %s: no text", file)
			}
		}
		base, ads = all[0], all[1:]
		longest := 0
		for slot, a := range all {
			for _, p := range prompts {
				ids := tok.Encode(p, true)
				if len(ids) == 0 {
					return 0, fmt.Errorf("eval: --prompt %q encodes to no tokens", p)
				}
				jobs = append(jobs, quality.Job{Slot: slot - 1, Prompt: ids})
				jobNames = append(jobNames, a.name)
				longest = max(longest, len(ids))
			}
		}
		// The cache holds batch generations of the longest prompt and
		// max-new tokens, or one whole held-out document (Score runs one
		// at a time): OpenEngine gives batch sequences kvTokens each.
		kvTokens = max(longest+*maxNew, (kvTokens+*batch-1) / *batch)
		return kvTokens, nil
	}
	open := func(sp engineSpec, kv func(*llama.Model, *tokenizer.Tokenizer) (int, error)) (*engine.Engine, server.EngineInfo, error) {
		e, info, err := server.OpenEngine(ctx, server.EngineConfig{Model: *modelDir, Device: sp.Device, Weights: sp.Weights, KVCache: sp.KVCache,
			Eager: sp.Eager, FP8PreciseAccum: sp.PreciseAccum, Slots: max(len(ads), 1), Logger: log, KVTokens: kv, KVSeqs: *batch})
		if err != nil {
			return nil, info, fmt.Errorf("eval: engine %s: %w", sp, err)
		}
		for slot, a := range ads {
			ad, err := lora.Load(a.dir, info.Model.Config)
			if err == nil {
				err = e.LoadAdapter(slot, ad)
			}
			if err != nil {
				e.Close()
				info.Model.Close()
				return nil, info, fmt.Errorf("eval: adapter %s: %w", a.name, err)
			}
		}
		return e, info, nil
	}
	re, rinfo, err := open(ref, encode)
	if err != nil {
		return err
	}
	if err := fellBack(ref, rinfo.Device); err != nil {
		re.Close()
		rinfo.Model.Close()
		return err
	}
	defer rinfo.Model.Close()
	defer re.Close()
	ref.Device = rinfo.Device
	var stop []int32
	for _, id := range rinfo.Model.Config.EOS {
		stop = append(stop, int32(id))
	}
	stop = append(stop, rinfo.Tokenizer.EOS()...)
	model := *modelDir
	if embedded {
		model = models.DefaultModel + " (embedded)"
	}
	rep := evalReport{Model: model, Reference: ref.String()}
	if !*asJSON {
		fmt.Fprintf(stdout, "model %s; reference %s\n", rep.Model, rep.Reference)
	}
	for _, sp := range specs {
		ce, cinfo, err := open(sp, func(*llama.Model, *tokenizer.Tokenizer) (int, error) { return kvTokens, nil })
		if err != nil {
			return err
		}
		if err := fellBack(sp, cinfo.Device); err != nil {
			ce.Close()
			cinfo.Model.Close()
			return err
		}
		sp.Device = cinfo.Device
		rows, err := evalOne(ctx, re, ce, sp.String(), append([]evalAdapter{base}, ads...), jobs, jobNames, *maxNew, *batch, stop, stderr)
		ce.Close()
		cinfo.Model.Close()
		if err != nil {
			return fmt.Errorf("eval: %s: %w", sp, err)
		}
		rep.Rows = append(rep.Rows, rows...)
		if !*asJSON { // each table as soon as it is known
			printRows(stdout, sp.String(), rows)
		}
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(rep)
	}
	return nil
}

// evalOne compares one candidate with the reference: held-out text per
// adapter, then every generation job, and the totals.
func evalOne(ctx context.Context, re, ce quality.Engine, cand string, all []evalAdapter, jobs []quality.Job, jobNames []string, maxNew, batch int, stop []int32, progress io.Writer) ([]evalRow, error) {
	row := func(adapter, stream string, st quality.Stats) evalRow {
		r := evalRow{Candidate: cand, Adapter: adapter, Stream: stream, Tokens: st.Rows, MeanKL: st.MeanKL(), MaxKL: st.KLMax, Agreement: st.Agreement(), Scored: st.Scored}
		if st.Scored > 0 {
			r.PPLRef, r.PPLCand = st.PPLRef(), st.PPLCand()
		}
		return r
	}
	var rows []evalRow
	var held quality.Stats
	for slot, a := range all {
		if len(a.docs) == 0 {
			continue
		}
		t0 := time.Now()
		st, err := quality.Score(ctx, re, ce, slot-1, a.docs)
		if err != nil {
			return nil, fmt.Errorf("held-out text of %s: %w", a.name, err)
		}
		fmt.Fprintf(progress, "eval: %s: held-out text of %s: %d documents, %d tokens in %.1fs\n", cand, a.name, len(a.docs), st.Rows, time.Since(t0).Seconds())
		rows = append(rows, row(a.name, "held-out", st))
		held.Add(st)
	}
	if held.Rows > 0 {
		rows = append(rows, row("all", "held-out", held))
	}
	// Generation: every job co-batched (adapters mixed in a step, as a
	// server batches them), then the stats split by adapter.
	t0 := time.Now()
	gen, out, err := quality.Generate(ctx, re, ce, jobs, maxNew, batch, stop)
	if err != nil {
		return nil, fmt.Errorf("generation: %w", err)
	}
	fmt.Fprintf(progress, "eval: %s: %d generations, %d tokens in %.1fs\n", cand, len(jobs), gen.Rows, time.Since(t0).Seconds())
	for _, a := range all {
		var st quality.Stats
		n := 0
		for i, g := range out {
			if jobNames[i] == a.name {
				st.Add(g.Stats)
				n++
			}
		}
		if n > 0 {
			rows = append(rows, row(a.name, "generated", st))
		}
	}
	rows = append(rows, row("all", "generated", gen))
	return rows, nil
}

// splitStories splits text at blank lines into its non-empty paragraphs.
func splitStories(text string) []string {
	var out []string
	for _, p := range strings.Split(strings.ReplaceAll(text, "\r\n", "\n"), "\n\n") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// printRows prints one candidate's rows as a table.
func printRows(w io.Writer, cand string, rows []evalRow) {
	fmt.Fprintf(w, "\ncandidate %s\n", cand)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "adapter\tstream\ttokens\tmean KL\tmax KL\ttop-1 agree\tppl ref\tppl cand\t")
	for _, r := range rows {
		ppl := "\t"
		if r.Scored > 0 {
			ppl = fmt.Sprintf("%.4f\t%.4f", r.PPLRef, r.PPLCand)
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%.3g\t%.3g\t%.2f%%\t%s\t\n", r.Adapter, r.Stream, r.Tokens, r.MeanKL, r.MaxKL, 100*r.Agreement, ppl)
	}
	tw.Flush()
}
