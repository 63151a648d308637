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
exit $status
