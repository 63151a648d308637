# Helpers shared by scripts/soak.sh and scripts/cold.sh (sourced): a local
# S3 server (versitygw, posix backend), loopback ports, stopping a server.
#
# Needs: AK, SK, REGION set by the caller (versitygw's root credentials).

# s3 CURL_ARGS...: curl with SigV4 against the local S3 server.
s3() {
	curl -sS --fail-with-body --aws-sigv4 "aws:amz:$REGION:s3" --user "$AK:$SK" \
		-H "x-amz-content-sha256: UNSIGNED-PAYLOAD" "$@"
}

# listening HOST:PORT: true once something accepts connections there.
listening() { (exec 3<>"/dev/tcp/${1%:*}/${1##*:}") 2>/dev/null; }

# free_port: a loopback port nothing listens on.
free_port() {
	local p
	for _ in $(seq 50); do
		p=$((20000 + RANDOM % 40000))
		listening "127.0.0.1:$p" || { echo "$p"; return 0; }
	done
	return 1
}

# stop_pid PID: stops a process (TERM, up to 30 s, then KILL); nothing if
# PID is empty or gone.
stop_pid() {
	local pid="$1"
	[ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
	kill "$pid"
	for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
	kill -9 "$pid" 2>/dev/null
	return 0
}

# find_vgw [PREFERRED]: the first versitygw binary (or gzip of one) among
# PREFERRED, $PEFTD_VERSITYGW, PATH, .cache/bin and GOPATH/bin.
find_vgw() {
	local c root
	root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
	for c in "${1:-}" "${PEFTD_VERSITYGW:-}" "$(command -v versitygw || true)" "$root/.cache/bin/versitygw" \
		"$(go env GOPATH 2>/dev/null || true)/bin/versitygw"; do
		if [ -n "$c" ] && { [ -x "$c" ] || { [ "${c%.gz}" != "$c" ] && [ -f "$c" ]; }; }; then echo "$c"; return 0; fi
	done
	return 1
}

# vgw_start WORK: runs versitygw ($VGW and $S3ADDR from WORK/s3.env) on the
# folder WORK/s3 and waits until it listens.
vgw_start() {
	local work="$1"
	# shellcheck disable=SC1091
	. "$work/s3.env"
	"$VGW" --port "$S3ADDR" --access "$AK" --secret "$SK" --region "$REGION" --quiet posix "$work/s3" \
		>>"$work/versitygw.log" 2>&1 &
	echo $! >"$work/versitygw.pid"
	for _ in $(seq 200); do
		if listening "$S3ADDR"; then return 0; fi
		kill -0 "$(cat "$work/versitygw.pid")" 2>/dev/null || break
		sleep 0.1
	done
	echo "$(basename "$0"): versitygw did not start on $S3ADDR:" >&2
	tail -20 "$work/versitygw.log" >&2
	return 1
}

# vgw_stop WORK: kills versitygw and waits until it is gone.
vgw_stop() {
	local work="$1" pid
	[ -f "$work/versitygw.pid" ] || return 0
	pid="$(cat "$work/versitygw.pid")"
	rm -f "$work/versitygw.pid"
	kill "$pid" 2>/dev/null || return 0
	for _ in $(seq 100); do
		kill -0 "$pid" 2>/dev/null || return 0
		sleep 0.1
	done
	kill -9 "$pid" 2>/dev/null || true
}

# vgw_setup WORK VGW: unpacks a gzipped VGW into WORK, picks a port, starts
# versitygw on WORK/s3 (S3ADDR is set after it).
vgw_setup() {
	local work="$1"
	VGW="$2"
	if [ "${VGW%.gz}" != "$VGW" ]; then
		gzip -dc "$VGW" >"$work/versitygw" && chmod +x "$work/versitygw"
		VGW="$work/versitygw"
	fi
	S3ADDR="127.0.0.1:$(free_port)"
	mkdir -p "$work/s3"
	printf 'VGW=%q\nS3ADDR=%q\n' "$VGW" "$S3ADDR" >"$work/s3.env"
	vgw_start "$work"
}
