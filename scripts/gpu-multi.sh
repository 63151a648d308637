#!/usr/bin/env bash
# gpu-multi.sh: several gpu-check invocations in one device call, each with
# its own environment and phases, each one's results kept in $OUT/NAME/
# (gpu-check clears $OUT's files at its end, so they are moved aside in
# between). The last lines of each invocation's output are printed.
#
#   bash scripts/gpu-multi.sh 'NAME: VAR=x VAR2=y -- phase phase' 'NAME2: ...'
#
# e.g. 'kd16: PEFTD_KDETAIL_BATCH=16 PEFTD_NCU_KERNELS=attn_decode -- kdetail'
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?gpu-multi runs on the device (the run tool sets OUT)}"
K=$(mktemp -d)
rc=0
for spec in "$@"; do
	name=${spec%%:*} rest=${spec#*:}
	envs=${rest%%--*} phases=${rest#*--}
	echo "=== $name:$envs-- $phases"
	# shellcheck disable=SC2086 # words on purpose
	env $envs bash scripts/gpu-check.sh --on-device $phases >"$K/$name.out" 2>&1 || rc=1
	mkdir -p "$K/$name"
	find "$OUT" -mindepth 1 -maxdepth 1 -type f -exec mv {} "$K/$name/" \;
	mv "$K/$name.out" "$K/$name/"
	tail -n "${MULTI_TAIL:-25}" "$K/$name/$name.out"
done
cp -r "$K"/. "$OUT/"
exit $rc
