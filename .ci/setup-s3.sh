#!/usr/bin/env bash
# Installs versitygw (a real S3 server with a posix backend) into .cache/bin/
# for the loader/store/s3 tests. Idempotent.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSION="v1.8.0"
BIN="$ROOT/.cache/bin"
mkdir -p "$BIN"
# Keep the cache out of git without touching the repository's .gitignore.
[ -f "$ROOT/.cache/.gitignore" ] || printf '*\n' >"$ROOT/.cache/.gitignore"
STAMP="$BIN/.versitygw-$VERSION"
if [ -x "$BIN/versitygw" ] && [ -f "$STAMP" ]; then
  echo "setup-s3: $BIN/versitygw $VERSION already present"
  exit 0
fi
# Build outside the repository so its go.mod is not consulted or edited.
cd "$(mktemp -d)"
GOBIN="$BIN" GOFLAGS=-buildvcs=false go install "github.com/versity/versitygw/cmd/versitygw@$VERSION"
rm -f "$BIN"/.versitygw-*
touch "$STAMP"
echo "setup-s3: installed $BIN/versitygw $VERSION"
