package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"

	"github.com/peftd/peftd/server"
	"github.com/peftd/peftd/text/tokenizer"
)

func cmdTokenize(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet(ctx, "tokenize", stdout, stderr)
	dir := fs.String("model", "", "model or tokenizer folder (default: the embedded stories260K)")
	text := fs.String("text", "", "text to encode")
	ids := fs.String("ids", "", "token ids to decode: 1,2,3")
	addSpecial := fs.Bool("add-special-tokens", false, "add BOS when encoding")
	asJSON := fs.Bool("json", false, "print JSON: {\"ids\":[...]} or {\"text\":\"...\"}")
	if err := fs.Parse(args); err != nil {
		return errUsage
	}
	textSet, idsSet := false, false
	fs.Visit(func(f *flag.Flag) {
		textSet = textSet || f.Name == "text"
		idsSet = idsSet || f.Name == "ids"
	})
	if textSet == idsSet {
		return fmt.Errorf("tokenize: give exactly one of --text and --ids")
	}
	d, _, err := server.ResolveModel(ctx, *dir, nil)
	if err != nil {
		return err
	}
	tok, err := tokenizer.Load(d)
	if err != nil {
		return fmt.Errorf("tokenize: %s: %w", d, err)
	}
	if textSet {
		out := tok.Encode(*text, *addSpecial)
		if out == nil {
			out = []int32{}
		}
		if *asJSON {
			return json.NewEncoder(stdout).Encode(map[string][]int32{"ids": out})
		}
		fmt.Fprintln(stdout, formatIDs(out))
		return nil
	}
	list, err := parseIDs(*ids)
	if err != nil {
		return fmt.Errorf("tokenize: --ids: %w", err)
	}
	for _, id := range list {
		if int(id) >= tok.VocabSize() {
			return fmt.Errorf("tokenize: token id %d outside the vocabulary (size %d)", id, tok.VocabSize())
		}
	}
	s := tok.Decode(list, false)
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetEscapeHTML(false)
		return enc.Encode(map[string]string{"text": s})
	}
	fmt.Fprintln(stdout, s)
	return nil
}
