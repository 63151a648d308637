#!/usr/bin/env bash
# ncu-bench.sh TEST ENV REGEX COUNT [DEFINES...]: on the device, ncu --set full
# on the first COUNT launches of the kernels matching REGEX in the runtime/gpu
# benchmark TEST (e.g. TestFP8GemmBench with ENV PEFTD_FP8_BENCH=1
# PEFTD_FP8_BENCH_T=64), once for each PEFTD_KERNEL_DEFINES in DEFINES (none:
# ""), one line a launch (scripts/ncu_table.py) and the raw CSV under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?ncu-bench runs on the device (the run tool sets OUT)}"
test=$1 envs=$2 re=$3 count=$4
shift 4
(($#)) || set -- ""
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" XDG_CACHE_HOME="${XDG_CACHE_HOME:-$(mktemp -d)}"
ncu="$(command -v ncu || echo "$CUDA_HOME/bin/ncu")"
i=0
for d in "$@"; do
	i=$((i + 1))
	echo "=== ncu $test ($envs) -k $re, PEFTD_KERNEL_DEFINES=\"$d\""
	# shellcheck disable=SC2086 # envs: words on purpose
	(cd runtime/gpu && env $envs PEFTD_KERNEL_DEFINES="$d" timeout 280 "$ncu" --print-units base --set full -k "regex:$re" -c "$count" \
		--csv --page raw "../../bin/gpu/runtime_gpu.test" -test.count=1 -test.run "^$test\$") >"$OUT/ncu$i.csv" 2>"$OUT/ncu$i.err"
	python3 scripts/ncu_table.py "$OUT/ncu$i.csv" | cut -c1-400
	tail -n 2 "$OUT/ncu$i.err"
done
