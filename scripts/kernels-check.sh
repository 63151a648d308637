#!/usr/bin/env bash
# Syntax and type check of the CUDA kernels (kernels/*.cu) without a GPU or
# a CUDA toolkit: clang in CUDA device mode against the declarations in
# scripts/cudastub/ (keywords, built-ins and the intrinsics the kernels
# use). It catches what would otherwise fail only in NVRTC on the device.
# Skips (exit 0) when clang is not installed: apt-get install clang.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v clang >/dev/null; then
	echo "kernels-check: clang not found, skipped (apt-get install clang)"
	exit 0
fi
status=0
check() { # file, then NVRTC-style options
	clang -x cuda --cuda-device-only --cuda-gpu-arch=sm_80 -nocudainc -nocudalib -std=c++17 \
		-include scripts/cudastub/cuda_prelude.h -I scripts/cudastub -fsyntax-only -Wno-unknown-cuda-version "$@"
}
for f in kernels/*.cu; do
	if check "$f"; then
		echo "kernels-check: $f OK"
	else
		status=1
	fi
	# each experiment macro (#ifdef PEFTD_..., switched on by
	# $PEFTD_KERNEL_DEFINES at run time) must compile too
	for d in $(grep -h '^#if' "$f" kernels/common.cuh | grep -o 'PEFTD_[A-Z0-9_]*' | sort -u); do
		if check "$f" "-D$d"; then
			echo "kernels-check: $f -D$d OK"
		else
			status=1
		fi
	done
done
# With a CUDA 12+ NVRTC here (scripts/cuda-local.sh, or CUDA_HOME), every
# module is also compiled as the device does (NVRTC, then ptxas) for sm_90a
# and sm_80, plain and with each macro: the inline PTX (wgmma, e4m3) is
# assembled, which clang does not check.
CH=${CUDA_HOME:-}
[[ -z $CH && -f .cache/cuda-local/lib64/libnvrtc.so.12 ]] && CH=.cache/cuda-local
if [[ -n $CH ]] && compgen -G "$CH/lib64/libnvrtc.so.1[2-9]*" >/dev/null; then
	CH=$(cd "$CH" && pwd)
	tmp=$(mktemp -d)
	trap 'rm -rf "$tmp"' EXIT
	if go build -o "$tmp/peftd" ./cmd/peftd; then
		for d in "" $(grep -h '^#if' kernels/*.cu kernels/common.cuh | grep -o 'PEFTD_[A-Z0-9_]*' | sort -u | sed 's/^/-D/'); do
			if out=$(CUDA_HOME=$CH PEFTD_KERNEL_DEFINES="$d" "$tmp/peftd" kernels --arch 9.0,8.0 --dir "$tmp/k" 2>&1); then
				echo "kernels-check: NVRTC sm_90a, sm_80 ${d:-(no macro)} OK"
			else
				echo "kernels-check: NVRTC ${d:-(no macro)} FAILED"; echo "$out" | tail -20
				status=1
			fi
			rm -rf "$tmp/k"
		done
	else
		status=1
	fi
else
	echo "kernels-check: no CUDA 12+ NVRTC (bash scripts/cuda-local.sh), NVRTC builds skipped"
fi
exit $status
