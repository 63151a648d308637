#!/usr/bin/env bash
# GPU checks and benchmarks for runtime/cuda and runtime/gpu (tests behind the
# `cuda` build tag).
#
# Here (no GPU needed):   bash scripts/gpu-check.sh
#   builds the tagged test binaries with CGO_ENABLED=0 into bin/gpu/ and
#   prints how to run them on the device machine.
# On the GPU machine:     bash scripts/gpu-check.sh --on-device [PHASE...]
#   PHASEs, in this order, default all:
#     tests      every test binary with -test.v (benchmarks skip themselves)
#     kernels    bin/gpu/peftd kernels for every architecture the container
#                image ships (KERNEL_ARCHS, the Dockerfile's default list) into
#                a fresh folder: each source must compile for each (no GPU
#                needed for it, the toolkit's NVRTC is)
#     memcheck   each binary once under compute-sanitizer --tool memcheck (API
#                errors not reported: the tests provoke some on purpose, e.g. an
#                out-of-memory allocation)
#     fixture8b  makes the Llama-3.1-8B-shape fixture (tools/llama8b-shape.json,
#                ~3 GB under /tmp, stays there) and runs TestFixture8BShape on it
#                through the default LoRA path, the LoRA stream's q/k/v update
#                (noinline) and --serial-lora (PEFTD_FIXTURE_8B_PATHS)
#     fp8ref     issue 14's scheme fidelity: tools/make_fp8_reference.py makes a
#                torch reference of exactly the FP8 scheme from the tiny fixture
#                (and from the 8B-shape one when fixture8b made it), then
#                TestFP8SchemeFidelity compares peftd's fp8 path with it; then
#                the same with FP8 keys (--kv fp8, --kv-cache fp8); run it by name
#     attnbench  TestAttnBench: prefill attention of one 8B layer, tensor-core
#                kernel vs per-row kernel (not in the default phases)
#     lorabench  TestLoRABench: the LoRA path of one 8B layer, CUDA-graph replays
#     fp8bench   TestFP8GemmBench: the FP8 product (fp8_gemv, fp8_gemm_skinny,
#                its n128 variant, cuBLASLt) against bf16 at the 8B projection
#                shapes, 1-2048 rows (PEFTD_FP8_BENCH_T: other rows; not in
#                the default phases); fp8wgsk lines: fp8_wgsk at 65-256 rows
#                on every SM and on 84 against the default product there, and
#                its blocks' phases (fp8wgsk phases lines: wgskPhases)
#     wsplanbench TestWsPlanBench: every one-wave plan of gemm_ws and fp8_ws
#                (width x K split) at the 8B shapes against the planner's, with
#                the activation bytes each reads from L2 (not in the default
#                phases; PEFTD_WSPLAN_FORMATS=bf16 or fp8 for one)
#     skinnybench TestSkinnyBench: gemm_skinny (the bf16 product of 1-16
#                rows) against cuBLASLt at the 8B shapes
#                (PEFTD_SKINNY_T: other rows; not default; in both,
#                PEFTD_BENCH_SHAPES=name:NxK,... other weight shapes)
#     decode     makes a random 32-layer 8B checkpoint + 4 rank-32 adapters
#                (tools/make_random_llama.py, ~16 GB under /tmp) and runs
#                TestDecodeBench (decode tokens/s at batch 1, 16, 64, 256;
#                split-KV vs per-row attention; then the step-time hiccup of
#                a rank-64 adapter load, synchronous vs prepared/async)
#     serve      bin/gpu/peftd serve --device cuda on the embedded stories260K:
#                startup logs name the GPU, the pirate invoke gives the known
#                text, peftd bench (96 requests, concurrency 16), /metrics has
#                peftd_gpu_memory_used_bytes
#     soak8b     make soak on the GPU: an 8B-shape checkpoint (SOAK_LAYERS, default 8
#                layers) with 200 copies of two rank-8 adapters in an S3 store
#                (versitygw from bin/gpu/versitygw.gz), 8 slots, a store outage
#                and an adapter replacement; not in the default phases (run it
#                by name: it takes most of one call)
#     prefix8b   prefix caching on the GPU: the soak8b checkpoint, a shared
#                2000-token prefix at concurrency 32, cache on vs off (TTFT,
#                throughput) and greedy outputs compared; run it by name
#     ready8b    peftd serve start -> /readyz on the random 8B checkpoint, cold
#                and warm kernel cache, and the first requests after ready
#                (READY8B_FP8=1: an FP8 checkpoint with --weights fp8; READY8B_WARM=idle:
#                --warm-graphs idle)
#     nsysdec    TestDecodeBench's base rows at PEFTD_DECODE_BATCHES (default
#                1,16,64) under nsys, graph nodes traced: each kernel
#                family's time per decode step and the idle time before it,
#                PDL overlap included (scripts/nsys_steps.py); not default
#     nsys8b     serve8b's load (base and 4 adapters mixed, concurrency 64) under nsys:
#                GPU busy fraction, idle gaps, top kernels, CUDA API calls
#                (scripts/nsys_busy.py; makes the decode checkpoint; not default)
#     cold8b     scripts/cold.sh on the random 8B checkpoint: start -> ready, peftd
#                deploy, an adapter from the bucket (versitygw) to its first token,
#                resident, from host memory, after the idle TTLs; phase metrics
#                (not in the default phases)
#     load       TestLoadBench: engine.New's weight upload time on the decode
#                phase's random 8B checkpoint (not in the default phases)
#     profile    ncu over one decode step without and one with the 4 adapters
#                per batch (PEFTD_PROFILE_BATCHES, default 1,64) on the decode
#                checkpoint (made if missing): kernel time per step and the
#                largest kernels (scripts/ncu_steps.py); run it by name
#     lorancu    ncu --set full (raw metrics, CSV) on the LoRA kernels of
#                TestLoRABench's 4 x r32 case at LORANCU_T rows (default
#                128,256); run it by name
#     kdetail    ncu --set full on the first launches of the kernels matching
#                PEFTD_NCU_KERNELS (an ncu -k regex, default fp8_gemv|attn_decode|
#                add_rmsnorm; PEFTD_NCU_COUNT launches, default 6) inside the
#                profile phase's decode step at batch PEFTD_KDETAIL_BATCH
#                (default 1): throughput, occupancy,
#                stall reasons per kernel (kdetail.txt); run it by name
#     readme8b   the README's GPU path as written, on what the device has: a
#                Llama-3.1-8B-shaped folder (the random checkpoint, Meta's Llama
#                3.1 tokenizer and chat template from testdata/llama3-tokenizer,
#                a generation_config.json) served with the README's command
#                (--model FOLDER --store ADAPTERS --slots 8); the startup lines
#                must name the GPU, the model with tokenizer and chat template,
#                the graphs and the store, and the README's chat and completions
#                requests must answer 200 with text; run it by name
#     quality    peftd eval on the embedded stories260K (a trained model) with its
#                demo adapters and held-out text: the GPU's bf16, fp8 and fp8+fp8-key
#                paths against the exact CPU, fp8 and fp8+fp8-key against the GPU's
#                bf16 (issue 14's KL(bf16 || fp8)), and the GPU's fp8+fp8-key path
#                against the CPU's emulation of that scheme (quality.txt)
#     trained    tools/train_tiny_llama.py trains a small Llama-3-family model
#                (hidden 512, 8 layers, Llama 3.1 tokenizer; TRAIN_MINUTES, default
#                3) and a rank-16 adapter (1 minute) on the device's Python source;
#                TestTrainedModel checks peftd reads them as trained; then peftd
#                eval on its held-out files: fp8, fp8 keys and both against the
#                GPU's bf16 (trained.txt); run it by name
#     serve8b    serves the random 8B checkpoint (from decode) with --device
#                cuda and its 4 adapters from a store folder; closed-loop load
#                at concurrency 64, base model alone vs the 4 adapters vs one
#                adapter, all adapters warmed up (loaded) before timing
#                (scripts/serve_bench.py, token-id prompts)
#   and prints a short table last (tests: result and max relative error;
#   benchmarks: the key rows). Logs and full tables go to $OUT (or bin/gpu/logs).
#
# The exact device invocation (the `run` tool; ~6-9 minutes on an H100, most
# of it writing and loading the 16 GB checkpoint):
#   run(command="bash scripts/gpu-check.sh --on-device", carry=["bin/gpu"], timeout_s=600)
#   (readme8b and trained need testdata/llama3-tokenizer/model too, and bin/gpu with it
#   is over the 64 MiB a call carries: carry bin/gpu/peftd, the .test files they need
#   and testdata/llama3-tokenizer/model, leaving bin/gpu/versitygw.gz behind)
# (v0.62, H200: `tests memcheck` alone outran a 420 s limit on a fresh
# machine; a subset such as GPU_TEST_RUN='LoRA|Graph|Fixture|PDL|Lora|Rope|FP8'
# without memcheck took 197 s. v0.63: every test without memcheck 201 s;
# memcheck of the whole runtime_gpu binary more than 170 s, so give it a
# call of its own, or a GPU_TEST_RUN subset: FP8Gemm$|FP8WgStream|OpLinear 62 s.)
# or split it over two calls when the budget is tight:
#   run(command="bash scripts/gpu-check.sh --on-device tests memcheck fixture8b lorabench", carry=["bin/gpu"])
#   run(command="bash scripts/gpu-check.sh --on-device decode", carry=["bin/gpu"])
# Knobs: GPU_TEST_RUN (a -test.run pattern for tests/memcheck), SKIP_MEMCHECK=1,
# PEFTD_TEST_SEED (the seed of the random-data tests' data: each logs its own),
# MEMCHECK_PART=i/n (memcheck: every n-th test from the i-th; the whole
# runtime_gpu binary under memcheck outran 330 s in v0.69), MEMCHECK_SKIP
# (memcheck: tests left out, default TuneCache|TuneGemmTN),
# PEFTD_DECODE_BATCHES (e.g. 1,16), PEFTD_DECODE_QUICK=1 (decode: base and
# adapters only), PEFTD_DECODE_ROWS=no,no+split2 (decode: only the rows of
# those labels; without QUICK, so any row of TestDecodeBench's list),
# PEFTD_WEIGHTS=fp8 (decode), PEFTD_KV=fp8 and PEFTD_DECODE_PROMPT=4096
# (decode, nsysdec, profile, kdetail), NSYSDEC_VARIANTS=2 (nsysdec: the
# 4 x r32 rows too), NSYSDEC_METRICS=1 (nsysdec: the GPU's metrics sampled
# too, averaged under each kernel family by scripts/nsys_metrics.py),
# SERVE8B_ARGS (e.g. "--weights fp8"), SERVE8B_QUICK=1
# (serve8b: the Go client's base and four-adapter runs only; serve flags such
# as --fp8-fast-accum=false go in SERVE8B_ARGS), PEFTD_FP8_PRECISE_ACCUM=1 (fp8ref's
# TestFP8SchemeFidelity, quality's GPU fp8 candidates and the FP8 rig's
# tests with cuBLASLt's float32 promotion, the default's A/B), DECODE_LAYERS
# (layers of the random checkpoint, default 32), PEFTD_KERNEL_DEFINES=
# -DPEFTD_ATTN_TS with PEFTD_ATTN_TS=1 (decode: each row's attn_decode
# phases, the "attnts" lines of decode.txt; PERFORMANCE v0.47),
# PEFTD_KERNEL_DEFINES=-DPEFTD_EXPAND_TS with PEFTD_EXPAND_TS=1 (decode: how
# the last gate/up expand's blocks ran in each row with adapters, the
# "expandts" lines; PERFORMANCE v0.99 Next 1). A/B of two
# trees in one call: GPUBIN_OVERRIDE (another runtime/gpu test binary) and
# PEFTD_OVERRIDE (another peftd, for serve8b).
set -uo pipefail
cd "$(dirname "$0")/.."

# binary name -> package folder (tests read testdata relative to it)
PKGS=(runtime/cuda runtime/gpu quality)
bin_of() { echo "bin/gpu/$(echo "$1" | tr / _).test"; }

if [[ "${1:-}" != "--on-device" ]]; then
	set -e
	mkdir -p bin/gpu
	# stripped (-s -w): what travels to the device is bounded (64 MiB)
	for p in "${PKGS[@]}"; do
		CGO_ENABLED=0 go test -c -tags cuda -ldflags "-s -w" -o "$(bin_of "$p")" "./$p/"
		echo "built $(bin_of "$p")"
	done
	# the server binary: go-nvml needs cgo (it runs on the device's newer glibc)
	CGO_ENABLED=1 CGO_CFLAGS='-g -O2 -Wno-deprecated-declarations' go build -ldflags "-s -w" -o bin/gpu/peftd ./cmd/peftd
	echo "built bin/gpu/peftd"
	# the soak8b phase's S3 server, stripped and gzipped (bash .ci/setup-s3.sh builds it)
	if [[ -x .cache/bin/versitygw && ! -f bin/gpu/versitygw.gz ]]; then
		strip -o bin/gpu/versitygw .cache/bin/versitygw && gzip -9 -f bin/gpu/versitygw && echo "packed bin/gpu/versitygw.gz"
	fi
	# nsys8b: the nsys bundled with Nsight Compute on the device cannot import
	# its own trace (its QdstrmImporter needs libdw.so.1, which the device
	# lacks); elfutils' libdw and libelf from this machine's packages travel along
	if [[ ! -f bin/gpu/nsyslib/libdw.so.1 ]] && command -v apt-get >/dev/null; then
		d=$(mktemp -d)
		if (cd "$d" && apt-get download libdw1 libelf1 >/dev/null 2>&1); then
			mkdir -p bin/gpu/nsyslib
			for deb in "$d"/*.deb; do dpkg-deb -x "$deb" "$d/x"; done
			cp -L "$d"/x/usr/lib/x86_64-linux-gnu/{libdw.so.1,libelf.so.1} bin/gpu/nsyslib/ && echo "packed bin/gpu/nsyslib (libdw, libelf for nsys's importer)"
		fi
		rm -rf "$d"
	fi
	cat <<'HINT'

Run on the device (the `run` tool), carrying the binaries:
  run(command="bash scripts/gpu-check.sh --on-device", carry=["bin/gpu"], timeout_s=600)
HINT
	exit 0
fi

# $OUT brings back at most 8 files: logs go to a folder that is packed into
# $OUT/logs.tgz at the end, beside copies of the summary and benchmark tables.
if [[ -n "${OUT:-}" ]]; then LOG=/tmp/gpu-check-logs; else LOG=bin/gpu/logs; fi
mkdir -p "$LOG"
ROOT="$PWD"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export XDG_CACHE_HOME="${XDG_CACHE_HOME:-$(mktemp -d)}" # a cold kernel cache on a fresh machine
{
	nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -4
	ls "$CUDA_HOME"/lib64/libnvrtc.so* "$CUDA_HOME"/lib64/libcublasLt.so* 2>&1 | head -6
} | tee "$LOG/env.txt"

shift
PHASES=("$@")
[[ ${#PHASES[@]} -gt 0 ]] || PHASES=(tests kernels memcheck fixture8b serve lorabench decode serve8b)
want() { local x; for x in "${PHASES[@]}"; do [[ "$x" == "$1" ]] && return 0; done; return 1; }
# every phase named must be one this script runs (`want NAME` below): a
# mistyped name or a gpu-multi.sh job ('label: ENV -- phase') would
# otherwise run nothing and still cost a device call
KNOWN=$(grep -oE '(^|[;&|] *|if )want [a-z0-9]+' "$0" | grep -oE '[a-z0-9]+$' | sort -u | tr '\n' ' ')
for x in "${PHASES[@]}"; do
	if [[ " $KNOWN" != *" $x "* ]]; then
		echo "gpu-check: no phase '$x' (phases: $KNOWN; jobs with a label and settings, 'label: ENV -- phase', go to scripts/gpu-multi.sh)" >&2
		exit 2
	fi
done
unset PEFTD_FIXTURE_8B PEFTD_LORA_BENCH PEFTD_MODEL_8B
# in_repo: path p as an absolute path, a relative one taken from the
# repository root (the phases run from elsewhere, e.g. runtime/gpu)
in_repo() { if [[ $1 == /* ]]; then echo "$1"; else echo "$ROOT/$1"; fi; }
GPUBIN="$(in_repo "${GPUBIN_OVERRIDE:-$(bin_of runtime/gpu)}")" # GPUBIN_OVERRIDE: another build of runtime/gpu (an A/B of two trees in one call)
T0=$SECONDS
stamp() { echo "--- $1 done at +$((SECONDS - T0))s"; }
# keep the whole run inside the device's 600 s command limit: each benchmark
# phase gets at most what is left of DEADLINE seconds
DEADLINE="${DEADLINE:-575}"
left() { local l=$((DEADLINE - SECONDS)); ((l > $1)) && l=$1; ((l < 10)) && l=10; echo $l; }
save() { [[ -n "${OUT:-}" ]] && cp "$@" "$OUT/" 2>/dev/null; return 0; }

status=0
want tests && for p in "${PKGS[@]}"; do
	b="$ROOT/$(bin_of "$p")"
	n="$(basename "$b" .test)"
	[[ -x "$b" ]] || { echo "missing $b: build it here first (bash scripts/gpu-check.sh)"; status=1; continue; }
	echo "=== $n"
	# v0.27: runtime_gpu's ~100 tests outgrew a 120 s limit on a fresh
	# machine (NVRTC compiling every module); a binary killed by its limit
	# is a FAIL row of its own in the summary, not silently shorter
	# each test's result line also goes to the output as it comes (with its
	# time): a call cut off by the device's limit still shows how far it got
	(cd "$p" && PEFTD_SAMPLE_BENCH=1 timeout "$(left 300)" "$b" -test.v -test.count=1 ${GPU_TEST_RUN:+-test.run "$GPU_TEST_RUN"}) 2>&1 |
		tee "$LOG/$n.log" | grep --line-buffered -E '^--- (PASS|FAIL)'
	rc=${PIPESTATUS[0]}
	if [[ $rc == 124 ]]; then
		echo "--- FAIL: TIMEOUT (killed by its time limit; the tests after the last one logged did not run)" >>"$LOG/$n.log"
	fi
	[[ $rc == 0 ]] || status=1
	tail -n 3 "$LOG/$n.log"
done
want tests && stamp tests
if want kernels; then
	# the Dockerfile's KERNEL_ARCHS: a kernel change that breaks one of them
	# would break the image build
	KA="${KERNEL_ARCHS:-$(sed -n 's/^ARG KERNEL_ARCHS=//p' "$ROOT/infra/docker/Dockerfile")}"
	KD=$(mktemp -d)
	if "$ROOT/bin/gpu/peftd" kernels --arch "$KA" --dir "$KD" >"$LOG/kernels.txt" 2>&1; then
		echo "KERNELS $(tail -1 "$LOG/kernels.txt") for $KA" | tee -a "$LOG/kernels.txt"
	else
		echo "kernels: FAIL for $KA"; tail -n 20 "$LOG/kernels.txt"; status=1
	fi
	rm -rf "$KD"
	save "$LOG/kernels.txt"
	stamp kernels
fi
if want memcheck && [[ "${SKIP_MEMCHECK:-0}" != 1 ]] && command -v compute-sanitizer >/dev/null; then
	for p in "${PKGS[@]}"; do
		[[ $p == quality ]] && continue # no device code of its own
		b="$ROOT/$(bin_of "$p")"
		n="$(basename "$b" .test)"
		if [[ -n "${GPU_TEST_RUN:-}" ]] && ! (cd "$p" && "$b" -test.list "$GPU_TEST_RUN" | grep -q .); then
			echo "memcheck $n: no test matches GPU_TEST_RUN" # compute-sanitizer fails a binary that makes no CUDA call
			continue
		fi
		run="${GPU_TEST_RUN:-}"
		if [[ -n "${MEMCHECK_PART:-}" ]]; then
			# MEMCHECK_PART=i/n: every n-th test of the binary's list from the
			# i-th (heavy and light ones interleaved), so that n invocations
			# (or calls) cover a memcheck one call's time limit cannot
			part=${MEMCHECK_PART%/*} parts=${MEMCHECK_PART#*/}
			sel=$(cd "$p" && "$b" -test.list "${GPU_TEST_RUN:-.}" | grep '^Test' | awk -v i="$part" -v n="$parts" '(NR - 1) % n == i - 1' | paste -sd'|')
			[[ -n $sel ]] || { echo "memcheck $n: no test in part $MEMCHECK_PART"; continue; }
			run="^($sel)\$"
			echo "memcheck $n: part $MEMCHECK_PART, $(tr '|' '\n' <<<"$sel" | wc -l) tests"
		fi
		echo "=== memcheck $n"
		# -test.v: a run cut off by its time limit still says which tests
		# memcheck finished (session 71: the whole runtime_gpu binary outran
		# the 170 s this was; it takes more than that under the sanitizer)
		# MEMCHECK_SKIP (default: the tuning tests, which time hundreds of
		# cuBLASLt configurations a product and run peftd's kernels only as
		# the fixture tests do; "" runs them too)
		skip=${MEMCHECK_SKIP-TuneCache|TuneGemmTN}
		(cd "$p" && timeout "$(left 540)" compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 86 "$b" -test.v -test.count=1 ${run:+-test.run "$run"} ${skip:+-test.skip "$skip"}) >"$LOG/$n.memcheck.log" 2>&1
		rc=$?
		[[ $rc == 124 ]] && echo "memcheck $n: cut off by its time limit after $(grep -c '^--- PASS' "$LOG/$n.memcheck.log") passing tests (the last: $(grep '^--- ' "$LOG/$n.memcheck.log" | tail -1))"
		if [[ $rc != 0 ]] && grep -q '^PASS$' "$LOG/$n.memcheck.log" && grep -q 'terminated before first instrumented API call' "$LOG/$n.memcheck.log"; then
			# the matched tests passed (skipped) without a CUDA call: nothing to check
			echo "========= ERROR SUMMARY: 0 errors (no CUDA call)" >>"$LOG/$n.memcheck.log"
			rc=0
		fi
		echo "memcheck $n: exit $rc; $(grep -E 'ERROR SUMMARY' "$LOG/$n.memcheck.log" | tail -1)"
		[[ $rc == 0 ]] || status=1
	done
	stamp memcheck
fi

PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
# random_ckpt DIR PHASE ARGS...: a random checkpoint (tools/make_random_llama.py
# DIR ARGS) unless DIR holds one already; the log goes to $LOG/PHASE.make.log.
random_ckpt() {
	local dir=$1 phase=$2
	shift 2
	[[ -f $dir/base/model.safetensors.index.json ]] ||
		timeout "$(left 300)" "$PY" tools/make_random_llama.py "$dir" "$@" >"$LOG/$phase.make.log" 2>&1
}
if want fixture8b; then
	FX=/tmp/peftd-fixture-8b
	echo "=== fixture8b: make $FX"
	if [[ -f $FX/expected.safetensors ]] || timeout "$(left 300)" "$PY" tools/make_lora_fixture.py tools/llama8b-shape.json "$FX" >"$LOG/fixture8b.make.log" 2>&1; then
		tail -n 6 "$LOG/fixture8b.make.log" 2>/dev/null
		(cd runtime/gpu && PEFTD_FIXTURE_8B=$FX PEFTD_FIXTURE_8B_PATHS=${PEFTD_FIXTURE_8B_PATHS:-default,noinline,serial} timeout "$(left 300)" "$GPUBIN" -test.v -test.count=1 -test.run '^TestFixture8BShape$') >"$LOG/fixture8b.log" 2>&1 || status=1
		tail -n 4 "$LOG/fixture8b.log"
		save "$LOG/fixture8b.log"
	else
		status=1
		tail -n 20 "$LOG/fixture8b.make.log"
	fi
	stamp fixture8b
fi

# serve_wait LOGFILE: wait for "listening on" (or the server's exit)
serve_wait() {
	local i
	for i in $(seq 1 "${2:-120}"); do
		grep -q 'listening on' "$1" && return 0
		kill -0 "$SRV" 2>/dev/null || return 1
		sleep 1
	done
	return 1
}
serve_stop() { [[ -n "${SRV:-}" ]] && kill "$SRV" 2>/dev/null && wait "$SRV" 2>/dev/null; SRV=; }
if want serve; then
	echo "=== serve: bin/gpu/peftd serve --device cuda (stories260K)"
	PD="$ROOT/bin/gpu/peftd"
	SD=$(mktemp -d)
	ok=1
	PEFTD_CACHE=$SD "$PD" serve --device cuda --listen 127.0.0.1:8080 >"$LOG/serve.log" 2>&1 &
	SRV=$!
	if serve_wait "$LOG/serve.log" 60; then
		gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
		if grep -E 'device=cuda' "$LOG/serve.log" | grep -qF "$gpu"; then echo "serve: startup log names the GPU ($gpu)"; else echo "serve: FAIL: no startup log line names $gpu"; ok=0; fi
		curl -sS -X POST http://127.0.0.1:8080/v1/adapters/pirate/invoke -H 'Content-Type: application/json' \
			-d '{"prompt":"Once upon a time","max_tokens":80}' >"$LOG/serve.invoke.json" 2>&1
		cat "$LOG/serve.invoke.json"; echo
		if grep -qF ', a little pirate girl named Sue had a boat. She loved the sea and the waves.' "$LOG/serve.invoke.json"; then echo "serve: pirate text OK"; else echo "serve: FAIL: pirate text differs"; ok=0; fi
		timeout "$(left 120)" "$PD" bench --url http://127.0.0.1:8080 --models pirate,space,stories260K --requests 96 --concurrency 16 --max-tokens 64 --quiet >"$LOG/serve.bench.txt" 2>&1 || { echo "serve: FAIL: bench"; ok=0; }
		cat "$LOG/serve.bench.txt"
		curl -sS http://127.0.0.1:8080/metrics >"$LOG/serve.metrics.txt"
		if grep -q '^peftd_gpu_memory_used_bytes' "$LOG/serve.metrics.txt"; then echo "serve: metrics: $(grep '^peftd_gpu_memory_used_bytes' "$LOG/serve.metrics.txt" | head -1)"; else echo "serve: FAIL: no peftd_gpu_memory_used_bytes"; ok=0; fi
	else
		echo "serve: FAIL: server did not start"; tail -n 20 "$LOG/serve.log"; ok=0
	fi
	serve_stop
	grep -E 'device|gpu|listening' "$LOG/serve.log" | head -6
	echo "SERVE stories260K: $([[ $ok == 1 ]] && echo PASS || echo FAIL)" | tee "$LOG/serve.result"
	[[ $ok == 1 ]] || status=1
	stamp serve
fi
if want quality; then
	echo "=== quality: peftd eval (stories260K, pirate, space; held-out text and generations)"
	PD="$ROOT/bin/gpu/peftd"
	# the default cache: the kernels compile once for every eval (and phase)
	# PEFTD_FP8_PRECISE_ACCUM=1: the GPU's fp8 candidates with cuBLASLt's float32
	# promotion too (eval's precise-accum key; serve's --fp8-fast-accum=false)
	FA=()
	[[ ${PEFTD_FP8_PRECISE_ACCUM:-} == 1 ]] && FA=(--cand device=cuda,weights=fp8,precise-accum --cand device=cuda,weights=fp8,kv-cache=fp8,precise-accum)
	{
		timeout "$(left 200)" "$PD" eval --ref device=cpu --cand device=cuda --cand device=cuda,weights=fp8 --cand device=cuda,weights=fp8,kv-cache=fp8 "${FA[@]}" &&
			timeout "$(left 200)" "$PD" eval --ref device=cuda --cand device=cuda,weights=fp8 --cand device=cuda,kv-cache=fp8 --cand device=cuda,weights=fp8,kv-cache=fp8 "${FA[@]}" &&
			timeout "$(left 200)" "$PD" eval --ref device=cpu,weights=fp8,kv-cache=fp8 --cand device=cuda,weights=fp8,kv-cache=fp8
	} >"$LOG/quality.txt" 2>&1 || { echo "quality: FAIL"; status=1; }
	tail -n 12 "$LOG/quality.txt"
	stamp quality
fi
if want trained; then
	echo "=== trained: a small Llama trained here, then peftd eval on its held-out files"
	TD=/tmp/tiny-llama-trained
	if [[ ! -f testdata/llama3-tokenizer/model/tokenizer.json ]]; then
		echo "trained: FAIL: testdata/llama3-tokenizer/model is missing: carry it (it is ignored by git)"
		status=1
	elif [[ ! -f $TD/train.json ]]; then
		# the run ends within what is left of the call (less a margin for the eval)
		tl=$(left 420)
		timeout "$tl" "$PY" tools/train_tiny_llama.py "$TD" --minutes "${TRAIN_MINUTES:-3}" --deadline $((tl - 15)) >"$LOG/trained.train.log" 2>&1 ||
			{ echo "trained: FAIL: training"; tail -n 20 "$LOG/trained.train.log"; status=1; }
		tail -n 3 "$LOG/trained.train.log"
	fi
	if [[ -f $TD/train.json ]]; then
		cp "$TD/train.json" "$LOG/" && save "$LOG/train.json"
		(cd quality && PEFTD_TRAINED_MODEL=$TD "$ROOT/$(bin_of quality)" -test.run TestTrainedModel -test.v) >"$LOG/trained.check.log" 2>&1 ||
			{ echo "trained: FAIL: TestTrainedModel"; status=1; }
		grep -E "relative|moves|^--- " "$LOG/trained.check.log"
		# PEFTD_FP8_PRECISE_ACCUM=1: the fp8 candidates with cuBLASLt's float32 promotion too
		TFA=()
		[[ ${PEFTD_FP8_PRECISE_ACCUM:-} == 1 ]] && TFA=(--cand device=cuda,weights=fp8,precise-accum --cand device=cuda,weights=fp8,kv-cache=fp8,precise-accum)
		mapfile -t TP <"$TD/prompts.txt"
		PARGS=()
		for p in "${TP[@]}"; do PARGS+=(--prompt "$p"); done
		timeout "$(left 240)" "$ROOT/bin/gpu/peftd" eval --model "$TD/base" --adapter "code=$TD/adapter" \
			--text "base=$TD/heldout/base.txt" --text "code=$TD/heldout/adapter.txt" "${PARGS[@]}" \
			--ref device=cuda --cand device=cuda,weights=fp8 --cand device=cuda,kv-cache=fp8 --cand device=cuda,weights=fp8,kv-cache=fp8 "${TFA[@]}" \
			>"$LOG/trained.txt" 2>&1 || { echo "trained: FAIL: eval"; status=1; }
		tail -n 16 "$LOG/trained.txt"
	fi
	stamp trained
fi
if want fp8ref; then
	echo "=== fp8ref: torch references of the FP8 scheme, then TestFP8SchemeFidelity"
	# the FP8 weight scheme with bf16 keys, then with FP8 keys (--kv-cache fp8)
	for kv in bf16 fp8; do
		for fxd in "$ROOT/testdata/tiny-llama-lora" /tmp/peftd-fixture-8b; do
			[[ -f $fxd/expected.safetensors ]] || continue
			tag=$(basename "$fxd").kv$kv
			ref=/tmp/peftd-fp8ref-$tag
			if timeout "$(left 300)" "$PY" tools/make_fp8_reference.py --kv "$kv" "$fxd" "$ref" >"$LOG/fp8ref.$tag.make.log" 2>&1; then
				tail -n 4 "$LOG/fp8ref.$tag.make.log"
				(cd runtime/gpu && PEFTD_FP8_REF=$ref PEFTD_FP8_REF_EXACT=$fxd PEFTD_FP8_REF_KV=$kv timeout "$(left 300)" "$GPUBIN" -test.v -test.count=1 -test.run '^TestFP8SchemeFidelity$') >"$LOG/fp8ref.$tag.log" 2>&1 || status=1
				grep -E 'fp8_cuda_test|PASS|FAIL' "$LOG/fp8ref.$tag.log" | cut -c1-160 | tail -n 30
				save "$LOG/fp8ref.$tag.log"
			else
				status=1
				tail -n 20 "$LOG/fp8ref.$tag.make.log"
			fi
		done
	done
	stamp fp8ref
fi

# bench_phase NAME ENV TEST PATTERN SECONDS: the gpu test binary's TEST
# with ENV=1 (a benchmark that skips itself otherwise), its PATTERN lines
# kept in NAME.txt (the summary prints them)
bench_phase() {
	echo "=== $1"
	(cd runtime/gpu && env "$2=1" timeout "$(left "$5")" "$GPUBIN" -test.v -test.count=1 -test.run "^$3\$") >"$LOG/$1.log" 2>&1 || status=1
	grep "$4" "$LOG/$1.log" >"$LOG/$1.txt"
	save "$LOG/$1.txt"
	grep -E -- '--- (PASS|FAIL|SKIP)|panic|Error' "$LOG/$1.log" | head -5
	stamp "$1"
}
want attnbench && bench_phase attnbench PEFTD_ATTN_BENCH TestAttnBench '^BENCH attn' 200
want lorabench && bench_phase lorabench PEFTD_LORA_BENCH TestLoRABench '^BENCH lora' 300
want fp8bench && bench_phase fp8bench PEFTD_FP8_BENCH TestFP8GemmBench '^BENCH fp8\(gemm\|wg\)' 300
want skinnybench && bench_phase skinnybench PEFTD_SKINNY_BENCH TestSkinnyBench '^BENCH skinny' 200
want wsplanbench && bench_phase wsplanbench PEFTD_WSPLAN_BENCH TestWsPlanBench '^BENCH wsplan' 300
if want decode; then
	MD=/tmp/llama8b-random
	echo "=== decode: make $MD"
	if random_ckpt "$MD" decode --layers "${DECODE_LAYERS:-32}"; then
		OUT_DECODE="${OUT:-$LOG}/decode.partial.txt"
		tail -n 2 "$LOG/decode.make.log" 2>/dev/null
		(cd runtime/gpu && PEFTD_MODEL_8B=$MD timeout "$(left 480)" "$GPUBIN" -test.v -test.count=1 -test.run '^TestDecodeBench$') 2>&1 | tee "$LOG/decode.log" | grep --line-buffered '^BENCH' >"$OUT_DECODE"
		[[ ${PIPESTATUS[0]} == 0 ]] || status=1
		grep -E '^BENCH (decode|adapterload)' "$LOG/decode.log" >"$LOG/decode.txt"
		grep -E -- '--- (PASS|FAIL|SKIP)|panic|Error' "$LOG/decode.log" | head -5
	else
		status=1
		tail -n 20 "$LOG/decode.make.log"
	fi
	stamp decode
fi

if want load; then
	MD=/tmp/llama8b-random
	echo "=== load: engine.New on the random 8B checkpoint (staged weight uploads)"
	if random_ckpt "$MD" decode --layers "${DECODE_LAYERS:-32}"; then
		(cd runtime/gpu && PEFTD_LOAD_BENCH=1 PEFTD_MODEL_8B=$MD timeout "$(left 300)" "$GPUBIN" -test.v -test.count=1 -test.run '^TestLoadBench$') 2>&1 | tee "$LOG/load.log" | grep -E '^BENCH|--- (PASS|FAIL)|Error'
		[[ ${PIPESTATUS[0]} == 0 ]] || status=1
		grep '^BENCH load' "$LOG/load.log" >"$LOG/load.txt"
		save "$LOG/load.txt"
	else
		status=1
	fi
	stamp load
fi

# ncu_decode OUT ERR BATCHES NCU_ARGS...: ncu over TestDecodeProfile on the
# decode checkpoint $MD (its profiler range: one decode step per batch size
# in BATCHES, base and 4 adapters), report to OUT, ncu's messages to ERR
ncu_decode() {
	local out=$1 err=$2 pb=$3 ncu
	shift 3
	ncu="$(command -v ncu || echo "$CUDA_HOME/bin/ncu")"
	(cd runtime/gpu && PEFTD_MODEL_8B=$MD PEFTD_PROFILE=1 PEFTD_PROFILE_BATCHES=$pb timeout "$(left 400)" "$ncu" --profile-from-start off --print-units base \
		"$@" "$GPUBIN" -test.v -test.count=1 -test.run '^TestDecodeProfile$') >"$out" 2>"$err"
}

if want profile; then
	MD=/tmp/llama8b-random
	echo "=== profile: ncu over one decode step per batch, base and 4 adapters"
	if random_ckpt "$MD" decode --layers "${DECODE_LAYERS:-32}"; then
		PB="${PEFTD_PROFILE_BATCHES:-1,64}"
		ncu_decode "$LOG/profile.csv" "$LOG/profile.err" "$PB" --csv --metrics gpu__time_duration.sum || status=1
		labels=(); IFS=, read -ra bs <<<"$PB"; for b in "${bs[@]}"; do labels+=("batch$b-base" "batch$b-4xr32"); done
		"$PY" scripts/ncu_steps.py "$LOG/profile.csv" "${labels[@]}" | tee "$LOG/profile.txt"
		save "$LOG/profile.txt"
		tail -n 3 "$LOG/profile.err"
	else
		status=1
	fi
	stamp profile
fi

if want lorancu; then
	# ncu --set full on the LoRA kernels of TestLoRABench's 4 x r32 case at
	# each of LORANCU_T (rows, default 128,256): its v1, v2, tc and graph
	# layouts run once each (PEFTD_LORA_BENCH_ONLY); raw metrics to CSV
	echo "=== lorancu: ncu --set full on the LoRA kernels, 4 x r32"
	IFS=, read -ra lts <<<"${LORANCU_T:-128,256}"
	ncu="$(command -v ncu || echo "$CUDA_HOME/bin/ncu")"
	for T in "${lts[@]}"; do
		(cd runtime/gpu && PEFTD_LORA_BENCH=1 PEFTD_LORA_BENCH_ONLY="4,32,$T" timeout "$(left 200)" "$ncu" --print-units base --set full \
			-k "regex:${LORANCU_KERNELS:-sgmv|lora}" --csv --page raw "$GPUBIN" -test.count=1 -test.run '^TestLoRABench$') \
			>"$LOG/lorancu-$T.csv" 2>"$LOG/lorancu-$T.err" || status=1
		echo "T=$T: $(grep -c '^"[0-9]' "$LOG/lorancu-$T.csv") kernels profiled"; tail -n 2 "$LOG/lorancu-$T.err"
		{ echo "# 4 x r32, T=$T"; "$PY" scripts/ncu_table.py "$LOG/lorancu-$T.csv"; } >>"$LOG/lorancu.txt" 2>&1
		gzip -kf "$LOG/lorancu-$T.csv" # in logs.tgz (the CSVs are not)
	done
	save "$LOG/lorancu.txt"
	cut -c1-220 "$LOG/lorancu.txt" | head -60
	stamp lorancu
fi

if want kdetail; then
	MD=/tmp/llama8b-random
	echo "=== kdetail: ncu --set full on kernels of one batch-1 decode step"
	if random_ckpt "$MD" decode --layers "${DECODE_LAYERS:-32}"; then
		KRE="${PEFTD_NCU_KERNELS:-fp8_gemv|attn_decode|add_rmsnorm}"
		if [[ -n "${KDETAIL_RAW:-}" ]]; then # raw metrics: one line per launch with its stall reasons (scripts/ncu_table.py)
			ncu_decode "$LOG/kdetail.csv" "$LOG/kdetail.err" "${PEFTD_KDETAIL_BATCH:-1}" --set full --csv --page raw -k "regex:$KRE" --launch-count "${PEFTD_NCU_COUNT:-6}" || status=1
			{ echo "# kdetail batch ${PEFTD_KDETAIL_BATCH:-1}: $KRE"; "$PY" scripts/ncu_table.py "$LOG/kdetail.csv"; } >"$LOG/kdetail.txt" 2>&1
			gzip -kf "$LOG/kdetail.csv"
			cat "$LOG/kdetail.txt"
		else
			ncu_decode "$LOG/kdetail.txt" "$LOG/kdetail.err" "${PEFTD_KDETAIL_BATCH:-1}" --set full -k "regex:$KRE" --launch-count "${PEFTD_NCU_COUNT:-6}" || status=1
			grep -E '^  [a-z_0-9]+.*\(|DRAM Throughput|Memory Throughput|Duration|Achieved Occupancy|Registers Per|Theoretical Occupancy' "$LOG/kdetail.txt" | head -80
		fi
		save "$LOG/kdetail.txt"
		tail -n 3 "$LOG/kdetail.err"
	else
		status=1
	fi
	stamp kdetail
fi

if want readme8b; then
	MD=/tmp/llama8b-random RM=/tmp/peftd-readme8b
	echo "=== readme8b: the README's GPU path on a Llama-3.1-8B-shaped folder"
	if random_ckpt "$MD" decode --layers "${DECODE_LAYERS:-32}"; then
		rm -rf "$RM" && mkdir -p "$RM/model" "$RM/adapters"
		ln -s "$MD"/base/* "$RM/model/"
		cp "$ROOT"/testdata/llama3-tokenizer/model/tokenizer.json "$ROOT"/testdata/llama3-tokenizer/model/tokenizer_config.json "$RM/model/"
		echo '{"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "do_sample": true, "temperature": 0.6, "top_p": 0.9}' >"$RM/model/generation_config.json"
		for a in $(ls "$MD/adapters" | head -2); do ln -s "$MD/adapters/$a" "$RM/adapters/$a"; done
		SD=$(mktemp -d)
		# step 4 of the README: bin/peftd serve --model ... --store ./adapters --slots 8
		PEFTD_CACHE=$SD "$ROOT/bin/gpu/peftd" serve --model "$RM/model" --store "$RM/adapters" --slots 8 --listen 127.0.0.1:8080 >"$LOG/readme8b.log" 2>&1 &
		SRV=$!
		if serve_wait "$LOG/readme8b.log" "$(left 200)"; then
			grep -E 'msg=device|msg=model|kv cache|CUDA graphs|msg=store|listening' "$LOG/readme8b.log" | cut -c1-240 | tee "$LOG/readme8b.txt"
			for want in 'name="NVIDIA' 'tokenizer=true' 'chat_template=true' 'CUDA graphs' 'msg=store' 'listening on'; do
				grep -q "$want" "$LOG/readme8b.log" || { echo "readme8b: FAIL: no startup line with $want"; status=1; }
			done
			A=$(ls "$RM/adapters" | head -1)
			BASE=$(curl -s http://127.0.0.1:8080/v1/models | "$PY" -c 'import json,sys; print([m["id"] for m in json.load(sys.stdin)["data"] if not m.get("parent")][0])')
			for req in "/v1/chat/completions|{\"model\":\"$A\",\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}],\"max_tokens\":16}" \
				"/v1/chat/completions|{\"model\":\"$BASE\",\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}],\"max_tokens\":16}" \
				"/v1/completions|{\"model\":\"$A\",\"prompt\":\"Once upon a time\",\"max_tokens\":16}"; do
				path=${req%%|*} body=${req#*|}
				code=$(curl -s -o "$LOG/readme8b.reply" -w '%{http_code}' http://127.0.0.1:8080$path -d "$body")
				echo "README8B $path $code $(head -c 300 "$LOG/readme8b.reply")" | tee -a "$LOG/readme8b.txt"
				[[ $code == 200 ]] && grep -q '"finish_reason"' "$LOG/readme8b.reply" || { echo "readme8b: FAIL: $path answered $code"; status=1; }
			done
		else
			echo "readme8b: FAIL: server did not start"; tail -n 20 "$LOG/readme8b.log"; status=1
		fi
		serve_stop
		save "$LOG/readme8b.txt"
	else
		status=1
	fi
	stamp readme8b
fi

if want serve8b; then
	MD=/tmp/llama8b-random
	echo "=== serve8b: peftd serve --device cuda --model $MD/base (4 adapters in a store folder)"
	if random_ckpt "$MD" decode --layers "${DECODE_LAYERS:-32}"; then
		SD=$(mktemp -d)
		# SERVE8B_ARGS: more serve flags (e.g. --weights fp8)
		# PEFTD_OVERRIDE: another build of peftd serves (an A/B of two trees in one call)
		SRVBIN="$(in_repo "${PEFTD_OVERRIDE:-bin/gpu/peftd}")"
		PEFTD_CACHE=$SD "$SRVBIN" serve --device cuda --model "$MD/base" --store "$MD/adapters" --slots 5 --max-queue 1024 --listen 127.0.0.1:8081 ${SERVE8B_ARGS:-} >"$LOG/serve8b.log" 2>&1 &
		SRV=$!
		if serve_wait "$LOG/serve8b.log" "$(left 200)"; then
			grep -E 'engine|kv cache|device|tuned|CUDA graphs' "$LOG/serve8b.log" | head -6 | cut -c1-300
			AD=$(ls "$MD/adapters" | paste -sd, -)
			# warm-up: the base model, then every adapter (fetched, parsed and
			# uploaded into its slot here, not during the timed runs; 5 slots hold all 4)
			"$PY" scripts/serve_bench.py http://127.0.0.1:8081 base 32 32 16 8 128256 >/dev/null 2>&1
			"$PY" scripts/serve_bench.py http://127.0.0.1:8081 "$AD" 32 32 16 8 128256 2>&1 | sed 's/^SERVEBENCH/WARMUP/' | tee "$LOG/serve8b.warm.txt"
			: >"$LOG/serve8b.txt"
			# SERVE8B_QUICK=1: only the Go client's runs below (an A/B of
			# serve flags in about half the time)
			if [[ -z ${SERVE8B_QUICK:-} ]]; then
				"$PY" scripts/serve_bench.py http://127.0.0.1:8081 base 256 64 128 64 128256 2>&1 | tee -a "$LOG/serve8b.txt"
				"$PY" scripts/serve_bench.py http://127.0.0.1:8081 "$AD" 256 64 128 64 128256 2>&1 | tee -a "$LOG/serve8b.txt"
				# one adapter only: LoRA compute without the split into four adapter queues
				"$PY" scripts/serve_bench.py http://127.0.0.1:8081 "${AD%%,*}" 256 64 128 64 128256 2>&1 | tee -a "$LOG/serve8b.txt"
				"$PY" scripts/serve_bench.py http://127.0.0.1:8081 base 256 64 128 64 128256 2>&1 | tee -a "$LOG/serve8b.txt"
			fi
			# the same load from a Go client (streamed completions, token-id
			# prompts), 1,024 requests: is the Python client what limits the rate?
			# Then the four adapters mixed (issue 9's 0.90 x base, issue 14's
			# 10,000 tok/s with four rank-32 adapters).
			gi=0
			for GM in base "$AD"; do
				gi=$((gi + 1))
				timeout "$(left 90)" "$ROOT/bin/gpu/peftd" bench --url http://127.0.0.1:8081 --models "$GM" --requests 1024 --concurrency 64 \
					--prompt-tokens 128 --vocab 128256 --max-tokens 64 --quiet --json >"$LOG/serve8b.gobench.$gi.json" 2>&1
				"$PY" -c 'import json,sys; r=json.load(open(sys.argv[1])); print("GOBENCH models=%s requests=%d failed=%d tok_s=%.0f steady_tok_s=%.0f ttft_p50_ms=%.1f ttft_p99_ms=%.1f tpot_p50_ms=%.2f" % (sys.argv[2], r["Completed"], r["Failed"], r["Throughput"], r["SteadyThroughput"], r["TTFT"]["P50"]/1e6, r["TTFT"]["P99"]/1e6, r["TPOT"]["P50"]/1e6))' \
					"$LOG/serve8b.gobench.$gi.json" "$GM" 2>&1 | tee -a "$LOG/serve8b.txt"
			done
			# what the steps were like over all the runs: count, mean duration, rows and sequences
			curl -sS http://127.0.0.1:8081/metrics >"$LOG/serve8b.metrics.txt"
			awk '/^peftd_step_(duration|device)_seconds_(sum|count) /{v[$1]=$2} /^peftd_batch_tokens_(sum|count) /{v[$1]=$2} /^peftd_batch_size_(sum|count) /{v[$1]=$2} /^peftd_steps_(ahead|chained)_total /{v[$1]=$2}
				END {n=v["peftd_step_duration_seconds_count"]; d=v["peftd_step_device_seconds_count"]; if (n>0) printf "SERVESTEPS steps=%d ahead=%d chained=%d mean_ms=%.2f device_mean_ms=%.2f mean_rows=%.1f mean_seqs=%.1f\n", n, v["peftd_steps_ahead_total"], v["peftd_steps_chained_total"], 1000*v["peftd_step_duration_seconds_sum"]/n, (d>0 ? 1000*v["peftd_step_device_seconds_sum"]/d : 0), v["peftd_batch_tokens_sum"]/v["peftd_batch_tokens_count"], v["peftd_batch_size_sum"]/v["peftd_batch_size_count"]}' \
				"$LOG/serve8b.metrics.txt" | tee -a "$LOG/serve8b.txt"
			# device time and rows by step kind (decode or mixed; with adapters or not)
			sed -n 's/^peftd_step_kind_\(device_seconds_sum\|device_seconds_count\|rows_total\){kind="\([a-z]*\)",lora="\([a-z]*\)"} \(.*\)/\1 \2 \3 \4/p' "$LOG/serve8b.metrics.txt" |
				awk '{v[$1 " " $2 "," $3]=$4; k[$2 "," $3]=1} END {printf "SERVEKINDS"; for (x in k) {c=v["device_seconds_count " x]; if (c>0) printf " %s:steps=%d,ms=%.2f,rows=%.0f", x, c, 1000*v["device_seconds_sum " x]/c, v["rows_total " x]/c}; printf "\n"}' |
				tee -a "$LOG/serve8b.txt"
			# where the host time of a step went (mean ms per step, by phase)
			sed -n 's/^peftd_step_host_seconds_\(sum\|count\){phase="\([a-z]*\)"} \(.*\)/\1 \2 \3/p' "$LOG/serve8b.metrics.txt" |
				awk '{v[$1 " " $2]=$3} END {printf "SERVEHOST mean_ms"; n=split("plan prepare issue wait emit settle", ph, " "); for (i=1;i<=n;i++) {c=v["count " ph[i]]; printf " %s=%.3f", ph[i], (c>0 ? 1000*v["sum " ph[i]]/c : 0)}; printf "\n"}' |
				tee -a "$LOG/serve8b.txt"
			grep -E 'adapter|load|graphs' "$LOG/serve8b.log" | tail -n 12 | cut -c1-240
			# what the FP8 tuning kept (the tune cache's records, kept whole in
			# the logs): for products of more than 128 rows, the heuristic's and
			# the kept configuration's µs at each SM target (0: every SM; else
			# the SMs left beside the LoRA stream), and the K split against them
			for tf in "$SD"/tune/fp8-*.json; do
				[[ -f $tf ]] || continue
				cp "$tf" "$LOG/serve8b.tune.json"
				"$PY" -c 'import json,sys
for r in json.load(open(sys.argv[1]))["records"]:
    if r["t"] <= 128 or not r["configs"]: continue
    c = r["configs"][0]; sp = r.get("split") or {}
    print("SERVETUNE t=%d n=%d k=%d sms=%d heuristic_us=%.1f kept_us=%.1f split_us=%s whole=%s" % (r["t"], r["n"], r["k"], r["sms"], c["heuristic_us"], c["kept_us"], "%.1f" % sp["SplitUs"] if sp else "-", sp.get("Whole", "-")))' "$tf" 2>&1 | tee -a "$LOG/serve8b.txt"
			done
		else
			echo "serve8b: FAIL: server did not start"; tail -n 20 "$LOG/serve8b.log"; status=1
		fi
		serve_stop
	else
		echo "serve8b: no checkpoint (run the decode phase first)"
	fi
	stamp serve8b
fi

if want ready8b; then
	# Issue 12's first rows: process start -> /readyz 200 for the random 8B
	# checkpoint from the page cache, with a cold kernel cache and again with
	# the warm one, and the first base request after ready vs the next.
	# READY8B_FP8=1: an FP8 checkpoint (tools/make_random_llama.py --fp8,
	# ~8.5 GB) served with --weights fp8, its weights uploaded as stored.
	# READY8B_WARM=idle: --warm-graphs idle (graphs recorded after ready; the
	# first requests may record theirs), and the log line saying when the
	# idle recording ended.
	MD=/tmp/llama8b-random R8ARGS=() R8MAKE=()
	if [[ -n "${READY8B_FP8:-}" ]]; then
		MD=/tmp/llama8b-fp8 R8ARGS=(--weights fp8) R8MAKE=(--fp8 --adapters 1)
	fi
	if [[ -n "${READY8B_WARM:-}" ]]; then
		R8ARGS+=(--warm-graphs "$READY8B_WARM")
	fi
	echo "=== ready8b: peftd serve start -> ready on $MD/base ${R8ARGS[*]}"
	if random_ckpt "$MD" ready8b --layers "${DECODE_LAYERS:-32}" "${R8MAKE[@]}"; then
		cat "$MD"/base/*.safetensors >/dev/null
		SD=$(mktemp -d)
		for run in cold warm; do
			t0=$(date +%s.%N)
			PEFTD_CACHE=$SD "$ROOT/bin/gpu/peftd" serve --device cuda --model "$MD/base" --store "$MD/adapters" --slots 5 --listen 127.0.0.1:8083 "${R8ARGS[@]}" >"$LOG/ready8b.$run.log" 2>&1 &
			SRV=$!
			ok=0
			for i in $(seq 1 1200); do
				if [[ $(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8083/readyz) == 200 ]]; then ok=1; break; fi
				kill -0 "$SRV" 2>/dev/null || break
				sleep 0.05
			done
			t1=$(date +%s.%N)
			if ((ok)); then
				req() { curl -s -o /dev/null -w '%{time_total}' -H 'Content-Type: application/json' -d '{"model":"base","prompt":[1,2,3,4],"max_tokens":1}' http://127.0.0.1:8083/v1/completions; }
				r1=$(req); r2=$(req); r3=$(req)
				awk -v a="$t0" -v b="$t1" -v r1="$r1" -v r2="$r2" -v r3="$r3" -v run="$run" 'BEGIN{printf "READY8B %s kernel cache: start -> ready %.2f s; first request %.1f ms, then %.1f, %.1f ms\n", run, b-a, 1000*r1, 1000*r2, 1000*r3}' | tee -a "$LOG/ready8b.txt"
				sleep 2 # an idle warm-up ends meanwhile
				grep -E 'engine|graphs|kernels|model|recorded while idle' "$LOG/ready8b.$run.log" | head -7 | cut -c1-200
			else
				echo "ready8b: FAIL: $run server not ready"; tail -n 20 "$LOG/ready8b.$run.log"; status=1
			fi
			serve_stop
		done
		save "$LOG/ready8b.txt"
	else
		status=1
	fi
	stamp ready8b
fi

# nsys_find: the nsys on the device (or the one bundled with Nsight Compute)
nsys_find() { command -v nsys || ls /usr/local/cuda/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys /opt/nvidia/nsight-compute/*/host/target-linux-x64/nsys 2>/dev/null | head -1; }
# nsys_import NAME: a bundled nsys leaves $LOG/NAME.qdstrm when its importer
# cannot start: import it with the libraries that travel in bin/gpu/nsyslib
nsys_import() {
	if [[ ! -f "$LOG/$1.nsys-rep" && -f "$LOG/$1.qdstrm" ]]; then
		local qi
		qi=$(ls "$(dirname "$NSYS")"/../linux-desktop-glibc_2_11_3-x64/QdstrmImporter "$(dirname "$NSYS")"/QdstrmImporter 2>/dev/null | head -1)
		[[ -n "$qi" ]] && LD_LIBRARY_PATH="$ROOT/bin/gpu/nsyslib:$(dirname "$qi")" "$qi" -i "$LOG/$1.qdstrm" >"$LOG/$1.import.log" 2>&1
		tail -n 3 "$LOG/$1.import.log" 2>/dev/null
	fi
}

if want nsysdec; then
	# Where a decode step's time goes inside its graph: TestDecodeBench's
	# base rows (PEFTD_DECODE_VARIANTS=1; NSYSDEC_VARIANTS=2 adds the
	# 4 x r32 rows, with their LoRA stream's kernels in a table of their
	# own) at PEFTD_DECODE_BATCHES (default 1,16,64) under nsys with graph
	# nodes traced; scripts/nsys_steps.py
	# gives each kernel family's time per step and the idle time before it
	# (PDL overlap shows as negative gaps). The trace CSV goes to $OUT gzipped.
	MD=/tmp/llama8b-random
	NSYS="$(nsys_find)"
	echo "=== nsysdec: ${NSYS:-no nsys}"
	if [[ -n "$NSYS" ]] && random_ckpt "$MD" decode --layers "${DECODE_LAYERS:-32}"; then
		# the trace starts at the first timed decode step
		# (PEFTD_DECODE_PROFILE_RANGE): no prefill launches before it
		# NSYSDEC_METRICS=1: nsys also samples the GPU's metrics (DRAM
		# read / write throughput, SMs active, tensor activity) at
		# NSYSDEC_METRICS_HZ (200 kHz, nsys's most), and
		# scripts/nsys_metrics.py averages them under each kernel family
		# (older nsys spell the switch --gpu-metrics-device; one with
		# neither traces without the metrics and says so)
		met=()
		if [[ ${NSYSDEC_METRICS:-} == 1 ]]; then
			# the longest spelling this nsys's help names (-devices matches -device too)
			sw=$("$NSYS" profile --help 2>&1 | grep -o -- '--gpu-metrics-devices\?' | sort | tail -n 1)
			if [[ -n $sw ]]; then
				met=("$sw=0" "--gpu-metrics-frequency=${NSYSDEC_METRICS_HZ:-200000}")
			else
				echo "nsysdec: this nsys has no GPU metrics switch: tracing without them"
			fi
		fi
		(cd runtime/gpu && PEFTD_MODEL_8B=$MD PEFTD_DECODE_VARIANTS="${NSYSDEC_VARIANTS:-1}" PEFTD_DECODE_PROFILE_RANGE=1 PEFTD_DECODE_BATCHES="${PEFTD_DECODE_BATCHES:-1,16,64}" timeout "$(left 300)" \
			"$NSYS" profile -t cuda --cuda-graph-trace=node "${met[@]}" --capture-range=cudaProfilerApi --capture-range-end=stop -o "$LOG/nsysdec" -f true "$GPUBIN" -test.v -test.count=1 -test.run '^TestDecodeBench$') >"$LOG/nsysdec.log" 2>&1 || status=1
		nsys_import nsysdec
		# stats' own output is kept: v0.24's bf16 runs left an empty CSV
		# after a good import, and said nothing of why
		"$NSYS" stats --force-export=true --report cuda_gpu_trace --format csv -o "$LOG/nsysdec" "$LOG/nsysdec.nsys-rep" >"$LOG/nsysdec.stats.log" 2>&1
		{
			grep -E '^BENCH decode' "$LOG/nsysdec.log"
			echo "nsysdec: $(wc -l <"$LOG/nsysdec_cuda_gpu_trace.csv" 2>/dev/null || echo no) lines of GPU trace"
			"$PY" scripts/nsys_steps.py "$LOG/nsysdec_cuda_gpu_trace.csv" 2>&1
			# stats --force-export leaves the report's SQLite export beside it
			[[ ${NSYSDEC_METRICS:-} == 1 ]] && "$PY" scripts/nsys_metrics.py "$LOG/nsysdec_cuda_gpu_trace.csv" "$LOG/nsysdec.sqlite" 2>&1
		} | tee "$LOG/nsysdec.txt"
		[[ -f "$LOG/nsysdec_cuda_gpu_trace.csv" ]] && gzip -c "$LOG/nsysdec_cuda_gpu_trace.csv" >"$LOG/nsysdec_cuda_gpu_trace.csv.gz"
		tail -n 5 "$LOG/nsysdec.stats.log"
		save "$LOG/nsysdec.txt" "$LOG/nsysdec_cuda_gpu_trace.csv.gz" "$LOG/nsysdec.stats.log"
	else
		echo "nsysdec: no nsys, or the random checkpoint could not be made"
	fi
	stamp nsysdec
fi

if want nsys8b; then
	# Where serving time goes: serve8b's base load (concurrency 64) with four
	# adapters mixed in, under nsys (CUDA API and GPU trace, graph nodes
	# traced): GPU busy fraction, idle gaps between kernels, the kernels that
	# took the time (scripts/nsys_busy.py), and the CUDA API calls.
	MD=/tmp/llama8b-random
	NSYS="$(nsys_find)"
	echo "=== nsys8b: ${NSYS:-no nsys}"
	if [[ -n "$NSYS" ]] && random_ckpt "$MD" decode --layers "${DECODE_LAYERS:-32}"; then
		SD=$(mktemp -d)
		PEFTD_CACHE=$SD "$NSYS" profile -t cuda,osrt --cuda-graph-trace=node -o "$LOG/nsys8b" -f true \
			"$ROOT/bin/gpu/peftd" serve --device cuda --model "$MD/base" --store "$MD/adapters" --slots 5 --max-queue 1024 --listen 127.0.0.1:8084 ${SERVE8B_ARGS:-} >"$LOG/nsys8b.log" 2>&1 &
		SRV=$!
		if serve_wait "$LOG/nsys8b.log" "$(left 200)"; then
			AD=$(ls "$MD/adapters" | paste -sd, -)
			"$PY" scripts/serve_bench.py http://127.0.0.1:8084 "$AD" 32 32 16 8 128256 >/dev/null 2>&1
			"$PY" scripts/serve_bench.py http://127.0.0.1:8084 "base,$AD" 128 64 128 64 128256 2>&1 | tee "$LOG/nsys8b.txt"
			serve_stop
			sleep 2
			nsys_import nsys8b
			"$NSYS" stats --report cuda_gpu_trace --format csv -o "$LOG/nsys8b" "$LOG/nsys8b.nsys-rep" >/dev/null 2>&1
			"$NSYS" stats --report cuda_api_sum --format csv -o "$LOG/nsys8b" "$LOG/nsys8b.nsys-rep" >/dev/null 2>&1
			"$NSYS" stats --report cuda_api_trace --format csv -o "$LOG/nsys8b" "$LOG/nsys8b.nsys-rep" >/dev/null 2>&1
			"$PY" scripts/nsys_launch.py "$LOG"/nsys8b_cuda_api_trace.csv "$LOG"/nsys8b_cuda_gpu_trace.csv 2>&1 | tee -a "$LOG/nsys8b.txt"
			head -3 "$LOG"/nsys8b_cuda_api_trace.csv "$LOG"/nsys8b_cuda_gpu_trace.csv 2>/dev/null | cut -c1-300
			"$PY" scripts/nsys_busy.py "$LOG"/nsys8b_cuda_gpu_trace.csv 2>&1 | tee -a "$LOG/nsys8b.txt"
			head -12 "$LOG"/nsys8b_cuda_api_sum.csv 2>/dev/null | cut -c1-160 | sed 's/^/NSYS api /' | tee -a "$LOG/nsys8b.txt"
			save "$LOG/nsys8b.txt"
		else
			echo "nsys8b: FAIL: server did not start"; tail -n 20 "$LOG/nsys8b.log"; status=1
			serve_stop
		fi
	else
		echo "nsys8b: no nsys, or the random checkpoint could not be made"
	fi
	stamp nsys8b
fi

if want cold8b; then
	# Issue 12's whole table against a local S3 server (scripts/cold.sh): start
	# -> ready, deploy, bucket -> listed, S3 -> first token, resident, host ->
	# token, after the idle TTLs, and the server's phase metrics; the random 8B
	# checkpoint and its four rank-32 adapters (168 MB each).
	MD=/tmp/llama8b-random
	echo "=== cold8b: $MD/base, adapters through versitygw"
	if random_ckpt "$MD" decode --layers "${DECODE_LAYERS:-32}" && [[ -f bin/gpu/versitygw.gz ]]; then
		cat "$MD"/base/*.safetensors >/dev/null
		COLD_BIN="$ROOT/bin/gpu/peftd" COLD_VERSITYGW="$ROOT/bin/gpu/versitygw.gz" COLD_MODEL="$MD/base" COLD_ADAPTERS_SRC="$MD/adapters" \
			COLD_DEVICE=cuda COLD_OUT="$LOG/cold8b" timeout "$(left 300)" bash scripts/cold.sh >"$LOG/cold8b.log" 2>&1 || status=1
		grep '^COLD' "$LOG/cold8b.log" | tee "$LOG/cold8b.txt"
		[[ -s "$LOG/cold8b.txt" ]] || tail -n 20 "$LOG/cold8b.log"
		save "$LOG/cold8b.txt"
	else
		echo "cold8b: no checkpoint or no bin/gpu/versitygw.gz"; status=1
	fi
	stamp cold8b
fi

if want soak8b; then
	# The hardening soak on the GPU: an 8B-shape checkpoint (SOAK_LAYERS layers
	# of Llama 3.1 8B's shapes, default 8, so it is written in about a minute)
	# with two rank-8 adapters copied into 200, S3 store on versitygw (carry it
	# as bin/gpu/versitygw.gz; without it the store is a folder), 8 slots, for
	# the minutes the deadline leaves (at most SOAK_MINUTES, default 5).
	SK=/tmp/llama8b-soak
	echo "=== soak8b: make $SK (${SOAK_LAYERS:-8} layers of the 8B shapes, 2 rank-8 adapters)"
	if random_ckpt "$SK" soak8b --layers "${SOAK_LAYERS:-8}" --adapters 2 --rank 8; then
		mins=$(( ($(left 900) - 120) / 60 ))
		((mins > ${SOAK_MINUTES:-5})) && mins=${SOAK_MINUTES:-5}
		((mins < 1)) && mins=1
		VGW=; [[ -f bin/gpu/versitygw.gz ]] && VGW="$ROOT/bin/gpu/versitygw.gz"
		mkdir -p "$LOG/soak8b"
		SOAK_BIN="$ROOT/bin/gpu/peftd" SOAK_VERSITYGW="$VGW" SOAK_STORE="${VGW:+s3}" SOAK_MODEL=$SK/base SOAK_ADAPTERS_SRC=$SK/adapters \
			SOAK_DEVICE=cuda SOAK_MINUTES=$mins SOAK_OUT="$LOG/soak8b" SOAK_ARGS="--warmup-max 90s" \
			timeout "$(left 900)" bash scripts/soak.sh >"$LOG/soak8b.log" 2>&1 || status=1
		sed -n '/== soak report/,/^PASS\|^FAIL/p' "$LOG/soak8b.log" >"$LOG/soak8b.txt"
		tail -n 3 "$LOG/soak8b.log"
	else
		status=1
		tail -n 20 "$LOG/soak8b.make.log"
	fi
	stamp soak8b
fi

if want prefix8b; then
	# Automatic prefix caching on the GPU: the soak8b checkpoint (made here if
	# absent), a shared 2000-token prefix + 32 tokens per request, streamed, at
	# concurrency 32 over the base model and its two adapters; the same load
	# with the cache on and with --no-prefix-cache; then greedy outputs of the
	# two runs compared.
	SK=/tmp/llama8b-soak
	echo "=== prefix8b: $SK"
	if random_ckpt "$SK" prefix8b --layers "${SOAK_LAYERS:-8}" --adapters 2 --rank 8; then
			AD=$(ls "$SK/adapters" | paste -sd, -)
		for mode in on off off2; do
			SD=$(mktemp -d)
			extra=(); [[ $mode == off* ]] && extra=(--no-prefix-cache)
			PEFTD_CACHE=$SD "$ROOT/bin/gpu/peftd" serve --device cuda --model "$SK/base" --store "$SK/adapters" --slots 4 --max-queue 1024 --listen 127.0.0.1:8082 "${extra[@]}" >"$LOG/prefix8b.$mode.log" 2>&1 &
			SRV=$!
			if serve_wait "$LOG/prefix8b.$mode.log" "$(left 200)"; then
				"$PY" scripts/prefix_bench.py http://127.0.0.1:8082 "base,$AD" 6 3 64 8 4 128256 warmup >/dev/null 2>&1
				[[ $mode == off2 ]] || timeout "$(left 200)" "$PY" scripts/prefix_bench.py http://127.0.0.1:8082 "base,$AD" 128 32 2000 32 32 128256 "cache-$mode" 2>&1 | tee -a "$LOG/prefix8b.txt"
				# greedy outputs of fixed prompts, for the on/off comparison
				"$PY" - "$mode" "base,$AD" >"$LOG/prefix8b.greedy.$mode.json" 2>&1 <<'PYEOF'
import json, random, sys, urllib.request
mode, models = sys.argv[1], sys.argv[2].split(",")
rng = random.Random(7)
system = [rng.randrange(3, 128256) for _ in range(2000)]
out = []
for i in range(24):
    ids = system + [3 + i, 5 + i, 7 + i]
    body = json.dumps({"model": models[i % len(models)], "prompt": ids, "max_tokens": 16, "temperature": 0, "ignore_eos": True, "return_token_ids": True}).encode()
    r = json.load(urllib.request.urlopen(urllib.request.Request("http://127.0.0.1:8082/v1/completions", body, {"Content-Type": "application/json"}), timeout=120))
    out.append(r["choices"][0]["token_ids"])
print(json.dumps(out))
PYEOF
				curl -s http://127.0.0.1:8082/metrics | grep -E '^(vllm:prefix_cache|peftd_prefix_cache)' >>"$LOG/prefix8b.txt"
			else
				echo "prefix8b: FAIL: server ($mode) did not start"; tail -n 20 "$LOG/prefix8b.$mode.log"; status=1
			fi
			serve_stop
		done
		# cache on vs off, and off vs off on a fresh server (the GPU's own
		# run-to-run agreement: bf16 rounding differs with batch composition)
		"$PY" - "$LOG"/prefix8b.greedy.{on,off,off2}.json <<'PYEOF' | tee -a "$LOG/prefix8b.txt"
import json, sys
on, off, off2 = (json.load(open(f)) for f in sys.argv[1:4])
def cmp(a, b):
    same = sum(x == y for x, y in zip(a, b))
    tok = sum(sum(p == q for p, q in zip(x, y)) for x, y in zip(a, b))
    return f"identical sequences {same}/{len(a)}, identical tokens {tok}/{sum(len(x) for x in a)}"
print("PREFIXGREEDY cache on vs off:", cmp(on, off), "| off vs off:", cmp(off, off2))
PYEOF
	else
		status=1
		tail -n 20 "$LOG/prefix8b.make.log"
	fi
	stamp prefix8b
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
	if [[ -f "$LOG/fixture8b.log" ]]; then
		printf '%-34s %-6s %s\n' fixture8b.TestFixture8BShape "$(grep -oE -- '--- (PASS|FAIL|SKIP)' "$LOG/fixture8b.log" | tail -1 | cut -c5-)" \
			"$(grep -oE 'maxrel=[0-9.eE+-]+.*' "$LOG/fixture8b.log" | tail -1 | cut -c1-90)"
	fi
	if [[ -s "$LOG/lorabench.txt" ]]; then
		echo "LoRA path per 8B layer (median us over graph replays, L2 flushed; 4 adapters; full table in lorabench.txt):"
		grep -E '^BENCH lora (device|eager|N |4 )' "$LOG/lorabench.txt" | grep -vE ' (16|64) ' | cut -c12-
		grep -E '^BENCH lora 4 +(16|64) +(1|256|4x512pf) ' "$LOG/lorabench.txt" | cut -c12-
	fi
	[[ -s "$LOG/attnbench.txt" ]] && echo "Prefill attention per 8B layer (median us):" && cut -c12- "$LOG/attnbench.txt"
	[[ -s "$LOG/skinnybench.txt" ]] && echo "bf16 product of 1-16 rows, gemm_skinny vs cuBLASLt (median us over graph replays):" && cut -c14- "$LOG/skinnybench.txt"
	[[ -s "$LOG/wsplanbench.txt" ]] && echo "ws one-wave plans (* the planner's; median us over graph replays):" && cut -c14- "$LOG/wsplanbench.txt"
	[[ -s "$LOG/fp8bench.txt" ]] && echo "FP8 product at the 8B projection shapes (median us over graph replays):" && cut -c15- "$LOG/fp8bench.txt"
	[[ -f "$LOG/serve.result" ]] && cat "$LOG/serve.result" && grep -E 'tok|req|TTFT|thr' "$LOG/serve.bench.txt" | head -8
	[[ -f "$LOG/serve8b.txt" ]] && grep -E "^(SERVEBENCH|GOBENCH|SERVESTEPS|SERVEKINDS|SERVEHOST)" "$LOG/serve8b.txt" | cut -c1-320
	[[ -s "$LOG/prefix8b.txt" ]] && echo "Prefix caching (8B shapes, 8 layers; 2000-token shared prefix, concurrency 32):" && grep -E '^(PREFIXBENCH|PREFIXGREEDY)' "$LOG/prefix8b.txt" | cut -c1-230
	[[ -s "$LOG/nsys8b.txt" ]] && echo "Serving under nsys (8B shapes, concurrency 64):" && grep -E '^(SERVEBENCH|NSYS)' "$LOG/nsys8b.txt" | cut -c1-200
	[[ -s "$LOG/quality.txt" ]] && echo "Quality (peftd eval, stories260K; full tables in quality.txt):" && grep -E '^(model|candidate)|  all ' "$LOG/quality.txt"
	[[ -s "$LOG/trained.check.log" ]] && grep -hE '^--- |relative' "$LOG/trained.check.log" | sed 's/^/trained: /'
	[[ -s "$LOG/trained.txt" ]] && echo "Quality on the model trained here (peftd eval; trained.txt, train.json):" && grep -E '^(model|candidate)|  all ' "$LOG/trained.txt"
	ls "$LOG"/fp8ref.*.log >/dev/null 2>&1 && grep -hE 'worst ratio|^--- ' "$LOG"/fp8ref.*.log | sed 's/^/fp8ref: /' 
	[[ -s "$LOG/cold8b.txt" ]] && echo "Cold start (8B shapes, versitygw; scripts/cold.sh):" && cut -c6-200 "$LOG/cold8b.txt"
	[[ -s "$LOG/ready8b.txt" ]] && cat "$LOG/ready8b.txt"
	[[ -s "$LOG/kernels.txt" ]] && grep -E '^(KERNELS|peftd: )' "$LOG/kernels.txt"
	[[ -s "$LOG/soak8b.txt" ]] && echo "Soak on the GPU (8B shapes; full report in soak8b.txt):" && grep -E '^(requests|failures|allowed|latency (overall|hot)|served/s|server RSS|GPU memory|PASS|FAIL)' "$LOG/soak8b.txt" | cut -c1-200
	grep -h '^BENCH \(launch\|sample\)' "$LOG"/*.log 2>/dev/null | cut -c7-
	grep -h '^BENCH adapterload' "$LOG"/decode.log 2>/dev/null | cut -c7-
	if [[ -s "$LOG/decode.txt" ]]; then
		echo "Decode throughput (128 new tokens after 512-token prompts):"
		grep "^BENCH decode" "$LOG/decode.txt" | cut -c14-
		# each setting's base and adapters rows side by side (scripts/decode_ab.py)
		"$PY" scripts/decode_ab.py "$LOG/decode.txt" 2>&1 | sed 's/^/AB /'
	fi
	echo "elapsed ${SECONDS}s"
} | tee "$LOG/summary.txt"
if [[ -n "${OUT:-}" ]]; then
	# the trace files are large: the tables from them are in nsys8b.txt
	# $OUT brings back 8 files: what save put there during the run (so that
	# a call cut off still returns its tables) gives way to the summary, the
	# packed logs and the first six tables present, in this order
	find "$OUT" -mindepth 1 -maxdepth 1 -type f -delete
	tar czf "$OUT/logs.tgz" --exclude='*.qdstrm' --exclude='*.nsys-rep' --exclude='*.sqlite' --exclude='*.csv' -C "$LOG" . 2>/dev/null
	cp "$LOG/summary.txt" "$OUT/"
	n=0
	for f in quality.txt trained.txt lorancu.txt decode.txt skinnybench.txt wsplanbench.txt fp8bench.txt cold8b.txt ready8b.txt readme8b.txt serve8b.txt lorabench.txt attnbench.txt soak8b.txt prefix8b.txt nsys8b.txt nsysdec.txt load.txt profile.txt kdetail.txt train.json; do
		if ((n < 6)) && [[ -f "$LOG/$f" ]]; then cp "$LOG/$f" "$OUT/" && n=$((n + 1)); fi
	done
fi
exit $status
