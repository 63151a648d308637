#!/usr/bin/env bash
# sass.sh: the SASS opcode counts of kernels as NVRTC compiles them for the
# device (peftd kernels, with $PEFTD_KERNEL_DEFINES), to see what an
# instruction-bound kernel spends its instructions on.
#
#   bash scripts/sass.sh [--arch 9.0] FUNC [FUNC...]
#
# Needs bin/gpu/peftd and the CUDA toolkit's NVRTC and cuobjdump
# ($CUDA_HOME, /usr/local/cuda, or scripts/cuda-local.sh's); no GPU. Prints each
# function's instruction count and its 25 most frequent opcodes (modifiers
# dropped after the first: HMMA.16816.F32.BF16 counts as HMMA.16816).
# SASS_KEEP=DIR keeps each function's whole SASS as DIR/FUNC.sass.
set -euo pipefail
cd "$(dirname "$0")/.."
arch=9.0
if [[ ${1:-} == --arch ]]; then arch=$2; shift 2; fi
(($#)) || { echo "usage: sass.sh [--arch 9.0] FUNC..." >&2; exit 2; }
if [[ -z ${CUDA_HOME:-} && ! -x /usr/local/cuda/bin/cuobjdump && -x .cache/cuda-local/bin/cuobjdump ]]; then
	export CUDA_HOME=$PWD/.cache/cuda-local # scripts/cuda-local.sh's NVRTC and cuobjdump
fi
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
bin/gpu/peftd kernels --arch "$arch" --dir "$dir" >/dev/null
OBJ=${CUDA_HOME:-/usr/local/cuda}/bin/cuobjdump
for f in "$@"; do
	cub=$(grep -lw -- "$f" "$dir"/*.cubin | head -1 || true)
	if [[ -z $cub ]]; then echo "sass $f: in no cubin" && continue; fi
	"$OBJ" -sass -fun "$f" "$cub" >"$dir/$f.sass" 2>/dev/null || { echo "sass $f: cuobjdump failed"; continue; }
	grep -oE '^\s+/\*[0-9a-f]{4,}\*/\s+(@!?U?P[0-9T] )?[A-Z0-9_]+(\.[A-Z0-9_]+)?' "$dir/$f.sass" |
		sed -E 's/^\s+\/\*[0-9a-f]+\*\/\s+(@!?U?P[0-9T] )?//' | sort | uniq -c | sort -rn >"$dir/$f.ops"
	echo "sass $f (${PEFTD_KERNEL_DEFINES:-no defines}): $(awk '{s+=$1} END {print s}' "$dir/$f.ops") instructions"
	head -25 "$dir/$f.ops" | awk '{printf "  %6d %s\n", $1, $2}'
	if [[ -n ${SASS_KEEP:-} ]]; then mkdir -p "$SASS_KEEP" && cp "$dir/$f.sass" "$SASS_KEEP/"; fi
done
