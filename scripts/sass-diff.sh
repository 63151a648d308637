#!/usr/bin/env bash
# sass-diff.sh REV [DEFINES]: which kernels compile differently in the
# working tree than at REV: every module built for sm_90a with the local
# CUDA 12.4 NVRTC (scripts/cuda-local.sh) at both, SASS compared function by
# function (addresses, encodings and the padding after them dropped: a
# module that grew pads its listing wider). "same" for every kernel a
# device run measured means the submitted tree runs that measured code
# (with this NVRTC; the device's is 13.0). DEFINES: PEFTD_KERNEL_DEFINES
# for both builds. NVRTC 12.4 is not quite deterministic here: a kernel
# whose source did not change has shown a few lines of difference
# (sgmv_expand_tc4: operand order, register names) in some runs and none
# in others, so rerun before reading a small difference as a change. Nor
# does it compile the e4m3 mma.sync (emulated on sm_90) as the device's
# 13.0 does: fp8_gemv_seg's local SASS keeps only the last K chunk's
# product (PERFORMANCE v0.46), so "same" there says the source did not
# change, not what the device runs. SASS_KEEP=DIR copies both trees' SASS
# (DIR/old.f, DIR/new.f: one file a function) there before cleaning up.
set -euo pipefail
cd "$(dirname "$0")/.."
rev=${1:?usage: sass-diff.sh REV [DEFINES]}
CH=${CUDA_HOME:-.cache/cuda-local}
[[ -f $CH/lib64/libnvrtc.so.12 ]] || { echo "sass-diff: no NVRTC in $CH (bash scripts/cuda-local.sh)"; exit 2; }
CH=$(cd "$CH" && pwd)
tmp=$(mktemp -d)
trap 'git worktree remove --force "$tmp/wt" 2>/dev/null || true; [[ -n ${SASS_KEEP:-} ]] && mkdir -p "$SASS_KEEP" && cp -r "$tmp/old.f" "$tmp/new.f" "$SASS_KEEP"/; rm -rf "$tmp"' EXIT
git worktree add -q "$tmp/wt" "$rev"
(cd "$tmp/wt" && go build -o "$tmp/old" ./cmd/peftd)
go build -o "$tmp/new" ./cmd/peftd
for v in old new; do
	mkdir -p "$tmp/$v.k" "$tmp/$v.f"
	CUDA_HOME=$CH PEFTD_KERNEL_DEFINES="${2:-}" "$tmp/$v" kernels --arch 9.0 --dir "$tmp/$v.k" >/dev/null
	for c in "$tmp/$v.k"/*.cubin; do
		"$CH/bin/cuobjdump" -sass "$c" | sed -E 's@/\*[0-9a-f]{4,}\*/@@; s@/\* 0x[0-9a-f]+ \*/@@; s/[[:space:]]+$//; /^\s*$/d' |
			awk -v d="$tmp/$v.f" '/Function : /{fn=$3} fn!=""{print > (d "/" fn)}'
	done
done
for f in $(ls "$tmp/old.f" "$tmp/new.f" | grep -v : | sort -u); do
	if [[ ! -f $tmp/old.f/$f ]]; then echo "$f new"
	elif [[ ! -f $tmp/new.f/$f ]]; then echo "$f removed"
	elif cmp -s "$tmp/old.f/$f" "$tmp/new.f/$f"; then echo "$f same"
	else echo "$f differs ($(diff "$tmp/old.f/$f" "$tmp/new.f/$f" | grep -c '^[<>]') lines)"; fi
done
