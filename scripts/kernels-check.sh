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
for f in kernels/*.cu; do
	if clang -x cuda --cuda-device-only --cuda-gpu-arch=sm_80 -nocudainc -nocudalib -std=c++17 \
		-include scripts/cudastub/cuda_prelude.h -I scripts/cudastub -fsyntax-only -Wno-unknown-cuda-version "$f"; then
		echo "kernels-check: $f OK"
	else
		status=1
	fi
done
exit $status
