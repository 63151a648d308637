# GPU checks: include from the top-level Makefile (include scripts/gpu-check.mk).
# `make gpu-check` checks the kernels' syntax with clang (when installed), and
# compiles them with NVRTC for sm_90a when `make cuda-local` has put CUDA
# 12.4's NVRTC in .cache/cuda-local, then builds the tagged test binaries here
# (CGO_ENABLED=0) into bin/gpu; run them on the GPU machine with
#   bash scripts/gpu-check.sh --on-device        (carry bin/gpu)
.PHONY: gpu-check gpu-check-device kernels-check cuda-local
gpu-check: kernels-check
	bash scripts/gpu-check.sh

gpu-check-device:
	bash scripts/gpu-check.sh --on-device

kernels-check:
	bash scripts/kernels-check.sh

cuda-local:
	bash scripts/cuda-local.sh
