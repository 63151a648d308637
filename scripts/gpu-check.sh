#!/usr/bin/env bash
# GPU checks for runtime/cuda and runtime/gpu (tests behind the `cuda` build tag).
#
# Here (no GPU needed):   bash scripts/gpu-check.sh
#   builds the tagged test binaries with CGO_ENABLED=0 into bin/gpu/ and
#   prints how to run them on the device machine.
# On the GPU machine:     bash scripts/gpu-check.sh --on-device
#   runs every binary with -test.v, then each once under
#   compute-sanitizer --tool memcheck (API errors not reported: the tests
#   provoke some on purpose, e.g. an out-of-memory allocation), and prints a table last
#   (test, result, max relative error). Logs go to $OUT (or bin/gpu/logs).
set -uo pipefail
cd "$(dirname "$0")/.."

# binary name -> package folder (tests read testdata relative to it)
PKGS=(runtime/cuda runtime/gpu)
bin_of() { echo "bin/gpu/$(echo "$1" | tr / _).test"; }

if [[ "${1:-}" != "--on-device" ]]; then
	set -e
	mkdir -p bin/gpu
	for p in "${PKGS[@]}"; do
		CGO_ENABLED=0 go test -c -tags cuda -o "$(bin_of "$p")" "./$p/"
		echo "built $(bin_of "$p")"
	done
	cat <<'HINT'

Run on the device (the `run` tool), carrying the binaries:
  run(command="bash scripts/gpu-check.sh --on-device", carry=["bin/gpu"])
HINT
	exit 0
fi

LOG="${OUT:-bin/gpu/logs}"
mkdir -p "$LOG"
ROOT="$PWD"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export XDG_CACHE_HOME="${XDG_CACHE_HOME:-$(mktemp -d)}" # a cold kernel cache on a fresh machine
{
	nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -4
	ls "$CUDA_HOME"/lib64/libnvrtc.so* "$CUDA_HOME"/lib64/libcublasLt.so* 2>&1 | head -6
} | tee "$LOG/env.txt"

status=0
for p in "${PKGS[@]}"; do
	b="$ROOT/$(bin_of "$p")"
	n="$(basename "$b" .test)"
	[[ -x "$b" ]] || { echo "missing $b: build it here first (bash scripts/gpu-check.sh)"; status=1; continue; }
	echo "=== $n"
	(cd "$p" && timeout 120 "$b" -test.v -test.count=1 ${GPU_TEST_RUN:+-test.run "$GPU_TEST_RUN"}) >"$LOG/$n.log" 2>&1 || status=1
	tail -n 3 "$LOG/$n.log"
done
if [[ "${SKIP_MEMCHECK:-0}" != 1 ]] && command -v compute-sanitizer >/dev/null; then
	for p in "${PKGS[@]}"; do
		b="$ROOT/$(bin_of "$p")"
		n="$(basename "$b" .test)"
		echo "=== memcheck $n"
		(cd "$p" && timeout 170 compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 86 "$b" -test.count=1 ${GPU_TEST_RUN:+-test.run "$GPU_TEST_RUN"}) >"$LOG/$n.memcheck.log" 2>&1
		rc=$?
		echo "memcheck $n: exit $rc; $(grep -E 'ERROR SUMMARY' "$LOG/$n.memcheck.log" | tail -1)"
		[[ $rc == 0 ]] || status=1
	done
fi

# Table: top-level test, result, the largest maxrel= it logged.
{
	printf '%-34s %-6s %s\n' TEST RESULT MAX_REL_ERR
	for p in "${PKGS[@]}"; do
		n="$(basename "$(bin_of "$p")" .test)"
		[[ -f "$LOG/$n.log" ]] || continue
		awk -v pkg="$n" '
			/^=== RUN / { split($3, a, "/"); cur = a[1] }
			/maxrel=/ { if (match($0, /maxrel=[0-9.eE+-]+/)) { v = substr($0, RSTART+7, RLENGTH-7) + 0; if (!(cur in mx) || v > mx[cur]) mx[cur] = v } }
			/^--- (PASS|FAIL|SKIP): / { t = $3; r = $2; sub(":", "", r); res[t] = r; order[++k] = t }
			END { for (i = 1; i <= k; i++) { t = order[i]; printf "%-34s %-6s %s\n", pkg "." t, res[t], (t in mx) ? sprintf("%.3g", mx[t]) : "-" } }
		' "$LOG/$n.log"
		m="$LOG/$n.memcheck.log"
		[[ -f "$m" ]] && printf '%-34s %-6s %s\n' "$n.memcheck" "$(grep -q '^PASS$' "$m" && grep -q 'ERROR SUMMARY: 0 errors' "$m" && echo PASS || echo FAIL)" "$(grep -E 'ERROR SUMMARY' "$m" | tail -1)"
	done
} | tee "$LOG/summary.txt"
exit $status
