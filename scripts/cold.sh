#!/usr/bin/env bash
# Cold-start table (make cold; scripts/gpu-check.sh's cold8b phase): how long
# peftd takes to come back, measured as a client sees it, against a local S3
# server (versitygw):
#   start -> /readyz; the first base requests after ready;
#   `peftd deploy` of one adapter through the server (MB/s) and its first request;
#   an adapter put in the bucket by a plain S3 client: until the server lists it,
#   then S3 -> disk -> host -> device -> first token;
#   the same adapter resident, then evicted from the device (host -> token),
#   then after both idle TTLs evicted it (disk -> token);
#   and the server's own account of where cold time went (the
#   peftd_adapter_load_phase_seconds and peftd_adapter_cold_first_token_seconds
#   metrics).
# Every request is one token (max_tokens 1) of an 8-token id prompt.
#
# Knobs (environment):
#   COLD_BIN            a prebuilt peftd (default: build bin/peftd)
#   COLD_MODEL          base model folder (default: the embedded stories260K)
#   COLD_ADAPTERS_SRC   folder of adapter folders that fit COLD_MODEL (default models/adapters);
#                       adapters are copied round-robin as cold-0..cold-3
#   COLD_DEVICE=auto    auto, cpu or cuda
#   COLD_VERSITYGW      versitygw binary or gzip of it (see scripts/s3lib.sh's find_vgw)
#   COLD_TTL=4          seconds of the device and host idle TTLs (the last row waits them out)
#   COLD_READY_TIMEOUT=900
#   COLD_OUT            folder for the report and the server log
#
# CPU:  make cold
# GPU:  the cold8b phase of scripts/gpu-check.sh (bin/gpu/peftd, bin/gpu/versitygw.gz).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
AK=peftdcold
SK=peftdcoldsecret
REGION=us-east-1
BUCKET=cold
# shellcheck source=scripts/s3lib.sh
. "$ROOT/scripts/s3lib.sh"

cd "$ROOT"
DEVICE="${COLD_DEVICE:-auto}"
SRC="${COLD_ADAPTERS_SRC:-$ROOT/models/adapters}"
TTL="${COLD_TTL:-4}"
if [ -n "${COLD_BIN:-}" ]; then
	BIN="$COLD_BIN"
else
	BIN="$ROOT/bin/peftd"
	echo "cold.sh: building $BIN"
	CGO_CFLAGS="${CGO_CFLAGS:--g -O2 -Wno-deprecated-declarations}" go build -o "$BIN" ./cmd/peftd
fi
SRCS=()
for d in "$SRC"/*/; do
	[ -f "$d/adapter_config.json" ] && [ -f "$d/adapter_model.safetensors" ] && SRCS+=("${d%/}")
done
[ "${#SRCS[@]}" -gt 0 ] || { echo "cold.sh: no adapter folders under $SRC" >&2; exit 2; }
VGW="$(find_vgw "${COLD_VERSITYGW:-}")" || { echo "cold.sh: no versitygw (bash .ci/setup-s3.sh installs it; or set COLD_VERSITYGW)" >&2; exit 2; }

WORK="$(mktemp -d "${TMPDIR:-/tmp}/peftd-cold.XXXXXX")"
SERVE_PID=""
STATUS=1
cleanup() {
	set +e
	stop_pid "$SERVE_PID"
	vgw_stop "$WORK"
	if [ -n "${COLD_OUT:-}" ]; then
		mkdir -p "$COLD_OUT"
		cp "$WORK/report.txt" "$WORK/serve.log" "$COLD_OUT/" 2>/dev/null
	fi
	[ "${RESP:-}" = "$WORK/last.json" ] || rm -f "${RESP:-}"
	if [ "$STATUS" -eq 0 ]; then rm -rf "$WORK"; else echo "cold.sh: logs kept in $WORK" >&2; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

vgw_setup "$WORK" "$VGW"
s3 -o /dev/null -X PUT "http://$S3ADDR/$BUCKET"
export AWS_ACCESS_KEY_ID="$AK" AWS_SECRET_ACCESS_KEY="$SK" AWS_REGION="$REGION"
STORE="s3://$BUCKET/adapters?endpoint=http://$S3ADDR&path_style=true"

report() { echo "COLD $*" | tee -a "$WORK/report.txt"; }
ms() { awk -v s="$1" 'BEGIN { printf "%.1f", s * 1000 }'; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }'; }

PORT="$(free_port)"
URL="http://127.0.0.1:$PORT"
MODELFLAG=()
[ -n "${COLD_MODEL:-}" ] && MODELFLAG=(--model "$COLD_MODEL")
t0="$(now)"
PEFTD_CACHE="$WORK/cache" "$BIN" serve --listen "127.0.0.1:$PORT" --slots 2 --device "$DEVICE" --store "$STORE" \
	--device-ttl "${TTL}s" --host-ttl "${TTL}s" "${MODELFLAG[@]}" >"$WORK/serve.log" 2>&1 &
SERVE_PID=$!
until curl -fsS -o /dev/null "$URL/readyz" 2>/dev/null; do
	if ! kill -0 "$SERVE_PID" 2>/dev/null; then
		echo "cold.sh: peftd serve exited:" >&2
		tail -30 "$WORK/serve.log" >&2
		exit 1
	fi
	if awk -v a="$(since "$t0")" -v m="${COLD_READY_TIMEOUT:-900}" 'BEGIN { exit !(a > m) }'; then
		echo "cold.sh: not ready after ${COLD_READY_TIMEOUT:-900}s" >&2
		tail -30 "$WORK/serve.log" >&2
		exit 1
	fi
	sleep 0.05
done
report "start_to_ready_s $(since "$t0") (device $DEVICE${COLD_MODEL:+, model $COLD_MODEL})"
grep -E 'msg="?(gpu|engine|device|model)' "$WORK/serve.log" | head -4 | cut -c1-200 || true

# The client writes each response to memory (/dev/shm when there is one):
# a response file on the disk the server's adapter cache writes to waited
# ~150 ms once for the kernel's writeback of a just-fetched adapter, a
# client-side delay that is not the server's.
RESP="$WORK/last.json"
if [ -d /dev/shm ] && [ -w /dev/shm ]; then RESP="$(mktemp /dev/shm/peftd-cold.XXXXXX)"; fi
# req MODEL: one token; prints the client's milliseconds (fails on a non-200).
req() {
	local t
	t=$(curl -sS --fail-with-body -o "$RESP" -w '%{time_total}' -H 'Content-Type: application/json' \
		-d '{"prompt_ids":[1,2,3,4,5,6,7,8],"max_tokens":1,"ignore_eos":true}' "$URL/v1/adapters/$1/invoke") ||
		{ echo "cold.sh: request to $1 failed: $(cat "$RESP" 2>/dev/null)" >&2; return 1; }
	ms "$t"
}
# wait_listed ID: seconds until GET /v1/adapters/ID answers 200.
wait_listed() {
	local t
	t="$(now)"
	until curl -fsS -o /dev/null "$URL/v1/adapters/$1" 2>/dev/null; do
		if awk -v a="$(since "$t")" 'BEGIN { exit !(a > 120) }'; then echo "cold.sh: $1 not listed after 120 s" >&2; return 1; fi
		sleep 0.02
	done
	since "$t"
}

# The base model: the entry of /v1/models without a parent.
BASE=$(curl -fsS "$URL/v1/models" | tr '{' '\n' | grep '"parent":null' | sed 's/.*"id":"\([^"]*\)".*/\1/' | head -1)
[ -n "$BASE" ] || { echo "cold.sh: no base model in /v1/models" >&2; exit 1; }
b1=$(req "$BASE") && b2=$(req "$BASE") && b3=$(req "$BASE") && b4=$(req "$BASE") || exit 1
report "base_first_request_ms $b1; then $b2 $b3 $b4 ($BASE)"

# peftd deploy through the server (it validates and writes the store).
A0="${SRCS[0]}"
bytes=$(stat -c %s "$A0/adapter_model.safetensors")
t="$(now)"
PEFTD_URL="$URL" "$BIN" deploy --id cold-0 "$A0" >"$WORK/deploy.log" 2>&1 || { cat "$WORK/deploy.log" >&2; exit 1; }
d="$(since "$t")"
report "deploy_s $d ($(awk -v b="$bytes" -v s="$d" 'BEGIN { printf "%.0f", b / 1e6 / s }') MB/s, $(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1e6 }') MB)"
r=$(req cold-0) || exit 1
report "deployed_first_request_ms $r"

# A plain S3 client puts cold-1..3 in the bucket (weights first, then the config).
for i in 1 2 3; do
	src="${SRCS[$((i % ${#SRCS[@]}))]}"
	s3 -o /dev/null -T "$src/adapter_model.safetensors" "http://$S3ADDR/$BUCKET/adapters/cold-$i/adapter_model.safetensors"
	t="$(now)"
	s3 -o /dev/null -T "$src/adapter_config.json" "http://$S3ADDR/$BUCKET/adapters/cold-$i/adapter_config.json"
	w=$(wait_listed "cold-$i") || exit 1
	report "bucket_put_to_listed_s cold-$i $w (events, else the store's poll interval)"
done
r=$(req cold-1) || exit 1
report "s3_to_first_token_ms $r (cold-1: S3 -> disk -> host -> device -> token)"
r1=$(req cold-1) && r2=$(req cold-1) && r3=$(req cold-1) || exit 1
report "resident_ms $r1 $r2 $r3"
c2=$(req cold-2) && c3=$(req cold-3) || exit 1
report "s3_to_first_token_ms $c2 $c3 (cold-2, cold-3; 2 slots: cold-1 leaves the device)"
h1=$(req cold-1) && h2=$(req cold-2) && h3=$(req cold-3) || exit 1
report "host_to_first_token_ms $h1 $h2 $h3 (cold-1, cold-2, cold-3 from host memory: each evicts the least recently used of the 2 slots)"
sleep $((2 * TTL + 2))
r=$(req cold-2) || exit 1
report "after_ttls_first_token_ms $r (cold-2 after the device and host TTLs, ${TTL} s each)"

curl -fsS "$URL/metrics" >"$WORK/metrics.txt"
awk '/^peftd_adapter_load_phase_seconds_(sum|count)/ { split($1, a, "\""); v[a[2] " " ($1 ~ /_sum/ ? "sum" : "count")] = $2 }
	END { for (k in v) { split(k, p, " "); if (p[2] == "count" && v[k] > 0) printf "COLD phase %-10s mean_ms %.1f over %d loads\n", p[1], 1000 * v[p[1] " sum"] / v[k], v[k] } }' \
	"$WORK/metrics.txt" | sort | tee -a "$WORK/report.txt"
# Wakes of the server's stall watcher over 20 ms late (internal/stallwatch),
# and the latest of them the log named (over 50 ms).
awk '/^peftd_runtime_stall_seconds_(count|sum) / { v[$1] = $2 }
	END { printf "COLD runtime_stalls %d (%.0f ms in all)\n", v["peftd_runtime_stall_seconds_count"], 1000 * v["peftd_runtime_stall_seconds_sum"] }' \
	"$WORK/metrics.txt" | tee -a "$WORK/report.txt"
grep -E '^peftd_adapter_(uploads_total|pinned_)' "$WORK/metrics.txt" | sed 's/^/COLD /' | tee -a "$WORK/report.txt" || true
report "stall_log_ms $(grep -o 'late_ms=[0-9]*' "$WORK/serve.log" | cut -d= -f2 | paste -sd' ' -)"
awk '/^peftd_adapter_cold_first_token_seconds_(sum|count)/ { split($1, a, "\""); v[a[2] " " ($1 ~ /_sum/ ? "sum" : "count")] = $2 }
	END { for (k in v) { split(k, p, " "); if (p[2] == "count" && v[k] > 0) printf "COLD first_token_from %-6s mean_ms %.1f over %d\n", p[1], 1000 * v[p[1] " sum"] / v[k], v[k] } }' \
	"$WORK/metrics.txt" | sort | tee -a "$WORK/report.txt"
STATUS=0
