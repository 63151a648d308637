#!/usr/bin/env bash
# FP8 weight path checks and benchmarks (runtime/gpu fp8.go, kernels/fp8.cu,
# runtime/cuda cublaslt_fp8.go).
#
# Here (no GPU needed):   bash scripts/fp8-check.sh
#   builds the cuda-tagged test binaries (CGO_ENABLED=0) into bin/fp8/.
# On the GPU machine:     bash scripts/fp8-check.sh --on-device [PHASE...]
#   PHASEs, in this order, default all:
#     ops        the cuBLASLt FP8 enums against this machine's cublasLt.h,
#                quant_rows_e4m3 bit for bit against the host encoder, the
#                FP8 GEMM against float64 (dequantized operands, tight; bf16
#                operands and the bf16 GEMM, reported), odd sizes; the tiny
#                fixture with bf16 and fp8 weights (TestFP8Fixture)
#     gemmbench  TestFP8GemmBench: fp8 vs bf16 GEMM at 8B projection shapes,
#                T = 1, 16, 64, 256, 2048
#     fixture8b  makes the Llama-3.1-8B-shape fixture (tools/llama8b-shape.json)
#                and runs TestFP8Fixture8BShape (bf16 and fp8 weights, same cases)
#     decode     makes the random 32-layer 8B checkpoint and runs TestDecodeBench
#                with bf16, then fp8 weights (PEFTD_DECODE_BATCHES, default 1,64,256)
#   Logs go to $OUT (summary.txt, fp8-logs.tgz).
# Device call:
#   run(command="bash scripts/fp8-check.sh --on-device", carry=["bin/fp8"], timeout_s=600)
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" != "--on-device" ]]; then
	set -e
	mkdir -p bin/fp8
	CGO_ENABLED=0 go test -c -tags cuda -o bin/fp8/runtime_gpu.test ./runtime/gpu/
	echo "built bin/fp8/runtime_gpu.test"
	exit 0
fi
shift
PHASES=("$@")
[[ ${#PHASES[@]} -gt 0 ]] || PHASES=(ops gemmbench fixture8b decode)
want() { local x; for x in "${PHASES[@]}"; do [[ "$x" == "$1" ]] && return 0; done; return 1; }
if [[ -n "${OUT:-}" ]]; then LOG=/tmp/fp8-logs; else LOG=bin/fp8/logs; fi
mkdir -p "$LOG"
ROOT="$PWD"
BIN="$ROOT/bin/fp8/runtime_gpu.test"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export XDG_CACHE_HOME="${XDG_CACHE_HOME:-$(mktemp -d)}" # cold kernel cache, shared by the phases
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
T0=$SECONDS
DEADLINE="${DEADLINE:-570}"
left() { local l=$((DEADLINE - SECONDS)); ((l > $1)) && l=$1; ((l < 10)) && l=10; echo $l; }
stamp() { echo "--- $1 done at +$((SECONDS - T0))s"; }
status=0
{
	nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | head -2
	ls "$CUDA_HOME"/lib64/libcublasLt.so.* 2>&1 | head -3
	grep -nE 'CUBLASLT_MATMUL_DESC_(A|B)_SCALE_(POINTER|MODE) *=|CUBLASLT_MATMUL_DESC_FAST_ACCUM *=|CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F *=' "$CUDA_HOME/include/cublasLt.h"
	grep -nE 'CUDA_R_8F_E4M3 *=' "$CUDA_HOME/include/library_types.h"
} 2>&1 | tee "$LOG/env.txt"
cd runtime/gpu
if want ops; then
	echo "=== ops"
	timeout "$(left 200)" "$BIN" -test.v -test.count=1 -test.run '^(TestFP8Enums|TestFP8Quant|TestFP8Gemm|TestFP8ActivationCache|TestFP8Fixture|TestOpLinear)$' >"$LOG/ops.log" 2>&1 || status=1
	grep -E -- '^(--- |ok|FAIL|PASS)|maxrel|codes differ|not available|fp8|bf16|greedy|panic|_test.go:[0-9]+: [0-9]+ ' "$LOG/ops.log" | grep -v 'ops_cuda_test.go:48' | cut -c1-260
	stamp ops
fi
if want gemmbench; then
	echo "=== gemmbench"
	PEFTD_FP8_BENCH=1 timeout "$(left 200)" "$BIN" -test.v -test.count=1 -test.run '^TestFP8GemmBench$' >"$LOG/gemmbench.log" 2>&1 || status=1
	grep '^BENCH fp8gemm' "$LOG/gemmbench.log" | cut -c7- | tee "$LOG/gemmbench.txt"
	grep -E -- '--- (FAIL|SKIP)|panic' "$LOG/gemmbench.log"
	stamp gemmbench
fi
if want fixture8b; then
	FX=/tmp/peftd-fixture-8b
	echo "=== fixture8b"
	if [[ -f $FX/expected.safetensors ]] || (cd "$ROOT" && timeout "$(left 300)" "$PY" tools/make_lora_fixture.py tools/llama8b-shape.json "$FX" >"$LOG/fixture8b.make.log" 2>&1); then
		PEFTD_FIXTURE_8B=$FX timeout "$(left 300)" "$BIN" -test.v -test.count=1 -test.run '^TestFP8Fixture8BShape$' >"$LOG/fixture8b.log" 2>&1 || status=1
		grep -E -- '^(--- |ok|FAIL|PASS)|maxrel|fp8|bf16|greedy|panic|_test.go:[0-9]+: [0-9]+ ' "$LOG/fixture8b.log" | cut -c1-260
	else
		status=1
		tail -n 20 "$LOG/fixture8b.make.log"
	fi
	stamp fixture8b
fi
if want decode; then
	MD=/tmp/llama8b-random
	echo "=== decode"
	if [[ -f $MD/base/model.safetensors.index.json ]] || (cd "$ROOT" && timeout "$(left 300)" "$PY" tools/make_random_llama.py "$MD" --layers "${DECODE_LAYERS:-32}" >"$LOG/decode.make.log" 2>&1); then
		for w in ${DECODE_WEIGHTS:-bf16 fp8}; do
			PEFTD_WEIGHTS=$w PEFTD_DECODE_BATCHES="${PEFTD_DECODE_BATCHES:-1,64,256}" PEFTD_MODEL_8B=$MD timeout "$(left 300)" "$BIN" -test.v -test.count=1 -test.run '^TestDecodeBench$' >"$LOG/decode-$w.log" 2>&1 || status=1
			echo "weights $w:"
			grep -E '^BENCH (decode|adapterload)' "$LOG/decode-$w.log" | cut -c7- | tee "$LOG/decode-$w.txt"
			grep -E -- '--- (FAIL|SKIP)|panic' "$LOG/decode-$w.log" | head -3
		done
	else
		status=1
		tail -n 20 "$LOG/decode.make.log"
	fi
	stamp decode
fi
echo "elapsed $((SECONDS - T0))s, status $status"
if [[ -n "${OUT:-}" ]]; then
	tar czf "$OUT/fp8-logs.tgz" -C "$LOG" .
	cat "$LOG"/*.txt >"$OUT/summary.txt" 2>/dev/null
fi
exit $status
