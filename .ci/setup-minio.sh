#!/usr/bin/env bash
# Builds the MinIO server from its Go module into .cache/bin/minio, once, for
# the loader/store tests of bucket notifications against a real MinIO
# (single drive in a temp folder; internal/s3test.StartMinIO). Idempotent: a
# present binary of the pinned version is kept. The build takes ~5-8 minutes
# on 2 cores, module download included. PEFTD_SKIP_S3=1 skips it (and the
# MinIO tests skip with it).
#
# MinIO is AGPLv3. It is only run as a separate test server process, like
# versitygw; nothing of it is linked into peftd.
#
# One file is added to MinIO before the build. Since #21651 (2025-10-24)
# MinIO wraps every S3 response writer in a trackingResponseWriter that does
# not pass Flush on, so ListenBucketNotification's events and pings stay in
# the server's 4 KiB write buffer: a listener hears nothing, for minutes.
# The module proxy serves no MinIO from before that change, so the file
# gives the wrapper a Flush that passes through, unless the server runs
# with PEFTD_MINIO_SILENT_LISTEN=1: then it is upstream's silent stream,
# which the tests use too.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# MinIO tags releases as RELEASE.<date>, which Go does not read as versions:
# this is the module proxy's pseudo-version of its last commit (@latest).
VERSION="v0.0.0-20260212201848-7aac2a2c5b7c"
PATCH_REV=1 # bump when the added file changes
BIN="$ROOT/.cache/bin"
if [ "${PEFTD_SKIP_S3:-}" = 1 ]; then
  echo "setup-minio: PEFTD_SKIP_S3=1: MinIO not built; its tests are skipped"
  exit 0
fi
mkdir -p "$BIN"
[ -f "$ROOT/.cache/.gitignore" ] || printf '*\n' >"$ROOT/.cache/.gitignore"
STAMP="$BIN/.minio-$VERSION-peftd$PATCH_REV"
if [ -x "$BIN/minio" ] && [ -f "$STAMP" ]; then
  echo "setup-minio: $BIN/minio $VERSION already present"
  exit 0
fi
start=$(date +%s)
work="$(mktemp -d)"
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT
# Outside the repository, so that its go.mod is not consulted or edited.
cd "$work"
dir="$(GOFLAGS=-mod=mod go mod download -json "github.com/minio/minio@$VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
[ -n "$dir" ] && [ -f "$dir/go.mod" ] || { echo "setup-minio: go mod download github.com/minio/minio@$VERSION failed" >&2; exit 1; }
cp -r "$dir" src
chmod -R u+w src
cat >src/cmd/zz_peftd_flush.go <<'GO'
package cmd

import (
	"net/http"
	"os"
)

// Flush passes flushes on; added by peftd's .ci/setup-minio.sh. Upstream's
// trackingResponseWriter hides the http.Flusher of the writer it wraps, so
// ListenBucketNotification's events and pings stay in the server's buffer.
// PEFTD_MINIO_SILENT_LISTEN=1 keeps upstream's behaviour.
func (w *trackingResponseWriter) Flush() {
	if os.Getenv("PEFTD_MINIO_SILENT_LISTEN") == "1" {
		return
	}
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}
GO
(cd src && GOFLAGS=-buildvcs=false go build -o "$BIN/minio.new" .)
mv "$BIN/minio.new" "$BIN/minio"
rm -f "$BIN"/.minio-*
touch "$STAMP"
echo "setup-minio: built $BIN/minio ($VERSION, Flush patch $PATCH_REV) in $(( $(date +%s) - start ))s"
