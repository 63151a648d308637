#!/usr/bin/env bash
# Soak test (make soak): 200 adapters in a store, peftd serve with 8 device
# slots, `peftd soak` for SOAK_MINUTES of mixed invoke/completions load with
# one store outage and one adapter replaced mid-run. Exits non-zero when the
# soak fails (any failed request, cold adapters not served after the outage,
# memory growth).
#
# Knobs (environment):
#   SOAK_MINUTES=5          minutes of timed load (after a warm-up over every adapter)
#   SOAK_BIN                a prebuilt peftd (default: build bin/peftd; the GPU machine has no Go)
#   SOAK_MODEL              base model folder (default: the embedded stories260K)
#   SOAK_ADAPTERS_SRC       folder of adapter folders copied round-robin (default: models/adapters,
#                           i.e. pirate and space); give adapters that fit SOAK_MODEL
#   SOAK_DEVICE=auto        auto, cpu or cuda
#   SOAK_ADAPTERS=200 SOAK_SLOTS=8 SOAK_CONCURRENCY=16 SOAK_OUTAGE_FOR=20s
#   SOAK_STORE=auto         s3 (versitygw; the outage stops it), fs (a folder; the outage moves it
#                           away), auto: s3 when versitygw is found, else fs
#   SOAK_VERSITYGW          versitygw binary, or a gzip of it (default: $PEFTD_VERSITYGW, PATH,
#                           .cache/bin, GOPATH/bin; bash .ci/setup-s3.sh installs it)
#   SOAK_HOST_CACHE_BYTES   peftd serve --host-cache-bytes (default: room for 48 adapters, so the
#                           host tier is full after the warm-up and RSS can be compared; 0: the
#                           server's own bound)
#   SOAK_SERVE_ARGS         more peftd serve flags;  SOAK_ARGS: more peftd soak flags
#   SOAK_READY_TIMEOUT=900  seconds to wait for /readyz (an 8B checkpoint takes a while)
#   SOAK_OUT                folder to copy the report and the server log into (e.g. $OUT)
#   SOAK_KEEP=1             keep the work folder (kept anyway when the soak fails)
#
# CPU:  make soak SOAK_MINUTES=5
# GPU machine (no Go there): here, `make gpu-check` (bin/gpu/peftd) and
#   gzip -9 -c .cache/bin/versitygw > bin/gpu/versitygw.gz
# then on the device, carrying bin/gpu: a random Llama-3.1-8B-shape checkpoint
# and two rank-8 adapters (200 copies of rank-8 8B adapters are ~8.4 GB in the
# store and as much in the disk cache; rank 32 would not fit the disk):
#   python3 tools/make_random_llama.py /tmp/llama8b-random --adapters 2 --rank 8
# and (a second call if need be: /tmp stays while the machine is warm)
#   SOAK_BIN=bin/gpu/peftd SOAK_VERSITYGW=bin/gpu/versitygw.gz SOAK_MODEL=/tmp/llama8b-random/base \
#   SOAK_ADAPTERS_SRC=/tmp/llama8b-random/adapters SOAK_DEVICE=cuda SOAK_MINUTES=5 SOAK_OUT=$OUT \
#   SOAK_ARGS="--warmup-max 90s" bash scripts/soak.sh
# (no tokenizer.json there: peftd soak sends token-id prompts by itself).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SELF="$ROOT/scripts/soak.sh"

AK=peftdsoak
SK=peftdsoaksecret
REGION=us-east-1
BUCKET=soak

# shellcheck source=scripts/s3lib.sh
. "$ROOT/scripts/s3lib.sh"

# The outage commands peftd soak runs: soak.sh __outage start|stop WORK.
if [ "${1:-}" = "__outage" ]; then
	what="$2" work="$3" t0=$SECONDS
	# shellcheck disable=SC1091
	. "$work/store.env"
	case "$STORE_KIND:$what" in
	s3:start) vgw_stop "$work" ;;
	s3:stop) vgw_start "$work" ;;
	fs:start) mv "$work/store" "$work/store.down" ;;
	fs:stop) mv "$work/store.down" "$work/store" ;;
	*) echo "soak.sh: bad outage call $*" >&2; exit 2 ;;
	esac
	echo "soak.sh: outage $what ($STORE_KIND) done in $((SECONDS - t0))s" >&2
	exit 0
fi

cd "$ROOT"
MINUTES="${SOAK_MINUTES:-5}"
N="${SOAK_ADAPTERS:-200}"
SLOTS="${SOAK_SLOTS:-8}"
CONC="${SOAK_CONCURRENCY:-16}"
DEVICE="${SOAK_DEVICE:-auto}"
SRC="${SOAK_ADAPTERS_SRC:-$ROOT/models/adapters}"

if [ -n "${SOAK_BIN:-}" ]; then
	BIN="$SOAK_BIN"
else
	BIN="$ROOT/bin/peftd"
	echo "soak.sh: building $BIN"
	CGO_CFLAGS="${CGO_CFLAGS:--g -O2 -Wno-deprecated-declarations}" go build -o "$BIN" ./cmd/peftd
fi
[ -x "$BIN" ] || { echo "soak.sh: $BIN is not an executable" >&2; exit 2; }

SRCS=()
for d in "$SRC"/*/; do
	[ -f "$d/adapter_config.json" ] && [ -f "$d/adapter_model.safetensors" ] && SRCS+=("${d%/}")
done
[ "${#SRCS[@]}" -gt 0 ] || { echo "soak.sh: no adapter folders under $SRC" >&2; exit 2; }

KIND="${SOAK_STORE:-auto}"
VGW=""
if [ "$KIND" != fs ]; then
	if VGW="$(find_vgw "${SOAK_VERSITYGW:-}")"; then
		KIND=s3
	elif [ "$KIND" = s3 ]; then
		echo "soak.sh: SOAK_STORE=s3 but no versitygw (bash .ci/setup-s3.sh installs it; or set SOAK_VERSITYGW)" >&2
		exit 2
	else
		KIND=fs
		echo "soak.sh: no versitygw found (bash .ci/setup-s3.sh): using a folder store; its outage moves the folder away" >&2
	fi
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/peftd-soak.XXXXXX")"
SERVE_PID=""
STATUS=1
cleanup() {
	set +e
	stop_pid "$SERVE_PID"
	vgw_stop "$WORK"
	if [ -d "$WORK/store.down" ]; then mv "$WORK/store.down" "$WORK/store"; fi
	if [ -n "${SOAK_OUT:-}" ]; then
		mkdir -p "$SOAK_OUT"
		cp "$WORK/report.txt" "$WORK/serve.log" "$SOAK_OUT/" 2>/dev/null
	fi
	if [ "$STATUS" -eq 0 ] && [ "${SOAK_KEEP:-}" != 1 ]; then
		rm -rf "$WORK"
	else
		echo "soak.sh: logs kept in $WORK (serve.log, versitygw.log, report.txt)" >&2
	fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The store: soak-000..soak-(N-1), copies of the source adapters round-robin.
ids=()
for i in $(seq 0 $((N - 1))); do ids+=("$(printf 'soak-%03d' "$i")"); done
echo "soak.sh: $N adapters from ${#SRCS[@]} source adapter(s) under $SRC into a $KIND store"
if [ "$KIND" = s3 ]; then
	vgw_setup "$WORK" "$VGW"
	s3 -o /dev/null -X PUT "http://$S3ADDR/$BUCKET"
	# A plain S3 client deploys them (weights first, then the config), as a deploy tool would.
	for i in "${!ids[@]}"; do
		src="${SRCS[$((i % ${#SRCS[@]}))]}"
		printf '%s %s\n' "$src/adapter_model.safetensors" "http://$S3ADDR/$BUCKET/adapters/${ids[$i]}/adapter_model.safetensors"
	done | xargs -P 8 -n 2 sh -c 'curl -sS --fail-with-body -o /dev/null --aws-sigv4 "aws:amz:'"$REGION"':s3" --user "'"$AK:$SK"'" -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" -T "$0" "$1"'
	for i in "${!ids[@]}"; do
		src="${SRCS[$((i % ${#SRCS[@]}))]}"
		printf '%s %s\n' "$src/adapter_config.json" "http://$S3ADDR/$BUCKET/adapters/${ids[$i]}/adapter_config.json"
	done | xargs -P 8 -n 2 sh -c 'curl -sS --fail-with-body -o /dev/null --aws-sigv4 "aws:amz:'"$REGION"':s3" --user "'"$AK:$SK"'" -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" -T "$0" "$1"'
	STORE="s3://$BUCKET/adapters?endpoint=http://$S3ADDR&path_style=true"
	export AWS_ACCESS_KEY_ID="$AK" AWS_SECRET_ACCESS_KEY="$SK" AWS_REGION="$REGION"
else
	for i in "${!ids[@]}"; do
		src="${SRCS[$((i % ${#SRCS[@]}))]}"
		mkdir -p "$WORK/store/${ids[$i]}"
		cp "$src/adapter_model.safetensors" "$src/adapter_config.json" "$WORK/store/${ids[$i]}/"
	done
	STORE="$WORK/store"
fi
echo "STORE_KIND=$KIND" >"$WORK/store.env"

# The host tier holds 48 adapters (6 per slot): the warm-up fills it, so
# the RSS at the start is the steady state. Bytes: at most twice a file
# (bf16 weights are kept as they are, others as float32).
HOSTB="${SOAK_HOST_CACHE_BYTES:-}"
if [ -z "$HOSTB" ]; then
	wb=0
	for s in "${SRCS[@]}"; do
		b=$(stat -c %s "$s/adapter_model.safetensors")
		[ "$b" -gt "$wb" ] && wb=$b
	done
	HOSTB=$((wb * 2 * 48))
fi
HOSTFLAG=()
[ "$HOSTB" != 0 ] && HOSTFLAG=(--host-cache-bytes "$HOSTB")

PORT="$(free_port)"
URL="http://127.0.0.1:$PORT"
MODELFLAG=()
[ -n "${SOAK_MODEL:-}" ] && MODELFLAG=(--model "$SOAK_MODEL")
echo "soak.sh: peftd serve on $URL (--slots $SLOTS, --device $DEVICE${SOAK_MODEL:+, --model $SOAK_MODEL}, store $STORE)"
# shellcheck disable=SC2086
PEFTD_CACHE="$WORK/cache" "$BIN" serve --listen "127.0.0.1:$PORT" --slots "$SLOTS" --device "$DEVICE" --store "$STORE" \
	"${MODELFLAG[@]}" "${HOSTFLAG[@]}" ${SOAK_SERVE_ARGS:-} >"$WORK/serve.log" 2>&1 &
SERVE_PID=$!
t0=$SECONDS
until curl -fsS -o /dev/null "$URL/readyz" 2>/dev/null; do
	if ! kill -0 "$SERVE_PID" 2>/dev/null; then
		echo "soak.sh: peftd serve exited:" >&2
		tail -30 "$WORK/serve.log" >&2
		exit 1
	fi
	if [ $((SECONDS - t0)) -gt "${SOAK_READY_TIMEOUT:-900}" ]; then
		echo "soak.sh: peftd serve not ready after ${SOAK_READY_TIMEOUT:-900}s" >&2
		tail -30 "$WORK/serve.log" >&2
		exit 1
	fi
	sleep 0.5
done
echo "soak.sh: ready after $((SECONDS - t0))s; the server says:"
{ grep -E 'level=(INFO|WARN)' "$WORK/serve.log" | grep -Eiv 'adapter (deployed|loaded)' | head -8 | cut -c1-220; } || true

# soak-000 (a copy of the first source adapter) is hot: it is replaced with
# the next source adapter (itself, made new, when there is only one).
REPL="${SRCS[$((1 % ${#SRCS[@]}))]}"
rc=0
# shellcheck disable=SC2086
"$BIN" soak --url "$URL" --prefix soak- --duration "${MINUTES}m" --concurrency "$CONC" --pid "$SERVE_PID" \
	--outage-start "bash '$SELF' __outage start '$WORK'" --outage-stop "bash '$SELF' __outage stop '$WORK'" \
	--outage-for "${SOAK_OUTAGE_FOR:-20s}" --replace-with "$REPL" ${SOAK_ARGS:-} 2>&1 | tee "$WORK/report.txt" || rc=$?

# What the server logged at WARN and ERROR, most frequent first.
echo "== server log: $(grep -c 'level=WARN' "$WORK/serve.log" || true) warnings, $(grep -c 'level=ERROR' "$WORK/serve.log" || true) errors"
grep -E 'level=(WARN|ERROR)' "$WORK/serve.log" | sed -E 's/^time=[^ ]+ //; s/soak-[0-9]{3}/soak-N/g' | cut -c1-260 |
	sort | uniq -c | sort -rn | head -12 || true
if ! kill -0 "$SERVE_PID" 2>/dev/null; then
	echo "soak.sh: peftd serve died during the soak" >&2
	rc=1
fi
if [ "$rc" -ne 0 ]; then
	echo "soak.sh: FAIL"
	exit 1
fi
STATUS=0
echo "soak.sh: PASS"
