// Command peftd serves LoRA fine-tuned Llama models.
//
//	peftd serve [--model DIR] [--store DIR|s3://...] [--listen ADDR] [--api-keys FILE] ...
//	peftd generate [--model DIR] [--adapter DIR|NAME] (--prompt TEXT | --prompt-ids 1,2,3) ...
//	peftd eval --cand ENGINE [--ref ENGINE] [--model DIR] [--adapter NAME=DIR] [--text NAME=FILE] ...
//	peftd tokenize [--model DIR] (--text T | --ids 1,2,3) [--add-special-tokens] [--json]
//	peftd deploy [--url URL] [--id ID] ADAPTER_DIR
//	peftd invoke [--url URL] --adapter ID (--prompt TEXT | --prompt-ids 1,2,3) [--stream]
//	peftd bench [--url URL] [--models a,b] [--requests N] [--concurrency N] ...
//	peftd soak [--url URL] [--duration D] [--outage-start CMD --outage-stop CMD] ...
//
// 'peftd help' lists them, 'peftd COMMAND -h' prints a command's help.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strconv"
	"strings"
)

// command describes a subcommand for 'peftd help' and 'peftd COMMAND -h'.
type command struct {
	name string
	args string // after "usage: peftd NAME"
	// short is its line in 'peftd help'; summary, the sentence its -h
	// starts with; more, notes printed after the summary.
	short, summary, more string
}

var commands = []command{
	{name: "serve", args: "[flags]", short: "serve adapters over HTTP (OpenAI-compatible API)",
		summary: "Serve the base model and its LoRA adapters over HTTP (OpenAI-compatible and native\n" +
			"routes), loading each adapter from the adapter store when it is first asked for.",
		more: "Every flag can also be set with a PEFTD_<FLAG> variable (PEFTD_LISTEN, PEFTD_API_KEYS, ...)\n" +
			"or in a --config file; flags win over variables, variables over the file."},
	{name: "generate", args: "[flags]", short: "generate text with the base model or an adapter, without a server",
		summary: "Generate text on this machine, without a server, with the base model or one adapter;\n" +
			"greedy unless --temperature is set.",
		more: "With no --model the embedded stories260K model is used (demo adapters: --adapter pirate,\n" +
			"--adapter space)."},
	{name: "eval", args: "--cand ENGINE [flags]", short: "compare the quality of two engine setups (fp8 against bf16, GPU against CPU)",
		summary: "Compare a candidate engine setup with a reference on the same tokens, teacher-forced:\n" +
			"per adapter, the mean and largest KL(reference || candidate) of the next-token\n" +
			"distributions, top-1 agreement, and the perplexity each gives held-out text; on held-out\n" +
			"text (prefill steps) and on the reference's greedy continuations of prompts (co-batched\n" +
			"decode steps).",
		more: "An ENGINE is comma-separated device=auto|cpu|cuda, weights=bf16|fp8, kv-cache=bf16|fp8,\n" +
			"eager. The CPU backend emulates fp8 weights and keys in float32 (the scheme's numerics).\n" +
			"With no --model: the embedded stories260K, its demo adapters and its held-out text, e.g.\n" +
			"  peftd eval --ref device=cpu --cand device=cpu,weights=fp8 --cand device=cpu,weights=fp8,kv-cache=fp8"},
	{name: "tokenize", args: "[flags]", short: "encode text or decode token ids",
		summary: "Encode text to token ids (--text) or decode token ids to text (--ids) with a model's\n" +
			"tokenizer.json."},
	{name: "deploy", args: "[flags] ADAPTER_DIR", short: "upload an adapter folder to a server (validated there, then stored)",
		summary: "Upload a PEFT LoRA adapter folder (adapter_config.json and adapter_model.safetensors) to\n" +
			"a server, which validates it against its base model and writes it to its adapter store."},
	{name: "invoke", args: "[flags]", short: "run an adapter on a server by its ID",
		summary: "Run an adapter on a server by its ID (POST /v1/adapters/{id}/invoke) and print the text;\n" +
			"greedy unless --temperature is set."},
	{name: "bench", args: "[flags]", short: "load-test an OpenAI-compatible server (peftd, vLLM, ...)",
		summary: "Load-test an OpenAI-compatible server (peftd, vLLM, ...) with completions spread over\n" +
			"several adapters, and report request rate, throughput, TTFT, TPOT and cold starts."},
	{name: "soak", args: "[flags]", short: "soak-test a peftd server (store outage, adapter replaced; make soak)",
		summary: "Soak-test a peftd server: mixed invoke/completions load over many adapters (a hot set and\n" +
			"cold ones), one adapter-store outage and one adapter replacement mid-run; report failures\n" +
			"by status, latencies and the server's memory at the start and the end.",
		more: "scripts/soak.sh (make soak) sets up the server, the store and the outage commands."},
	{name: "kernels", args: "[flags]", short: "compile the CUDA kernels ahead of time (for a container image: no compile at start)",
		summary: "Compile peftd's CUDA kernels with NVRTC for the given GPU architectures (default: this\n" +
			"machine's GPUs) into the kernel cache or a folder; needs the CUDA toolkit's NVRTC and\n" +
			"headers, not a GPU.",
		more: "A server looks for cubins in its kernel cache, then in the folders of PEFTD_KERNEL_DIRS\n" +
			"(colon-separated), and compiles only what it finds in neither (~10-15 s on a cold start).\n" +
			"In a container image:\n" +
			"  RUN peftd kernels --arch 8.0,8.6,8.9,9.0 --dir /opt/peftd/kernels\n" +
			"  ENV PEFTD_KERNEL_DIRS=/opt/peftd/kernels"},
	{name: "version", short: "print the version"},
	{name: "help", args: "[COMMAND]", short: "print this help, or a command's ('peftd COMMAND -h' too)"},
}

func lookupCommand(name string) (command, bool) {
	for _, c := range commands {
		if c.name == name {
			return c, true
		}
	}
	return command{}, false
}

// printTopUsage prints 'peftd help'.
func printTopUsage(w io.Writer) {
	fmt.Fprint(w, "usage: peftd COMMAND [flags]\n\n"+
		"peftd serves LoRA fine-tuned Llama models: one base model, any number of PEFT LoRA adapters\n"+
		"co-batched on it.\n\nCommands:\n")
	for _, c := range commands {
		fmt.Fprintf(w, "  %-9s %s\n", c.name, c.short)
	}
	fmt.Fprint(w, "\nRun 'peftd COMMAND -h' for a command's flags. With no --model the embedded\n"+
		"stories260K model is used (demo adapters: --adapter pirate, --adapter space).\n")
}

// printUsage prints a subcommand's help to w: its usage line, what it
// does, and its flags.
func printUsage(w io.Writer, fs *flag.FlagSet) {
	c, _ := lookupCommand(fs.Name())
	fmt.Fprintf(w, "usage: peftd %s %s\n", fs.Name(), c.args)
	if c.summary != "" {
		fmt.Fprintf(w, "\n%s\n", c.summary)
	}
	if c.more != "" {
		fmt.Fprintf(w, "\n%s\n", c.more)
	}
	fmt.Fprint(w, "\nFlags:\n")
	out := fs.Output()
	fs.SetOutput(w)
	fs.PrintDefaults()
	fs.SetOutput(out)
}

// newFlagSet returns a subcommand's flag set (name as in commands), with
// its errors on stderr and its help as setUsage makes it.
func newFlagSet(ctx context.Context, name string, stdout, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	setUsage(ctx, fs, stdout, stderr)
	return fs
}

// setUsage makes fs.Usage print the subcommand's help (printUsage); call
// it after fs.SetOutput. Asked for with -h, -help or --help, the help goes
// to stdout and peftd exits 0: the command returns errUsage from its failed
// Parse as usual, and run, which handed it ctx, sees that the help was
// asked for. After a bad flag the help goes to stderr, and peftd exits 2.
//
// The flag package prints a bad flag's error to fs.Output() before it
// calls Usage, and nothing before it for -h: setUsage counts what goes
// through fs.Output() to tell the two apart.
func setUsage(ctx context.Context, fs *flag.FlagSet, stdout, stderr io.Writer) {
	out := &countWriter{w: fs.Output()}
	fs.SetOutput(out)
	fs.Usage = func() {
		if out.n == 0 && fs.Output() == out { // -h
			if h, ok := ctx.Value(helpKey{}).(*bool); ok {
				*h = true
			}
			printUsage(stdout, fs)
			return
		}
		printUsage(stderr, fs)
	}
}

type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// helpKey keys a *bool in the context run hands to commands: set when a
// command printed its help because -h asked for it.
type helpKey struct{}

var version = "dev"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout, os.Stderr); err != nil {
		if !errors.Is(err, errUsage) {
			fmt.Fprintln(os.Stderr, "peftd:", err)
		}
		os.Exit(2)
	}
}

// errUsage: the command line was wrong, and the usage was printed.
var errUsage = errors.New("usage")

// run runs the command line args (without the program name); nil means
// exit status 0, as after a help asked for with -h.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		printTopUsage(stderr)
		return errUsage
	}
	var help bool
	err := runCommand(context.WithValue(ctx, helpKey{}, &help), args[0], args[1:], stdout, stderr)
	if help && errors.Is(err, errUsage) {
		return nil
	}
	return err
}

func runCommand(ctx context.Context, name string, args []string, stdout, stderr io.Writer) error {
	switch name {
	case "generate":
		return cmdGenerate(ctx, args, stdout, stderr)
	case "deploy":
		return cmdDeploy(ctx, args, stdout, stderr)
	case "invoke":
		return cmdInvoke(ctx, args, stdout, stderr)
	case "bench":
		return cmdBench(ctx, args, stdout, stderr)
	case "soak":
		return cmdSoak(ctx, args, stdout, stderr)
	case "tokenize":
		return cmdTokenize(ctx, args, stdout, stderr)
	case "eval":
		return cmdEval(ctx, args, stdout, stderr)
	case "serve":
		return cmdServe(ctx, args, stdout, stderr)
	case "kernels":
		return cmdKernels(ctx, args, stdout, stderr)
	case "version", "--version", "-version":
		fmt.Fprintln(stdout, "peftd", version)
		return nil
	case "help", "-h", "-help", "--help":
		if len(args) == 0 {
			printTopUsage(stdout)
			return nil
		}
		c, ok := lookupCommand(args[0])
		switch {
		case ok && c.name != "help" && c.name != "version": // the commands with flags
			return runCommand(ctx, c.name, []string{"-h"}, stdout, stderr)
		case ok:
			printTopUsage(stdout)
			return nil
		}
		printTopUsage(stderr)
		return fmt.Errorf("help: unknown command %q", args[0])
	}
	printTopUsage(stderr)
	return fmt.Errorf("unknown command %q", name)
}

// parseIDs reads "1,2,3" (spaces allowed).
func parseIDs(s string) ([]int32, error) {
	var out []int32
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		v, err := strconv.ParseInt(f, 10, 32)
		if err != nil || v < 0 {
			return nil, fmt.Errorf("bad token id %q: want non-negative integers separated by commas", f)
		}
		out = append(out, int32(v))
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no token ids in %q", s)
	}
	return out, nil
}
