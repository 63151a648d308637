#!/usr/bin/env bash
# cuda-local.sh: a CUDA 12.4 NVRTC, ptxas and cuobjdump on this machine (no
# GPU, no install), from Debian trixie's non-free packages, so kernels compile
# for sm_90a and their SASS can be read here:
#
#   bash scripts/cuda-local.sh [DIR]          # default .cache/cuda-local (git-ignored)
#   CUDA_HOME=DIR bin/gpu/peftd kernels --arch 9.0 --dir /tmp/k   # NVRTC for sm_90a
#   CUDA_HOME=DIR bash scripts/sass.sh fp8_wg_n64                 # SASS opcode counts
#   CUDA_HOME=DIR bash scripts/kernels-check.sh                   # + NVRTC builds of every macro
#
# The device runs CUDA 13.0: its NVRTC may schedule differently, so SASS read
# here is a guide and a compile check (wgmma, e4m3 asm), not the measured
# binary. Needs apt-get and ~1 GB of downloads once (the headers come in the
# 0.9 GB nvidia-cuda-dev package; only include/ is kept: ~160 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.cache/cuda-local}
VER=12.4.127~12.4.1-2
TOOLVER=12.4.131~12.4.1-2
if [[ -x $DIR/bin/ptxas && -f $DIR/lib64/libnvrtc.so.12 && -f $DIR/include/cuda_bf16.h ]]; then
	echo "cuda-local: $DIR is ready (CUDA_HOME=$DIR)"
	exit 0
fi
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat >"$work/trixie.sources" <<SRC
Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main contrib non-free
SRC
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/debs" "$work/x"
A=(-o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts=/dev/null -o "Dir::Etc::sourcelist=$work/trixie.sources"
	-o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o APT::Sandbox::User=root)
apt-get "${A[@]}" update >/dev/null
(cd "$work/debs" && apt-get "${A[@]}" download "nvidia-cuda-toolkit=$TOOLVER" "libnvrtc12=$VER" "libnvrtc-builtins12.4=$VER" "nvidia-cuda-dev=$VER" >/dev/null)
for d in "$work"/debs/nvidia-cuda-toolkit_*.deb "$work"/debs/libnvrtc*.deb; do dpkg-deb -x "$d" "$work/x"; done
mkdir -p "$DIR/bin" "$DIR/lib64"
cp "$work"/x/usr/bin/{ptxas,cuobjdump,nvdisasm} "$DIR/bin/"
cp -a "$work"/x/usr/lib/x86_64-linux-gnu/libnvrtc* "$DIR/lib64/"
ln -sf libnvrtc.so.12 "$DIR/lib64/libnvrtc.so"
rm -rf "$DIR/include"
dpkg-deb --fsys-tarfile "$work"/debs/nvidia-cuda-dev_*.deb | tar -x -C "$work/x" ./usr/include
mv "$work/x/usr/include" "$DIR/include"
echo "cuda-local: CUDA 12.4 NVRTC, ptxas, cuobjdump and headers in $DIR (CUDA_HOME=$DIR)"
