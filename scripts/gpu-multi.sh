#!/usr/bin/env bash
# gpu-multi.sh: several gpu-check invocations in one device call, each with
# its own environment and phases, each one's results (what gpu-check left in
# $OUT, and its output as NAME.out) packed as $OUT/NAME.tgz; the last lines
# of each invocation's output are printed and kept in $OUT/multi.txt.
#
#   bash scripts/gpu-multi.sh 'NAME: VAR=x VAR2=y -- phase phase' 'NAME2: ...'
#
# e.g. 'kd16: PEFTD_KDETAIL_BATCH=16 PEFTD_NCU_KERNELS=attn_decode -- kdetail'
# or 's1: SERVE8B_ARGS="--graph-rows 512" GPU_TEST_RUN=TestA|TestB -- serve8b'
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?gpu-multi runs on the device (the run tool sets OUT)}"
K=$(mktemp -d)
# finished invocations' results wait in $OUT/multi (gpu-check clears only
# $OUT's top-level files), so that a call cut off by its time limit still
# brings back the ones that finished, and the output of the one it cut off
# (multi/NAME.out)
M="$OUT/multi"
mkdir -p "$M"
rc=0
for spec in "$@"; do
	name=${spec%%:*} rest=${spec#*:}
	envs=${rest%% -- *} phases=${rest#* -- } # split at the first " -- " (values may hold --flags)
	echo "=== $name:$envs -- $phases" | tee -a "$K/multi.txt"
	rm -rf /tmp/gpu-check-logs # gpu-check's log folder on the device: each invocation's own
	# the settings split as a shell would (quotes group words, e.g.
	# SERVE8B_ARGS="--graph-rows 512"), but nothing in them runs
	mapfile -t ev < <(python3 -c 'import shlex, sys; sys.stdout.write("".join(w + "\n" for w in shlex.split(sys.argv[1])))' "$envs")
	# shellcheck disable=SC2086 # words on purpose
	# the output goes to $OUT/multi as it is written: a call cut off by its
	# time limit still brings back how far this invocation got (session 70
	# lost a 420 s call's whole test run: the output waited in a temporary
	# folder for the invocation's end)
	env "${ev[@]}" bash scripts/gpu-check.sh --on-device $phases >"$M/$name.out" 2>&1 || rc=1
	tail -n "${MULTI_TAIL:-25}" "$M/$name.out" | tee -a "$K/multi.txt"
	mv "$M/$name.out" "$OUT/" # gpu-check clears $OUT's files as it ends: its output joins them after
	tar czf "$M/$name.tgz" --exclude=./multi -C "$OUT" . && find "$OUT" -mindepth 1 -maxdepth 1 ! -name multi -exec rm -rf {} +
	cp "$K/multi.txt" "$M/"
done
mv "$M"/* "$OUT/" && rmdir "$M"
exit $rc
