// Command peftd serves LoRA fine-tuned Llama models.
//
//	peftd generate [--model DIR] [--adapter DIR|NAME] (--prompt TEXT | --prompt-ids 1,2,3) ...
//	peftd tokenize [--model DIR] (--text T | --ids 1,2,3) [--add-special-tokens] [--json]
//	peftd serve [--model DIR] [--store DIR] [--listen ADDR] [--api-keys FILE] ...
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strconv"
	"strings"
)

const usage = `peftd: a serverless runtime for LoRA fine-tuned Llama models

Usage:
  peftd generate [flags]   generate text with the base model or an adapter
  peftd deploy [flags] DIR upload an adapter folder to a server (validated there, then stored)
  peftd invoke [flags]     run an adapter on a server by its ID
  peftd bench [flags]      load-test an OpenAI-compatible server (peftd, vLLM, ...)
  peftd soak [flags]       soak-test a peftd server (store outage, adapter replaced; make soak)
  peftd tokenize [flags]   encode text or decode token ids
  peftd serve [flags]      serve adapters over HTTP (OpenAI-compatible API)
  peftd version            print the version

Run 'peftd COMMAND -h' for a command's flags. With no --model the embedded
stories260K model is used (demo adapters: --adapter pirate, --adapter space).
`

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

var errUsage = errors.New("usage")

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return errUsage
	}
	switch args[0] {
	case "generate":
		return cmdGenerate(ctx, args[1:], stdout, stderr)
	case "deploy":
		return cmdDeploy(ctx, args[1:], stdout, stderr)
	case "invoke":
		return cmdInvoke(ctx, args[1:], stdout, stderr)
	case "bench":
		return cmdBench(ctx, args[1:], stdout, stderr)
	case "soak":
		return cmdSoak(ctx, args[1:], stdout, stderr)
	case "tokenize":
		return cmdTokenize(args[1:], stdout, stderr)
	case "serve":
		return cmdServe(ctx, args[1:], stdout, stderr)
	case "version", "--version":
		fmt.Fprintln(stdout, "peftd", version)
		return nil
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return nil
	}
	fmt.Fprint(stderr, usage)
	return fmt.Errorf("unknown command %q", args[0])
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
